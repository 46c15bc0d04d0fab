"""Turn a step's last-position logits into tokens.

Shapes: B sequences sampling this step, V vocab.

Greedy rows take the argmax. The others are scaled by temperature, cut to top-k and
top-p, and drawn by the exponential race (argmax p / Exp(1), which is a draw from p) with
noise from a generator seeded by (request seed, tokens generated so far): a request's
output depends on its seed only, never on what else shares the batch.
"""

import torch

from attention_service.sampling_params import SamplingParams


def _noise(seed: int, step: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.empty(vocab).exponential_(generator=g).to(device)        # [V] ~ Exp(1)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; top_k [B] (0 = off); top_p [B] -> probs [B, V] with cut tokens at 0."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cut |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = probs.masked_fill(cut, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> torch.Tensor:
    """logits [B, V] fp32 -> tokens [B] int64."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    idx = torch.tensor(rows, device=logits.device)
    temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    probs = _filter(logits[idx] / temp[:, None], top_k, top_p)
    noise = torch.stack([_noise(seeds[i], steps[i], logits.shape[-1], logits.device) for i in rows])
    tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution: chosen [B], top ids [B, n], top values [B, n]."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    values, ids = logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, ids, values
