"""Who may call an expert shard, as both ends of the connection agree on it.

A shard of a Serve app accepts a call only when it carries the app's shared token in the
`x-moe-serve-token` metadata (generated once per app and handed to every replica through
Ray: expert_service/auth.py checks it, `open_channel` sends it). Optionally the
connection is TLS, and with `mutual` both ends show a certificate signed by the same CA
(mTLS), so only the cluster's own processes can even connect. Message size caps are sized
to the model (`message_bytes_for`): a shard need not accept 512 MiB from anyone.

The token never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
import msgspec

from protos.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options

TOKEN_KEY = "x-moe-serve-token"


class ShardTLS(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The app config's `expert_tls`: PEM files present on every node (the chart mounts a Secret)."""

    ca_file: str
    cert_file: str
    key_file: str
    # Both ends show a certificate signed by ca_file (mTLS); false: only the shards do.
    mutual: bool = True
    # The name the shards' certificate is issued for. Replicas are dialled by IP address,
    # which certificates rarely list; unset, the address itself must match.
    server_name: str | None = None


@dataclass(frozen=True)
class ShardAccess:
    """What a shard demands of callers, and what a caller presents: token, TLS, message size."""

    token: str | None = field(default=None, repr=False)
    tls: ShardTLS | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a stream presents when it opens (unary calls get it from open_channel)."""
        return ((TOKEN_KEY, self.token),) if self.token else ()

    def options(self) -> list[tuple[str, int | str]]:
        opts: list[tuple[str, int | str]] = list(channel_options(self.max_message_bytes))
        if self.tls is not None and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return opts


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(tls: ShardTLS) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(tls.key_file), _read(tls.cert_file))],
                                       root_certificates=_read(tls.ca_file), require_client_auth=tls.mutual)


def channel_credentials(tls: ShardTLS) -> grpc.ChannelCredentials:
    if tls.mutual:
        return grpc.ssl_channel_credentials(_read(tls.ca_file), _read(tls.key_file), _read(tls.cert_file))
    return grpc.ssl_channel_credentials(_read(tls.ca_file))


class _Token:
    """Adds the token to every unary call's metadata. Streams take `ShardAccess.metadata` when
    opened instead: an intercepted stream passes each message through a queue of its own."""

    def __init__(self, token: str):
        self._pair = (TOKEN_KEY, token)

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self._pair)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _UnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


def open_channel(address: str, access: ShardAccess | None = None,
                 extra_options: list[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """A channel to the shard at address that presents what access says."""
    access = access or ShardAccess()
    interceptors = [_UnaryToken(access.token)] if access.token else None
    options = access.options() + list(extra_options)
    if access.tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(access.tls), options=options,
                                   interceptors=interceptors)


def message_bytes_for(hidden_size: int, max_rows: int, top_k: int = 2) -> int:
    """The largest ExpertBatch or ExpertResult a step can make: max_rows hidden rows (at 4
    bytes, the widest dtype) plus expert ids and weights, with room for the framing."""
    payload = max_rows * (hidden_size * 4 + top_k * 8)
    return int(math.ceil(payload * 1.25)) + (1 << 20)
