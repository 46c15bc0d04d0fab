"""Top-k gating with Mixtral's semantics.

Shapes: T tokens, D hidden, E experts, K top-k.

Mixtral picks the K largest router logits and weighs the chosen experts by a softmax over
those K logits. That equals "softmax over all E, keep the top K, renormalise", which is
how the reference implementation writes it; computing it over K values only is cheaper.
"""

import torch


def route(y: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [T, D], gate_weight [E, D] -> expert ids [T, K] (int64), weights [T, K] (float32)."""
    logits = torch.nn.functional.linear(y, gate_weight).float()   # [T, E]
    top_logits, ids = torch.topk(logits, top_k, dim=-1)           # [T, K]
    return ids, torch.softmax(top_logits, dim=-1)

