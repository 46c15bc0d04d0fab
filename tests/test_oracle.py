"""Every path against transformers' Mixtral on the same checkpoint: logits and greedy tokens."""

import asyncio

import pytest
import torch

from attention_service.config import EngineConfig
from attention_service.sampling_params import SamplingParams
from cluster.local import build_engine
from mixtral import greedy
from mixtral.config import ModelConfig, preset

transformers = pytest.importorskip("transformers")

SHAPES = {
    "tiny": preset("tiny"),                       # 8 experts top-2, GQA 4/2, vocab 32000
    "tiny-v3": preset("tiny-v3"),                 # 4 experts top-2, GQA 8/2, 3 layers, vocab 32768
    "mha-top3": ModelConfig(vocab_size=32000, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=3, num_key_value_heads=3, num_local_experts=6,
                            num_experts_per_tok=3, max_position_embeddings=4096, rope_theta=10000.0),
    "mqa-top1": ModelConfig(vocab_size=32768, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=1, num_local_experts=4,
                            num_experts_per_tok=1, max_position_embeddings=4096, rope_theta=1e6),
}
PROMPT_LENS = [1, 2, 17, 64, 151, 300]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, make_ckpt):
    path = make_ckpt(SHAPES[request.param])
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


@pytest.fixture(scope="module")
def hf_greedy(model):
    """HF's greedy continuation of each prompt, generated one prompt at a time (no padding)."""
    name, _, hf = model
    prompts = _prompts(SHAPES[name].vocab_size, seed=1)
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False)
        refs.append(out[0, len(p):].tolist())
    return prompts, refs


def test_prompt_logits_match(model):
    name, path, hf = model
    engine, _ = build_engine(path, EngineConfig(block_size=8))
    prompts = _prompts(SHAPES[name].vocab_size)
    ours = asyncio.run(engine.prompt_logits(prompts))          # one batch of mixed lengths
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


# Engine layouts that must not change a token: expert groups, tiny KV blocks, a token
# budget small enough that the long prompts are fed in as chunks beside the decodes, and
# torch's attention instead of the CPU kernels the others use.
LAYOUTS = {
    "1 group": dict(groups=1, cfg=EngineConfig()),
    "2 groups, 4-token blocks": dict(groups=2, cfg=EngineConfig(block_size=4)),
    "all groups, chunked prefill": dict(groups=None, cfg=EngineConfig(block_size=16, max_batched_tokens=40)),
    "torch attention": dict(groups=2, cfg=EngineConfig(block_size=4), kernel=False),
    "every fp32 logit": dict(groups=1, cfg=EngineConfig(greedy_screen=False)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_generation_matches(model, hf_greedy, layout):
    name, path, _ = model
    groups = LAYOUTS[layout]["groups"] or SHAPES[name].num_local_experts
    engine, _ = build_engine(path, LAYOUTS[layout]["cfg"], groups=groups)
    # CPU, fp32: the kernels unless told otherwise
    assert engine.runner.decode_kernel is not None and engine.runner.prefill_kernel is not None
    # Greedy tokens from the lm_head's screen wherever the CPU can build it (mixtral/greedy.py)
    assert (engine.model.greedy_head is not None) == (LAYOUTS[layout]["cfg"].greedy_screen and greedy._built())
    if not LAYOUTS[layout].get("kernel", True):
        engine.runner.decode_kernel = engine.runner.prefill_kernel = None
    prompts, refs = hf_greedy
    seqs = asyncio.run(engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0)))
    for p, seq, ref in zip(prompts, seqs, refs):
        assert seq.output_ids == ref, f"prompt of {len(p)} tokens"
    assert engine.blocks.num_free == engine.blocks.num_blocks     # every block came back
