"""`python -m bench.sampling --quick --grammar-only` runs end to end and prints its grammar figures."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_grammar_mask_bench_quick():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.sampling", "--quick", "--grammar-only"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("grammar sampler rows=8: plain ") and "ratio" in line for line in lines), done.stdout
    assert any(line.startswith("grammar decode step tiny rows=8: plain ") and "% of a decode step" in line
               for line in lines), done.stdout
