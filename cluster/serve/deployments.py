"""The Ray Serve deployments: thin wrappers that build the plain services and hand them work.

    Frontend (ingress: OpenAI HTTP, gRPC Generation) --handle, streaming--> Attention
    Attention --gRPC ExpertShard--> ExpertGroup-0 .. ExpertGroup-(G-1)

Each ExpertGroup replica runs an ExpertShard gRPC server on a free port and registers it
with the endpoint directory; Attention replicas follow the directory, and beat to it every
second with the expert replicas they reach (the front door's /ready). Both take the app's
shard token from the directory: shards demand it, attention replicas present it. The
deployment options (replicas, GPUs, resources) are bound in cluster/serve/builder.py,
nowhere else.
"""

import asyncio
import logging
import threading
import time

import ray
from ray import serve

from attention_service.async_engine import AsyncEngine
from attention_service.config import EngineConfig
from attention_service.grpc_transport import GrpcTransport
from attention_service.loader import open_engine
from attention_service.sampling_params import SamplingParams
from cluster.observe import telemetry
from cluster.observe.names import GROUP_PREFIX
from cluster.observe.telemetry import TelemetrySpec
from cluster.serve.app_config import GroupSpec
from cluster.serve.directory import get_directory
from expert_service.server import serve as serve_shard
from mixtral.checkpoint import Checkpoint
from protos.channel import DEFAULT_MAX_MESSAGE_BYTES
from protos.shard_access import ShardAccess, ShardTLS
from router.dispatch import Placement, group_pairs

log = logging.getLogger("ray.serve")


def _telemetry(service: str, spec: TelemetrySpec, host: str) -> telemetry.Telemetry:
    """This replica's telemetry and its /metrics server (registered in the directory by the caller)."""
    tel = telemetry.init(service, spec)
    tel.serve_metrics(host=host)
    return tel


class _Busy:
    """The fraction of wall time spent computing since the previous reading (on CPU: the CPU the
    compute got, see expert_service.server._cpu_busy)."""

    def __init__(self, servicer):
        self.servicer, self.last = servicer, (time.monotonic(), servicer.busy_seconds)

    def read(self) -> float:
        now, busy = time.monotonic(), self.servicer.busy_seconds
        t0, b0 = self.last
        self.last = (now, busy)
        return min(1.0, (busy - b0) / max(now - t0, 1e-6))


class ExpertGroup:
    """One replica of an expert group: an ExpertShard gRPC server, registered in the directory."""

    async def __init__(self, model: str, group: int, spec: GroupSpec, device: str, dtype: str, directory: str,
                       telemetry_spec: TelemetrySpec = TelemetrySpec(), tls: ShardTLS | None = None,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        host = ray.util.get_node_ip_address()
        self.telemetry = _telemetry("experts", telemetry_spec, host)
        self.directory = get_directory(directory)
        access = ShardAccess(await self.directory.shard_token.remote(), tls, max_message_bytes)
        self.shard, port = await serve_shard(model, spec.experts, spec.layers, port=0, host=host, device=device,
                                             dtype=dtype, shard_id=f"g{group}", group=group,
                                             max_message_bytes=max_message_bytes, access=access)
        self.group, self.address = group, f"{host}:{port}"
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.telemetry.busy_sources.add(self.shard.servicer)
        self.busy = _Busy(self.shard.servicer)
        await self._register()
        self._renew = asyncio.get_running_loop().create_task(self._keep_registered())

    async def _register(self) -> None:
        await self.directory.register.remote(self.group, self.replica, self.address)
        await self.directory.register_metrics.remote(f"expert-{self.group}-{self.replica}", self.telemetry.url)

    async def _keep_registered(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._register()
            except Exception:   # the directory restarts on failure; the next beat re-registers
                log.warning("expert group %d: directory unreachable", self.group)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's controller reads this every metrics interval: how busy this replica is."""
        busy = self.busy.read()
        self.telemetry.busy.set(busy, {"group": str(self.group), "replica": self.address})
        return {"busy": busy}

    def describe(self) -> dict:
        return {"group": self.group, "address": self.address, "node_id": ray.get_runtime_context().get_node_id()}

    async def check_health(self) -> None:
        if self.shard.servicer.draining:
            raise RuntimeError("draining")

    async def __del__(self):
        """Stop taking batches, finish the ones in flight, then go."""
        self._renew.cancel()
        try:
            await self.directory.unregister.remote(self.replica)
        finally:
            await self.shard.drain()


class Attention:
    """One attention shard: the engine, its KV cache, and gRPC clients of every expert group."""

    async def __init__(self, model: str, cfg: EngineConfig, groups: list[GroupSpec], directory: str,
                       telemetry_spec: TelemetrySpec = TelemetrySpec(), experts: list | None = None,
                       wait_for_experts_s: float = 300.0, expert_wait_s: float = 30.0, expert_timeout_s: float = 30.0,
                       tls: ShardTLS | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        # `experts` are the ExpertGroup deployments' handles: bound here so that Serve deploys
        # them with the app; the data path reaches them over gRPC, not through Serve.
        ckpt = Checkpoint(model)
        mc = ckpt.config
        placement = Placement.from_groups([group_pairs(g.experts, g.layers, mc.num_hidden_layers) for g in groups],
                                          mc.num_hidden_layers, mc.num_local_experts)
        self.telemetry = _telemetry("attention", telemetry_spec, ray.util.get_node_ip_address())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.directory = get_directory(directory)
        version, addresses = await self._wait_for_experts(len(groups), wait_for_experts_s)
        access = ShardAccess(await self.directory.shard_token.remote(), tls, max_message_bytes)
        self.transport = GrpcTransport([addresses.get(g, []) for g in range(len(groups))], timeout=expert_timeout_s,
                                       wire_dtype=cfg.wire_dtype, access=access)
        engine, tokenizer = open_engine(ckpt, cfg, self.transport, placement)
        self.engine = AsyncEngine(engine, tokenizer, expert_wait_s=expert_wait_s)
        self.routing = engine.routing
        self.telemetry.routing_sources.add(self.routing)
        self.telemetry.engine_sources.add(engine)
        self.telemetry.wire_sources.add(self.transport.stats)
        self.stats: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        self._follow = loop.create_task(self._follow_directory(version, len(groups)))
        self._report = loop.create_task(self._report_load(len(groups)))
        # The heartbeat has a thread of its own: a long step holds the event loop, but this
        # replica is alive all the same. It stops only with the process (or __del__).
        self._stop_beating = threading.Event()
        threading.Thread(target=self._beat, args=(len(groups),), daemon=True, name="attention-beat").start()

    def _beat(self, num_groups: int) -> None:
        """Every second: "alive, and reaching these expert replicas" to the directory (the
        front door's readiness, and how it knows at once that no attention replica is left)."""
        while not self._stop_beating.is_set():
            try:
                self.directory.attention_beat.remote(self.replica, [len(self.transport.live(g))
                                                                    for g in range(num_groups)])
            except Exception:
                log.warning("attention replica %s: directory unreachable", self.replica)
            self._stop_beating.wait(1.0)

    async def _wait_for_experts(self, num_groups: int, timeout: float):
        deadline = time.monotonic() + timeout
        version, addresses = await self.directory.snapshot.remote()
        while any(not addresses.get(g) for g in range(num_groups)):
            if time.monotonic() > deadline:
                missing = [g for g in range(num_groups) if not addresses.get(g)]
                raise RuntimeError(f"expert groups {missing} have no registered replica after {timeout:.0f} s")
            version, addresses = await self.directory.wait_for_change.remote(version, 2.0)
        return version, addresses

    async def _follow_directory(self, version: int, num_groups: int) -> None:
        while True:
            try:
                version, addresses = await self.directory.wait_for_change.remote(version, 10.0)
                for g in range(num_groups):
                    self.transport.set_replicas(g, addresses.get(g, []))
            except Exception:
                log.exception("following the endpoint directory")
                await asyncio.sleep(1.0)

    async def _report_load(self, num_groups: int) -> None:
        """Every second: the load figures, for telemetry and for the autoscaling policy."""
        tel = self.telemetry
        mine = {"replica": self.replica}
        while True:
            await asyncio.sleep(1.0)
            try:
                rates = self.routing.rates()
                stats = {f"routed_tps.g{g}": r for g, r in enumerate(rates)}
                stats.update(running=self.engine.num_running, waiting=self.engine.num_waiting,
                             kv_usage=self.engine.kv_usage)
                self.stats = stats
                for g, r in enumerate(rates):
                    tel.routed_rate.set(r, {"group": str(g), **mine})
                    tel.replicas.set(len(self.transport.live(g)), {"group": str(g), "state": "current"})
                tel.kv_usage.set(self.engine.kv_usage, mine)
                tel.running.set(self.engine.num_running, mine)
                tel.waiting.set(self.engine.num_waiting, mine)
                await self.directory.register_metrics.remote(f"attention-{self.replica}", tel.url)
                for name, r in (await self.directory.scaling.remote()).items():
                    if name.startswith(GROUP_PREFIX):
                        tel.replicas.set(r["target"], {"group": name.removeprefix(GROUP_PREFIX), "state": "target"})
            except Exception:
                log.exception("reporting load")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's controller reads this every metrics interval: routed load per group, requests, KV use."""
        return self.stats

    async def generate(self, prompt_ids: list[int], params: SamplingParams, trace: dict | None = None):
        """Stream a request's Deltas. trace: the front door's trace context as W3C headers."""
        ctx = telemetry.extract(trace) if trace else None
        async for delta in self.engine.generate(prompt_ids, params, ctx):
            yield delta

    async def __del__(self):
        """Leave the directory at once: the front door stops sending here before the lease runs out."""
        self._stop_beating.set()
        self._report.cancel()
        self._follow.cancel()
        await self.directory.attention_gone.remote(self.replica)

    def load(self) -> dict:
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting,
                "kv_usage": self.engine.kv_usage, "expert_replicas": [len(r) for r in self.transport.replicas],
                "failovers": self.transport.stats.failovers, "node_id": ray.get_runtime_context().get_node_id(),
                "rows_per_replica": dict(self.transport.stats.per_replica_rows), "replica": self.replica}
