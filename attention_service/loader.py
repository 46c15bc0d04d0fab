"""Build the attention side from a checkpoint, reading only the tensors it owns."""

import torch

from attention_service.model import AttentionModel
from mixtral.checkpoint import Checkpoint, attention_tensor_names


def load_attention_model(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu",
                         progress: bool = False) -> AttentionModel:
    names = attention_tensor_names(ckpt.config)
    weights = {n: t.to(device) for n, t in ckpt.read_many(names, dtype, progress).items()}
    return AttentionModel(ckpt.config, weights)
