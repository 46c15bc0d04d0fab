"""`python -m bench.sampling --quick` runs end to end and prints every figure."""

import os
import re
import subprocess
import sys
from pathlib import Path

from bench.sampling import CASES, PENALTIES

REPO = Path(__file__).resolve().parent.parent


def test_sampling_bench_quick():
    done = subprocess.run([sys.executable, "-m", "bench.sampling", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for case in CASES:
        line = rf"sampling peaked rows=4 {re.escape(case)}: ours [0-9.]+ ms, sort-every-row [0-9.]+ ms"
        assert re.search(line, done.stdout), case
    for kind in PENALTIES:
        line = rf"sampling penalties rows=4 {kind}: [0-9.]+ ms, plain [0-9.]+ ms, adds -?[0-9.]+ ms, ratio [0-9.]+x"
        assert re.search(line, done.stdout), kind
