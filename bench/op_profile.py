"""Where a run's time goes, by kind of torch op: matmuls, attention by the kind of call,
row and KV-block gathers, everything else.

    with op_profile.profiler() as prof:
        run()
    for line in op_profile.lines("engine_load profile", op_profile.breakdown(prof, wall_s)):
        print(line)

Self times are summed per op, so nothing is counted twice; an attention call's own
children (mask conversion, allocation) count as that attention call. The profiler adds its
own overhead per op, so the figures are shares, not timings to compare with other runs.
"""

from __future__ import annotations

from collections import defaultdict

import torch

MATMULS = {"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
GATHERS = {"aten::index_select", "aten::index"}
ATTENTION = "aten::scaled_dot_product_attention"
# attention_service/cpu_kernels.py: decode and prompt attention over the paged cache (CPU, fp32)
DECODE_KERNEL = "moe_serve::paged_decode_attention"
PREFILL_KERNEL = "moe_serve::paged_prefill_attention"
# torch's path for prompt chunks after cached tokens on CPU (attention.after_cached): two calls, merged
CHUNK_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def attention_kind(input_shapes: list) -> str:
    """An SDPA call by its attn_mask argument: none -> causal whole prompts; [q, L] -> prompt
    chunks after cached tokens, [B, 1, 1, L] -> decode buckets (the torch paths of
    attention_service/attention.py; on CPU in fp32 the kernels PREFILL_KERNEL and
    DECODE_KERNEL take their place)."""
    mask = input_shapes[3] if len(input_shapes) > 3 else []
    return {0: "attention, whole prompts (causal)", 2: "attention, prompt chunks after cached tokens",
            4: "attention, decode"}.get(len(mask), "attention, other")


def category(evt) -> str:
    chain = []                         # the event and its parents, innermost first
    e = evt
    while e is not None:
        chain.append(e)
        e = e.cpu_parent
    for e in chain:                    # torch's SDPA first: it calls the flash kernel itself
        if e.name == ATTENTION:
            return attention_kind(e.input_shapes)
    names = {e.name for e in chain}
    if DECODE_KERNEL in names:
        return "attention, decode"
    if PREFILL_KERNEL in names:
        return "attention, prompts and prompt chunks"
    if CHUNK_KERNEL in names:
        return "attention, prompt chunks after cached tokens"
    if evt.name in MATMULS:
        return "matmuls"
    if evt.name in GATHERS:
        return "gathers (KV blocks, rows)"
    return "other ops"


def profiler():
    """torch's CPU profiler with input shapes, which tell the attention calls apart."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)


def breakdown(prof, wall_s: float) -> dict[str, float]:
    """category -> seconds; 'ops total' and 'outside ops' (Python, event loop, profiler) added."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        out[category(evt)] += evt.self_cpu_time_total / 1e6
    total = sum(out.values())
    return {**dict(sorted(out.items(), key=lambda kv: -kv[1])), "ops total": total,
            "outside ops": max(0.0, wall_s - total)}


def lines(prefix: str, breakdown: dict[str, float]) -> list[str]:
    total = breakdown["ops total"] + breakdown["outside ops"]
    return [f"{prefix} {name}: {s:.2f} s ({100 * s / total:.0f}%)" for name, s in breakdown.items()
            if name != "ops total"] + [f"{prefix} ops total: {breakdown['ops total']:.2f} s of {total:.2f} s"]
