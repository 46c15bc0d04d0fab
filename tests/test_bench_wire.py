"""`python -m bench.wire --quick` runs end to end: real shards, real sockets, answers checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wire_bench_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOE_SERVE_BENCH_CACHE": os.environ.get(
        "MOE_SERVE_BENCH_CACHE", str(Path.home() / ".cache" / "moe-serve" / "bench"))}
    done = subprocess.run([sys.executable, "-m", "bench.wire", "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "CHECK OK" in out
    for wire in ("bf16", "fp8"):
        for rows in (16, 256):
            for figure in ("ours echo", "raw", "unary echo", "grpc bare", "ours compute"):
                line = rf"wire {wire} rows +{rows} {figure} +[0-9.]+ ms +[0-9.]+ GB/s"
                assert re.search(line, out), (wire, rows, figure)
            assert re.search(rf"wire {wire} rows +{rows} ratio ours/raw [0-9.]+ = grpc bare/raw", out)
    results = json.loads((REPO / "bench" / "out" / "wire.json").read_text())["results"]
    sizes = {(r["wire"], r["rows"]): r["request_bytes"] for r in results}
    # fp8 rows: one byte an element and a scale per row, about half of bf16's request.
    assert sizes[("fp8", 256)] < 0.55 * sizes[("bf16", 256)]
    assert all(r["echo_ok"] and r["compute_ok"] for r in results)
