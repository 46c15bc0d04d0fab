"""The attention side's connections to one expert replica: a ForwardStream on each.

A replica is reached over `connections` channels (TCP connections), each carrying one
long-lived ForwardStream on which batches are written in turn and their results matched
back by batch id, so any number of a step's batches share it in flight. Every way a
batch's call can fail (a status from gRPC, the shard's per-batch error, a deadline, the
stream ending) comes out as one ShardCallError with a status code, which the transport
sorts into a refused batch or a failed replica.
"""

import asyncio
import functools
import itertools
from dataclasses import dataclass, field

import grpc

from protos import codec
from protos import expert_pb2 as pb
from protos.channel import FORWARD_STREAM
from protos.shard_access import ShardAccess, open_channel

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_unpack_result = functools.partial(codec.unpack, pb.ExpertResult)


class ShardCallError(Exception):
    """One batch's call failed: the status code and message, whether from gRPC or the shard."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class ShardStream:
    """One ForwardStream: batches written in turn, results matched to them by batch id."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple):
        self.call = channel.stream_stream(FORWARD_STREAM, request_serializer=None,
                                          response_deserializer=_unpack_result)(metadata=metadata)
        self.pending: dict[int, asyncio.Future] = {}
        self.failed: ShardCallError | None = None
        self._write = asyncio.Lock()     # gRPC takes one message at a time per call
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for result in self.call:
                fut = self.pending.pop(result[0].batch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
            error = ShardCallError(grpc.StatusCode.UNAVAILABLE, "the shard closed the stream")
        except grpc.aio.AioRpcError as e:
            error = ShardCallError(e.code(), e.details() or "")
        except asyncio.CancelledError:
            error = ShardCallError(grpc.StatusCode.CANCELLED, "stream closed")
        except codec.CodecError as e:
            error = ShardCallError(grpc.StatusCode.INTERNAL, f"malformed result: {e}")
        self.failed = error
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()

    async def forward(self, batch_id: int, request: bytes, timeout: float):
        if self.failed is not None:
            raise self.failed
        fut = asyncio.get_running_loop().create_future()
        self.pending[batch_id] = fut
        try:
            async with self._write:
                await self.call.write(request)
            msg, tensors = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ShardCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result after {timeout:.1f} s") from None
        except grpc.aio.AioRpcError as e:
            raise ShardCallError(e.code(), e.details() or "") from None
        except asyncio.InvalidStateError:        # the call ended between our check and the write
            raise self.failed or ShardCallError(grpc.StatusCode.UNAVAILABLE, "stream ended") from None
        finally:
            self.pending.pop(batch_id, None)
        if msg.error_code:
            raise ShardCallError(_CODES.get(msg.error_code, grpc.StatusCode.UNKNOWN), msg.error)
        return msg, tensors

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


@dataclass(eq=False)
class Replica:
    """One replica of a group: `connections` channels (TCP connections), a stream on each."""

    address: str
    channels: list[grpc.aio.Channel]
    down_until: float = 0.0
    metadata: tuple = ()
    _streams: list[ShardStream | None] = field(default_factory=list)
    _turn: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def open(cls, address: str, connections: int = 1, access: ShardAccess | None = None) -> "Replica":
        # The app's token, TLS and message caps come with access (protos/shard_access.py). A pool
        # of its own per channel: channels with equal options would otherwise share one connection.
        extra = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
        channels = [open_channel(address, access, extra) for _ in range(connections)]
        return cls(address, channels, metadata=(access or ShardAccess()).metadata(), _streams=[None] * connections)

    async def forward(self, batch_id: int, request: bytes, timeout: float):
        """(ExpertResult, tensors) for one packed batch, on the next connection's stream."""
        i = next(self._turn) % len(self.channels)
        stream = self._streams[i]
        if stream is None or stream.failed is not None:
            stream = self._streams[i] = ShardStream(self.channels[i], self.metadata)
        return await stream.forward(batch_id, request, timeout)

    async def close(self, grace: float | None = None) -> None:
        for s in self._streams:
            if s is not None:
                s.close()
        await asyncio.gather(*(ch.close(grace) for ch in self.channels))
