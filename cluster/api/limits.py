"""What a request may ask for, checked at the front door before anything reaches the engine.

Both doors (OpenAI HTTP, public gRPC) apply the same bounds: every number in range, every
string valid Unicode (JSON can spell a lone UTF-16 surrogate, which no tokenizer can
encode), stop conditions few and short enough that checking them on every token costs
the engine loop nothing, and a default `max_tokens` for requests that set none. Whatever
is refused is the client's fault and says which field: `RequestError`, so HTTP 400 /
gRPC INVALID_ARGUMENT. The HTTP-only bounds (body size, content type) are in http_guard.
"""

from __future__ import annotations

from typing import Any

import msgspec

from attention_service.errors import RequestError
from attention_service.sampling_params import SamplingParams
from mixtral.config import ConfigError

_INT64 = 1 << 63


class RequestLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The app config's `limits`: bounds on what one request may ask."""

    # Bodies larger than this get 413 before they are read: a 64K-token prompt is well
    # under 1 MiB of JSON, and parsing a larger body would stall the front door for everyone.
    max_body_bytes: int = 4 << 20
    # max_tokens for chat and gRPC requests that set none (/v1/completions keeps OpenAI's
    # 16), and never more than the context leaves: a request without it should not hold
    # a sequence slot for the whole context.
    default_max_tokens: int = 2048
    # Stop strings and stop token ids are checked on every generated token.
    max_stop: int = 16
    max_stop_chars: int = 512
    max_stop_token_ids: int = 64
    # Choices per request (n, and best_of's candidates): each is a sequence of its own
    # once the prompt is computed.
    max_n: int = 16
    # logit_bias entries: each is one scattered add on every step.
    max_logit_bias: int = 300
    # Seconds that 429 (queue full) and 503 (no replica to serve it) answers ask clients to
    # wait before retrying (Retry-After).
    retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_stop", "max_stop_chars", "max_stop_token_ids",
                     "max_n", "max_logit_bias"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be at least 1, got {getattr(self, name)}")
        if not self.retry_after_s >= 0:
            raise ConfigError(f"limits.retry_after_s must not be negative, got {self.retry_after_s}")


DEFAULT_LIMITS = RequestLimits()


def limits_of(backend: Any) -> RequestLimits:
    """A backend's limits; the defaults for one that sets none."""
    return getattr(backend, "limits", None) or DEFAULT_LIMITS


def check_unicode(value: Any, param: str | None = None) -> None:
    """Refuse any string inside value (dict keys included) that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{param or 'body'}: not valid Unicode (U+{ord(value[e.start]):04X}, a lone "
                               f"surrogate, at character {e.start})", param) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, param or (k if isinstance(k, str) else None))
            check_unicode(v, param or (k if isinstance(k, str) else None))
    elif isinstance(value, list):
        for v in value:
            check_unicode(v, param)


def check_params(params: SamplingParams, limits: RequestLimits, vocab_size: int) -> None:
    """The bounds SamplingParams does not know: they depend on the server's limits and vocabulary."""
    if params.seed is not None and not -_INT64 <= params.seed < 2 * _INT64:
        raise RequestError(f"seed must fit in 64 bits, got {params.seed}", "seed")
    if params.n > limits.max_n:
        raise RequestError(f"n may be {limits.max_n} at most, got {params.n}", "n")
    if params.candidates > limits.max_n:
        raise RequestError(f"best_of may be {limits.max_n} at most (limits.max_n), got {params.best_of}", "best_of")
    if len(params.logit_bias) > limits.max_logit_bias:
        raise RequestError(f"at most {limits.max_logit_bias} logit_bias entries, got {len(params.logit_bias)}",
                           "logit_bias")
    if len(params.stop) > limits.max_stop:
        raise RequestError(f"at most {limits.max_stop} stop strings, got {len(params.stop)}", "stop")
    long = next((s for s in params.stop if len(s) > limits.max_stop_chars), None)
    if long is not None:
        raise RequestError(f"stop strings may be {limits.max_stop_chars} characters at most, got {len(long)}",
                           "stop")
    check_unicode(params.stop, "stop")
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(f"at most {limits.max_stop_token_ids} stop_token_ids, got {len(params.stop_token_ids)}",
                           "stop_token_ids")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"stop token id {bad} is outside the vocabulary [0, {vocab_size})", "stop_token_ids")


def default_max_tokens(limits: RequestLimits, max_model_len: int, prompt_ids: list[int]) -> int:
    """max_tokens for a request that sets none: the configured default, within what the context leaves."""
    return max(1, min(limits.default_max_tokens, max_model_len - len(prompt_ids) + 1))
