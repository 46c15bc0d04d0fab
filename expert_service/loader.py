"""Build an expert shard's weights from a checkpoint, reading only its (layer, expert) pairs."""

import torch

from expert_service.experts import ExpertWeights
from mixtral.checkpoint import Checkpoint, expert_tensor_names


def load_experts(ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype, device: str = "cpu",
                 progress: bool = False) -> ExpertWeights:
    cfg = ckpt.config
    for layer, expert in pairs:
        if not (0 <= layer < cfg.num_hidden_layers and 0 <= expert < cfg.num_local_experts):
            raise ValueError(f"(layer {layer}, expert {expert}) is outside the model "
                             f"({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts)")
    names = [n for p in pairs for n in expert_tensor_names(*p)]
    w = {n: t.to(device) for n, t in ckpt.read_many(names, dtype, progress).items()}
    tensors = {p: tuple(w[n] for n in expert_tensor_names(*p)) for p in pairs}
    return ExpertWeights(tensors, cfg.num_local_experts)
