"""The /v1/completions response, whole or as stream chunks (chat's is cluster/api/chat.py)."""

from __future__ import annotations

import time
import uuid

from attention_service.async_engine import Delta
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import token_text, usage


class CompletionReply:
    """The /v1/completions response, whole or as stream chunks."""

    def __init__(self, model: str, tok: Tokenizer, logprobs: bool):
        self.model, self.tok, self.want_logprobs = model, tok, logprobs
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offset = 0          # text_offset of the next token, in characters of the completion

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def logprobs(self, ids: list[int], lps: list | None) -> dict | None:
        if not self.want_logprobs or lps is None:
            return None
        toks = [token_text(self.tok, t) for t in ids]
        offsets = []
        for t in toks:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": toks, "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{token_text(self.tok, i): v for i, v in alts} for _, alts in lps],
                "text_offset": offsets}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, d: Delta) -> list[dict]:
        lp = self.logprobs(d.token_ids, d.logprobs)
        if not d.text and d.finish_reason is None and lp is None:
            return []
        return [self.envelope([{"index": 0, "text": d.text, "finish_reason": d.finish_reason, "logprobs": lp}])]

    def usage_chunk(self, last: Delta) -> dict:
        return self.envelope([], usage=usage(last))

    def whole(self, deltas: list[Delta]) -> dict:
        lp = self.logprobs([t for d in deltas for t in d.token_ids], [x for d in deltas for x in d.logprobs or []])
        choice = {"index": 0, "text": "".join(d.text for d in deltas), "finish_reason": deltas[-1].finish_reason,
                  "logprobs": lp}
        return self.envelope([choice], usage=usage(deltas[-1]))
