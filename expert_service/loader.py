"""Build an expert shard's weights from a checkpoint, reading only its (layer, expert) pairs."""

import torch

from expert_service.experts import ExpertWeights
from mixtral.checkpoint import Checkpoint, expert_tensor_names, resolve_dtype


def load_experts(ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype, device: str = "cpu",
                 progress: bool = False, cuda_graphs: bool = True,
                 row_dtype: torch.dtype | None = None) -> ExpertWeights:
    """dtype: the compute dtype (mixtral.checkpoint.resolve_dtype), or torch.float8_e4m3fn for
    fp8 weights: then rows travel in row_dtype (unset: what "auto" gives on this device, the
    checkpoint's on CPU and bfloat16 on GPU), the weights are read in it and quantised to
    e4m3 with one scale per output channel, one expert at a time.
    cuda_graphs: capture decode-sized batches on CUDA (MOE_SERVE_CUDA_GRAPHS=0 also turns it off)."""
    cfg = ckpt.config
    for layer, expert in pairs:
        if not (0 <= layer < cfg.num_hidden_layers and 0 <= expert < cfg.num_local_experts):
            raise ValueError(f"(layer {layer}, expert {expert}) is outside the model "
                             f"({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts)")
    fp8 = dtype == torch.float8_e4m3fn
    if fp8:
        dtype = row_dtype or resolve_dtype("auto", ckpt, str(torch.device(device).type))
    names = [n for p in pairs for n in expert_tensor_names(*p)]
    w = {n: t.to(device) for n, t in ckpt.read_many(names, dtype, progress).items()}
    tensors = {p: tuple(w[n] for n in expert_tensor_names(*p)) for p in pairs}
    return ExpertWeights(tensors, cfg.num_local_experts, fp8=fp8, cuda_graphs=cuda_graphs)
