"""The standard gRPC services every server of ours offers beside its own: health and reflection.

`grpc.health.v1.Health` (grpcio-health-checking) is what Kubernetes gRPC probes, load
balancers and `grpc_health_probe` speak; server reflection (grpcio-reflection) lets
`grpcurl`, `grpcui` and Postman list the services and fetch their descriptors without the
.proto files. Both carry no data of the app, so a shard's token does not guard them
(`OPEN_SERVICES`; a Kubernetes probe cannot send metadata): a caller without the token
learns whether the shard serves and what its messages look like, which expert.proto
already says in public, and nothing else.

Status names follow the health protocol: "" is the server as a whole, a service's full
name is that service. Every server here has one service, and both names say the same:
whether a call sent now would be served.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name      # grpc.health.v1.Health
REFLECTION_SERVICE = reflection.SERVICE_NAME     # grpc.reflection.v1alpha.ServerReflection
OPEN_SERVICES = frozenset({HEALTH_SERVICE, REFLECTION_SERVICE})
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def is_open(method: str) -> bool:
    """Whether a call's method ("/package.Service/Method") belongs to an open service."""
    return method.split("/")[1] in OPEN_SERVICES if method.count("/") == 2 else False


class _Servicer(HealthServicer):
    """grpcio-health-checking's servicer (Check, Watch) with the protocol's List as well."""

    def __init__(self, health: Health):
        super().__init__()
        self._health = health

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        now = health_pb2.HealthCheckResponse(status=self._health.status)
        return health_pb2.HealthListResponse(statuses={name: now for name in self._health.services})


class Health:
    """A server's health service, SERVING for "" and each of its services until `shut_down`."""

    def __init__(self, services: list[str]):
        self.services = ["", *services]
        self.status = SERVING
        self.servicer = _Servicer(self)

    async def start(self) -> None:
        """Report SERVING for every name (the servicer starts with "" only)."""
        for name in self.services:
            await self.servicer.set(name, SERVING)

    async def shut_down(self) -> None:
        """NOT_SERVING for every name, for good: the server is draining (watchers hear it at once)."""
        self.status = NOT_SERVING
        await self.servicer.enter_graceful_shutdown()


def add_reflection(server, services: list[str]) -> None:
    """Server reflection listing `services`, the health service and reflection itself."""
    reflection.enable_server_reflection([*services, HEALTH_SERVICE, REFLECTION_SERVICE], server)


async def add_standard_services(server, services: list[str]) -> Health:
    """Health (SERVING) and reflection on a grpc.aio server serving `services`, before it starts."""
    health = Health(services)
    await health.start()
    add_HealthServicer_to_server(health.servicer, server)
    add_reflection(server, services)
    return health
