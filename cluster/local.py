"""An engine in one process: the attention side and every expert group, called directly.

This is the in-process path of the design: the oracle the distributed paths are tested
against and the baseline their benchmarks are measured against.
"""

from pathlib import Path

from attention_service.engine import Engine
from attention_service.loader import load_attention_model
from attention_service.tokenizer import Tokenizer
from attention_service.transport import ExpertTransport, InProcessTransport
from mixtral.checkpoint import Checkpoint, resolve_dtype
from attention_service.config import EngineConfig
from expert_service.loader import load_experts
from router.dispatch import Placement


def split_experts(num_experts: int, groups: int) -> list[list[int]]:
    """Whole experts dealt round-robin into `groups` groups: 8 into 2 gives {0,2,4,6}, {1,3,5,7}."""
    if not 1 <= groups <= num_experts:
        raise ValueError(f"groups must be in [1, {num_experts}], got {groups}")
    return [list(range(g, num_experts, groups)) for g in range(groups)]


def build_engine(model_dir: str | Path, cfg: EngineConfig = EngineConfig(), groups: int = 1,
                 transport: ExpertTransport | None = None, placement: Placement | None = None,
                 progress: bool = False) -> tuple[Engine, Tokenizer]:
    """An engine over the checkpoint in model_dir; experts in-process unless a transport is given."""
    ckpt = Checkpoint(model_dir)
    mc = ckpt.config
    dtype = resolve_dtype(cfg.dtype, ckpt, cfg.device)
    model = load_attention_model(ckpt, dtype, cfg.device, progress)
    if placement is None:
        placement = Placement.by_expert(split_experts(mc.num_local_experts, groups), mc.num_hidden_layers,
                                        mc.num_local_experts)
    if transport is None:
        transport = InProcessTransport([load_experts(ckpt, placement.pairs(g), dtype, cfg.device, progress)
                                        for g in range(placement.num_groups)])
    tokenizer = Tokenizer.from_checkpoint(ckpt)
    return Engine(model, transport, placement, cfg, eos_id=mc.eos_token_id), tokenizer


async def connect_engine(model_dir: str | Path, experts_at: list[str], cfg: EngineConfig = EngineConfig(),
                         progress: bool = False) -> tuple[Engine, Tokenizer]:
    """An engine whose experts are the gRPC shards at experts_at (host:port each).

    The shards say what they hold; shards holding the same pairs are replicas of one group.
    Must be awaited in the event loop that will run the engine (gRPC channels belong to it).
    """
    from attention_service.grpc_transport import GrpcTransport, discover

    ckpt = Checkpoint(model_dir)
    mc = ckpt.config
    groups, placement = await discover(experts_at, mc.num_hidden_layers, mc.num_local_experts, ckpt.fingerprint())
    model = load_attention_model(ckpt, resolve_dtype(cfg.dtype, ckpt, cfg.device), cfg.device, progress)
    transport = GrpcTransport(groups)
    return Engine(model, transport, placement, cfg, eos_id=mc.eos_token_id), Tokenizer.from_checkpoint(ckpt)
