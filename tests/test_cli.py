"""The `moe-serve` command line, as a user runs it: real processes, real files."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from mixtral.checkpoint import Checkpoint

CLI = [sys.executable, "-m", "cluster.tools.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_make_checkpoint_then_generate_json(tmp_path: Path):
    out = tmp_path / "ckpt"
    r = run("make-checkpoint", "--preset", "tiny", "--out", str(out), "--shards", "2")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.model").exists()
    Checkpoint(out)                                                      # validates every tensor

    r = run("generate", "--model", str(out), "--prompt-ids", "1,415,5565,302", "--max-tokens", "9", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    engine, tok = build_engine(out)
    (seq,) = asyncio.run(engine.generate([[1, 415, 5565, 302]], SamplingParams(max_tokens=9, temperature=0)))
    assert got == {"token_ids": seq.output_ids, "text": tok.decode(seq.output_ids)}

    r = run("generate", "--model", str(out), "--prompt", "Hello there", "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert 1 <= len(json.loads(r.stdout)["token_ids"]) <= 3


def test_bad_input_is_a_clear_error(tmp_path: Path):
    r = run("generate", "--model", str(tmp_path), "--prompt", "x", "--json")
    assert r.returncode != 0 and "config.json" in r.stderr
    r = run("generate", "--prompt-ids", "1,a,3")
    assert r.returncode != 0 and "comma-separated token ids" in r.stderr
    r = run("make-checkpoint", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "unknown preset" in r.stderr
