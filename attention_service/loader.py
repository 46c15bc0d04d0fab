"""Build the attention side from a checkpoint, reading only the tensors it owns."""

import torch

from attention_service.model import AttentionModel
from cluster.checkpoint import Checkpoint, attention_tensor_names


def resolve_dtype(name: str, ckpt: Checkpoint, device: str) -> torch.dtype:
    """'auto' is the checkpoint's dtype on CPU and bfloat16 on GPU."""
    if name == "auto":
        return ckpt.dtype if device == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def load_attention_model(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu",
                         progress: bool = False) -> AttentionModel:
    names = attention_tensor_names(ckpt.config)
    weights = {n: t.to(device) for n, t in ckpt.read_many(names, dtype, progress).items()}
    return AttentionModel(ckpt.config, weights)
