"""Build the attention side from a checkpoint, reading only the tensors it owns.

`open_engine` is the one engine factory: the in-process path (cluster/local.py),
`connect_engine` and the Attention deployment all build their engines through it.
"""

from pathlib import Path

import torch

from attention_service.config import EngineConfig
from attention_service.engine import Engine
from attention_service.grammar import Grammars
from attention_service.model import AttentionModel
from attention_service.tokenizer import Tokenizer
from attention_service.transport import ExpertTransport
from mixtral.checkpoint import Checkpoint, attention_tensor_names, resolve_dtype
from router.dispatch import Placement


def load_attention_model(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu",
                         progress: bool = False) -> AttentionModel:
    names = attention_tensor_names(ckpt.config)
    weights = {n: t.to(device) for n, t in ckpt.read_many(names, dtype, progress).items()}
    return AttentionModel(ckpt.config, weights)


def open_engine(ckpt: Checkpoint, cfg: EngineConfig, transport: ExpertTransport, placement: Placement,
                progress: bool = False) -> tuple[Engine, Tokenizer]:
    """An engine over ckpt's attention weights whose experts are behind `transport`, and its tokenizer."""
    model = load_attention_model(ckpt, resolve_dtype(cfg.dtype, ckpt, cfg.device), cfg.device, progress)
    engine = Engine(model, transport, placement, cfg, eos_id=ckpt.config.eos_token_id)
    tok = Tokenizer.from_checkpoint(ckpt)
    engine.grammars = Grammars(tok)
    return engine, tok


async def connect_engine(model_dir: str | Path, experts_at: list[str], cfg: EngineConfig = EngineConfig(),
                         progress: bool = False) -> tuple[Engine, Tokenizer]:
    """An engine whose experts are the gRPC shards at experts_at (host:port each).

    The shards say what they hold; shards holding the same pairs are replicas of one group.
    Must be awaited in the event loop that will run the engine (gRPC channels belong to it).
    """
    from attention_service.grpc_transport import GrpcTransport, discover

    ckpt = Checkpoint(model_dir)
    mc = ckpt.config
    groups, placement = await discover(experts_at, mc.num_hidden_layers, mc.num_local_experts, ckpt.fingerprint(),
                                       wire_dtype=cfg.wire_dtype)
    return open_engine(ckpt, cfg, GrpcTransport(groups, wire_dtype=cfg.wire_dtype), placement, progress)
