"""A shuffled paged KV cache and a step's new rows over it, for the attention kernels' tests."""

import torch


def paged_case(H, KVH, Dh, bs, lens, rows=None, dtype=torch.float32, seed=0):
    """len(lens) contexts in blocks out of order (some unused) -> (q [T, H, Dh], new k, v [T, KVH, Dh],
    caches [S, KVH, Dh], block tables); T = rows, or one row per context."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // bs) for L in lens]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(order[i:i + n])
        i += n
    S, T = (sum(need) + 3) * bs, len(lens) if rows is None else rows
    kc, vc = torch.randn(S, KVH, Dh, generator=g).to(dtype), torch.randn(S, KVH, Dh, generator=g).to(dtype)
    q = torch.randn(T, H, Dh, generator=g).to(dtype)
    k, v = torch.randn(T, KVH, Dh, generator=g).to(dtype), torch.randn(T, KVH, Dh, generator=g).to(dtype)
    return q, k, v, kc, vc, tables
