"""The engine as a service: submit a request, get an async stream of its tokens.

One background task runs the engine's steps while any request is in flight; each request
has its own queue of deltas. Leaving a stream early (client gone, `aclose()`, task
cancelled) cancels the request and frees its KV blocks at once.

A step that finds an expert group with no live replica (`ExpertGroupUnavailable`) has
changed nothing yet (tokens are recorded only after the whole step), so it is tried again,
backing off, while the directory brings a replica back; a request that has waited
`expert_wait_s` for one ends with an "unavailable" error, which the front doors answer
with 503 and Retry-After. With `max_waiting` set, a request that would queue behind that
many waiting ones is refused with `Overloaded` before any work.

A request for n choices streams the deltas of all of them, each marked with its `index`;
the stream ends once every choice has finished.

Text is decoded incrementally (multi-byte characters are held until complete) and stop
strings are honoured on the text: the output ends just before the first stop string,
and text that might be the start of one is held back until it is known not to be.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import msgspec

from attention_service.engine import Engine
from attention_service.errors import ExpertGroupUnavailable, Overloaded
from attention_service.sampling_params import SamplingParams
from attention_service.sequence import Sequence
from attention_service.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


class Delta(msgspec.Struct, frozen=True):
    """What one request gained since the last delta; it crosses a Serve handle as it is."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None          # "stop", "length", "abort" or "error"
    # Per new token: (its log-probability, [(alternative id, log-probability), ...]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # With finish_reason "error": "unavailable" when only the experts being out of reach
    # failed it (the same request may succeed later), else None.
    error_code: str | None = None
    index: int = 0                            # which of the request's n choices

    def then(self, later: "Delta") -> "Delta":
        """This delta followed by a later one of the same choice, as one."""
        lps = (None if self.logprobs is None and later.logprobs is None
               else (self.logprobs or []) + (later.logprobs or []))
        return Delta(self.token_ids + later.token_ids, self.text + later.text, later.finish_reason, lps,
                     later.prompt_tokens, later.completion_tokens, later.error, later.error_code, self.index)


def coalesce(deltas: list[Delta]) -> list[Delta]:
    """Deltas in arrival order, each choice's merged into one, in the order choices first appear."""
    out: dict[int, Delta] = {}
    for d in deltas:
        out[d.index] = out[d.index].then(d) if d.index in out else d
    return list(out.values())


@dataclass
class _Choice:
    seq: Sequence
    decoder: IncrementalDecoder
    sent_tokens: int = 0
    held: str = ""           # decoded text not yet sent: it may begin a stop string
    done: bool = False       # its last delta is queued


@dataclass
class _Request:
    choices: list[_Choice]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stalled: float | None = None   # since when its steps have found an expert group unreachable


class AsyncEngine:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_waiting: int | None = None,
                 expert_wait_s: float = 30.0, retry_after_s: float = 5.0):
        """max_waiting: refuse requests beyond this many waiting (None: no bound; a Serve
        deployment bounds its queue in Serve instead). expert_wait_s: how long a request
        waits for an expert group to come back. retry_after_s: what refusals advise."""
        self.engine, self.tokenizer = engine, tokenizer
        self.max_waiting, self.expert_wait_s, self.retry_after_s = max_waiting, expert_wait_s, retry_after_s
        self._outage: float | None = None          # when steps began to find a group unreachable
        self._requests: dict[int, _Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.engine.kv_usage

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, trace_context=None
                       ) -> AsyncIterator[Delta]:
        """Stream one request's deltas; each choice's last one carries finish_reason. Bad input
        raises RequestError, a full queue Overloaded."""
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            raise Overloaded(f"server busy: {self.engine.num_waiting} requests already wait; retry later",
                             self.retry_after_s)
        if params.grammar is not None and self.engine.grammars is not None:
            # Compiled off the loop (a large schema takes a while) and cached for engine.add.
            await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
        seq = self.engine.add(prompt_ids, params, trace_context)      # validates before any work
        req = _Request([_Choice(s, self.tokenizer.incremental(context=prompt_ids)) for s in seq.choices])
        for c in req.choices:
            self._requests[c.seq.seq_id] = req
        self._ensure_running()
        self._wake.set()
        try:
            left = len(req.choices)
            while left:
                # Steps the reader fell behind on go out as one delta per choice: downstream
                # (a Serve handle stream, an SSE chunk) pays per item, not per token.
                pending = [await req.queue.get()]
                while not req.queue.empty():
                    pending.append(req.queue.get_nowait())
                for delta in coalesce(pending):
                    yield delta
                    left -= delta.finish_reason is not None
        finally:
            for c in req.choices:
                self._requests.pop(c.seq.seq_id, None)
                if not c.seq.is_finished:
                    self.engine.finish(c.seq, "abort")       # frees its blocks now

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Delta:
        """The whole output at once, as one Delta."""
        ids, text, lps, last = [], [], [], None
        async for d in self.generate(prompt_ids, params):
            ids += d.token_ids
            text.append(d.text)
            lps += d.logprobs or []
            last = d
        return Delta(ids, "".join(text), last.finish_reason, lps if params.logprobs is not None else None,
                     last.prompt_tokens, last.completion_tokens, last.error, last.error_code)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                touched = await self.engine.step()
            except ExpertGroupUnavailable as e:
                await self._wait_for_experts(str(e))
                continue
            except Exception as e:   # outside the model (the engine fails a step's own sequences itself):
                log.exception("engine step failed")   # fail every request rather than retry it forever
                self._fail_all(f"{type(e).__name__}: {e}")
                continue
            if self._outage is not None:
                log.warning("expert groups reachable again after %.1f s", time.monotonic() - self._outage)
                self._outage = None
                for req in self._requests.values():
                    req.stalled = None
            for seq in touched:
                req = self._requests.get(seq.seq_id)
                if req is not None:
                    self._emit(req)
            await asyncio.sleep(0)                     # let consumers and new submissions in

    def _emit(self, req: _Request) -> None:
        """Queue a delta for each of the request's choices that gained tokens or finished."""
        for c in req.choices:
            seq = c.seq
            if not c.done and (seq.num_output > c.sent_tokens or seq.finish_reason is not None):
                self._emit_choice(req, c)

    def _emit_choice(self, req: _Request, c: _Choice) -> None:
        seq, p = c.seq, c.seq.params
        new = seq.token_ids[seq.num_prompt_tokens + c.sent_tokens:]
        lps = seq.logprobs[c.sent_tokens:] if p.logprobs is not None else None
        c.sent_tokens += len(new)
        text = c.held + c.decoder.push_many(t for t in new if not (t == self.engine.eos_id and not p.ignore_eos))
        finish = seq.finish_reason
        if finish is not None:
            text += c.decoder.flush()
        cut, hold = _stop_scan(text, p.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            self.engine.finish(seq, "stop")
        elif finish is None and hold:
            text, c.held = text[:-hold], text[-hold:]
        else:
            c.held = ""
        c.done = finish is not None
        req.queue.put_nowait(Delta(new, text, finish, lps, seq.num_prompt_tokens, seq.num_output,
                                   seq.error if finish == "error" else None, index=seq.index))

    async def _wait_for_experts(self, message: str) -> None:
        """A step found an expert group unreachable: fail the requests that have waited long
        enough, then pause before the step is tried again (it changed nothing)."""
        now = time.monotonic()
        if self._outage is None:
            self._outage = now
            log.warning("%s; requests wait up to %.0f s for a replica", message, self.expert_wait_s)
        for req in self._unique_requests():
            req.stalled = req.stalled or now
            if now - req.stalled >= self.expert_wait_s:
                self._fail(req, f"{message} (waited {now - req.stalled:.0f} s)", "unavailable")
        # Short at first (a replica set aside comes back quickly), at most a second.
        await asyncio.sleep(min(1.0, 0.05 + (now - self._outage) / 4))

    def _unique_requests(self) -> list[_Request]:
        """Each request once (the map holds it under every choice's id)."""
        return list({id(r): r for r in self._requests.values()}.values())

    def _fail(self, req: _Request, message: str, code: str | None = None) -> None:
        for c in req.choices:
            if not c.done:
                self.engine.finish(c.seq, "error")
                c.done = True
                req.queue.put_nowait(Delta([], "", "error", None, c.seq.num_prompt_tokens, c.seq.num_output,
                                           error=message, error_code=code, index=c.seq.index))

    def _fail_all(self, message: str) -> None:
        for req in self._unique_requests():
            self._fail(req, message)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.engine.close()


def _stop_scan(text: str, stops: list[str]) -> tuple[int | None, int]:
    """(index where the first stop string starts, or None; chars at the end that may begin one)."""
    if not stops:
        return None, 0
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return min(found), 0
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[-n:]):
                hold = n
                break
    return None, hold
