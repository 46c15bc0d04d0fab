"""OpenAI-compatible HTTP routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /ready.

Routes reach the engine only through a `Backend`, fetched per request from
`get_backend()`, so a Ray Serve ingress can mount them on its FastAPI app at import time
and supply the backend once its replica is built. Bodies are parsed here rather than by
FastAPI so that every failure (bad JSON, a missing content-type, a wrong field) gets
OpenAI's error body and a 400, with the offending field named in `param`. The gate in front of the routes (API key, body
size, content type) is cluster/api/http_guard.py; the bounds on each field are limits.py.

`/health` is liveness: 200 while this process answers. `/ready` is readiness: 200 only
while a request sent now could be served (the backend says what it found), else 503.
Requests the server cannot serve now get 503 (429 when the queue is full) with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from attention_service.async_engine import Delta
from attention_service.errors import Overloaded, RequestError, Unavailable
from attention_service.grammar_spec import GrammarSpec
from attention_service.sampling_params import SamplingParams
from cluster.api import chat, structured
from cluster.api.access import ApiKeys
from cluster.api.backend import Backend, close_quietly, getter, open_stream
from cluster.api.completion import CompletionReply
from cluster.api.http_guard import HttpGuard
from cluster.api.limits import check_unicode, default_max_tokens, limits_of
from cluster.api.request_fields import check_defaults, logit_bias
from cluster.api.structured import response_format_grammar

log = logging.getLogger(__name__)

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.retry_after_s = retry_after_s

    @classmethod
    def unavailable(cls, e: Unavailable) -> APIError:
        """503 (429 for a full queue), telling the client when to try again."""
        if isinstance(e, Overloaded):
            return cls(429, e.message, code="rate_limit_exceeded", type="rate_limit_error",
                       retry_after_s=e.retry_after_s)
        return cls(503, e.message, code="service_unavailable", type="server_error", retry_after_s=e.retry_after_s)

    def response(self) -> JSONResponse:
        headers = None if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # An unknown field is refused, never ignored: a client that sends one expects an effect.
    # Python's json reads NaN and 1e999: SamplingParams refuses them, the one finiteness
    # check for both front doors.
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                   # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None    # extension
    ignore_eos: bool = False                   # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None    # extension
    min_p: float | None = None                 # extension
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None               # prefix caching is automatic
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # Some clients send every field, unset ones as null: they mean the default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None


def build_openai_app(backend: Backend | Callable[[], Backend]) -> FastAPI:
    """A standalone app over one backend (or a getter, for a backend built at startup)."""
    app = FastAPI(title="moe-serve")
    add_openai_routes(app, getter(backend))
    return app


def add_openai_routes(app: FastAPI, get_backend: Callable[[], Backend]) -> None:
    """Mount the gate, the routes, and the handlers that give every error OpenAI's body, on `app`."""
    def policy():
        b = get_backend()
        return getattr(b, "api_keys", None) or ApiKeys(), limits_of(b)
    app.add_middleware(HttpGuard, policy=policy)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        # FastAPI's own 404 and 405, in the same body as every other error.
        err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, e: Unavailable) -> JSONResponse:
        return APIError.unavailable(e).response()

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        err = _refusal(e, chat=request.url.path.endswith("/chat/completions"))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the same error shape as for everything else.
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        b = get_backend()
        try:
            ok, detail = await b.ready() if hasattr(b, "ready") else (True, {})
        except Exception as e:
            ok, detail = False, {"error": f"{type(e).__name__}: {e}"}
        return JSONResponse({"status": "ready" if ok else "not ready", **detail}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        b = get_backend()
        return {"object": "list", "data": [{"id": b.model_name, "object": "model", "created": _STARTED,
                                            "owned_by": "moe-serve", "max_model_len": b.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        b = get_backend()
        req = await _parse(request, CompletionRequest, b)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt")
            p = p[0]
        ids = b.tokenizer.encode(p) if isinstance(p, str) else list(p)
        params = _params(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs,
                         response_format_grammar(req.response_format), req.best_of)
        if req.stream and params.ranked:
            raise APIError(400, f"best_of={req.best_of} > n={params.n} cannot be streamed: the best are known only "
                           "once every candidate has finished", "best_of")
        reply = CompletionReply(b.model_name, b.tokenizer, req.logprobs is not None, params.n)
        return await _respond(request, b, req, ids, params, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        b = get_backend()
        req = await _parse(request, ChatRequest, b)
        if req.tool_choice not in (None, "none", "auto") and not req.tools:
            raise APIError(400, f"tool_choice {req.tool_choice!r} needs tools", "tool_choice")
        grammar = _chat_grammar(b, req)
        ids = chat.chat_prompt(b.tokenizer, req.messages, req.tools, req.tool_choice)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        lps = (req.top_logprobs or 0) if req.logprobs else None
        default = default_max_tokens(limits_of(b), b.max_model_len, ids)
        params = _params(req, limit if limit is not None else default, lps, grammar)
        reply = chat.ChatReply(b.model_name, b.tokenizer, req.tools, req.tool_choice, req.logprobs, params.n)
        return await _respond(request, b, req, ids, params, reply)


_STARTED = int(time.time())


async def _parse(request: Request, model: type[_Sampling], backend: Backend) -> Any:
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as e:     # ValueError: bad JSON, bad UTF-8, an integer of 4300+ digits
        raise APIError(400, f"request body is not valid JSON: {type(e).__name__}: {e}"[:400]) from None
    try:
        check_unicode(data)
    except RequestError as e:
        raise APIError(400, e.message, e.param) from None
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"][:1]) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown field {field!r}: this server does not support it", field) from None
        raise APIError(400, f"{field or 'body'}: {err['msg']}", field) from None
    if req.model != backend.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {backend.model_name!r}",
                       "model", "model_not_found")
    check_defaults(req)
    return req


def _chat_grammar(b: Backend, req: ChatRequest) -> GrammarSpec | None:
    """The grammar a chat request asks for: a forced tool call's, or its response_format's."""
    forced = structured.tool_choice_grammar(b.tokenizer, req.tools, req.tool_choice)
    if forced is not None and req.response_format not in (None, {"type": "text"}):
        raise APIError(400, "response_format cannot be combined with a forced tool_choice", "response_format")
    return forced or response_format_grammar(req.response_format)


def _params(req: _Sampling, max_tokens: int, logprobs: int | None, grammar: GrammarSpec | None,
            best_of: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, top_k=req.top_k or 0,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
        n=1 if req.n is None else req.n, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_p=req.min_p or 0.0, logit_bias=logit_bias(req.logit_bias), grammar=grammar, best_of=best_of)


# The engine's parameter names, as a chat request spells them.
_CHAT_PARAMS = {"prompt": "messages", "logprobs": "top_logprobs"}


def _refusal(e: RequestError, chat: bool) -> APIError:
    """A refused request as OpenAI's 400: the parameter named as the client's route spells it."""
    param = _CHAT_PARAMS.get(e.param, e.param) if chat else e.param
    return APIError(400, e.message, param, e.code)


async def _respond(request: Request, b: Backend, req: _Sampling, ids: list[int], params: SamplingParams,
                   reply: CompletionReply | chat.ChatReply) -> Response:
    try:
        stream = await open_stream(b, ids, params)
    except (RequestError, Unavailable):
        raise
    except Exception as e:
        log.exception("generation failed to start")
        raise APIError(500, f"generation failed: {e}", type="server_error") from None
    if req.stream:
        with_usage = req.stream_options is not None and req.stream_options.include_usage
        body = _sse(stream, reply, with_usage)

        async def close() -> None:    # Starlette stops iterating on disconnect but never closes it
            await body.aclose()
        return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(close))
    try:
        deltas = await _until_disconnect(request, _collect(stream))
    except Unavailable:
        raise
    except Exception as e:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {e}", type="server_error") from None
    if deltas is None:
        return Response(status_code=499)       # nobody is listening; the request was cancelled
    failed = next((d for d in deltas if d.finish_reason == "error"), None)
    if failed is not None:
        raise _failure(failed, limits_of(b).retry_after_s)
    return JSONResponse(reply.whole(deltas))


def _failure(last: Delta, retry_after_s: float) -> APIError:
    """A request the engine ended with an error: 503 + Retry-After when only the experts'
    absence failed it (sent again, it may succeed), else 500."""
    if last.error_code == "unavailable":
        return APIError.unavailable(Unavailable(f"generation failed: {last.error}", retry_after_s))
    return APIError(500, f"generation failed: {last.error}", type="server_error")


async def _collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    try:
        return [d async for d in stream]
    finally:
        await close_quietly(stream)


async def _until_disconnect(request: Request, coro) -> Any:
    """Run coro, cancelling it if the client goes away first (then None)."""
    work = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        work.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return None
        raise
    finally:
        watcher.cancel()


async def _sse(stream: AsyncIterator[Delta], reply: CompletionReply | chat.ChatReply,
               with_usage: bool) -> AsyncIterator[str]:
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        try:
            last = None
            for chunk in reply.opening():
                yield event(chunk)
            async for d in stream:
                last = d
                if d.finish_reason == "error":
                    yield event(_failure(d, 0).body())
                    break
                for chunk in reply.chunks(d):
                    yield event(chunk)
            if with_usage and last is not None and last.finish_reason != "error":
                yield event(reply.usage_chunk())
        except Unavailable as e:   # the engine's replica went away mid-stream
            log.warning("stream broken: %s", e)
            yield event(APIError.unavailable(e).body())
        except Exception as e:     # a remote engine lost mid-stream: tell the client, then end cleanly
            log.exception("stream failed")
            yield event(APIError(500, f"generation failed: {e}", type="server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        await close_quietly(stream)
