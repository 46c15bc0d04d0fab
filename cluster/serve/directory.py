"""The endpoint directory: which expert replicas serve each group, and where.

A named Ray actor. Expert replicas register `host:port` when their gRPC server is up and
renew it every second; an entry not renewed for `ttl` seconds is dropped, so a replica
that died without a word is forgotten within seconds. Attention replicas long-poll
`wait_for_change` and hand the new lists to their transport.

It also lists where every process serves its Prometheus /metrics (same leases), for the
front door to gather, and keeps the autoscaling policy's last decisions for telemetry.

Readiness: every attention replica beats once a second with the expert groups it can
reach; `readiness` says which replicas beat lately and what they see, which is what the
front door's /ready reports and how it knows, within seconds, that no attention replica
is left to take a request.

The app's shard token: made by whichever replica creates the directory, kept as the
actor's creation argument (so a restarted directory has the same one), and handed to
every replica that asks. Expert shards demand it; attention replicas present it.
"""

import asyncio
import secrets
import time

import ray

NAMESPACE = "moe-serve"


@ray.remote(num_cpus=0, max_restarts=-1)
class EndpointDirectory:
    def __init__(self, ttl: float = 5.0, token: str | None = None):
        self.ttl = ttl
        self._token = token or secrets.token_urlsafe(32)
        self.attention: dict[str, tuple[list[int], float]] = {}     # replica -> (live replicas per group, at)
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

    async def shard_token(self) -> str:
        return self._token

    async def attention_beat(self, replica: str, live: list[int]) -> None:
        """An attention replica is up and reaches live[g] replicas of expert group g."""
        self.attention[replica] = (list(live), time.monotonic())

    async def attention_gone(self, replica: str) -> None:
        self.attention.pop(replica, None)

    async def readiness(self) -> dict:
        """{"attention": {replica: [live replicas per group]}, "groups": {group: registered replicas}},
        counting only those heard from within the lease."""
        now = time.monotonic()
        groups: dict[int, int] = {}
        for group, _, _ in self.entries.values():
            groups[group] = groups.get(group, 0) + 1
        return {"attention": {r: live for r, (live, t) in self.attention.items() if now - t <= self.ttl},
                "groups": groups}

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
            for r in [r for r, (_, t) in self.attention.items() if now - t > self.ttl]:
                del self.attention[r]


def get_directory(name: str):
    """The app's directory actor, created by whichever replica asks first (with a fresh token;
    later callers get the existing actor, and its token)."""
    return EndpointDirectory.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                     lifetime="detached").remote(token=secrets.token_urlsafe(32))
