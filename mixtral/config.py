"""Model configuration: what a Mixtral checkpoint is, as a frozen struct.

`ModelConfig` mirrors the fields of a Hugging Face Mixtral `config.json` that the math
needs. Everything else in a published config (dropout, aux-loss coefficients, ...) is a
training knob and is ignored on read; a config that is not Mixtral, or that lacks a field
we need, is refused with an error that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

# Where moe-serve keeps what it makes on a machine: the default checkpoint, compiled kernels.
CACHE = Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


class ConfigError(ValueError):
    """A config file that cannot describe a servable Mixtral model."""


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    # Published Mixtral configs omit head_dim; it is then hidden / heads.
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_local_experts={self.num_local_experts}]"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads when head_dim is unset")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # --- sizes -----------------------------------------------------------------------
    def attention_params(self) -> int:
        """Everything that lives on an attention shard: embeddings, attention, norms, gates, lm_head."""
        D, H, KVH, Dh = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.dim_head
        per_layer = D * H * Dh * 2 + D * KVH * Dh * 2 + 2 * D + self.num_local_experts * D
        head = self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        return per_layer * self.num_hidden_layers + head

    def expert_params(self) -> int:
        """One expert of one layer: w1, w3 [F, D] and w2 [D, F]."""
        return 3 * self.hidden_size * self.intermediate_size

    def total_params(self) -> int:
        return self.attention_params() + self.expert_params() * self.num_local_experts * self.num_hidden_layers

    def active_params(self) -> int:
        return self.attention_params() + self.expert_params() * self.num_experts_per_tok * self.num_hidden_layers

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.dim_head * dtype_bytes

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` a Hugging Face checkpoint of this model carries."""
        d = msgspec.to_builtins(self)
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        d.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            hidden_act="silu",
            sliding_window=None,
            attention_dropout=0.0,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
            use_cache=True,
            initializer_range=0.02,
        )
        return d


def from_hf_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """Decode a Hugging Face config dict; refuse anything that is not Mixtral."""
    arch = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "mixtral" and "MixtralForCausalLM" not in arch:
        raise ConfigError(
            f"{source}: not a Mixtral config (model_type={model_type!r}, architectures={arch!r}); "
            "expected model_type 'mixtral'"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Mixtral uses 'silu')")
    if raw.get("sliding_window") not in (None, 0) and raw["sliding_window"] < raw.get("max_position_embeddings", 0):
        raise ConfigError(f"{source}: sliding_window={raw['sliding_window']} is not supported")
    known = set(ModelConfig.__struct_fields__)
    picked = {k: v for k, v in raw.items() if k in known and v is not None}
    if isinstance(picked.get("eos_token_id"), list):
        picked["eos_token_id"] = picked["eos_token_id"][0]
    if "torch_dtype" not in picked and isinstance(raw.get("dtype"), str):
        picked["torch_dtype"] = raw["dtype"]
    # transformers >= 5 writes rope_theta inside rope_parameters instead of at the top level.
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} is not supported (Mixtral uses 'default')")
        if "rope_theta" in rope:
            picked.setdefault("rope_theta", rope["rope_theta"])
    try:
        return msgspec.convert(picked, ModelConfig, strict=False)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Object missing required field `hidden_size`"; keep its words.
        raise ConfigError(f"{source}: {e}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return from_hf_dict(raw, source=str(path))


_MIXTRAL = dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
                num_key_value_heads=8)

PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=32768, **_MIXTRAL),
    "mixtral-8x22b": ModelConfig(
        vocab_size=32000, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, max_position_embeddings=65536, **_MIXTRAL),
    # Random-weight models of the real architecture, small enough for 2 CPU cores.
    # The 64K context of 8x22B is kept so long-context paths run on them too.
    "tiny": ModelConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, rope_theta=1e6, torch_dtype="float32"),
    "tiny-v3": ModelConfig(
        vocab_size=32768, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=65536, rope_theta=1e6, torch_dtype="float32"),
    # The benchmark model: big enough that matmuls, not Python, dominate a step.
    "bench": ModelConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, rope_theta=1e6, torch_dtype="float32"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
