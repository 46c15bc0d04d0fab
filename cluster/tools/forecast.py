"""Throughput forecast: what a plan's GPUs and network will do on decode steps.

    moe-serve plan --preset mixtral-8x22b --gpu-memory 80GiB --context 65536 --concurrency 16 --forecast

A roofline model of one decode step (docs/forecast.md derives it and says what it leaves
out). Per layer and micro-batch of b = B / M tokens of context C:

    attention  t_a = max(bytes / HBM, flops / peak): the layer's attention weights and the
               micro-batch's KV cache (b * C tokens) read once; 2 flops per weight per
               token plus 4 * C * H * Dh per token for QK and PV.
    experts    t_e: the busiest group's replica reads the weights of the experts its rows
               hit and runs 6 * D * F flops per (token, expert) pair; routing is uniform.
    wire       the attention node's link carries every group's rows out (D x wire bytes and
               8 bytes of ids and weights per expert slot) and the partial sums back (D x
               model bytes): t_w = max(out, in) / bandwidth of link time, and on the
               critical path out / bw + in / bw + round-trip latency + per-RPC overhead.

    layer      T = max(M * t_a, A * M * t_e / R, M * t_w, t_a + t_e + path): each stage busy
               for its micro-batches, a group's R replicas for all A attention replicas'
               batches (each RPC reads the weights again), and never faster than one
               micro-batch's way round. M = 1 is no ping-pong.
    step       L * T + lm_head; decode tokens/s = A * B / step, per GPU / plan.gpus.

The bound named is the largest of the stage terms or, when the way round sets T, the
largest of its three parts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import msgspec

from mixtral.config import ModelConfig

# Dense bf16 tensor-core peaks and HBM bandwidth of the SXM parts, from NVIDIA's data sheets.
GPUS = {"h100": ("H100 SXM", 989.0, 3350.0), "h200": ("H200 SXM", 989.0, 4800.0)}
NETWORKS_GBPS = (100.0, 400.0)
MIN_ROWS_PER_REPLICA = 32   # attention_service.grpc_transport's default: a group's rows split over replicas
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}


class GpuSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    matmul_peak_tflops: float          # dense, in the weights' dtype
    hbm_gbps: float                    # GB/s (10^9 bytes)


class Network(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gbps: float                        # link rate, Gb/s (10^9 bits), each way
    latency_us: float = 10.0           # round trip on the wire
    rpc_overhead_us: float = 50.0      # software per RPC round trip, both ends together


def gpu_spec(kind: str = "h100", json_path: str | None = None, matmul_peak_tflops: float | None = None,
             hbm_gbps: float | None = None) -> GpuSpec:
    """A GPU's figures: the kind's defaults, then bench/gpu.py's JSON file, then explicit values."""
    if kind not in GPUS:
        raise ValueError(f"unknown GPU {kind!r}; known: {', '.join(GPUS)}")
    name, peak, hbm = GPUS[kind]
    if json_path:
        with open(json_path) as f:
            data = json.load(f)
        missing = [k for k in ("matmul_peak_tflops", "hbm_gbps") if not isinstance(data.get(k), (int, float))]
        if missing:
            raise ValueError(f"{json_path}: no number for {', '.join(missing)} (bench/gpu.py writes them)")
        name, peak, hbm = str(data.get("gpu", json_path)), float(data["matmul_peak_tflops"]), float(data["hbm_gbps"])
    return GpuSpec(name, matmul_peak_tflops or peak, hbm_gbps or hbm)


@dataclass(frozen=True)
class StepForecast:
    batch: int                 # sequences decoding per attention replica
    context: int
    micro_batches: int
    attention_s: float         # per layer, one micro-batch (t_a)
    experts_s: float           # per layer, one micro-batch, busiest group replica (t_e)
    wire_s: float              # per layer, one micro-batch, link time (t_w)
    path_s: float              # per layer, one micro-batch's wire on the critical path
    layer_s: float
    step_s: float
    tokens_per_s: float        # the whole cluster
    tokens_per_s_per_gpu: float
    bound: str                 # attention | experts | wire
    fits: bool                 # batch x context fits the plan's KV cache


def _roofline(nbytes: float, flops: float, gpu: GpuSpec) -> float:
    return max(nbytes / (gpu.hbm_gbps * 1e9), flops / (gpu.matmul_peak_tflops * 1e12))


def step(mc: ModelConfig, plan, gpu: GpuSpec, net: Network, batch: int, context: int, micro_batches: int = 1,
         wire_dtype: str = "model") -> StepForecast:
    """The forecast of one decode step of `batch` sequences per attention replica at `context`."""
    D, F, E, K, L = mc.hidden_size, mc.intermediate_size, mc.num_local_experts, mc.num_experts_per_tok, \
        mc.num_hidden_layers
    H, KVH, Dh = mc.num_attention_heads, mc.num_key_value_heads, mc.dim_head
    mb, eb = mc_bytes(plan), DTYPE_BYTES[plan.dtype]     # hidden states and KV cache; expert weights
    expert_gpu = gpu if plan.dtype != "fp8" else msgspec.structs.replace(
        gpu, matmul_peak_tflops=2 * gpu.matmul_peak_tflops)   # fp8 tensor cores: twice bf16's rate
    M = max(1, min(micro_batches, batch))
    b = batch / M

    attn_params = D * H * Dh * 2 + D * KVH * Dh * 2 + 2 * D + E * D           # per layer
    kv = b * context * 2 * KVH * Dh * mb
    t_a = _roofline(attn_params * mb + kv, 2 * b * attn_params + 4 * b * context * H * Dh, gpu)

    A = plan.attention_replicas
    t_e, busy, tokens = 0.0, 0.0, []
    for g in plan.groups:
        e_g = len(g.experts) * (len(g.layers) if g.layers is not None else L) / L   # experts of a layer held
        t_g = b * (1 - math.comb(E - round(e_g), K) / math.comb(E, K))       # tokens with an expert here
        tokens.append(t_g)
        n = max(1, min(g.replicas, int(t_g // MIN_ROWS_PER_REPLICA)))        # replicas sharing one batch's rows
        hit = e_g * (1 - (1 - K / E) ** (b / n))                              # experts one share touches
        pairs = b * K * e_g / E / n
        one = _roofline(hit * 3 * D * F * eb, 6 * D * F * pairs, expert_gpu)
        t_e = max(t_e, one)
        # A replicas' M micro-batches a layer, each in n shares, dealt over the group's replicas.
        busy = max(busy, A * M * n / g.replicas * one)

    row_out = (D + 4 if wire_dtype == "fp8" else D * mb) + 8 * K          # fp8: a byte an element, a scale a row
    out_b, in_b = sum(tokens) * row_out, sum(tokens) * D * mb
    bw = net.gbps / 8 * 1e9
    t_w = max(out_b, in_b) / bw
    path = out_b / bw + in_b / bw + (net.latency_us + net.rpc_overhead_us) * 1e-6

    stages = {"attention": M * t_a, "experts": busy, "wire": M * t_w}
    chain = {"attention": t_a, "experts": t_e, "wire": path}
    layer = max(*stages.values(), sum(chain.values()))
    # The bound: the busiest stage, or, when one micro-batch's way round sets the pace, its largest part.
    bound = max(chain, key=chain.get) if sum(chain.values()) >= max(stages.values()) else max(stages, key=stages.get)
    head = _roofline(mc.vocab_size * D * mb, 2 * batch * mc.vocab_size * D, gpu)
    step_s = L * layer + head
    tps = A * batch / step_s
    fits = batch * math.ceil(context / plan.block_size) * plan.block_size <= plan.kv_tokens
    return StepForecast(batch, context, M, t_a, t_e, t_w, path, layer, step_s, tps, tps / plan.gpus, bound, fits)


def mc_bytes(plan) -> int:
    """Bytes of the model's dtype: hidden states, KV cache and expert results travel in it."""
    return 2 if plan.dtype == "fp8" else DTYPE_BYTES[plan.dtype]


def table(mc: ModelConfig, plan, gpu: GpuSpec, nets: list[Network], batches: list[int], contexts: list[int],
          micro_batches: list[int], wire_dtype: str = "model") -> str:
    lines = [f"forecast     {gpu.name}: {gpu.matmul_peak_tflops:g} TFLOP/s, {gpu.hbm_gbps:g} GB/s HBM; "
             f"{plan.attention_replicas} attention replicas, {len(plan.groups)} expert groups of "
             f"{'/'.join(sorted({str(g.replicas) for g in plan.groups}))} replicas, {plan.gpus} GPUs; "
             f"rows on the wire in {'fp8' if wire_dtype == 'fp8' else plan.dtype}; per layer and micro-batch:"]
    head = (f"  {'net':>8} {'batch':>6} {'context':>8} {'M':>2} {'attn ms':>8} {'experts':>8} {'wire':>8} "
            f"{'step ms':>9} {'tok/s':>9} {'tok/s/GPU':>10}  bound")
    lines.append(head)
    for net in nets:
        for C in contexts:
            for B in batches:
                for M in micro_batches:
                    if M > B:          # a micro-batch needs a sequence
                        continue
                    f = step(mc, plan, gpu, net, B, C, M, wire_dtype)
                    tail = (f"{f.tokens_per_s:9.0f} {f.tokens_per_s_per_gpu:10.1f}  {f.bound}" if f.fits
                            else f"{'-':>9} {'-':>10}  KV cache holds {plan.kv_tokens // C} of {C}")
                    lines.append(f"  {net.gbps:>5g}G {B:6d} {C:8d} {f.micro_batches:2d} {f.attention_s * 1e3:8.3f} "
                                 f"{f.experts_s * 1e3:8.3f} {f.wire_s * 1e3:8.3f} {f.step_s * 1e3:9.2f} " + tail)
    return "\n".join(lines)


# --- the command's flags (added to `moe-serve plan`) -------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def add_arguments(q) -> None:
    f = q.add_argument_group("forecast", "decode throughput of the plan (--forecast; docs/forecast.md)")
    f.add_argument("--forecast", action="store_true", help="print decode step times and tokens/s for the plan")
    f.add_argument("--gpu", choices=list(GPUS), help="GPU figures to assume (default: h200 from 120 GiB up, else h100)")
    f.add_argument("--gpu-json", metavar="FILE",
                   help="bench/gpu.py's JSON output: its measured matmul_peak_tflops and hbm_gbps replace the defaults")
    f.add_argument("--matmul-tflops", type=float, help="dense matmul peak, TFLOP/s (overrides --gpu and --gpu-json)")
    f.add_argument("--hbm-gbps", type=float, help="HBM bandwidth, GB/s (overrides --gpu and --gpu-json)")
    f.add_argument("--net-gbps", type=_floats, default=list(NETWORKS_GBPS),
                   help="link rates between attention and expert nodes, Gb/s (default: 100,400)")
    f.add_argument("--net-latency-us", type=float, default=10.0, help="round-trip latency on the wire (default: 10)")
    f.add_argument("--rpc-overhead-us", type=float, default=50.0,
                   help="software cost of one RPC round trip, both ends (default: 50)")
    f.add_argument("--batch", type=_ints, default=[1, 4, 16, 64, 256],
                   help="sequences decoding per attention replica (default: 1,4,16,64,256)")
    f.add_argument("--forecast-context", type=_ints, help="context lengths (default: the plan's --context)")
    f.add_argument("--micro-batches", type=_ints, default=[1, 2], help="ping-pong settings (default: 1,2)")
    f.add_argument("--wire-dtype", choices=["model", "fp8"], default="model", help="rows on the wire (default: model)")


def describe(mc: ModelConfig, plan, a) -> str:
    kind = a.gpu or ("h200" if plan.gpu_bytes >= 120 * (1 << 30) else "h100")
    gpu = gpu_spec(kind, a.gpu_json, a.matmul_tflops, a.hbm_gbps)
    nets = [Network(g, a.net_latency_us, a.rpc_overhead_us) for g in a.net_gbps]
    return table(mc, plan, gpu, nets, a.batch, a.forecast_context or [plan.context], a.micro_batches, a.wire_dtype)
