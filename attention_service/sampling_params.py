"""What a request asks of generation. Validated on construction so bad input fails early."""

import math

import msgspec

from attention_service.errors import RequestError
from attention_service.grammar_spec import GrammarSpec


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int = 16
    # 0 means greedy: always the most likely token.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1 (the common "off" value) means no top-k cut; a k of the vocabulary or more cuts nothing.
    top_k: int = 0
    # Same seed, same output, whatever else shares the batch.
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # Return the log-probability of each sampled token and of this many alternatives.
    logprobs: int | None = None
    # OpenAI's penalties: subtracted from the logit of every token the output holds, once
    # (presence) or once per occurrence (frequency). The prompt does not count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL's (and transformers'): the logit of every token in the prompt or the output is
    # divided by this when positive, multiplied when negative. 1 is off.
    repetition_penalty: float = 1.0
    # Added to the logits of these token ids before anything else.
    logit_bias: dict[int, float] = {}
    # Drop tokens less likely than min_p times the most likely one (after temperature).
    min_p: float = 0.0
    # Independent completions of the one prompt; they share the prompt's KV blocks.
    n: int = 1
    # OpenAI's best_of: generate this many candidates (choices 0..best_of-1, each what n =
    # best_of would give) and return the n with the highest mean log-probability per token,
    # scored on the model's own distribution, as `logprobs` reports it. None: n.
    best_of: int | None = None
    # Constrained decoding: the output must match this (attention_service/grammar.py).
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            if not math.isfinite(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number, got {getattr(self, name)}", name)
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise RequestError(f"top_k must be >= -1 (-1 or 0 disables it), got {self.top_k}", "top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0 < self.repetition_penalty <= 10:
            raise RequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                               "repetition_penalty")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        bad = next((v for v in self.logit_bias.values() if not -100 <= v <= 100), None)   # NaN fails too
        if bad is not None:
            raise RequestError(f"logit_bias values must be in [-100, 100], got {bad}", "logit_bias")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}", "n")
        if self.best_of is not None and self.best_of < self.n:
            raise RequestError(f"best_of must be at least n ({self.n}), got {self.best_of}", "best_of")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def candidates(self) -> int:
        """Sequences generated: best_of, or n."""
        return self.n if self.best_of is None else self.best_of

    @property
    def ranked(self) -> bool:
        """Whether only the best n of the candidates are returned."""
        return self.candidates > self.n

    @property
    def scored(self) -> bool:
        """Whether each sampled token's log-probability is needed (reported, or ranked on)."""
        return self.logprobs is not None or self.ranked

    @property
    def penalized(self) -> bool:
        """Whether anything changes the model's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias)


def check_prompt(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> int:
    """Refuse, before any work, a prompt that cannot run; returns the positions it needs.

    The model sees every prompt token and every generated one but the last, which is
    sampled from the positions before it: a prompt of the full context still yields a token.
    """
    if not prompt_ids:
        raise RequestError("prompt is empty", "prompt")
    bad = next((t for t in params.logit_bias if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab_size})", "logit_bias")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
    positions = len(prompt_ids) + params.max_tokens - 1
    if positions > max_model_len:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                           f"{positions} positions; the model's context is {max_model_len} tokens",
                           "prompt", "context_length_exceeded")
    return positions
