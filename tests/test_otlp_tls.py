"""Traces reach an OTLP collector over TLS (and mTLS) when the telemetry config says so: a real
gRPC collector with real certificates."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc
from pki import make_pki

from cluster.observe.telemetry import Telemetry, TelemetrySpec
from mixtral.config import ConfigError


class Collector(tgrpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list[str] = []

    def Export(self, request, context):
        self.spans += [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return tpb.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("otlp-pki")
    return make_pki(out, "collector", ["localhost"]), make_pki(out, "client", ["moe-serve"])


def _collector(creds: grpc.ServerCredentials | None):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    collector = Collector()
    tgrpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_secure_port("localhost:0", creds) if creds else server.add_insecure_port("localhost:0")
    server.start()
    return server, collector, port


def _send(spec: TelemetrySpec, name: str, wait_ms: int = 10_000) -> None:
    tel = Telemetry("otlp-test", spec)
    tel.tracer.start_span(name).end()
    tel.tracer_provider.force_flush(wait_ms)
    tel.tracer_provider.shutdown()
    tel.meter_provider.shutdown()


def test_traces_reach_a_tls_collector_and_an_mtls_one(certs, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")        # the refused exports give up sooner
    (ca, cert, key), (client_ca, client_cert, client_key) = certs
    read = lambda p: p.read_bytes()                                                     # noqa: E731
    server, collector, port = _collector(grpc.ssl_server_credentials([(read(key), read(cert))]))
    try:
        _send(TelemetrySpec(otlp_endpoint=f"https://localhost:{port}", otlp_ca_file=str(ca), trace_sample_ratio=1),
              "over-tls")
        _send(TelemetrySpec(otlp_endpoint=f"https://localhost:{port}", trace_sample_ratio=1), "untrusted", 1000)
    finally:
        server.stop(None)
    assert collector.spans == ["over-tls"]          # the system's roots do not know this CA: nothing sent
    mutual = grpc.ssl_server_credentials([(read(key), read(cert))], root_certificates=read(client_ca),
                                         require_client_auth=True)
    server, collector, port = _collector(mutual)
    try:
        _send(TelemetrySpec(otlp_endpoint=f"https://localhost:{port}", otlp_ca_file=str(ca),
                            otlp_client_cert_file=str(client_cert), otlp_client_key_file=str(client_key),
                            trace_sample_ratio=1), "over-mtls")
        _send(TelemetrySpec(otlp_endpoint=f"https://localhost:{port}", otlp_ca_file=str(ca), trace_sample_ratio=1),
              "no-client-cert", 1000)
    finally:
        server.stop(None)
    assert collector.spans == ["over-mtls"]


def test_plaintext_follows_the_scheme_unless_told():
    server, collector, port = _collector(None)
    try:
        _send(TelemetrySpec(otlp_endpoint=f"http://localhost:{port}", trace_sample_ratio=1), "plain")
    finally:
        server.stop(None)
    assert collector.spans == ["plain"]
    assert TelemetrySpec(otlp_endpoint="http://c:4317", otlp_insecure=False).otlp_exporter_args()["insecure"] is False
    assert TelemetrySpec(otlp_endpoint="https://c:4317", otlp_insecure=True).otlp_exporter_args()["insecure"] is True
    with pytest.raises(ConfigError, match="go together"):
        TelemetrySpec(otlp_client_cert_file="c.pem")
