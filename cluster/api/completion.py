"""The /v1/completions response, whole or as stream chunks (chat's is cluster/api/chat.py)."""

from __future__ import annotations

import time
import uuid

from attention_service.async_engine import Delta
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import Choices, token_text


class CompletionReply(Choices):
    """The /v1/completions response, whole or as stream chunks, one choice per index."""

    def __init__(self, model: str, tok: Tokenizer, logprobs: bool, n: int = 1):
        super().__init__(n)
        self.model, self.tok, self.want_logprobs = model, tok, logprobs
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offset = [0] * n    # per choice: text_offset of its next token, in characters of its text

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def logprobs(self, index: int, ids: list[int], lps: list | None) -> dict | None:
        if not self.want_logprobs or lps is None:
            return None
        toks = [token_text(self.tok, t) for t in ids]
        offsets = []
        for t in toks:
            offsets.append(self.offset[index])
            self.offset[index] += len(t)
        return {"tokens": toks, "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{token_text(self.tok, i): v for i, v in alts} for _, alts in lps],
                "text_offset": offsets}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, d: Delta) -> list[dict]:
        self.saw(d)
        lp = self.logprobs(d.index, d.token_ids, d.logprobs)
        if not d.text and d.finish_reason is None and lp is None:
            return []
        return [self.envelope([{"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": lp}])]

    def usage_chunk(self) -> dict:
        return self.envelope([], usage=self.usage())

    def whole(self, deltas: list[Delta]) -> dict:
        choices = []
        for index, mine in self.by_choice(deltas):
            lp = self.logprobs(index, [t for d in mine for t in d.token_ids],
                               [x for d in mine for x in d.logprobs or []])
            choices.append({"index": index, "text": "".join(d.text for d in mine),
                            "finish_reason": mine[-1].finish_reason, "logprobs": lp})
        return self.envelope(choices, usage=self.usage())
