"""Constrained decoding: a request's JSON Schema as a token mask at every step.

Shapes: B sequences sampling this step, G of them with a grammar, V vocab, W = ceil(V / 32) int32 words.

xgrammar compiles a schema against the vocabulary once (cached by schema text), each
sequence keeps a matcher that is advanced with every token it accepts, and a step's masks
for all its grammar rows are filled in one call on a worker thread, started before the
forward and joined before sampling, and unpacked there into what applying them needs
(token_mask.py), so the mask costs the step only what the forward does not hide. The
runner then sends disallowed tokens to -inf (TokenMask.apply_) before sampling.

Output is compact JSON (no free whitespace: a weak model would otherwise spend its tokens
on it) after an optional space, the one SentencePiece writes before a first word. Control
tokens ([INST], <s>, ...) are never allowed inside the JSON: they decode to nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import torch
import xgrammar as xgr

from attention_service.errors import RequestError
from attention_service.grammar_spec import GrammarSpec
from attention_service.token_mask import TokenMask

if TYPE_CHECKING:
    from attention_service.tokenizer import Tokenizer

_CACHE_SIZE = 256       # compiled grammars kept, least recently used dropped first
_SEPARATORS = (",", ":")
_LEADING_SPACE = 'root ::= [ ]?'


def _grammar(spec: GrammarSpec) -> xgr.Grammar:
    """The spec as an xgrammar Grammar; RequestError naming spec.param when the schema cannot compile."""
    try:
        body = xgr.Grammar.from_json_schema(spec.json_schema, any_whitespace=False, separators=_SEPARATORS,
                                            strict_mode=spec.strict)
    except (RuntimeError, ValueError) as e:
        # xgrammar's messages carry a timestamp and a C++ source line first; the reason is last.
        reason = str(e).strip().splitlines()[0].split(": ", 1)[-1] if str(e).strip() else type(e).__name__
        raise RequestError(f"{spec.param}: the JSON schema cannot be used: {reason}"[:600], spec.param) from None
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(_LEADING_SPACE), body)


def check(spec: GrammarSpec) -> None:
    """Refuse a schema that cannot compile, without a vocabulary (the front door's early check)."""
    _grammar(spec)


def tokenizer_info(tok: Tokenizer) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar reads it, control tokens as empty strings (never matched by text)."""
    inner = tok.mistral.instruct_tokenizer.tokenizer
    n = tok.vocab_size
    sp = getattr(inner, "_model", None)
    if sp is not None:           # SentencePiece: pieces with '▁' for space and <0xNN> byte tokens
        vocab = ["" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(n)]
        kind = xgr.VocabType.BYTE_FALLBACK
    else:                        # Tekken: special tokens first, then raw bytes
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        specials = inner.num_special_tokens
        vocab = [b"" if i < specials else inner.id_to_byte_piece(i, SpecialTokenPolicy.RAISE) for i in range(n)]
        kind = xgr.VocabType.RAW
    return xgr.TokenizerInfo(vocab, kind, vocab_size=n, stop_token_ids=[tok.eos_id], add_prefix_space=sp is not None)


class GrammarMatcher:
    """One sequence's place in its grammar: forced prefix tokens first, then the JSON."""

    def __init__(self, compiled: xgr.CompiledGrammar, prefix: Sequence[int], stop_ids: Sequence[int],
                 vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.pending = list(prefix)
        self.stop_ids, self.vocab_size = list(stop_ids), vocab_size
        self.error: str | None = None

    def accept(self, token: int) -> bool:
        """Advance past the sampled token; True once the sequence must end: its output is complete
        (nothing but a stop token could follow), or the token broke the grammar (then `error` says so)."""
        if self.pending:
            forced = self.pending.pop(0)
            if token != forced:
                self.error = f"sampled token {token} where the grammar forced token {forced}"
            return token != forced
        if not self.matcher.accept_token(token):
            self.error = f"sampled token {token}, which the grammar does not allow here"
            return True
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(mask)
        for t in self.stop_ids:
            mask[0, t // 32] &= ~_bit(t % 32)
        return not bool(mask.any())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this step's allowed tokens into bitmask[row] (for a forced token: that one)."""
        if self.pending:
            t = self.pending[0]
            bitmask[row].zero_()
            bitmask[row, t // 32] = _bit(t % 32)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores (bit 31 is negative)."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


class Grammars:
    """Compiled grammars for one tokenizer, and the batched masks of a step's grammar rows."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None    # built on first use: ~0.1 s, not every engine needs it
        self._cache: OrderedDict[tuple[str, bool], xgr.CompiledGrammar] = OrderedDict()
        self.vocab_size = tokenizer.vocab_size

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        key = (spec.json_schema, spec.strict)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(tokenizer_info(self.tokenizer))
            compiler = self._compiler
        compiled = compiler.compile_grammar(_grammar(spec))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec), spec.prefix_token_ids, [self.tokenizer.eos_id], self.vocab_size)


# One worker for every engine in the process: steps of one engine never overlap, and the
# batch matcher spreads a step's rows over its own threads. Its torch ops (unpacking the
# masks) are small: run on one thread, they leave the forward's threads alone.
_worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask", initializer=torch.set_num_threads, initargs=(1,))
_batch: list[xgr.BatchGrammarMatcher] = []


def fill_masks(matchers: list[GrammarMatcher], rows: list[int] | None = None, batch: int | None = None,
               device: torch.device | str = "cpu") -> TokenMask:
    """The mask of a batch of B = batch (by default G) rows: row rows[g] (by default g) allows
    the tokens matchers[g] allows next, the other rows allow everything; unpacked for logits
    on device (see token_mask.py)."""
    rows = list(range(len(matchers))) if rows is None else rows
    if not _batch:
        _batch.append(xgr.BatchGrammarMatcher())
    vocab = matchers[0].vocab_size
    bitmask = xgr.allocate_token_bitmask(batch or len(matchers), vocab)
    free = [g for g, m in enumerate(matchers) if not m.pending]
    if free:
        _batch[0].batch_fill_next_token_bitmask([matchers[g].matcher for g in free], bitmask,
                                                [rows[g] for g in free])
    for g, m in enumerate(matchers):
        if m.pending:
            m.fill(bitmask, rows[g])
    if torch.device(device).type == "cpu":
        return TokenMask.unpack(bitmask, rows, vocab)
    return TokenMask(bitmask, rows, vocab)


def start_masks(matchers: list[GrammarMatcher], rows: list[int], batch: int, device: torch.device) -> Future:
    """fill_masks on the worker thread; the Future's result is the TokenMask."""
    return _worker.submit(fill_masks, matchers, rows, batch, device)


def apply_masks(masks: Future, logits: torch.Tensor) -> Future:
    """start_masks's masks applied to logits in place; the Future is done once they are. CPU
    logits are masked on the worker too: on one thread its passes take as long as on two,
    and a core busy with something else cannot hold them up (a pass split over two threads
    waits for the slower one)."""
    if logits.device.type == "cpu":
        return _worker.submit(lambda: masks.result().apply_(logits))
    masks.result().apply_(logits)  # the GPU kernel goes on the caller's stream, after the logits
    done = Future()
    done.set_result(None)
    return done
