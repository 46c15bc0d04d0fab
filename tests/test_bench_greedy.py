"""`python -m bench.greedy_screen --quick` runs end to end: a figure per row count, the same tokens."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral import greedy

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not greedy._built(), reason="no AVX-512 BF16 on this CPU, or no compiler")
def test_greedy_screen_bench_quick(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.greedy_screen", "--quick", "--out", str(tmp_path / "g.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for M in (1, 32):
        line = (rf"greedy_screen rows={M}: screen [0-9.]+ ms, every logit [0-9.]+ ms; "
                rf"ratio every/screen [0-9.]+x; same tokens: True")
        assert re.search(line, done.stdout), (M, done.stdout[-2000:])
