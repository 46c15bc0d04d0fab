"""Metrics and traces: one OpenTelemetry MeterProvider and TracerProvider per process.

Metrics go to a Prometheus registry served at /metrics (each attention and expert
process on its own port, which the endpoint directory lists; the front door's /metrics
gathers them all) and, when configured, to an OTLP collector with the traces.

The services report through the OpenTelemetry API (spans, the expert RPC histograms)
and through stats objects they own (routing counts, wire bytes, busy time), which the
deployments register here and which are read only when /metrics is collected. `init`
installs this process's providers as the API's global ones.

Names follow the GenAI semantic conventions where they exist, with their bucket
boundaries; the rest are ours, under `moe_serve.`. On /metrics a name reads with
underscores, a unit suffix and `_total` on counters, e.g. `moe_serve_router_routed_tokens_total`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections import Counter
from typing import Callable, Iterable

import msgspec
import prometheus_client
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from mixtral.config import ConfigError

log = logging.getLogger("moe-serve.telemetry")

# The GenAI conventions' advisory boundaries.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]


class TelemetrySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Each attention and expert process serves Prometheus /metrics on this port (0: a free
    # one, found through the endpoint directory); the front door's /metrics gathers them all.
    metrics_port: int = 0
    # OTLP/gRPC collector for metrics and traces, e.g. http://otel-collector:4317; unset: none.
    otlp_endpoint: str | None = None
    # TLS to the collector: unset follows the endpoint's scheme (https:// is TLS, http:// is not).
    otlp_insecure: bool | None = None
    # PEM files for TLS: the CA to verify the collector with (unset: the system's roots), and
    # a client certificate and key where the collector demands one (mTLS).
    otlp_ca_file: str | None = None
    otlp_client_cert_file: str | None = None
    otlp_client_key_file: str | None = None
    # Fraction of requests traced (parent-based: an expert RPC follows its request's choice).
    trace_sample_ratio: float = 0.01
    # Also write finished spans as JSON lines to <trace_dir>/spans-<pid>.jsonl (for debugging).
    trace_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ConfigError(f"trace_sample_ratio must be in [0, 1], got {self.trace_sample_ratio}")
        if (self.otlp_client_cert_file is None) != (self.otlp_client_key_file is None):
            raise ConfigError("otlp_client_cert_file and otlp_client_key_file go together")

    def otlp_exporter_args(self) -> dict:
        """endpoint, insecure and credentials for the OTLP/gRPC exporters."""
        if self.otlp_insecure is True:
            return {"endpoint": self.otlp_endpoint, "insecure": True}
        if self.otlp_insecure is None and not (self.otlp_endpoint or "").startswith("https://"):
            return {"endpoint": self.otlp_endpoint, "insecure": True}
        import grpc

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        return {"endpoint": self.otlp_endpoint, "insecure": False, "credentials": grpc.ssl_channel_credentials(
            read(self.otlp_ca_file), read(self.otlp_client_key_file), read(self.otlp_client_cert_file))}


class Telemetry:
    """This process's providers, instruments and /metrics server."""

    def __init__(self, service: str, spec=None):
        spec = spec or TelemetrySpec()
        self.service, self.spec = service, spec
        resource = Resource.create({"service.name": f"moe-serve-{service}", "service.instance.id": str(os.getpid())})
        self.registry = prometheus_client.CollectorRegistry()
        readers = [PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)]
        self.tracer_provider = TracerProvider(resource=resource,
                                              sampler=ParentBased(TraceIdRatioBased(spec.trace_sample_ratio)))
        if spec.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(**spec.otlp_exporter_args())))
            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**spec.otlp_exporter_args())))
        if spec.trace_dir:
            os.makedirs(spec.trace_dir, exist_ok=True)
            out = open(os.path.join(spec.trace_dir, f"spans-{os.getpid()}.jsonl"), "a", buffering=1)
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
                out=out, formatter=lambda s: json.dumps(json.loads(s.to_json())) + "\n")))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.meter = self.meter_provider.get_meter("moe-serve")
        self.tracer = self.tracer_provider.get_tracer("moe-serve")
        self.url: str | None = None
        m = self.meter
        # Front door: the GenAI server conventions.
        self.ttft = m.create_histogram("gen_ai.server.time_to_first_token", "s", "Time to the first output token",
                                       explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.tpot = m.create_histogram("gen_ai.server.time_per_output_token", "s",
                                       "Time per output token after the first",
                                       explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self.duration = m.create_histogram("gen_ai.server.request.duration", "s", "Request duration",
                                           explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.token_usage = m.create_histogram("gen_ai.client.token.usage", "{token}",
                                              "Input and output tokens per request",
                                              explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.requests = m.create_counter("moe_serve.requests", "{request}", "Requests by outcome")
        # Attention side. The expert RPC histograms are the transport's own
        # (attention_service.grpc_transport.RpcInstruments), made through the API.
        self.replicas = m.create_gauge("moe_serve.expert.replicas", "{replica}",
                                       "Expert group replicas: current (live, as attention sees them) and target")
        self.routed_rate = m.create_gauge("moe_serve.router.routed_tokens_rate", "{token}/s",
                                          "Routed (token, expert) pairs per second per group, last window")
        self.kv_usage = m.create_gauge("moe_serve.kv_cache.usage", "1", "Fraction of KV cache blocks in use")
        self.running = m.create_gauge("moe_serve.requests.running", "{request}", "Requests in the running batch")
        self.waiting = m.create_gauge("moe_serve.requests.waiting", "{request}", "Requests waiting to start")
        # Expert side.
        self.busy = m.create_gauge("moe_serve.expert.busy", "1", "Fraction of wall time an expert replica "
                                   "computed (on CPU: the CPU time its compute got)")

        # Counts kept by the data path in plain Python and torch, read only at collection time,
        # so a step or an RPC pays nothing for them. Sources register themselves here.
        self.routing_sources: weakref.WeakSet = weakref.WeakSet()    # router.routing_stats.RoutingStats
        self.wire_sources: weakref.WeakSet = weakref.WeakSet()       # grpc_transport.WireStats
        self.busy_sources: weakref.WeakSet = weakref.WeakSet()       # objects with .busy_seconds, .pairs, .labels
        self.engine_sources: weakref.WeakSet = weakref.WeakSet()     # attention_service.engine.Engine
        self._observe_counter("moe_serve.router.routed_tokens", "{token}",
                              "Routed (token, expert) pairs, per layer, expert and group", self._routed)
        self._observe_counter("moe_serve.wire.bytes", "By", "Expert RPC message bytes, per group and direction",
                              self._wire)
        self._observe_counter("moe_serve.expert.busy_time", "s", "Seconds an expert replica spent computing",
                              lambda: [(s.busy_seconds, s.labels) for s in list(self.busy_sources)])
        self._observe_counter("moe_serve.expert.pairs", "{pair}", "(token, expert) pairs an expert replica computed",
                              lambda: [(s.pairs, s.labels) for s in list(self.busy_sources)])
        for field, unit, what in (("queried_tokens", "{token}", "Prompt tokens looked up in the prefix cache"),
                                  ("hit_tokens", "{token}", "Prompt tokens whose KV came from the prefix cache"),
                                  ("queried_blocks", "{block}", "Full prompt blocks looked up in the prefix cache"),
                                  ("hit_blocks", "{block}", "Full prompt blocks found in the prefix cache"),
                                  ("evictions", "{block}", "Cached KV blocks evicted to make room")):
            self._observe_counter(f"moe_serve.prefix_cache.{field}", unit, what,
                                  lambda f=field: [(sum(getattr(e.prefix_stats, f) for e in list(self.engine_sources)),
                                                    {})])
        self._observe_counter("moe_serve.preemptions", "{sequence}",
                              "Running sequences preempted for KV cache room (recomputed later)",
                              lambda: [(sum(e.num_preemptions for e in list(self.engine_sources)), {})])

    def _observe_counter(self, name: str, unit: str, description: str,
                         fn: Callable[[], Iterable[tuple[float, dict]]]) -> None:
        def callback(_: CallbackOptions):
            return [Observation(v, a) for v, a in fn()]
        self.meter.create_observable_counter(name, [callback], unit, description)

    def _routed(self):
        total: Counter = Counter()
        for r in list(self.routing_sources):
            counts, groups = r.snapshot().tolist(), r.group_of.tolist()
            for layer, row in enumerate(counts):
                for expert, n in enumerate(row):
                    total[(layer, expert, groups[layer][expert])] += n
        return [(n, {"layer": str(l), "expert": str(e), "group": str(g)}) for (l, e, g), n in total.items()]

    def _wire(self):
        total: Counter = Counter()
        for w in list(self.wire_sources):
            total.update(dict(w.per_group_bytes))
        return [(n, {"group": str(g), "direction": d}) for (g, d), n in total.items()]

    def serve_metrics(self, host: str = "0.0.0.0", port: int | None = None) -> str:
        """Serve /metrics on a port of this process (0: a free one); -> its URL."""
        port = self.spec.metrics_port if port is None else port
        server, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{server.server_address[1]}/metrics"
        return self.url

    def text(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


_lock = threading.Lock()
_current: Telemetry | None = None


def init(service: str, spec=None) -> Telemetry:
    """This process's telemetry, made on first call; later calls return the same."""
    global _current
    with _lock:
        if _current is None:
            _current = Telemetry(service, spec)
            # The data path makes its spans and instruments through the OpenTelemetry API
            # (get_tracer / get_meter); from here on they land on these providers.
            trace.set_tracer_provider(_current.tracer_provider)
            metrics.set_meter_provider(_current.meter_provider)
        return _current


def get() -> Telemetry:
    """The process's telemetry; a default one (no export but /metrics text) if none was set up."""
    return _current or init("process")


def inject(context: otel_context.Context | None = None) -> dict[str, str]:
    """A trace context (default: the current one) as W3C headers, for gRPC metadata and handle calls."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(carrier: dict[str, str] | Iterable[tuple[str, str]] | None) -> otel_context.Context:
    if not carrier:
        return otel_context.Context()
    return propagate.extract(dict(carrier))
