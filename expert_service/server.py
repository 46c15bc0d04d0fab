"""The ExpertShard gRPC service: one process serving the (layer, expert) pairs it holds.

Hidden rows and outputs go through the codec's fast path: requests are parsed by
`codec.unpack` (tensors viewed in place in the received bytes) and responses are
`codec.pack`ed bytes handed to gRPC as they are. Info and Health are small and use the
generated message classes. Between the bytes and the math a DeviceCopier moves the rows
to the shard's device and the results back (on CUDA through pinned buffers on a copy
stream, overlapping the previous batch's compute). Rows may arrive in the compute dtype
or as fp8 with a scale per row (protos/wire_fp8.py); results go back in the compute dtype.

Beside ExpertShard the server offers the standard `grpc.health.v1.Health` ("" and the
ExpertShard service: SERVING, then NOT_SERVING from the moment a drain begins) and server
reflection (protos/standard_services.py), so Kubernetes probes and grpcurl need no .proto.
The older ExpertShard.Health RPC stays for callers of revision 1 and says the same (DRAINING).

Compute runs on one dedicated thread. torch releases the GIL inside its kernels, so the
event loop keeps receiving and validating the next batches meanwhile, and torch's own
intra-op threads already use every core: a second compute thread would only make two
batches fight over the same cores and inflate both of their compute times. On a GPU the
kernels are serialized on one stream anyway.

A malformed or misaddressed batch is refused with INVALID_ARGUMENT before any compute; a
shard never computes a batch it cannot compute exactly, and bad input never takes it down.
On ForwardStream such a batch is answered with ExpertResult.error and the stream goes on,
so the other batches sharing it are not failed with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path

import grpc
import torch
from opentelemetry import propagate, trace

from expert_service import auth
from expert_service.echo import EchoExperts
from expert_service.loader import load_experts
from mixtral.checkpoint import Checkpoint, resolve_dtype
from protos import codec
from protos import expert_pb2 as pb
from protos.channel import DEFAULT_MAX_MESSAGE_BYTES, FORWARD, FORWARD_STREAM, REVISION, SERVICE, channel_options  # noqa: F401
from protos.device_copy import DeviceCopier
from protos.shard_access import ShardAccess
from protos.standard_services import Health, add_standard_services
from protos.wire_fp8 import E4M3, dequantize_rows
from router.dispatch import group_pairs

log = logging.getLogger("moe-serve.expert")
_tracer = trace.get_tracer(__name__)



class BadBatch(ValueError):
    """A batch this shard refuses (INVALID_ARGUMENT)."""


def _unpack_batch(data: bytes):
    # A deserializer that raises makes gRPC answer UNKNOWN; hand the error to the handler
    # instead so that it can answer INVALID_ARGUMENT with the codec's message.
    try:
        return codec.unpack(pb.ExpertBatch, data)
    except codec.CodecError as e:
        return e


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_busy(wall: float, thread_cpu: float) -> float:
    """Busy time of a CPU compute: the CPU it got, not the wall time it took.

    On a host whose cores other processes share, a batch's wall time grows with the wait for
    a core; counting it would call a starved replica busy, and adding replicas to the same
    cores only starves them more. The compute thread's CPU time times torch's intra-op
    threads (which split each kernel evenly) is the work done, capped at the wall time.
    """
    return min(wall, thread_cpu * torch.get_num_threads())


class ExpertShardServicer:
    def __init__(self, experts, hidden_size: int, fingerprint: str, shard_id: str, device: str = "cpu",
                 echo: bool = False):
        """experts: ExpertWeights, or EchoExperts for an echo shard (echo=True)."""
        self.experts = experts
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        self.shard_id = shard_id
        self.device = torch.device(device)
        self.echo = echo
        self.copier = DeviceCopier(self.device)
        self.draining = False
        self.inflight = 0
        self.busy_seconds = 0.0          # compute time (see _cpu_busy), cumulative: the busy fraction is its rate
        self.pairs = 0                   # (token, expert) pairs computed, cumulative: the work done
        self.labels = {"group": shard_id, "replica": shard_id}     # serve() names the replica by address
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"experts-{shard_id}")

    # --- validation ----------------------------------------------------------------------
    def _prepare(self, request) -> tuple[pb.ExpertBatch, list[torch.Tensor]]:
        """The batch and its tensors [hidden, hidden_scale or None, expert_ids, weights], on the host."""
        if isinstance(request, codec.CodecError):
            raise BadBatch(str(request))
        msg, tensors = request
        missing = [n for n in ("hidden", "expert_ids", "weights") if n not in tensors]
        if missing:
            raise BadBatch(f"batch {msg.batch_id}: missing {', '.join(missing)}")
        y, scale, ids, w = tensors["hidden"], tensors.get("hidden_scale"), tensors["expert_ids"], tensors["weights"]
        if y.dim() != 2 or y.shape[1] != self.hidden_size:
            raise BadBatch(f"batch {msg.batch_id}: hidden has shape {list(y.shape)}, "
                           f"expected [T, {self.hidden_size}]")
        T, want = y.shape[0], self.experts.dtype
        if y.dtype == E4M3:
            if scale is None:
                raise BadBatch(f"batch {msg.batch_id}: hidden is fp8 (float8_e4m3fn) without hidden_scale")
            if scale.shape != (T,) or scale.dtype != torch.float32:
                raise BadBatch(f"batch {msg.batch_id}: hidden_scale is {_name(scale.dtype)} {list(scale.shape)}, "
                               f"expected float32 [{T}]")
        elif y.dtype != want:
            raise BadBatch(f"batch {msg.batch_id}: hidden is {_name(y.dtype)}, this shard computes in "
                           f"{_name(want)}; send hidden rows in {_name(want)} (or float8_e4m3fn with hidden_scale)")
        elif scale is not None:
            raise BadBatch(f"batch {msg.batch_id}: hidden_scale is set but hidden is {_name(y.dtype)}, not fp8")
        if ids.dim() != 2 or ids.shape[0] != T:
            raise BadBatch(f"batch {msg.batch_id}: expert_ids has shape {list(ids.shape)}, expected [{T}, K]")
        if w.shape != ids.shape:
            raise BadBatch(f"batch {msg.batch_id}: weights has shape {list(w.shape)}, "
                           f"expected {list(ids.shape)} like expert_ids")
        if ids.dtype not in (torch.int32, torch.int64):
            raise BadBatch(f"batch {msg.batch_id}: expert_ids is {_name(ids.dtype)}, expected int32")
        if not w.dtype.is_floating_point:
            raise BadBatch(f"batch {msg.batch_id}: weights is {_name(w.dtype)}, expected float32")
        try:
            self.experts.check(msg.layer, ids)
        except KeyError as e:
            raise BadBatch(f"batch {msg.batch_id}: {e.args[0]}") from None
        return msg, [y, scale, ids, w]

    # --- compute -------------------------------------------------------------------------
    def _compute(self, layer: int, y: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor,
                 w: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """On the compute thread, on device tensors: (output [T, D], compute seconds, pairs)."""
        with torch.inference_mode():
            start, cpu_start = time.perf_counter(), time.thread_time()
            if scale is not None:
                y = dequantize_rows(y, scale, self.experts.dtype)
            out = self.experts.forward(layer, y, ids, w)
            if out.is_cuda:  # kernels are asynchronous; time them, not their launch
                torch.cuda.synchronize(out.device)
            seconds = time.perf_counter() - start
            self.busy_seconds += seconds if out.is_cuda else _cpu_busy(seconds, time.thread_time() - cpu_start)
            rows = int((ids >= 0).sum())
            self.pairs += rows
        return out, seconds, rows

    async def _run(self, msg: pb.ExpertBatch, tensors: list) -> bytes:
        """One validated batch: to the device, compute, back to the host; the packed ExpertResult."""
        self.inflight += 1
        self._idle.clear()
        try:
            present = [t for t in tensors if t is not None]
            on_device = iter(await self.copier.to_device(*present))
            y, scale, ids, w = (None if t is None else next(on_device) for t in tensors)
            loop = asyncio.get_running_loop()
            out, seconds, rows = await loop.run_in_executor(self._pool, self._compute, msg.layer, y, scale, ids, w)
            host, = await self.copier.to_host(out)
            return codec.pack(pb.ExpertResult(batch_id=msg.batch_id, compute_seconds=seconds, rows=rows), output=host)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def _answer(self, request) -> bytes:
        """The packed result of one request, traced when the sender's step is; raises BadBatch."""
        msg, tensors = self._prepare(request)
        if not msg.trace_context:
            return await self._run(msg, tensors)
        # The sender's step is traced: this batch's compute joins the request's trace.
        with _tracer.start_as_current_span(
                "moe_serve.expert.compute", context=propagate.extract(dict(msg.trace_context)),
                kind=trace.SpanKind.SERVER,
                attributes={"moe_serve.layer": msg.layer, "moe_serve.rows": int(tensors[0].shape[0]),
                            "moe_serve.shard": self.shard_id}):
            return await self._run(msg, tensors)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no batch is in flight; False if some still are after timeout seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        """Stop the compute thread once its current batch is done."""
        self._pool.shutdown(wait=False)

    # --- RPCs ----------------------------------------------------------------------------
    async def Forward(self, request, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._answer(request)
        except BadBatch as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # e.g. out of memory: fail this batch, keep serving
            log.exception("batch failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"compute failed: {e}")

    async def _stream_answer(self, request) -> bytes:
        """ForwardStream's answer to one batch: its result, or its error as a result."""
        batch_id = request[0].batch_id
        try:
            return await self._answer(request)
        except BadBatch as e:
            code, text = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:
            log.exception("batch %d failed", batch_id)
            code, text = grpc.StatusCode.INTERNAL, f"batch {batch_id}: compute failed: {e}"
        return pb.ExpertResult(batch_id=batch_id, error_code=code.value[0], error=text).SerializeToString()

    async def ForwardStream(self, requests, context: grpc.aio.ServicerContext) -> None:
        # The reader starts each batch as it arrives, so the next ones are copied to the
        # device and queued while earlier ones compute. With one FIFO compute thread they
        # finish in arrival order, so answering in that order delays none of them. Only a
        # message that cannot be parsed at all (no batch id to answer) fails the stream.
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in requests:
                    if isinstance(request, codec.CodecError):
                        raise BadBatch(f"malformed batch on the stream: {request}")
                    queue.put_nowait(asyncio.ensure_future(self._stream_answer(request)))
                queue.put_nowait(None)
            except Exception as e:  # answer the batches before it, then fail the stream
                queue.put_nowait(e)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BadBatch):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, Exception):
                    raise item
                await context.write(await item)
        finally:
            reader.cancel()

    async def Info(self, request: pb.InfoRequest, context) -> pb.ShardInfo:
        by_layer: dict[int, list[int]] = {}
        for layer, expert in sorted(self.experts.pairs):
            by_layer.setdefault(layer, []).append(expert)
        return pb.ShardInfo(
            shard_id=self.shard_id,
            layers=[pb.LayerExperts(layer=l, experts=e) for l, e in by_layer.items()],
            dtype=codec.wire_dtype(self.experts.dtype),
            checkpoint_fingerprint=self.fingerprint,
            hidden_size=self.hidden_size,
            hidden_dtypes=[codec.wire_dtype(self.experts.dtype), pb.DTYPE_FLOAT8_E4M3],
            revision=REVISION,
            echo=self.echo,
        )

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        status = pb.HealthResponse.DRAINING if self.draining else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, inflight_batches=self.inflight)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            # Forward paths: the request deserializer views tensors in place, the response
            # is already bytes (serializer None passes them through).
            "Forward": grpc.unary_unary_rpc_method_handler(self.Forward, request_deserializer=_unpack_batch),
            "ForwardStream": grpc.stream_stream_rpc_method_handler(
                self.ForwardStream, request_deserializer=_unpack_batch),
            "Info": grpc.unary_unary_rpc_method_handler(
                self.Info, request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.ShardInfo.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.Health, request_deserializer=pb.HealthRequest.FromString,
                response_serializer=pb.HealthResponse.SerializeToString),
        })


class ShardServer:
    """A running shard: the grpc.aio server, the servicer behind it and its health service."""

    def __init__(self, server: grpc.aio.Server, servicer: ExpertShardServicer, address: str, health: Health):
        self.server, self.servicer, self.address, self.health = server, servicer, address, health

    async def drain(self, grace: float = 10.0) -> None:
        """Report DRAINING (NOT_SERVING on the health service), let in-flight batches finish
        (up to grace seconds), then stop.

        Batches that still arrive meanwhile are served: a sender that has not yet seen
        DRAINING gets its answer rather than an error. gRPC's own stop then refuses new
        calls and gives open ones another grace seconds before cancelling them."""
        self.servicer.draining = True
        await self.health.shut_down()
        log.info("draining %s (%d batches in flight)", self.address, self.servicer.inflight)
        if not await self.servicer.wait_idle(grace):
            log.warning("%d batches still in flight after %.1fs; stopping anyway", self.servicer.inflight, grace)
        await self.server.stop(grace)
        self.servicer.close()
        log.info("stopped %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        self.servicer.draining = True
        await self.health.shut_down()
        await self.server.stop(grace)
        self.servicer.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ids(ids: list[int] | None) -> str:
    return "all" if ids is None else "[" + ",".join(map(str, ids)) + "]"


async def serve(model_dir: str | Path, experts: list[int], layers: list[int] | None = None, port: int = 0,
                host: str = "127.0.0.1", device: str = "cpu", dtype: str = "auto", shard_id: str | None = None,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, group: int | None = None,
                echo: bool = False, access: ShardAccess | None = None) -> tuple[ShardServer, int]:
    """Load `experts` of `layers` (None: all) from model_dir and serve them; port 0 picks one.
    `group`: the expert group this shard is a replica of, for telemetry labels. `echo`: load
    no weights and answer each batch with its rows (expert_service/echo.py). `access`: the
    token callers must present, and TLS (expert_service/auth.py)."""
    ckpt = Checkpoint(model_dir, require_tokenizer=False)
    cfg = ckpt.config
    if not experts:
        raise ValueError("a shard must hold at least one expert")
    experts = sorted(set(experts))
    layers = None if layers is None else sorted(set(layers))
    pairs = group_pairs(experts, layers, cfg.num_hidden_layers)
    torch_dtype = resolve_dtype(dtype, ckpt, device)
    if echo:
        weights = EchoExperts(pairs, cfg.num_local_experts, torch_dtype)
    else:
        weights = await asyncio.to_thread(load_experts, ckpt, pairs, torch_dtype, device)
    shard_id = shard_id or "experts-" + "-".join(map(str, experts))
    servicer = ExpertShardServicer(weights, cfg.hidden_size, ckpt.fingerprint(), shard_id, device, echo)

    # Access control (expert_service/auth.py): the app's token and TLS when `access` has them.
    # so_reuseport off: a second shard on a taken port must fail, not share it silently.
    server = grpc.aio.server(options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
                             interceptors=auth.interceptors(access))
    server.add_generic_rpc_handlers([servicer.handler()])
    health = await add_standard_services(server, [SERVICE])
    try:
        bound = auth.listen(server, _host_port(host, port), access)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {_host_port(host, port)}: {e}") from None
    if not bound:  # older grpc versions signal failure with port 0
        raise RuntimeError(f"cannot listen on {_host_port(host, port)}")
    await server.start()
    address = _host_port(host, bound)
    servicer.labels = {"group": str(group) if group is not None else shard_id, "replica": address}
    log.info("expert shard %s serving %d (layer, expert) pairs, experts %s, layers %s, %s on %s, on %s%s",
             shard_id, len(pairs), _ids(experts), _ids(layers), _name(torch_dtype), device, address,
             " (echo: no compute)" if echo else "")
    return ShardServer(server, servicer, address, health), bound
