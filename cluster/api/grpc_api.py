"""The public `Generation` gRPC service: one streamed generation per call.

`generate(backend, request)` holds the logic and raises `RpcError` (a status code and
a message) for input it refuses; `GenerationServicer` serves it from a plain grpc.aio
server, and a Ray Serve ingress calls it from its own `Generate` method.

Unset optional fields follow the proto's comments: unset `max_tokens` runs to EOS, a
stop condition, the limits' `default_max_tokens` or the end of the context; unset
`temperature`, `top_p` and `top_k` take the OpenAI defaults (1.0, 1.0, no cut), so an
empty request samples as /v1/completions does; unset penalties and `min_p` are off; unset
`seed` draws a fresh one; unset `logprobs` returns none; unset `n` is one choice. With
n > 1 the choices' responses interleave, each marked with its `index`; with `best_of` > n
the n best come, one response each, once every candidate has finished.

Calls carry the API key, when the app has any, as `authorization: Bearer KEY` metadata
(UNAUTHENTICATED without it). A request the server cannot serve now ends UNAVAILABLE
(RESOURCE_EXHAUSTED for a full queue) with `retry-after` (seconds) in the trailing metadata.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import AsyncIterator, Callable

import grpc

from attention_service import grammar
from attention_service.errors import Overloaded, RequestError, Unavailable
from attention_service.grammar_spec import GrammarSpec
from attention_service.sampling_params import SamplingParams
from cluster.api.backend import Backend, close_quietly, getter, open_stream
from cluster.api.grpc_health import FrontDoorHealth
from cluster.api.grpc_register import SERVICE, Undecodable, add_generation_servicer, add_health_servicer
from cluster.api.limits import default_max_tokens, limits_of
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc
from protos.standard_services import add_reflection

log = logging.getLogger(__name__)


class RpcError(Exception):
    """Ends a call with this status; the message says what was wrong."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        # All in args: it pickles, as Ray Serve ships it between processes.
        super().__init__(code, message, retry_after_s)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s

    def __str__(self) -> str:
        return self.message

    @classmethod
    def unavailable(cls, e: Unavailable) -> RpcError:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, Overloaded) else grpc.StatusCode.UNAVAILABLE
        return cls(code, e.message, e.retry_after_s)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """`retry-after` in whole seconds, when the call may be retried."""
        if self.retry_after_s is None:
            return ()
        return (("retry-after", str(max(1, math.ceil(self.retry_after_s)))),)


UNAUTHENTICATED = RpcError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or invalid API key: send it as 'authorization: Bearer KEY' metadata")


def authorize(backend: Backend, metadata) -> None:
    """RpcError(UNAUTHENTICATED) unless the call's metadata carries one of the backend's API keys."""
    keys = getattr(backend, "api_keys", None)
    if keys is not None and not keys.allows_metadata(metadata):
        raise UNAUTHENTICATED


def to_engine_request(backend: Backend, request: pb.GenerateRequest | Undecodable
                      ) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling parameters, or RpcError (NOT_FOUND, INVALID_ARGUMENT)."""
    if isinstance(request, Undecodable):
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
    if request.model and request.model != backend.model_name:
        raise RpcError(grpc.StatusCode.NOT_FOUND,
                       f"model {request.model!r} does not exist; this server serves {backend.model_name!r}")
    which = request.WhichOneof("prompt")
    if which is None:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "request has no prompt: set text or token_ids")
    ids = backend.tokenizer.encode(request.text) if which == "text" else list(request.token_ids.ids)

    def opt(name: str, default):
        return getattr(request, name) if request.HasField(name) else default

    try:
        params = SamplingParams(
            max_tokens=opt("max_tokens", default_max_tokens(limits_of(backend), backend.max_model_len, ids)),
            temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0), top_k=opt("top_k", 0),
            seed=opt("seed", None), stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
            ignore_eos=request.ignore_eos, logprobs=opt("logprobs", None), n=opt("n", 1),
            best_of=opt("best_of", None),
            presence_penalty=opt("presence_penalty", 0.0), frequency_penalty=opt("frequency_penalty", 0.0),
            repetition_penalty=opt("repetition_penalty", 1.0), min_p=opt("min_p", 0.0),
            logit_bias=dict(request.logit_bias),
            grammar=GrammarSpec(request.json_schema, param="json_schema") if request.json_schema else None)
        if params.grammar is not None:
            grammar.check(params.grammar)
    except RequestError as e:
        raise _refusal(e) from None
    return ids, params


def _refusal(e: RequestError) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, e.message)


async def generate(backend: Backend, request: pb.GenerateRequest | Undecodable
                   ) -> AsyncIterator[pb.GenerateResponse]:
    """Stream responses for one request. Refusals raise RpcError before the first response;
    an engine failure mid-stream raises RpcError(INTERNAL, or UNAVAILABLE when only the
    experts or the engine's replica went away) after the responses already sent."""
    ids, params = to_engine_request(backend, request)
    retry_after = limits_of(backend).retry_after_s
    try:
        stream = await open_stream(backend, ids, params)
    except RequestError as e:
        raise _refusal(e) from None
    except Unavailable as e:
        raise RpcError.unavailable(e) from None
    except Exception as e:
        log.exception("generation failed to start")
        raise RpcError(grpc.StatusCode.INTERNAL, f"generation failed: {e}") from None
    rid = request.request_id or f"gen-{uuid.uuid4().hex}"
    try:
        async for d in stream:
            if d.finish_reason == "error" and d.error_code == "unavailable":
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"generation failed: {d.error}", retry_after)
            if d.finish_reason == "error":
                raise RpcError(grpc.StatusCode.INTERNAL, f"generation failed: {d.error}")
            lps = [pb.TokenLogprob(logprob=lp, top_token_ids=[i for i, _ in alts], top_logprobs=[v for _, v in alts])
                   for lp, alts in d.logprobs or []]
            yield pb.GenerateResponse(
                request_id=rid, token_ids=d.token_ids, text=d.text, finish_reason=d.finish_reason or "",
                usage=pb.Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                               unreturned_tokens=d.unreturned_tokens),
                logprobs=lps, index=d.index)
    except RpcError:
        raise
    except Unavailable as e:     # the engine's replica went away mid-stream
        raise RpcError.unavailable(e) from None
    except Exception as e:       # a remote engine lost mid-stream
        log.exception("generation failed")
        raise RpcError(grpc.StatusCode.INTERNAL, f"generation failed: {e}") from None
    finally:
        await close_quietly(stream)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """For a plain grpc.aio server; takes a backend or a function returning one."""

    def __init__(self, backend: Backend | Callable[[], Backend]):
        self._get = getter(backend)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        backend = self._get()
        try:
            authorize(backend, context.invocation_metadata())
            async for response in generate(backend, request):
                yield response
        except RpcError as e:
            await context.abort(e.code, e.message, e.trailing_metadata())


async def start_grpc_server(backend: Backend | Callable[[], Backend],
                            address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with the Generation service, its health (following the
    backend's readiness, cluster/api/grpc_health.py) and server reflection; and the port it bound."""
    server = grpc.aio.server()
    add_generation_servicer(GenerationServicer(backend), server)
    add_health_servicer(FrontDoorHealth(backend), server)
    add_reflection(server, [SERVICE])
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
