"""Placement planner: how many GPUs a Mixtral model needs, and what goes on each.

    moe-serve plan --preset mixtral-8x22b --gpu-memory 80GiB --context 65536 --concurrency 8

Every GPU holds one replica: an attention replica (attention, embeddings, lm_head and a KV
cache) or an expert-group replica (whole experts across all layers, or, when one expert
does not fit, one expert over a range of layers). Sizes come from `ModelConfig`'s
parameter counts, so the planner and the published Mixtral sizes agree by construction; the tests hold
them to those figures. `headroom` is the share of each GPU left out of the plan: the CUDA
context, activations and allocator slack live there.

Expert groups get two replicas each by default: every token passes through every group, so
a group with one replica stalls the whole model while Serve replaces it (tens of seconds
for a large model's weights), and with two the other replica takes its rows at once.
`--expert-replicas 1` trades that for fewer GPUs.
"""

from __future__ import annotations

import math
import re

import msgspec

from cluster.tools import forecast
from mixtral.config import ModelConfig

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Expert weights may also be fp8: 1 byte a weight plus one fp32 scale per output channel.
EXPERT_DTYPES = [*DTYPE_BYTES, "fp8"]
GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": GiB, "gib": GiB, "ti": 1 << 40, "tib": 1 << 40}


class PlanError(ValueError):
    """A plan that cannot be made: the GPU is too small, or the inputs make no sense."""


def parse_size(text: str) -> int:
    """'80GiB', '80Gi', '80GB', '8.5e10' -> bytes. Bare K/M/G/T are decimal, as in Kubernetes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise PlanError(f"cannot read {text!r} as a memory size; try 80GiB, 141GB or 48Gi")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class GroupPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    experts: tuple[int, ...]
    # None: every layer. A range only when a whole expert does not fit on one GPU.
    layers: tuple[int, ...] | None
    weight_bytes: int
    replicas: int
    max_replicas: int


class Plan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    dtype: str
    num_layers: int
    num_experts: int
    gpu_bytes: int
    headroom: float
    context: int
    concurrency: int
    block_size: int
    attention_replicas: int
    # What the concurrency asks for; more than attention_replicas only when the count was fixed.
    attention_replicas_needed: int
    attention_weight_bytes: int
    kv_bytes_per_token: int
    # Per attention replica: the cache the engine is told to allocate, and what it holds.
    kv_cache_bytes: int
    kv_tokens: int
    kv_sequences: int
    expert_bytes: int
    groups: tuple[GroupPlan, ...]
    # Expert weights' dtype: dtype unless set (fp8 halves bf16's expert bytes).
    expert_dtype: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_bytes * (1 - self.headroom))

    @property
    def attention_gpu_bytes(self) -> int:
        return self.attention_weight_bytes + self.kv_cache_bytes

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_tokens * self.attention_replicas

    @property
    def gpus(self) -> int:
        return self.attention_replicas + sum(g.replicas for g in self.groups)

    @property
    def max_gpus(self) -> int:
        return self.attention_replicas + sum(g.max_replicas for g in self.groups)

    @property
    def warnings(self) -> list[str]:
        if self.attention_replicas >= self.attention_replicas_needed:
            return []
        return [f"{self.concurrency} sequences of {self.context} tokens need {self.attention_replicas_needed} "
                f"attention replicas ({self.kv_sequences} per replica); this plan has {self.attention_replicas}"]


def _deal(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous runs whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        n = q + (i < r)
        out.append(items[start:start + n])
        start += n
    return out


def make_plan(mc: ModelConfig, *, gpu_bytes: int, context: int, concurrency: int, dtype: str = "bfloat16",
              headroom: float = 0.1, attention_replicas: int | None = None, experts_per_gpu: int | None = None,
              max_expert_replicas: int = 4, block_size: int = 16, model: str = "model",
              expert_dtype: str | None = None, expert_replicas: int = 2) -> Plan:
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    expert_dtype = expert_dtype or dtype
    if expert_dtype not in EXPERT_DTYPES:
        raise PlanError(f"expert dtype must be one of {', '.join(EXPERT_DTYPES)}, got {expert_dtype!r}")
    if not 0 <= headroom < 1:
        raise PlanError(f"headroom must be in [0, 1), got {headroom}")
    if not 1 <= context <= mc.max_position_embeddings:
        raise PlanError(f"context must be in [1, {mc.max_position_embeddings}] (the model's), got {context}")
    if max_expert_replicas < expert_replicas:
        raise PlanError(f"max expert replicas ({max_expert_replicas}) must be at least the expert replicas "
                        f"({expert_replicas})")
    for name, v in (("concurrency", concurrency), ("max expert replicas", max_expert_replicas),
                    ("expert replicas", expert_replicas),
                    ("attention replicas", attention_replicas or 1), ("experts per GPU", experts_per_gpu or 1)):
        if v < 1:
            raise PlanError(f"{name} must be at least 1, got {v}")
    nbytes = DTYPE_BYTES[dtype]
    budget = int(gpu_bytes * (1 - headroom))
    L, E = mc.num_hidden_layers, mc.num_local_experts

    # Attention: whatever the weights leave of the budget is KV cache, in whole blocks.
    attn = mc.attention_params() * nbytes
    per_token = mc.kv_bytes_per_token(nbytes)
    seq_tokens = math.ceil(context / block_size) * block_size
    kv_tokens = max(budget - attn, 0) // (per_token * block_size) * block_size
    seqs = kv_tokens // seq_tokens
    if seqs < 1:
        raise PlanError(
            f"GPU too small for the attention side: {attn / GiB:.1f} GiB of weights plus the KV cache of one "
            f"{context}-token sequence ({seq_tokens * per_token / GiB:.1f} GiB) exceed the "
            f"{budget / GiB:.1f} GiB budget ({gpu_bytes / GiB:.1f} GiB less {headroom:.0%} headroom); "
            f"use a larger GPU or a shorter --context")
    needed = math.ceil(concurrency / seqs)

    # Experts: as many whole experts per GPU as fit, dealt evenly over the fewest groups;
    # an expert that does not fit is cut into layer ranges instead.
    layer_bytes = expert_layer_bytes(mc, expert_dtype)
    expert = layer_bytes * L
    fit = budget // expert
    if experts_per_gpu is not None:
        if experts_per_gpu > fit:
            raise PlanError(f"{experts_per_gpu} experts ({experts_per_gpu * expert / GiB:.1f} GiB) do not fit in "
                            f"the {budget / GiB:.1f} GiB budget; at most {fit}")
        fit = experts_per_gpu
    if fit >= 1:
        parts = [(tuple(es), None) for es in _deal(list(range(E)), math.ceil(E / fit))]
    else:
        per_slice = budget // layer_bytes
        if per_slice < 1:
            raise PlanError(f"GPU too small for the experts: one expert of one layer is {layer_bytes / GiB:.2f} GiB, "
                            f"the budget {budget / GiB:.2f} GiB")
        ranges = _deal(list(range(L)), math.ceil(L / per_slice))
        parts = [((e,), tuple(r)) for e in range(E) for r in ranges]
    groups = tuple(GroupPlan(experts=es, layers=ls, weight_bytes=layer_bytes * len(es) * (len(ls) if ls else L),
                             replicas=expert_replicas, max_replicas=max_expert_replicas) for es, ls in parts)
    return Plan(model=model, dtype=dtype, num_layers=L, num_experts=E, gpu_bytes=gpu_bytes, headroom=headroom,
                context=context, concurrency=concurrency, block_size=block_size,
                attention_replicas=attention_replicas or needed, attention_replicas_needed=needed,
                attention_weight_bytes=attn, kv_bytes_per_token=per_token, kv_cache_bytes=kv_tokens * per_token,
                kv_tokens=kv_tokens, kv_sequences=seqs, expert_bytes=expert, groups=groups, expert_dtype=expert_dtype)


def expert_layer_bytes(mc: ModelConfig, expert_dtype: str) -> int:
    """Bytes of one expert's weights in one layer: W1, W3 [F, D] and W2 [D, F]; under fp8 one
    byte each plus an fp32 scale per output channel (2F for W1/W3, D for W2)."""
    if expert_dtype == "fp8":
        return mc.expert_params() + 4 * (2 * mc.intermediate_size + mc.hidden_size)
    return mc.expert_params() * DTYPE_BYTES[expert_dtype]


# --- as text and as chart values ------------------------------------------------------------
# The chart's default custom Ray resources (helm/moe-serve/values.yaml: workers.*.nodeResource).
ATTENTION_NODE, EXPERT_NODE = "attention_node", "expert_node"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _experts_in(p: Plan) -> str:
    return f" (experts {p.expert_dtype})" if p.expert_dtype and p.expert_dtype != p.dtype else ""


def describe(p: Plan) -> str:
    gib = lambda b: f"{b / GiB:.1f} GiB"                                              # noqa: E731
    span = lambda ls: "all layers" if ls is None else f"layers {ls[0]}-{ls[-1]}"      # noqa: E731
    need = p.context * p.concurrency
    lines = [
        f"model        {p.model}, {p.dtype}{_experts_in(p)}: one expert (all layers) {p.expert_bytes / 1e9:.1f} GB, "
        f"all experts "
        f"{p.expert_bytes * p.num_experts / 1e9:.0f} GB, attention side {p.attention_weight_bytes / 1e9:.1f} GB, "
        f"KV cache {p.kv_bytes_per_token // 1024} KiB per token",
        f"GPU          {gib(p.gpu_bytes)}, {p.headroom:.0%} headroom: {gib(p.budget_bytes)} planned per GPU",
        f"load         {p.concurrency} sequences x {p.context} tokens = {need} tokens of KV cache "
        f"({gib(need * p.kv_bytes_per_token)})",
        f"attention    {_n(p.attention_replicas, 'replica')}, 1 GPU each: {gib(p.attention_weight_bytes)} weights + "
        f"{gib(p.kv_cache_bytes)} KV cache = {p.kv_tokens} tokens, {_n(p.kv_sequences, 'sequence')} of {p.context}",
        f"KV capacity  {p.kv_capacity_tokens} tokens, {_n(p.kv_sequences * p.attention_replicas, 'sequence')} of "
        f"{p.context} (need {p.concurrency})",
        f"experts      {_n(len(p.groups), 'group')}, 1 GPU per replica, at least "
        f"{_n(p.groups[0].replicas, 'replica')}, up to {p.groups[0].max_replicas} each:",
    ]
    for i, g in enumerate(p.groups):
        lines.append(f"  group {i:<4} experts {','.join(map(str, g.experts)):<10} {span(g.layers):<14} "
                     f"{gib(g.weight_bytes)}")
    biggest = max(g.weight_bytes for g in p.groups)
    lines.append("replicas     " + (
        f"{p.groups[0].replicas} replicas per group: every token passes through every group, so losing "
        "a group's only replica would stall every request until Serve replaces it" if p.groups[0].replicas > 1
        else "1 replica per group: losing one stalls every request until Serve replaces it "
             "(--expert-replicas 2 avoids that)"))
    lines += [
        f"GPUs         {p.gpus} to start ({p.attention_replicas} attention + "
        f"{sum(g.replicas for g in p.groups)} experts), {p.max_gpus} with every group at its max",
        f"per GPU      attention {gib(p.attention_gpu_bytes)}, experts up to {gib(biggest)} "
        f"(of {gib(p.gpu_bytes)}; planned at most {gib(p.budget_bytes)})",
    ]
    return "\n".join(lines + [f"warning      {w}" for w in p.warnings])


def _pod_memory(weight_bytes: int) -> str:
    # Weights pass through host memory on their way to the GPU, and Ray's object store
    # takes 30% of the pod by default: room for both, in steps of 8 GiB.
    return f"{max(32, math.ceil((weight_bytes / GiB + 24) / 8) * 8)}Gi"


def chart_values(p: Plan) -> dict:
    """The helm/moe-serve values this plan needs (helm merges them over the chart's defaults)."""
    def workers(start: int, most: int, weights: int) -> dict:
        mem = _pod_memory(weights)
        return {"replicas": start, "minReplicas": start, "maxReplicas": most, "gpusPerPod": 1,
                "resources": {"requests": {"memory": mem}, "limits": {"memory": mem}}}

    groups = []
    for g in p.groups:
        spec = {"experts": list(g.experts)}
        if g.layers is not None:
            spec["layers"] = list(g.layers)
        groups.append(spec | {"replicas": g.replicas, "num_gpus": 1, "resources": {EXPERT_NODE: 1}})
    return {
        "workers": {
            "attention": workers(p.attention_replicas, p.attention_replicas, p.attention_weight_bytes),
            "experts": workers(sum(g.replicas for g in p.groups), sum(g.max_replicas for g in p.groups),
                               max(g.weight_bytes for g in p.groups)),
        },
        "serve": {"config": {
            "expert_device": "cuda",
            "expert_dtype": p.expert_dtype or p.dtype,
            "expert_groups": groups,
            "attention": {"replicas": p.attention_replicas, "num_gpus": 1, "resources": {ATTENTION_NODE: 1},
                          "engine": {"device": "cuda", "dtype": p.dtype, "block_size": p.block_size,
                                     "kv_cache_bytes": p.kv_cache_bytes, "max_model_len": p.context}},
            # Attention is sized by KV cache, not load: the policy keeps it where the plan put it.
            # Experts never scale below the replicas that let one fail without stalling the model.
            "autoscaling": {"attention": {"min_replicas": p.attention_replicas, "max_replicas": p.attention_replicas},
                            "experts": {"min_replicas": p.groups[0].replicas,
                                        "max_replicas": p.groups[0].max_replicas}},
        }},
    }


# --- the command ----------------------------------------------------------------------------
def add_parser(sub) -> None:
    q = sub.add_parser(
        "plan", help="size a GPU cluster: attention replicas and KV cache, expert groups, GPUs",
        description="Plan where a Mixtral model's parts go on GPUs of one size: attention replicas and the KV "
                    "cache each holds, expert groups and their replicas, GPUs in all, memory per GPU. "
                    "--values-out writes the plan as values for the helm/moe-serve chart.")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="mixtral-8x7b, mixtral-8x22b (or another preset)")
    src.add_argument("--model", help="a checkpoint folder: plan for its config.json")
    q.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GiB, 141GB, 48Gi")
    q.add_argument("--context", type=int, help="tokens per sequence, prompt and output (default: the model's)")
    q.add_argument("--concurrency", type=int, required=True, help="sequences of --context tokens held at once")
    q.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES),
                   help="weights and KV cache (default: bfloat16)")
    q.add_argument("--expert-dtype", choices=EXPERT_DTYPES,
                   help="expert weights: fp8 is e4m3 with per-channel scales, quantised at load (default: --dtype)")
    q.add_argument("--headroom", type=float, default=0.1,
                   help="share of each GPU left for CUDA, activations and slack (default: 0.1)")
    q.add_argument("--attention-replicas", type=int, help="fix the count (default: as many as the KV cache needs)")
    q.add_argument("--experts-per-gpu", type=int,
                   help="fewer than fit, for finer-grained scaling (default: as many as fit)")
    q.add_argument("--expert-replicas", type=int, default=2,
                   help="replicas each expert group keeps at least: with 2, one can fail and the other takes its "
                        "rows at once (every token passes through every group); 1 saves GPUs but stalls every "
                        "request while a lost replica is replaced (default: 2)")
    q.add_argument("--max-expert-replicas", type=int, default=4,
                   help="replicas each expert group may scale to; sizes the experts worker group (default: 4)")
    q.add_argument("--values-out", metavar="FILE", help="write the plan as helm/moe-serve values (- for stdout)")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    forecast.add_arguments(q)
    q.set_defaults(fn=cmd_plan)


def cmd_plan(a) -> None:
    import sys

    import yaml

    from mixtral.config import ConfigError, load_model_config, preset

    try:
        mc = preset(a.preset) if a.preset else load_model_config(a.model)
        p = make_plan(mc, gpu_bytes=parse_size(a.gpu_memory), context=a.context or mc.max_position_embeddings,
                      concurrency=a.concurrency, dtype=a.dtype, headroom=a.headroom,
                      attention_replicas=a.attention_replicas, experts_per_gpu=a.experts_per_gpu,
                      max_expert_replicas=a.max_expert_replicas, model=a.preset or a.model.rstrip("/"),
                      expert_dtype=a.expert_dtype, expert_replicas=a.expert_replicas)
    except (PlanError, ConfigError) as e:
        sys.exit(f"moe-serve plan: {e}")
    if a.values_out:
        # The plan itself heads the file, so the values say what they were sized for.
        text = "".join(f"# {line}\n" for line in ["moe-serve plan", *describe(p).splitlines()]) + \
            yaml.safe_dump(chart_values(p), sort_keys=False, default_flow_style=None)
        if a.values_out == "-":
            sys.stdout.write(text)
            return
        with open(a.values_out, "w") as f:
            f.write(text)
    print(msgspec.json.encode(p).decode() if a.json else describe(p))
    if a.forecast:
        try:
            print(forecast.describe(mc, p, a))
        except (ValueError, OSError) as e:
            sys.exit(f"moe-serve plan --forecast: {e}")
