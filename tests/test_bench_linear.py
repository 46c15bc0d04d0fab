"""`python -m bench.linear_rows --quick` runs end to end and prints a figure per shape and row count."""

import os
import re
import subprocess
import sys
from pathlib import Path

from bench.linear_rows import SHAPES

REPO = Path(__file__).resolve().parent.parent


def test_linear_rows_bench_quick(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.linear_rows", "--quick", "--out", str(tmp_path / "l.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in SHAPES:
        for M in (1, 8, 64):
            line = (rf"linear_rows {name} \[\d+, \d+\] rows={M}: panels [0-9.]+ ms, [0-9.]+ GFLOP/s, [0-9.]+ GB/s; "
                    rf"onednn [0-9.]+ ms, [0-9.]+ GFLOP/s, [0-9.]+ GB/s; ratio onednn/panels [0-9.]+x")
            assert re.search(line, done.stdout), (name, M, done.stdout[-2000:])
