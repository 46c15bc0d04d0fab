"""The endpoint directory: which expert replicas serve each group, and where.

A named Ray actor. Expert replicas register `host:port` when their gRPC server is up and
renew it every second; an entry not renewed for `ttl` seconds is dropped, so a replica
that died without a word is forgotten within seconds. Attention replicas long-poll
`wait_for_change` and hand the new lists to their transport.

It also lists where every process serves its Prometheus /metrics (same leases), for the
front door to gather, and keeps the autoscaling policy's last decisions for telemetry.
"""

import asyncio
import time

import ray

NAMESPACE = "moe-serve"


@ray.remote(num_cpus=0, max_restarts=-1)
class EndpointDirectory:
    def __init__(self, ttl: float = 5.0):
        self.ttl = ttl
        self.entries: dict[str, tuple[int, str, float]] = {}    # replica id -> (group, address, renewed at)
        self.metrics: dict[str, tuple[str, float]] = {}     # process -> (/metrics URL, renewed at)
        self.scaling_report: dict[str, dict] = {}            # deployment -> the policy's last word
        self.version = 0
        self.changed = asyncio.Event()
        self._expiry = asyncio.get_event_loop().create_task(self._expire())

    def _bump(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def register(self, group: int, replica: str, address: str) -> None:
        known = self.entries.get(replica)
        self.entries[replica] = (group, address, time.monotonic())
        if known is None or known[:2] != (group, address):
            self._bump()

    async def unregister(self, replica: str) -> None:
        if self.entries.pop(replica, None) is not None:
            self._bump()

    async def snapshot(self) -> tuple[int, dict[int, list[str]]]:
        groups: dict[int, list[str]] = {}
        for group, address, _ in self.entries.values():
            groups.setdefault(group, []).append(address)
        return self.version, {g: sorted(a) for g, a in groups.items()}

    async def wait_for_change(self, version: int, timeout: float = 10.0) -> tuple[int, dict[int, list[str]]]:
        if version == self.version:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return await self.snapshot()

    async def register_metrics(self, process: str, url: str) -> None:
        self.metrics[process] = (url, time.monotonic())

    async def metrics_targets(self) -> dict[str, str]:
        return {p: url for p, (url, _) in self.metrics.items()}

    async def set_scaling(self, report: dict[str, dict]) -> None:
        self.scaling_report = report

    async def scaling(self) -> dict[str, dict]:
        return self.scaling_report

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 5)
            now = time.monotonic()
            stale = [r for r, (_, _, t) in self.entries.items() if now - t > self.ttl]
            for r in stale:
                del self.entries[r]
            if stale:
                self._bump()
            for p in [p for p, (_, t) in self.metrics.items() if now - t > self.ttl]:
                del self.metrics[p]


def get_directory(name: str):
    """The app's directory actor, created by whichever replica asks first."""
    return EndpointDirectory.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                     lifetime="detached").remote()
