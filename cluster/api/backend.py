"""What the front door (OpenAI HTTP, public gRPC) needs from an engine, wherever it runs.

The same route code serves an engine in this process (`LocalBackend`: tests, running
without Ray) and one behind a Ray Serve `DeploymentHandle`, where deltas arrive as the
same `Delta` structs and errors arrive re-raised from another process with their types.
So requests are checked here, before dispatch, and `open_stream` waits for the first
delta: input the engine alone can refuse (a KV cache too small) still fails before any
response is sent, and the caller can answer with a clean 400 / INVALID_ARGUMENT instead
of a broken stream. A request the engine could not serve before its first token only
because the experts were out of reach raises `Unavailable` there too (503, not a 200
carrying an error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import anyio

from attention_service import sampling_params
from attention_service.async_engine import AsyncEngine, Delta
from attention_service.config import EngineConfig
from attention_service.errors import Unavailable
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer
from cluster.api.access import ApiKeys
from cluster.api.limits import RequestLimits, check_params, limits_of
from cluster.local import build_engine


class Backend(Protocol):
    model_name: str          # what /v1/models lists and requests must name
    tokenizer: Tokenizer
    max_model_len: int
    limits: RequestLimits    # what one request may ask (cluster/api/limits.py)
    api_keys: ApiKeys        # who may ask (none: anyone who reaches the port)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """One request's deltas, the last with finish_reason; bad input raises RequestError."""
        ...

    async def ready(self) -> tuple[bool, dict]:
        """Whether a request sent now could be served, and what was found (for /ready)."""
        ...


class LocalBackend:
    """An `AsyncEngine` in this process. Its engine loop binds to the event loop that first streams."""

    def __init__(self, engine: AsyncEngine, model_name: str, limits: RequestLimits = RequestLimits(),
                 api_keys: ApiKeys = ApiKeys()):
        self.engine, self.model_name, self.limits, self.api_keys = engine, model_name, limits, api_keys
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, cfg: EngineConfig | None = None, groups: int = 1,
                        model_name: str | None = None, limits: RequestLimits = RequestLimits(),
                        api_keys: ApiKeys = ApiKeys(), max_waiting: int | None = None) -> LocalBackend:
        """Load the checkpoint with every expert in-process; served under the folder's name by default."""
        engine, tok = build_engine(model_dir, cfg or EngineConfig(), groups)
        return cls(AsyncEngine(engine, tok, max_waiting=max_waiting, retry_after_s=limits.retry_after_s),
                   model_name or Path(model_dir).resolve().name, limits, api_keys)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return self.engine.generate(prompt_ids, params)

    async def ready(self) -> tuple[bool, dict]:
        """Experts behind a gRPC transport are ready while every group has a live replica."""
        live = getattr(self.engine.engine.transport, "live", None)
        if live is None:
            return True, {}
        counts = [len(live(g)) for g in range(len(self.engine.engine.transport.replicas))]
        return all(counts), {"expert_replicas": counts}

    async def close(self) -> None:
        await self.engine.close()


def getter(backend: Backend | Callable[[], Backend]) -> Callable[[], Backend]:
    """A backend, or a function giving the current one (built after the routes are), as a function."""
    return (lambda: backend) if hasattr(backend, "stream") else backend


class Choices:
    """What the replies of both routes track of a request's n choices: the latest counts of each."""

    def __init__(self, n: int):
        self.n = n
        self.last: dict[int, Delta] = {}

    def saw(self, d: Delta) -> None:
        self.last[d.index] = d

    def by_choice(self, deltas: list[Delta]) -> list[tuple[int, list[Delta]]]:
        """A whole request's deltas, grouped by choice, in index order."""
        for d in deltas:
            self.saw(d)
        return [(i, [d for d in deltas if d.index == i]) for i in sorted(self.last)]

    def usage(self) -> dict:
        """OpenAI's usage object: the prompt once, every choice's completion tokens, and those
        of the best_of candidates not returned (generated all the same)."""
        prompt = max((d.prompt_tokens for d in self.last.values()), default=0)
        completion = sum(d.completion_tokens + d.unreturned_tokens for d in self.last.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tok: Tokenizer, token_id: int) -> str:
    """How a token reads in logprobs: its vocabulary piece, SentencePiece's word marker as a space."""
    return tok.piece(token_id).replace("\u2581", " ")


def check_prompt(backend: Backend, prompt_ids: list[int], params: SamplingParams) -> None:
    """Refuse what the engine would refuse, in its words, and what the limits forbid, before
    anything is dispatched."""
    check_params(params, limits_of(backend), backend.tokenizer.vocab_size)
    sampling_params.check_prompt(prompt_ids, params, backend.tokenizer.vocab_size, backend.max_model_len)


async def open_stream(backend: Backend, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
    """Check, dispatch and wait for the first delta; RequestError here means bad input.

    The returned generator must be closed (`aclose()`) by whoever stops reading it early;
    closing it cancels the request in the engine.
    """
    check_prompt(backend, prompt_ids, params)
    it = aiter(backend.stream(prompt_ids, params))
    try:
        first = await anext(it)
    except BaseException:
        await close_quietly(it)
        raise
    if first.finish_reason == "error" and first.error_code == "unavailable" and not first.token_ids:
        await close_quietly(it)
        raise Unavailable(f"generation could not start: {first.error}", limits_of(backend).retry_after_s)
    return _chain(first, it)


async def _chain(first: Delta, rest: AsyncIterator) -> AsyncIterator[Delta]:
    try:
        yield first
        async for x in rest:         # ends after the last choice's last delta
            yield x
    finally:
        await close_quietly(rest)


async def close_quietly(it: Any) -> None:
    """Close an async iterator even inside a cancelled task (Starlette cancels on disconnect)."""
    aclose = getattr(it, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            pass
