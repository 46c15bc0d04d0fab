"""The paged KV cache's storage: per layer, one flat tensor of slots for K and one for V.

Shapes: L layers, S slots (blocks x block size), KVH kv heads, Dh head dim.
"""

import logging

import torch

log = logging.getLogger(__name__)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, dim_head: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # One block more than the block manager hands out: padding rows of CUDA-graph batches
        # write their K/V there and read it back, so they never touch a sequence's blocks.
        shape = (num_layers, (num_blocks + 1) * block_size, n_kv_heads, dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)     # [L, S, KVH, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv_heads: int, dim_head: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv_heads * dim_head * dtype.itemsize

    @classmethod
    def from_budget(cls, budget_bytes: int, block_size: int, num_layers: int, n_kv_heads: int, dim_head: int,
                    dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVCache":
        per_token = cls.bytes_per_token(num_layers, n_kv_heads, dim_head, dtype)
        num_blocks = budget_bytes // (per_token * block_size)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget_bytes} B holds no block of {block_size} tokens "
                             f"({per_token} B per token)")
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d B per token)",
                 num_blocks, block_size, num_blocks * block_size, num_blocks * block_size * per_token / 2**20,
                 per_token)
        return cls(num_layers, num_blocks, block_size, n_kv_heads, dim_head, dtype, device)
