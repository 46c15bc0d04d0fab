"""How an attention shard runs its engine, as a frozen struct (the app config's `attention.engine`)."""

import msgspec

from mixtral.config import ConfigError, ModelConfig


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an attention shard runs its engine."""

    device: str = "cpu"
    # "auto": the checkpoint's dtype on CPU, bfloat16 on GPU.
    dtype: str = "auto"
    # KV cache block, in tokens. 32 on CPU: the decode kernel streams the benchmark model's
    # 16 KiB blocks faster than 8 KiB ones (docs/benchmarks.md). GPU plans (`moe-serve plan`) write 16.
    block_size: int = 32
    # KV cache size in bytes; unset on GPU means kv_cache_fraction of the memory left after weights.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.85
    max_num_seqs: int = 256
    # The per-step token budget shared by decodes and prefill chunks: larger favours
    # throughput, smaller keeps decode latency flat while long prompts come in.
    max_batched_tokens: int = 2048
    # Micro-batches per step for overlapping attention with expert RPCs; 1 turns it off.
    micro_batches: int = 1
    # Cap on prompt + generation; unset means the model's max_position_embeddings.
    max_model_len: int | None = None
    # How hidden rows travel to expert shards: "model" (the model's dtype, exact) or "fp8"
    # (e4m3 with a scale per row: half of bf16's request bytes, results still in the
    # model's dtype; docs/wire.md gives its error).
    wire_dtype: str = "model"
    # Reuse the KV blocks of prompt prefixes seen before (system prompts, conversation
    # history); off: every request prefills from scratch.
    prefix_caching: bool = True
    # Replay decode steps' per-layer segments from CUDA graphs (one per layer and batch-size
    # bucket): at small batches their kernel launches cost more than their math. Ignored off CUDA.
    cuda_graphs: bool = True
    # Greedy steps on CPU in fp32 take their tokens from an int8 or bf16 screen of the lm_head
    # and an fp32 check of the few outputs it leaves: the same tokens as every fp32 logit for a
    # quarter to half of its bytes (mixtral/greedy.py; AVX-512 BF16 CPUs), at 3/4 of its memory.
    greedy_screen: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r} "
                              "(fp8 is for expert weights: expert_dtype)")
        for name in ("block_size", "max_num_seqs", "max_batched_tokens", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.wire_dtype not in ("model", "fp8"):
            raise ConfigError(f"wire_dtype must be model or fp8, got {self.wire_dtype!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")

    def max_model_len_for(self, mc: ModelConfig) -> int:
        """Prompt + generation cap: max_model_len, never past the model's positions."""
        return min(self.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
