"""The placement planner: its sizes against the published Mixtral figures, its invariants, its command line."""

import collections
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.serve import app_config
from cluster.tools.plan import GiB, PlanError, chart_values, make_plan, parse_size
from mixtral.config import preset

KiB = 1024
# Published Mixtral sizes, bf16: one expert over all layers, all experts, attention side (GB), KV per token.
TABLE = {
    "mixtral-8x7b": dict(expert=11.3e9, experts=90e9, attention=3.2e9, kv=128 * KiB),
    "mixtral-8x22b": dict(expert=33.8e9, experts=271e9, attention=10.7e9, kv=224 * KiB),
}
# (preset, GPU memory, context, concurrency): the GPUs people plan with, and a 24 GiB one that
# cannot hold a whole 8x22B expert.
CASES = [
    ("mixtral-8x7b", "80GiB", 32768, 16), ("mixtral-8x7b", "48GiB", 32768, 4), ("mixtral-8x7b", "141GiB", 8192, 256),
    ("mixtral-8x22b", "80GiB", 65536, 8), ("mixtral-8x22b", "141GiB", 65536, 32), ("mixtral-8x22b", "24GiB", 4096, 8),
]


def plan_for(name, gpu="80GiB", context=None, concurrency=8, **kw):
    mc = preset(name)
    return make_plan(mc, gpu_bytes=parse_size(gpu), context=context or mc.max_position_embeddings,
                     concurrency=concurrency, model=name, **kw)


@pytest.mark.parametrize("name", TABLE)
def test_sizes_match_the_design_table(name):
    p, want = plan_for(name), TABLE[name]
    assert p.expert_bytes == pytest.approx(want["expert"], rel=0.02)
    assert p.expert_bytes * p.num_experts == pytest.approx(want["experts"], rel=0.02)
    assert p.attention_weight_bytes == pytest.approx(want["attention"], rel=0.02)
    assert p.kv_bytes_per_token == want["kv"]
    assert sum(g.weight_bytes for g in p.groups) == p.expert_bytes * p.num_experts


def test_64k_tokens_of_8x22b_kv_cache_are_14_gib():
    assert plan_for("mixtral-8x22b").kv_bytes_per_token * 65536 == 14 * GiB


@pytest.mark.parametrize("name,gpu,context,concurrency", CASES)
def test_plan_invariants(name, gpu, context, concurrency):
    p = plan_for(name, gpu, context, concurrency)
    # Every (layer, expert) pair lives in exactly one group.
    held = collections.Counter((layer, e) for g in p.groups for e in g.experts
                               for layer in (g.layers if g.layers is not None else range(p.num_layers)))
    assert set(held) == {(layer, e) for layer in range(p.num_layers) for e in range(p.num_experts)}
    assert set(held.values()) == {1}
    # Nothing planned beyond the budget.
    assert p.attention_gpu_bytes <= p.budget_bytes
    assert all(g.weight_bytes <= p.budget_bytes for g in p.groups)
    # The KV cache holds the load, in whole blocks.
    assert p.kv_capacity_tokens >= context * concurrency
    assert p.kv_sequences * p.attention_replicas >= concurrency
    assert p.kv_tokens % p.block_size == 0 and p.kv_cache_bytes == p.kv_tokens * p.kv_bytes_per_token
    assert p.warnings == []
    # Two replicas per group, so that one can fail without stalling the model; GPUs to match.
    assert all(g.replicas == 2 and g.max_replicas >= 2 for g in p.groups)
    assert p.gpus == p.attention_replicas + 2 * len(p.groups)


def test_groups_are_as_few_as_fit_and_even():
    p7 = plan_for("mixtral-8x7b", "80GiB")      # 11.3 GB per expert: 6 fit, so 2 groups of 4
    assert [g.experts for g in p7.groups] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    p22 = plan_for("mixtral-8x22b", "80GiB")    # 33.8 GB per expert: 2 fit, so 4 groups of 2
    assert [g.experts for g in p22.groups] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(g.layers is None for g in p22.groups)
    small = plan_for("mixtral-8x22b", "24GiB", 4096)   # an expert does not fit: cut by layers
    assert len(small.groups) == 16 and {len(g.layers) for g in small.groups} == {28}
    fine = plan_for("mixtral-8x7b", "80GiB", experts_per_gpu=1)
    assert len(fine.groups) == 8


def test_attention_replicas_follow_the_kv_cache():
    # 80 GiB less 10% and 10.7 GB of weights leave room for 4 sequences of 64K tokens.
    p = plan_for("mixtral-8x22b", "80GiB", 65536, 1)
    assert p.kv_sequences == 4 and p.attention_replicas == 1
    assert plan_for("mixtral-8x22b", "80GiB", 65536, 9).attention_replicas == 3
    short = plan_for("mixtral-8x22b", "80GiB", 65536, 9, attention_replicas=2)
    assert short.attention_replicas_needed == 3 and short.kv_capacity_tokens < 65536 * 9
    assert "need 3 attention replicas" in short.warnings[0]


def test_a_gpu_too_small_is_a_clear_error():
    with pytest.raises(PlanError, match="GPU too small for the attention side.*shorter --context"):
        plan_for("mixtral-8x22b", "16GiB", 65536)
    with pytest.raises(PlanError, match="do not fit"):
        plan_for("mixtral-8x22b", "80GiB", experts_per_gpu=3)
    with pytest.raises(PlanError, match="context must be in"):
        plan_for("mixtral-8x7b", context=65536)
    with pytest.raises(PlanError, match="memory size"):
        parse_size("80 furlongs")


def test_parse_size():
    assert parse_size("80GiB") == parse_size("80Gi") == 80 * GiB
    assert parse_size("141GB") == parse_size("141G") == 141 * 10**9
    assert parse_size("8.5e10") == 85 * 10**9 and parse_size("512MiB") == 512 << 20
    assert math.isclose(parse_size("1TiB") / GiB, 1024)


@pytest.mark.parametrize("name", TABLE)
def test_chart_values_decode_into_the_app_config(name):
    p = plan_for(name)
    values = chart_values(p)
    cfg = app_config.decode(values["serve"]["config"])
    assert [tuple(g.experts) for g in cfg.expert_groups] == [g.experts for g in p.groups]
    assert cfg.attention.replicas == p.attention_replicas
    assert cfg.attention.engine.kv_cache_bytes == p.kv_cache_bytes
    assert cfg.attention.engine.max_model_len == p.context
    w = values["workers"]
    assert w["attention"]["minReplicas"] == p.attention_replicas
    assert w["experts"]["maxReplicas"] == sum(g.max_replicas for g in p.groups)
    assert w["experts"]["minReplicas"] == sum(g.replicas for g in p.groups) == 2 * len(p.groups)
    assert cfg.autoscaling.experts.min_replicas == 2 and all(g.replicas == 2 for g in cfg.expert_groups)
    # What the engine itself will accept: every pair placed once.
    from router.dispatch import Placement
    Placement.from_groups([[(layer, e) for e in g.experts for layer in (g.layers or range(p.num_layers))]
                           for g in cfg.expert_groups], p.num_layers, p.num_experts)


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "cluster.tools.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_command_prints_the_plan_and_writes_values(tmp_path: Path):
    out = tmp_path / "values.yaml"
    r = run_plan("--preset", "mixtral-8x22b", "--gpu-memory", "80GiB", "--context", "65536", "--concurrency", "8",
                 "--values-out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 replicas, 1 GPU each" in r.stdout and "4 groups" in r.stdout
    assert "10 to start (2 attention + 8 experts), 18 with every group at its max" in r.stdout
    assert "replicas     2 replicas per group: every token passes through every group" in r.stdout
    one = run_plan("--preset", "mixtral-8x22b", "--gpu-memory", "80GiB", "--concurrency", "8", "--expert-replicas", "1")
    assert "6 to start (2 attention + 4 experts)" in one.stdout and "--expert-replicas 2 avoids that" in one.stdout
    text = out.read_text()
    assert text.startswith("# moe-serve plan\n")
    values = yaml.safe_load(text)
    assert len(app_config.decode(values["serve"]["config"]).expert_groups) == 4


def test_command_errors_are_clear():
    r = run_plan("--preset", "mixtral-8x22b", "--gpu-memory", "16GiB", "--concurrency", "1")
    assert r.returncode != 0 and "moe-serve plan: GPU too small" in r.stderr
    r = run_plan("--preset", "mixtral-8x22b", "--gpu-memory", "lots", "--concurrency", "1")
    assert r.returncode != 0 and "cannot read 'lots'" in r.stderr
    r = run_plan("--preset", "nope", "--gpu-memory", "80GiB", "--concurrency", "1")
    assert r.returncode != 0 and "unknown preset" in r.stderr
