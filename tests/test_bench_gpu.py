"""bench/gpu.py's smoke run: the GPU benchmark's code, end to end on CPU at tiny sizes, so it
never rots between the runs on a lent GPU (every section: peaks, experts bf16/fp8, decode
attention, an engine step in-process and over gRPC to a shard process, token agreement)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.tools.forecast import gpu_spec

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_produces_every_figure(tmp_path):
    out = tmp_path / "gpu-smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["machine"]["device"] == "cpu"
    assert report["peaks"]["matmul_tflops"] > 0 and report["peaks"]["hbm_gb_s"] > 0
    for kind in ("bf16", "fp8"):
        for rows in (16, 64):
            fig = report["experts"][f"tiny {kind} {rows}"]
            assert fig["tflops"] > 0 and fig["matmul"] == "grouped"
        assert report["experts"][f"tiny {kind} 16"]["of_hbm"] > 0
    for seqs in ("2 seqs", "4 seqs"):
        assert report["attention"][seqs]["torch gather + SDPA"]["kv_gb_s"] > 0
    steps = report["step"]
    assert set(steps) == {f"{where} M={m} graphs={g}" for where in ("in-process", "gRPC") for m in (1, 2)
                          for g in ("on", "off")}
    assert all(v > 0 for v in steps.values())
    tokens = report["tokens"]
    assert tokens["tokens"] == 8 and len(tokens["bf16_vs_fp32"]) == 4 and len(tokens["fp8_vs_bf16"]) == 4
    lines = r.stdout.splitlines()
    assert any(line.startswith("experts tiny fp8 rows/expert=16:") and "of HBM" in line for line in lines)
    assert any(line.startswith("step gRPC") for line in lines) and lines[-1].startswith("done in")
    # The plan's forecast takes this GPU's own peaks from the same file.
    spec = gpu_spec(json_path=str(out))
    assert (spec.matmul_peak_tflops, spec.hbm_gbps) == (report["peaks"]["matmul_tflops"], report["peaks"]["hbm_gb_s"])
