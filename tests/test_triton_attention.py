"""The GPU attention kernels (attention_service/triton_attention.py), run by Triton's
interpreter on CPU: against torch's path over the same paged cache (decodes, prompt chunks,
chunks after cached tokens, GQA shapes, block sizes) and, in an engine, against transformers.

The interpreter is switched on in a fresh process (TRITON_INTERPRET is read when triton is
imported), so these tests run in a subprocess each; skipped where triton is not installed."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
REPO = Path(__file__).resolve().parent.parent


def _interpret(code: str, timeout: float = 240) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOE_SERVE_ATTENTION": "triton",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH"))
                                         if p)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


CASES = """
import torch
from attention_service import triton_attention as ta
from attention_service.attention import AttentionMetadata, paged_attention
from paged_case import paged_case

def compare(H, KVH, Dh, bs, qlens, lens, dtype=torch.float32, splits=None):
    q, k, v, kc, vc, tables = paged_case(H, KVH, Dh, bs, lens, sum(qlens), dtype)
    f = lambda x: x.float()
    ref = paged_attention(f(q), f(k), f(v), f(kc), f(vc), AttentionMetadata.build(qlens, lens, tables, bs))
    decode = lambda *a: ta.paged_decode_attention(*a, splits=splits)
    meta = AttentionMetadata.build(qlens, lens, tables, bs, decode_kernel=decode,
                                   prefill_kernel=ta.paged_prefill_attention)
    assert meta.decode == [] and meta.prefill == []          # nothing left to torch's path
    kc2, vc2 = kc.clone(), vc.clone()
    out = paged_attention(q, k, v, kc2, vc2, meta)
    assert out.dtype == dtype
    return float((out.float() - ref).abs().max()), float(ref.abs().max())
"""


# (H, KVH, Dh, block size, query lengths, context lengths, dtype, key splits): GQA 4:1, 8x22B's
# 48:8 at Dh 128, MQA 6:1, MHA; contexts of one token, whole and partial blocks; keys split 1
# and 3 ways (merged by log-sum-exp) and as the shapes choose; whole prompts, chunks after
# cached tokens (17 new after 33), a chunk longer than a query tile, and decodes among them.
DECODES = [1, 4, 5, 11, 37, 200]
KERNEL_CASES = {
    "decode gqa4 bs4 splits1": (8, 2, 64, 4, [1] * 6, DECODES, "float32", 1),
    "decode gqa4 bs16 splits3": (8, 2, 64, 16, [1] * 6, DECODES, "float32", 3),
    "decode mqa6 bs4 split by shape": (6, 1, 16, 4, [1] * 6, DECODES, "float32", None),
    "decode mha bs32 splits3": (4, 4, 32, 32, [1] * 6, DECODES, "float32", 3),
    "decode 8x22b heads bs16": (48, 8, 128, 16, [1] * 3, [1, 17, 90], "float32", 2),
    "mixed gqa4 bs16": (8, 2, 64, 16, [5, 1, 40, 1, 17, 3, 70], [5, 30, 100, 1, 50, 3, 70], "float32", None),
    "mixed mqa6 bs4": (6, 1, 16, 4, [5, 1, 40, 1, 17, 3, 70], [5, 30, 100, 1, 50, 3, 70], "float32", None),
    "mixed 8x22b heads bs16": (48, 8, 128, 16, [20, 1], [40, 9], "float32", None),
    "mixed mha bs32": (4, 4, 32, 32, [5, 1, 40, 17], [5, 30, 100, 50], "float32", None),
    # fp16 tiles on fp32 accumulators. (GPUs run bf16; the interpreter multiplies bf16 as raw
    # 16-bit integers, so CPU tests hold fp16, the same code path.)
    "fp16 mixed gqa4 bs16": (8, 2, 64, 16, [1, 1, 9, 1], [300, 17, 40, 1], "float16", 2),
}


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, tuple[float, float]]:
    """Every case in one interpreter process: name -> (max abs error, max abs reference)."""
    out = _interpret(CASES + f"""
for name, (H, KVH, Dh, bs, qlens, lens, dtype, splits) in {KERNEL_CASES!r}.items():
    err, scale = compare(H, KVH, Dh, bs, qlens, lens, getattr(torch, dtype), splits)
    print(name, "|", err, scale)
""")
    return {name: tuple(map(float, rest.split())) for name, rest in
            (line.split(" | ") for line in out.strip().splitlines())}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_match_torch(kernel_errors, case):
    err, scale = kernel_errors[case]
    tol = 5e-3 if KERNEL_CASES[case][6] == "float16" else 2e-6
    assert err < tol * max(1.0, scale), f"{case}: max error {err}"


def test_engine_on_triton_kernels_matches_transformers(tmp_path):
    """The whole engine with the Triton kernels (chunked prompts beside decodes, 16-token blocks,
    GQA 6:1 like 8x22B's 48:8) gives transformers' greedy tokens."""
    out = _interpret(f"""
import asyncio, torch, transformers
from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from attention_service import triton_attention
from cluster.local import build_engine
from mixtral.config import ModelConfig
from mixtral.random_checkpoint import write_random_checkpoint

cfg = ModelConfig(vocab_size=32768, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=1, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e6)
path = write_random_checkpoint(cfg, {str(tmp_path)!r})
g = torch.Generator().manual_seed(1)
prompts = [[1] + torch.randint(3, 32768, (n - 1,), generator=g).tolist() for n in (1, 9, 30)]
hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
refs = []
for p in prompts:
    with torch.no_grad():
        o = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=4, do_sample=False)
    refs.append(o[0, len(p):].tolist())
engine, _ = build_engine(path, EngineConfig(block_size=16, max_batched_tokens=24), groups=2)
assert engine.runner.decode_kernel is triton_attention.paged_decode_attention
assert engine.runner.prefill_kernel is triton_attention.paged_prefill_attention
seqs = asyncio.run(engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0)))
assert [s.output_ids for s in seqs] == refs, ([s.output_ids for s in seqs], refs)
print("ok")
""")
    assert out.strip().endswith("ok")
