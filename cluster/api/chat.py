"""Chat in Mixtral's instruct format: OpenAI messages in, prompt ids out; replies and tool calls back.

The template is mistral_common's, so prompts match what Mistral's own stack builds
for the same tokenizer version: v1 writes `[INST]` as text and has no tools; v3 has
control tokens for `[INST]`, `[AVAILABLE_TOOLS]`, `[TOOL_CALLS]` and `[TOOL_RESULTS]`.

A v3 model calls tools by emitting the `[TOOL_CALLS]` control token first, then a JSON
list of `{"name", "arguments"}`. The control token decodes to nothing, so detection
looks at the first generated id, not at the text.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import time
import uuid
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokens

from attention_service.async_engine import Delta
from attention_service.errors import RequestError
from attention_service.tokenizer import Tokenizer
from cluster.api.backend import Choices, token_text

_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALNUM = string.ascii_letters + string.digits


class ChatError(RequestError):
    """A conversation that cannot be turned into a prompt for this model."""

    def __init__(self, message: str, param: str | None = "messages", code: str | None = None):
        super().__init__(message, param, code)


def supports_tools(tok: Tokenizer) -> bool:
    return tok.version != "v1"


def tool_calls_token(tok: Tokenizer) -> int | None:
    """The id of `[TOOL_CALLS]`, or None where the vocabulary has no such control token."""
    if not supports_tools(tok):
        return None  # v1 answers get_special_token("[TOOL_CALLS]") with 0, the <unk> id
    return tok.mistral.instruct_tokenizer.tokenizer.get_special_token(SpecialTokens.tool_calls.value)


def chat_prompt(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                tool_choice: Any = None) -> list[int]:
    """Prompt ids for an OpenAI-style conversation (and tool list); ChatError on what cannot be encoded."""
    uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages
                                    if isinstance(m, dict))
    if uses_tools and not supports_tools(tok):
        # mistral_common would silently drop a v1 tool list; a caller relying on it should know.
        raise ChatError(f"this model's tokenizer ({tok.version}) does not support tools or tool calls",
                        "tools" if tools else "messages")
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    try:
        req = ChatCompletionRequest.from_openai(_fix_call_ids(messages), tools=tools or None, **extra)
        return tok.mistral.encode_chat_completion(req).tokens
    except KeyError as e:        # from_openai indexes message fields without checking them
        raise ChatError(f"invalid conversation: a message lacks the field {e.args[0]!r}") from None
    except Exception as e:       # anything else it trips on (an image part asserts) is still the input's fault
        # pydantic's and mistral_common's messages are multi-line; one line reads better in a 400.
        text = " ".join(str(e).split())
        raise ChatError(f"invalid conversation: {type(e).__name__}: {text}"[:600]) from None


def _fix_call_ids(messages: list[dict]) -> list[dict]:
    """Map OpenAI-style call ids ("call_...") onto the 9 alphanumerics the v3 template demands.

    The map is a pure function of the id, so an assistant's call and the tool message
    answering it still agree.
    """
    def fix(i: Any) -> Any:
        if not isinstance(i, str) or _CALL_ID.match(i):
            return i
        return hashlib.sha256(i.encode()).hexdigest()[:9]

    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        if "tool_call_id" in m:
            m["tool_call_id"] = fix(m["tool_call_id"])
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [{**c, "id": fix(c.get("id"))} if isinstance(c, dict) else c for c in m["tool_calls"]]
        out.append(m)
    return out


def new_call_id() -> str:
    """A tool call id that the v3 template accepts back in the next turn."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def parse_tool_calls(token_ids: list[int], text: str, marker: int | None) -> list[dict] | None:
    """OpenAI `tool_calls` from output that starts with `[TOOL_CALLS]` and JSON; None if it is not that.

    `text` is the decoded output (the marker decodes to nothing); output that starts with
    the marker but does not parse is left to the caller to return as plain content.
    """
    if marker is None or not token_ids or token_ids[0] != marker:
        return None
    body = text.strip()
    if body.startswith(SpecialTokens.tool_calls.value):
        body = body[len(SpecialTokens.tool_calls.value):].strip()
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            return None
        args = c.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        cid = c.get("id") if isinstance(c.get("id"), str) and _CALL_ID.match(c["id"]) else new_call_id()
        out.append({"id": cid, "type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


class ChatReply(Choices):
    """The /v1/chat/completions response, whole or as stream chunks, one choice per index.

    Output that begins with `[TOOL_CALLS]` is held back while streaming (a half-written
    JSON call is of no use to a client) and sent as one `tool_calls` delta at the end.
    """

    def __init__(self, model: str, tok: Tokenizer, tools: list | None, tool_choice: Any, logprobs: bool,
                 n: int = 1):
        super().__init__(n)
        self.model, self.tok, self.want_logprobs = model, tok, logprobs
        self.marker = tool_calls_token(tok) if tools and tool_choice != "none" else None
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.held: dict[int, list[Delta]] = {}    # per choice, once its first token is the marker
        self.decided: set[int] = set()            # choices whose first token has been seen

    def envelope(self, choices: list, object: str = "chat.completion.chunk", **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def logprobs(self, deltas: list[Delta]) -> dict | None:
        if not self.want_logprobs:
            return None

        def entry(i: int, lp: float) -> dict:
            t = token_text(self.tok, i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}
        return {"content": [{**entry(i, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                            for d in deltas for i, (lp, alts) in zip(d.token_ids, d.logprobs or [])]}

    def message(self, deltas: list[Delta]) -> tuple[dict, str | None]:
        ids = [t for d in deltas for t in d.token_ids]
        text = "".join(d.text for d in deltas)
        calls = parse_tool_calls(ids, text, self.marker)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, deltas[-1].finish_reason

    def whole(self, deltas: list[Delta]) -> dict:
        choices = []
        for index, mine in self.by_choice(deltas):
            msg, finish = self.message(mine)
            choices.append({"index": index, "message": msg, "finish_reason": finish, "logprobs": self.logprobs(mine)})
        return self.envelope(choices, "chat.completion", usage=self.usage())

    def opening(self) -> list[dict]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "logprobs": None}]) for i in range(self.n)]

    def chunks(self, d: Delta) -> list[dict]:
        self.saw(d)
        i = d.index
        if i not in self.decided and d.token_ids:
            self.decided.add(i)
            if self.marker is not None and d.token_ids[0] == self.marker:
                self.held[i] = []
        if i in self.held:
            self.held[i].append(d)
            if d.finish_reason is None:
                return []
            msg, finish = self.message(self.held[i])
            delta = ({"tool_calls": [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]}
                     if "tool_calls" in msg else {"content": msg["content"]})
            return [self.envelope([{"index": i, "delta": delta, "finish_reason": finish,
                                    "logprobs": self.logprobs(self.held[i])}])]
        lp = self.logprobs([d])
        if not d.text and d.finish_reason is None and lp is None:
            return []
        return [self.envelope([{"index": i, "delta": {"content": d.text} if d.text else {},
                                "finish_reason": d.finish_reason, "logprobs": lp}])]

    def usage_chunk(self) -> dict:
        return self.envelope([], usage=self.usage())
