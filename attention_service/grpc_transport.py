"""Expert groups over gRPC: the attention side's client for ExpertShard.

Per layer, one batch per expert group touched (more when a group's rows are spread over
several replicas), all in flight at once. Each batch travels on the long-lived
ForwardStream this process keeps to each replica (one per connection,
attention_service/shard_stream.py), matched to its result by batch id: a call per batch
costs several times more at these message sizes (docs/wire.md). Tensors go through the
codec's fast path: one copy into the request bytes, none out of the reply, and a
DeviceCopier on each side moves them between host memory and the device (the results
land on the device of the hidden state sent).
With `wire_dtype="fp8"` the rows travel as e4m3 with one scale per row (protos/wire_fp8.py).

A replica that fails (connection lost, deadline passed, a batch it could not compute) is
set aside for `retry_after` seconds and its rows are sent to another replica of the
group; the step, and so every request in it, goes on with the same result. A group with
no live replica fails the step with an error that names it. A batch the shard refuses
(INVALID_ARGUMENT) is not a replica failure and is raised at once.
"""

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch
from opentelemetry import metrics, propagate, trace

from attention_service.errors import ExpertGroupUnavailable
from attention_service.shard_stream import Replica, ShardCallError
from protos import codec
from protos import expert_pb2 as pb
from protos.channel import INFO, REVISION
from protos.device_copy import DeviceCopier
from protos.shard_access import ShardAccess, open_channel
from protos.wire_fp8 import quantize_rows
from router.dispatch import GroupBatch, Placement

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# Expert RPCs are sub-millisecond on GPUs and tens of milliseconds on a busy CPU.
RPC_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
WIRE_DTYPES = ("model", "fp8")


@dataclass(frozen=True)
class RpcInstruments:
    """The per-RPC histograms, made on a meter (the process's, through the OpenTelemetry API)."""

    duration: metrics.Histogram
    rows: metrics.Histogram

    @classmethod
    def on(cls, meter: metrics.Meter) -> "RpcInstruments":
        return cls(meter.create_histogram("moe_serve.expert.rpc.duration", "s",
                                          "Expert Forward RPC round trip, per group and replica",
                                          explicit_bucket_boundaries_advisory=RPC_BUCKETS),
                   meter.create_histogram("moe_serve.expert.batch.rows", "{row}",
                                          "Token rows per expert RPC, per group and replica",
                                          explicit_bucket_boundaries_advisory=ROWS_BUCKETS))


_rpc = RpcInstruments.on(metrics.get_meter(__name__))

_REPLICA_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass(eq=False)
class WireStats:
    """What crossed the wire; the benchmark and telemetry read it."""

    rpcs: int = 0
    rows: int = 0
    rpc_seconds: float = 0.0
    failovers: int = 0
    per_replica_rows: collections.Counter = field(default_factory=collections.Counter)
    per_group_bytes: collections.Counter = field(default_factory=collections.Counter)  # (group, "sent" | "received")

    @property
    def bytes_sent(self) -> int:
        return sum(n for (_, d), n in self.per_group_bytes.items() if d == "sent")

    @property
    def bytes_received(self) -> int:
        return sum(n for (_, d), n in self.per_group_bytes.items() if d == "received")


class GrpcTransport:
    def __init__(self, groups: list[list[str]], timeout: float = 30.0, retry_after: float = 5.0,
                 min_rows_per_replica: int = 32, wire_dtype: str = "model", connections: int = 1,
                 access: ShardAccess | None = None):
        """groups[g]: the addresses of group g's replicas. wire_dtype: "model" (rows travel in
        the model's dtype) or "fp8" (e4m3 with a scale per row; results still in the model's).
        connections: TCP connections per replica, for links one connection does not fill.
        access: what to present to the shards (the app's token, TLS, message caps)."""
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self.connections, self.access = connections, access
        self.replicas: list[list[Replica]] = [[Replica.open(a, connections, access) for a in addrs]
                                              for addrs in groups]
        self.timeout, self.retry_after, self.min_rows = timeout, retry_after, min_rows_per_replica
        self.fp8 = wire_dtype == "fp8"
        self.stats = WireStats()
        self._ids = itertools.count()
        self._copiers: dict[torch.device, DeviceCopier] = {}
        # One rotation per (group, layer): with one shared counter, or one per group, the
        # RPCs of a step take turns in a fixed order, so with as many replicas as layers a
        # replica would always get the same layer, and layers differ in how many rows they route.
        self._turns: dict[tuple[int, int], itertools.count] = collections.defaultdict(itertools.count)

    def set_replicas(self, group: int, addresses: list[str]) -> None:
        """Follow the endpoint directory: keep known replicas, open new ones, drop the gone."""
        known = {r.address: r for r in self.replicas[group]}
        self.replicas[group] = [known.pop(a, None) or Replica.open(a, self.connections, self.access)
                                 for a in addresses]
        for gone in known.values():
            asyncio.ensure_future(gone.close(grace=self.timeout))

    def live(self, group: int) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas[group] if r.down_until <= now]

    def _copier(self, device: torch.device) -> DeviceCopier:
        if device not in self._copiers:
            self._copiers[device] = DeviceCopier(device)
        return self._copiers[device]

    async def forward(self, layer: int, y: torch.Tensor, batches: list[GroupBatch]) -> list[torch.Tensor]:
        """y [T, D]; for each batch its partial sums [R, D], on y's device in the shards' dtype."""
        calls = [self._group(layer, y, b) for b in batches]
        return await asyncio.gather(*calls)

    async def _group(self, layer: int, y: torch.Tensor, b: GroupBatch) -> torch.Tensor:
        """One group's rows, spread over its live replicas (and their connections) in contiguous slices."""
        if not self.replicas[b.group]:
            raise ExpertGroupUnavailable(f"expert group {b.group} has no replica")
        live = self.live(b.group) or self.replicas[b.group]   # all set aside: try them anyway, once more
        R = len(b.rows)
        n = max(1, min(len(live) * self.connections, R // self.min_rows))
        first = next(self._turns[(b.group, layer)])
        bounds = [R * i // n for i in range(n + 1)]
        parts = [self._slice(layer, y, b, bounds[i], bounds[i + 1], live[(first + i) % len(live)])
                 for i in range(n)]
        outs = await asyncio.gather(*parts)
        return outs[0] if n == 1 else torch.cat(outs)

    async def _request(self, layer: int, y: torch.Tensor, b: GroupBatch, s: int, e: int,
                       carrier: dict | None) -> tuple[int, bytes]:
        """Gather (and quantize) the slice's rows on y's device, copy them to the host, pack."""
        # A batch of all the step's rows (one group, one replica) needs no gather on the host,
        # where a gather is a copy of the rows; rows are sorted and unique, so their count says it.
        rows = y if e - s == y.shape[0] and y.device.type == "cpu" else y[b.rows[s:e]]
        tensors = dict(zip(("hidden", "hidden_scale"), quantize_rows(rows))) if self.fp8 else {"hidden": rows}
        tensors |= {"expert_ids": b.expert_ids[s:e], "weights": b.weights[s:e]}
        host = await self._copier(y.device).to_host(*tensors.values())
        batch_id = next(self._ids)
        msg = pb.ExpertBatch(batch_id=batch_id, layer=layer, trace_context=carrier)
        return batch_id, codec.pack(msg, **dict(zip(tensors, host)))

    async def _slice(self, layer: int, y: torch.Tensor, b: GroupBatch, s: int, e: int,
                     replica: Replica) -> torch.Tensor:
        # One client span covers the slice, failovers included; its context rides in the batch.
        span, carrier = self._span(layer, b.group, e - s)
        tried = []
        try:
            batch_id, request = await self._request(layer, y, b, s, e, carrier)
            while True:
                tried.append(replica.address)
                t0 = time.perf_counter()
                try:
                    msg, tensors = await replica.forward(batch_id, request, self.timeout)
                    break
                except ShardCallError as err:
                    if span is not None:
                        span.add_event("replica failed", {"server.address": replica.address,
                                                          "rpc.grpc.status_code": err.code.name})
                    if err.code not in _REPLICA_FAILURES:
                        raise RuntimeError(f"expert group {b.group} at {replica.address} refused layer {layer} "
                                           f"batch: {err}") from None
                    replica.down_until = time.monotonic() + self.retry_after
                    self.stats.failovers += 1
                    log.warning("expert replica %s of group %d failed (%s); retrying elsewhere",
                                replica.address, b.group, err)
                    others = [r for r in self.live(b.group) if r.address not in tried]
                    if not others:
                        raise ExpertGroupUnavailable(f"expert group {b.group} has no live replica "
                                                     f"(tried {', '.join(tried)})") from None
                    replica = others[0]
            seconds = time.perf_counter() - t0
            if "output" not in tensors:
                raise RuntimeError(f"expert group {b.group} at {replica.address} answered layer {layer} "
                                   f"batch {batch_id} without an output")
            host_out = tensors["output"]
            out, = await self._copier(y.device).to_device(host_out)
        except Exception as err:
            if span is not None:
                span.set_status(trace.StatusCode.ERROR, type(err).__name__)
                span.end()
            raise
        if span is not None:
            span.set_attributes({"server.address": replica.address,
                                 "moe_serve.expert.compute_seconds": msg.compute_seconds})
            span.end()
        st = self.stats
        st.rpcs += 1
        st.rows += e - s
        st.rpc_seconds += seconds
        st.per_replica_rows[replica.address] += e - s
        st.per_group_bytes[(b.group, "sent")] += len(request)
        st.per_group_bytes[(b.group, "received")] += host_out.numel() * host_out.element_size()
        attrs = {"group": str(b.group), "replica": replica.address}
        _rpc.duration.record(seconds, attrs)
        _rpc.rows.record(e - s, attrs)
        return out

    def _span(self, layer: int, group: int, rows: int):
        """A client span for the slice and its context as W3C headers, when the step is traced."""
        if not trace.get_current_span().is_recording():
            return None, None
        span = _tracer.start_span(
            "moe_serve.expert.forward", kind=trace.SpanKind.CLIENT,
            attributes={"moe_serve.layer": layer, "moe_serve.group": group, "moe_serve.rows": rows,
                        "rpc.system": "grpc"})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for rs in self.replicas for r in rs))


async def discover(addresses: list[str], num_layers: int, num_experts: int, fingerprint: str | None = None,
                   timeout: float = 30.0, wire_dtype: str = "model", echo: bool = False,
                   access: ShardAccess | None = None) -> tuple[list[list[str]], Placement]:
    """Ask each shard what it holds: shards holding the same pairs are replicas of one group.

    Refuses shards serving another checkpoint than `fingerprint`, shards older than this
    client's contract revision or unable to take `wire_dtype`, echo shards (unless `echo`:
    they compute nothing), and layouts that leave a (layer, expert) pair unserved or serve
    one in two different groups.
    """
    async def info(address: str) -> pb.ShardInfo:
        async with open_channel(address, access) as ch:
            call = ch.unary_unary(INFO, request_serializer=pb.InfoRequest.SerializeToString,
                                  response_deserializer=pb.ShardInfo.FromString)
            try:
                return await call(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                raise ExpertGroupUnavailable(f"expert shard {address}: {err.code().name}: {err.details()}") from None

    infos = await asyncio.gather(*(info(a) for a in addresses))
    by_pairs: dict[tuple, list[str]] = {}
    for address, si in zip(addresses, infos):
        if fingerprint and si.checkpoint_fingerprint != fingerprint:
            raise ValueError(f"expert shard {address} serves checkpoint {si.checkpoint_fingerprint}, "
                             f"this model is {fingerprint}")
        if si.revision < REVISION:
            raise ValueError(f"expert shard {address} speaks revision {si.revision or 1} of the expert contract, "
                             f"this attention shard needs {REVISION}: upgrade the shard")
        if wire_dtype == "fp8" and pb.DTYPE_FLOAT8_E4M3 not in si.hidden_dtypes:
            raise ValueError(f"expert shard {address} does not take fp8 rows; set wire_dtype: model")
        if si.echo and not echo:
            raise ValueError(f"expert shard {address} is an echo shard (it computes nothing); "
                             "start it without --echo to serve")
        pairs = tuple(sorted((le.layer, e) for le in si.layers for e in le.experts))
        by_pairs.setdefault(pairs, []).append(address)
    placement = Placement.from_groups([list(p) for p in by_pairs], num_layers, num_experts)
    return list(by_pairs.values()), placement
