"""What becomes of the OpenAI request fields that are not plain sampling parameters.

No field is ignored silently (docs/api.md lists them all): the request models refuse
unknown ones; the fields below are accepted only where they change nothing, or, for the
ones clients send by default and that mean nothing to this server, accepted and ignored.
Refusals are `RequestError`s, so a 400 that names the field.
"""

from __future__ import annotations

from typing import Any

from attention_service.errors import RequestError

# Accepted only at these values: anything else would silently differ.
ONLY_DEFAULT = {"echo": (None, False), "suffix": (None, ""), "modalities": (None, ["text"]),
                "parallel_tool_calls": (None, True), "audio": (None,), "prediction": (None,),
                "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,),
                "functions": (None,), "function_call": (None,)}
# Sent by clients by default and meaningless here (nothing is stored, there is one service
# tier, prefixes are cached on their own): accepted and ignored.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "moderation")


def check_defaults(req: Any) -> None:
    """Refuse a field of ONLY_DEFAULT set to anything but its default."""
    for name, allowed in ONLY_DEFAULT.items():
        if getattr(req, name, None) not in allowed:
            only = f" (only {allowed[1]!r})" if len(allowed) > 1 else ""
            raise RequestError(f"{name}={getattr(req, name)!r} is not supported{only}", name)


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias, whose token ids are JSON keys (strings), as SamplingParams takes it."""
    out = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = v
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
    return out
