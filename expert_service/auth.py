"""An expert shard's door: only callers with the app's token (and, with TLS, the right
certificate) get through.

A shard holds the model's weights and computes whatever arrives: unguarded, anyone who
can reach its port could feed it batches as large as its message cap. With a token set,
every call must carry it in the `x-moe-serve-token` metadata (protos/shard_access.py);
one without it ends UNAUTHENTICATED before its request is read. The standard health and
reflection services are open (protos/standard_services.py: probes send no metadata).
Tokens are compared in constant time and never logged. `listen` binds the port, TLS or
plain, as access says.
"""

from __future__ import annotations

import hmac
import logging

import grpc

from protos.shard_access import TOKEN_KEY, ShardAccess, server_credentials
from protos.standard_services import is_open

log = logging.getLogger("moe-serve.expert")


async def _refuse(request, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this expert shard takes calls from its app only")


async def _refuse_stream(request_iterator, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this expert shard takes calls from its app only")


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks the token, but those to the open services."""

    def __init__(self, token: str):
        self._token = token.encode()
        self.refused = 0

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        given = next((v for k, v in details.invocation_metadata or () if k == TOKEN_KEY), None)
        if is_open(details.method) or given is not None and hmac.compare_digest(
                given.encode() if isinstance(given, str) else given, self._token):
            return await continuation(details)
        self.refused += 1
        if self.refused in (1, 10, 100, 1000) or self.refused % 10000 == 0:
            log.warning("refused %d calls without the app's token (latest: %s)", self.refused, details.method)
        handler = await continuation(details)
        if handler is not None and handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(_refuse_stream)
        return grpc.unary_unary_rpc_method_handler(_refuse)


def interceptors(access: ShardAccess | None) -> list[grpc.aio.ServerInterceptor]:
    return [TokenCheck(access.token)] if access is not None and access.token else []


def listen(server: grpc.aio.Server, address: str, access: ShardAccess | None) -> int:
    """Bind address (TLS when access has it); -> the port bound (0 where it failed)."""
    if access is not None and access.tls is not None:
        return server.add_secure_port(address, server_credentials(access.tls))
    return server.add_insecure_port(address)
