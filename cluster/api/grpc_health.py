"""The front door's `grpc.health.v1.Health`: SERVING while a request sent now could be served.

Both names it knows, "" (the server) and `moe_serve.generation.v1.Generation`, follow the
backend's readiness, as `GET /ready` does: an engine alive that reaches a live replica of
every expert group. Liveness stays HTTP `GET /health`: a front door that answers is alive
even while an expert group is away, and restarting it would not bring the group back.
Other names are NOT_FOUND on Check and SERVICE_UNKNOWN on Watch, as the protocol says.

Check (and List, every name at once) asks the backend once. Watch asks every `poll_s` seconds and writes only when the
answer changes, so a watcher hears NOT_SERVING within about a second of the app losing its
last attention replica or a group its last expert replica. The logic is served from a
plain grpc.aio server (`FrontDoorHealth`, beside `start_grpc_server`) and from the Serve
ingress, whose Check, List and Watch methods Serve's gRPC proxy calls
(cluster/api/grpc_register.py registers the service there).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api.backend import Backend, getter
from cluster.api.grpc_register import SERVICE as GENERATION_SERVICE

log = logging.getLogger(__name__)

SERVICES = ("", GENERATION_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
POLL_S = 1.0


def unknown(service: str) -> str:
    """The NOT_FOUND message for a name this server does not serve."""
    return f"unknown service {service!r}: this server reports '' and {GENERATION_SERVICE!r}"


async def status(backend: Backend, service: str) -> int:
    """SERVING or NOT_SERVING for a known name (SERVICE_UNKNOWN for another)."""
    if service not in SERVICES:
        return SERVICE_UNKNOWN
    try:
        ok, _ = await backend.ready()
    except Exception as e:          # the directory unreachable, say: a request would not be served either
        log.warning("health: readiness unknown (%s: %s)", type(e).__name__, e)
        ok = False
    return SERVING if ok else NOT_SERVING


async def statuses(backend: Backend) -> health_pb2.HealthListResponse:
    """List's answer: every name this server reports, from one readiness check."""
    now = health_pb2.HealthCheckResponse(status=await status(backend, ""))
    return health_pb2.HealthListResponse(statuses={name: now for name in SERVICES})


async def watch(get_backend: Callable[[], Backend], service: str, poll_s: float = POLL_S
                ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    """The current status at once, then each change, until the caller goes away."""
    last = None
    while True:
        now = await status(get_backend(), service)
        if now != last:
            yield health_pb2.HealthCheckResponse(status=now)
            last = now
        await asyncio.sleep(poll_s)


class FrontDoorHealth(health_pb2_grpc.HealthServicer):
    """For a plain grpc.aio server; takes a backend or a function returning one."""

    def __init__(self, backend: Backend | Callable[[], Backend], poll_s: float = POLL_S):
        self._get, self.poll_s = getter(backend), poll_s

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        now = await status(self._get(), request.service)
        if now == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown(request.service))
        return health_pb2.HealthCheckResponse(status=now)

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext):
        return await statuses(self._get())

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        async for response in watch(self._get, request.service, self.poll_s):
            yield response
