"""A step's token masks: xgrammar's bitmask, turned into what the logits need.

Shapes: B sequences sampling this step, V vocab (of the logits), W = ceil(vocab / 32) int32
words, W0 = vocab // 32 whole words, M words that allow some of their 32 tokens but not all.

Bit j of word w of row r says whether token 32 w + j may follow in row r (grammar.py fills
them; rows without a grammar are all ones). A JSON grammar allows a few tokens at most
places, so nearly every word is 0 (none of its tokens) or -1 (all of them): `unpack`, run
beside the forward on the grammar worker, makes of the bitmask one -inf or -0.0 per word
and the 32 addends of each of the M mixed words. Applying them is then one add over the
logits viewed as [B, W0, 32] (the word's addend broadcast over its tokens) and one indexed
add for the mixed words, each a single pass at memory speed; adding -0.0 leaves every
value as it was, bit for bit. xgrammar's own CPU kernel tests every bit of every row one at
a time, which costs a decode step several milliseconds at 64 rows (docs/benchmarks.md).

On other devices the bitmask goes to xgrammar's GPU kernel as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xgrammar as xgr

_NEG = float("-inf")
_SHIFT = torch.arange(32, dtype=torch.int32)


@dataclass
class TokenMask:
    bitmask: torch.Tensor                 # [B, W] int32, xgrammar's layout
    rows: list[int]                       # the rows with a grammar (the others allow everything)
    vocab: int                            # tokens the bitmask covers
    words: torch.Tensor | None = None     # [B, W0, 1] -inf: the word allows none of its tokens, else -0.0
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None   # (row [M], word [M]) of the mixed words
    mixed_add: torch.Tensor | None = None                    # [M, 32] -inf or -0.0 per token

    @classmethod
    def unpack(cls, bitmask: torch.Tensor, rows: list[int], vocab: int) -> TokenMask:
        """The per-word addends of bitmask, for applying it to CPU logits (see the module doc)."""
        whole = bitmask[:, :vocab // 32]
        words = torch.where(whole == 0, _NEG, -0.0).unsqueeze(-1)
        mixed = ((whole != 0) & (whole != -1)).nonzero(as_tuple=True)
        bits = (whole[mixed].unsqueeze(-1) >> _SHIFT) & 1
        return cls(bitmask, rows, vocab, words, mixed, torch.where(bits == 0, _NEG, -0.0))

    def apply_(self, logits: torch.Tensor) -> None:
        """In place: logits [B, V] lose (to -inf) every token their row's bitmask forbids, and in
        the rows with a grammar every token past the grammar's vocabulary; other rows stay as
        they were."""
        B, V = logits.shape
        w0 = self.vocab // 32
        if self.words is None or logits.device.type != "cpu" or logits.stride(-1) != 1 or V < 32 * w0:
            self._apply_xgrammar(logits)
            return
        dt = logits.dtype
        x = logits.as_strided((B, w0, 32), (logits.stride(0), 32, 1), logits.storage_offset())
        x.add_(self.words.to(dt))
        if self.mixed[0].numel():
            x.index_put_(self.mixed, self.mixed_add.to(dt), accumulate=True)
        if V > 32 * w0:                           # the last, partial word, and anything past the vocabulary
            tail = torch.arange(32 * w0, V)
            rows = torch.tensor(self.rows)
            bit = torch.zeros(len(self.rows), V - 32 * w0, dtype=torch.bool)
            inside = tail < self.vocab
            if bool(inside.any()):
                word = self.bitmask[rows, w0].unsqueeze(-1)
                bit[:, inside] = ((word >> (tail[inside] - 32 * w0).to(torch.int32)) & 1) == 1
            logits[rows, 32 * w0:] = logits[rows, 32 * w0:].masked_fill(~bit, _NEG)

    def _apply_xgrammar(self, logits: torch.Tensor) -> None:
        n = min(logits.shape[-1], self.vocab)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=n, indices=self.rows)
        if logits.shape[-1] > n:                  # logits past the grammar's vocabulary: never allowed
            rows = torch.tensor(self.rows, device=logits.device)
            logits[rows, n:] = _NEG
