"""Turn a step's last-position logits into tokens.

Shapes: B sequences sampling this step, R of them not greedy, P of them penalised, V vocab,
C candidates, N tokens of the penalised rows in all.

In order: logit_bias, then the penalties (repetition over prompt and output, frequency and
presence over the output), all on the logits, as vLLM does; greedy rows then take the
argmax of what is left. The penalties are a few tensor ops per step, whatever the batch
holds: the rows' tokens laid end to end address the logits they change (see penalize).

The others are scaled by temperature, cut by min_p, then top-k and top-p (on what min_p
left, renormalised), and drawn by inverse CDF with one uniform from a generator seeded by
(request seed, tokens generated so far): a request's output depends on its seed only, never on what else
shares the batch.

Nothing here sorts the vocabulary when it can be avoided (on a CPU, sorting a batch's
vocabularies takes longer than the model's step; docs/benchmarks.md): rows without a cut
sample from the softmax as it is, and rows with a cut sample among their top C candidates
(C = their largest top-k, or _TOP_P_CANDIDATES for a top-p cut, widened to the whole
vocabulary only for a row whose top C does not hold top_p of the mass). Both give exactly
the distribution the cuts define.
"""

import itertools

import torch

from attention_service import cpu_kernels
from attention_service.sampling_params import SamplingParams

_TOP_P_CANDIDATES = 1024


def _uniforms(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """[R] uniforms in [0, 1), each from its own (seed, step) generator."""
    return torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(
        (seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)) for seed, step in zip(seeds, steps)])


def _candidates(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [R, V] (softmax); top_k [R] (0 = off); top_p [R] -> kept [R, C] in descending order
    (cut ones 0, not normalised), ids [R, C].

    Top-k keeps the k most likely and renormalises over them; top-p then keeps the smallest
    prefix whose mass reaches top_p (the first token always stays).
    """
    V = probs.shape[-1]
    c = min(V, max(int(top_k.max()), _TOP_P_CANDIDATES if bool(((top_k == 0) & (top_p < 1)).any()) else 1))
    vals, ids = probs.topk(c, dim=-1)                                    # [R, C], sorted
    if c < V and bool(((top_k == 0) & (top_p < 1) & (vals.sum(-1) < top_p)).any()):
        vals, ids = probs.sort(dim=-1, descending=True)                  # a flat row: its cut may lie past C
        c = V
    rank = torch.arange(c, device=probs.device)[None, :]
    cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    kept = vals.masked_fill(cut, 0.0)
    kept = kept / torch.where(top_k > 0, kept.sum(-1), 1.0)[:, None]     # top-k renormalises
    cut |= (kept.cumsum(-1) - kept) >= top_p[:, None]
    return kept.masked_fill(cut, 0.0), ids


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [R, N] >= 0 (any scale); u [R] in [0, 1) -> index [R] of a draw proportional to weights."""
    N = weights.shape[-1]
    cdf = weights.cumsum(-1)                                             # [R, N]
    target = (u * cdf[:, -1])[:, None]
    # right=True: the first index whose cdf exceeds the target, so never a zero-weight entry;
    # a target rounded up to the total finds none and takes the last positive entry.
    pick = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = N - 1 - (weights.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return torch.where(pick < N, pick, last)


def penalize(logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]],
             prompt_lens: list[int]) -> torch.Tensor:
    """logits [B, V] -> a copy with logit_bias and penalties applied (logits itself where no row
    has any). history[i]: row i's tokens, prompt then output; prompt_lens[i]: how many of them
    are prompt.

    Only the entries the rows' tokens name are touched: the tokens of every penalised row,
    laid end to end, address the flattened logits (row * V + token), so a step costs O(N)
    plus one sort of the output tokens (their per-row counts), not O(P * V).
    """
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[-1]
    x = logits.clone()
    flat_x = x.view(-1)
    biased = [(i * V + t, b) for i in rows for t, b in params[i].logit_bias.items()]
    if biased:
        at, b = zip(*biased)
        flat_x.index_add_(0, torch.tensor(at, device=dev), torch.tensor(b, dtype=x.dtype, device=dev))
    rep_on = any(params[i].repetition_penalty != 1 for i in rows)
    count_on = any(params[i].frequency_penalty or params[i].presence_penalty for i in rows)
    if not (rep_on or count_on):
        return x
    lens = torch.tensor([len(history[i]) for i in rows])
    tokens = torch.tensor(list(itertools.chain.from_iterable(history[i] for i in rows)), dtype=torch.int64)
    row = torch.repeat_interleave(torch.tensor(rows), lens)                   # [N]
    pos = torch.arange(len(tokens)) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    out = pos >= torch.repeat_interleave(torch.tensor([prompt_lens[i] for i in rows]), lens)
    key = (row * V + tokens).to(dev)                                          # [N] into flat_x
    # Repetition: every entry is read before any is written, so a token seen twice is
    # penalised once.
    if rep_on:
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=dev)[row.to(dev)]
        seen = flat_x[key]
        flat_x[key] = torch.where(seen > 0, seen / rep, seen * rep)
    if not count_on:
        return x
    # Frequency and presence, over the output: each distinct (row, token) once, with its count.
    ukey, count = torch.unique(key[out.to(dev)], return_counts=True)
    r = ukey // V
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=dev)[r]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=dev)[r]
    flat_x.index_add_(0, ukey, -(freq * count.to(x.dtype) + pres))
    return x


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> each row's argmax [B], as torch.argmax gives it (first of equal maxima,
    a NaN above all); fp32 on CPU through our kernel (csrc/fused.cpp), ten times faster."""
    ops = cpu_kernels.fused_ops(logits.dtype, logits.device)
    if ops is not None and logits.dim() == 2 and logits.shape[1] > 0 and logits.is_contiguous():
        return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
           history: list[list[int]] | None = None, prompt_lens: list[int] | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> tokens [B] int64. history and prompt_lens (see penalize) are needed
    only when some row has penalties or a logit_bias."""
    if history is not None:
        logits = penalize(logits, params, history, prompt_lens)
    elif any(p.penalized for p in params):
        raise ValueError("penalties and logit_bias need each row's tokens (history)")
    tokens = argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev, V = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, device=dev)
    temp = torch.tensor([params[i].temperature for i in rows], device=dev)
    # Off (-1, 0) and a k of the whole vocabulary or more all mean no cut: 0 here.
    top_k = torch.tensor([k if 0 < (k := params[i].top_k) < V else 0 for i in rows], device=dev)
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
    mine = logits if len(rows) == len(params) else logits[idx]
    # Shifted before dividing, so a tiny temperature sends the others to -inf and the best to 0,
    # never inf - inf: the limit of the softmax as temperature goes to 0 is the argmax.
    mine = mine - mine.max(dim=-1, keepdim=True).values
    probs = torch.softmax(mine / temp[:, None], dim=-1)                   # [R, V]
    if any(params[i].min_p > 0 for i in rows):
        min_p = torch.tensor([params[i].min_p for i in rows], device=dev)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    u = _uniforms([seeds[i] for i in rows], [steps[i] for i in rows]).to(dev)
    plain = (top_k == 0) & (top_p >= 1)                                   # [R] no cut: the softmax as it is
    if bool(plain.all()):
        out = _draw(probs, u)
    else:
        out = torch.empty(len(rows), dtype=torch.int64, device=dev)
        if bool(plain.any()):
            out[plain] = _draw(probs[plain], u[plain])
        cut = ~plain
        kept, ids = _candidates(probs[cut], top_k[cut], top_p[cut])
        out[cut] = ids.gather(-1, _draw(kept, u[cut])[:, None]).squeeze(-1)
    tokens[idx] = out
    return tokens


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution: chosen [B], top ids [B, n], top values [B, n]."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    values, ids = logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, ids, values
