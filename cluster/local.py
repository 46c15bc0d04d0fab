"""An engine in one process: the attention side and every expert group, called directly.

This is the in-process path of the design: the oracle the distributed paths are tested
against and the baseline their benchmarks are measured against.
"""

from pathlib import Path

from attention_service.config import EngineConfig
from attention_service.engine import Engine
from attention_service.loader import open_engine
from attention_service.tokenizer import Tokenizer
from attention_service.transport import ExpertTransport, InProcessTransport
from expert_service.loader import load_experts
from mixtral.checkpoint import Checkpoint, resolve_dtype
from router.dispatch import Placement, split_experts


def build_engine(model_dir: str | Path, cfg: EngineConfig = EngineConfig(), groups: int = 1,
                 transport: ExpertTransport | None = None, placement: Placement | None = None,
                 progress: bool = False, expert_dtype: str | None = None) -> tuple[Engine, Tokenizer]:
    """An engine over the checkpoint in model_dir; experts in-process unless a transport is given,
    in expert_dtype (e.g. "fp8"; default: the engine's dtype)."""
    ckpt = Checkpoint(model_dir)
    mc = ckpt.config
    if placement is None:
        placement = Placement.by_expert(split_experts(mc.num_local_experts, groups), mc.num_hidden_layers,
                                        mc.num_local_experts)
    if transport is None:
        rows = resolve_dtype(cfg.dtype, ckpt, cfg.device)
        dtype = resolve_dtype(expert_dtype, ckpt, cfg.device) if expert_dtype else rows
        transport = InProcessTransport([load_experts(ckpt, placement.pairs(g), dtype, cfg.device, progress,
                                                     cfg.cuda_graphs, rows) for g in range(placement.num_groups)])
    return open_engine(ckpt, cfg, transport, placement, progress)
