"""The throughput forecast against cases computed by hand (docs/forecast.md has the model)."""

import json
import subprocess
import sys

import pytest

from cluster.tools.forecast import GpuSpec, Network, gpu_spec, step
from cluster.tools.plan import make_plan, parse_size
from mixtral.config import preset

MC = preset("mixtral-8x22b")
H100 = GpuSpec("H100 SXM", 989.0, 3350.0)
NET100 = Network(100.0, latency_us=10.0, rpc_overhead_us=50.0)


@pytest.fixture(scope="module")
def plan8():
    """8 H100s: 4 attention replicas of 4 sequences of 64K, 4 groups of 2 whole experts."""
    p = make_plan(MC, gpu_bytes=parse_size("80GiB"), context=65536, concurrency=16, expert_replicas=1)
    assert (p.attention_replicas, len(p.groups), p.gpus, p.kv_sequences) == (4, 4, 8, 4)
    return p


def test_8x22b_4_sequences_of_64k_on_h100(plan8):
    f = step(MC, plan8, H100, NET100, batch=4, context=65536)
    # Attention, per layer: weights 6144*48*128*2 + 6144*8*128*2 + 2*6144 + 8*6144 = 88,141,824
    # params, 176,283,648 bytes; KV 4 seqs * 65536 tokens * 2 (K, V) * 8 heads * 128 * 2 bytes
    # = 1,073,741,824 bytes; 1,250,025,472 bytes / 3.35e12 B/s (flops: 7.2 GFLOP, 7 us at peak).
    assert f.attention_s == pytest.approx(1_250_025_472 / 3.35e12, rel=1e-9)
    # Experts, one group of 2: each is missed by a token with probability 6/8, so 2 * (1 - 0.75^4)
    # = 1.3671875 experts' weights are read, 3 * 6144 * 16384 * 2 = 603,979,776 bytes each.
    assert f.experts_s == pytest.approx(1.3671875 * 603_979_776 / 3.35e12, rel=1e-9)
    # Wire: a token has an expert in a group of 2 with probability 1 - C(6,2)/C(8,2) = 13/28;
    # 4 groups * 4 * 13/28 tokens go out at 6144 * 2 + 8 * 2 bytes (ids and weights), and the
    # link moves 12.5e9 bytes a second.
    assert f.wire_s == pytest.approx(4 * 4 * 13 / 28 * 12304 / 12.5e9, rel=1e-9)
    assert f.path_s == pytest.approx(4 * 4 * 13 / 28 * (12304 + 12288) / 12.5e9 + 60e-6, rel=1e-9)
    # 4 attention replicas' batches each read the experts again: 4 * t_e per layer bounds it.
    assert f.bound == "experts" and f.layer_s == pytest.approx(4 * f.experts_s, rel=1e-12)
    # lm_head: 32000 * 6144 * 2 bytes once per step.
    head = 32000 * 6144 * 2 / 3.35e12
    assert f.step_s == pytest.approx(56 * f.layer_s + head, rel=1e-12)
    assert f.tokens_per_s == pytest.approx(16 / f.step_s) and f.tokens_per_s_per_gpu == pytest.approx(2 / f.step_s)
    assert f.fits


def test_ping_pong_halves_the_micro_batch_and_never_beats_one_way_round(plan8):
    f = step(MC, plan8, H100, NET100, batch=4, context=65536, micro_batches=2)
    # 2 sequences per micro-batch: half the KV cache, the same weights.
    assert f.attention_s == pytest.approx((176_283_648 + 536_870_912) / 3.35e12, rel=1e-9)
    assert f.experts_s == pytest.approx(2 * (1 - 0.75 ** 2) * 603_979_776 / 3.35e12, rel=1e-9)
    assert f.layer_s == pytest.approx(max(2 * f.attention_s, 4 * 2 * f.experts_s, 2 * f.wire_s,
                                          f.attention_s + f.experts_s + f.path_s))


def test_expert_replicas_share_the_attention_replicas_batches(plan8):
    import msgspec

    two = msgspec.structs.replace(plan8, groups=tuple(msgspec.structs.replace(g, replicas=2) for g in plan8.groups))
    f = step(MC, two, H100, NET100, batch=4, context=65536)
    # 4 tokens are too few to split (32 rows a replica at least): whole batches alternate over
    # the 2 replicas, each serving 2 of the 4 attention replicas: 2 * t_e, not 4 * t_e.
    assert f.experts_s == step(MC, plan8, H100, NET100, batch=4, context=65536).experts_s
    assert f.layer_s == pytest.approx(max(2 * f.experts_s, f.attention_s + f.experts_s + f.path_s))
    assert f.tokens_per_s_per_gpu == pytest.approx(16 / f.step_s / 12)


def test_a_slow_link_makes_the_wire_the_bound(plan8):
    slow = Network(1.0, latency_us=0.0, rpc_overhead_us=0.0)
    f = step(MC, plan8, H100, slow, batch=4, context=65536)
    # 1 Gb/s = 1.25e8 bytes/s: out 4 * 4 * 13/28 * 12304 bytes, back the same rows at 12288.
    out = 4 * 4 * 13 / 28 * 12304 / 1.25e8
    back = 4 * 4 * 13 / 28 * 12288 / 1.25e8
    assert f.layer_s == pytest.approx(f.attention_s + f.experts_s + out + back, rel=1e-9)
    assert f.bound == "wire"


def test_fp8_rows_halve_the_request(plan8):
    bf16 = step(MC, plan8, H100, NET100, batch=4, context=65536)
    fp8 = step(MC, plan8, H100, NET100, batch=4, context=65536, wire_dtype="fp8")
    # A row: 6144 bytes and a 4-byte scale instead of 12,288 bytes, beside 16 bytes of ids and weights.
    assert fp8.path_s - 60e-6 == pytest.approx(4 * 4 * 13 / 28 * (6164 + 12288) / 12.5e9, rel=1e-9)
    assert fp8.wire_s == pytest.approx(bf16.wire_s * 12288 / 12304, rel=1e-12)  # busiest way: the answers


def test_a_batch_past_the_kv_cache_does_not_fit(plan8):
    assert not step(MC, plan8, H100, NET100, batch=5, context=65536).fits


def test_gpu_figures_from_bench_json(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "matmul_peak_tflops": 780.5, "hbm_gbps": 4200, "other": 1}))
    assert gpu_spec("h100", str(path)) == GpuSpec("NVIDIA H200", 780.5, 4200.0)
    assert gpu_spec("h100", str(path), hbm_gbps=4000).hbm_gbps == 4000
    assert gpu_spec("h200") == GpuSpec("H200 SXM", 989.0, 4800.0)
    path.write_text(json.dumps({"matmul_peak_tflops": 780.5}))
    with pytest.raises(ValueError, match="hbm_gbps"):
        gpu_spec("h100", str(path))


def test_plan_forecast_command():
    out = subprocess.run([sys.executable, "-m", "cluster.tools.cli", "plan", "--preset", "mixtral-8x22b",
                          "--gpu-memory", "80GiB", "--context", "65536", "--concurrency", "16",
                          "--expert-replicas", "1", "--forecast", "--batch", "4,8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "forecast     H100 SXM: 989 TFLOP/s, 3350 GB/s HBM; 4 attention replicas, 4 expert groups of 1 " in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("100G", "400G"))]
    assert [(r[0], r[1], r[3]) for r in rows] == [(n, b, m) for n in ("100G", "400G") for b in ("4", "8")
                                                 for m in ("1", "2")]
    assert all(r[-1] == "experts" for r in rows if r[1] == "4")
    assert all("KV cache holds 4 of 65536" in " ".join(r) for r in rows if r[1] == "8")
