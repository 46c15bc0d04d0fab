"""Sampling cost per step: the engine's sampler against sorting every row.

What it measures
    `attention_service.sampler.sample` on a step's logits [B, 32000] (fp32, random; two
    shapes, see SHAPES), for B
    rows all sampling with one of four parameter sets (temperature only; top-p 0.9; top-k
    50; top-k 50 + top-p 0.9), against the reference way of cutting: sort each row's whole
    vocabulary, mask top-k and top-p in sorted order, scatter back, draw with one
    exponential per vocabulary entry (what this engine did before). Both give each row's
    draw from its seed alone. Median of --repeats calls each, same logits.

    Then penalties: the same sampler on 64 rows (temperature 0.8), each row holding a
    512-token prompt and 128 generated tokens, with each kind alone (presence, frequency,
    repetition, a 16-entry logit_bias, min_p) and all together, against the plain sampler
    on the same logits in the same run; what each adds per step.

    For scale: a decode step of the `bench` model with 32 sequences takes about 21 ms on
    this machine's 2 cores (docs/benchmarks.md).

    Grammar masks (JSON schema) per step, the sampler's share and a decode step's: see
    bench/grammar_masks.py.

Run
    .venv/bin/python -m bench.sampling                 # about a minute
    .venv/bin/python -m bench.sampling --quick         # small shapes, few repeats: checks that it runs
    .venv/bin/python -m bench.sampling --grammar-only  # only the grammar-mask figures
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch  # noqa: E402

from attention_service.sampler import _TOP_P_CANDIDATES, sample  # noqa: E402
from attention_service.sampling_params import SamplingParams  # noqa: E402
from bench import common, grammar_masks  # noqa: E402

# Random logits are flatter than a trained model's: "peaked" stands in for those (its top-p
# 0.9 cut lies within the first candidates), "flat" is the worst case (it does not).
SHAPES = {"peaked": 4.0, "flat": 1.0}
CASES = {"temperature": dict(temperature=0.8), "top_p": dict(temperature=0.8, top_p=0.9),
         "top_k": dict(temperature=0.8, top_k=50), "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.9)}


def sorted_reference(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]):
    """Sort every row, cut in sorted order, scatter back, exponential race over the vocabulary."""
    temp = torch.tensor([p.temperature for p in params])
    top_k = torch.tensor([p.top_k for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    sorted_logits, order = torch.sort(logits / temp[:, None], dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1])[None, :]
    cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
    cut |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = torch.zeros_like(probs).scatter_(-1, order, probs.masked_fill(cut, 0.0))
    noise = torch.stack([torch.empty(logits.shape[-1]).exponential_(
        generator=torch.Generator().manual_seed(s * 1_000_003 + t)) for s, t in zip(seeds, steps)])
    return (probs / noise).argmax(dim=-1)


PENALTIES = {"presence": dict(presence_penalty=0.5), "frequency": dict(frequency_penalty=0.5),
             "repetition": dict(repetition_penalty=1.2), "logit_bias": dict(logit_bias={t: 1.0 for t in range(16)}),
             "min_p": dict(min_p=0.05)}
PENALTIES["all"] = {k: v for kw in PENALTIES.values() for k, v in kw.items()}


def penalties(logits: torch.Tensor, rows: int, prompt: int, output: int, repeats: int) -> None:
    """Per-step cost of each penalty kind against the plain sampler, same logits."""
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, logits.shape[-1], (rows, prompt + output), generator=g).tolist()
    prompt_lens, seeds, steps = [prompt] * rows, list(range(rows)), [output] * rows
    plain = [SamplingParams(temperature=0.8)] * rows
    base = median_ms(lambda: sample(logits[:rows].clone(), plain, seeds, steps), repeats)
    print(f"sampling penalties rows={rows} plain: {base:.2f} ms")
    for name, kw in PENALTIES.items():
        params = [SamplingParams(temperature=0.8, **kw)] * rows
        hist = (history, prompt_lens) if params[0].penalized else (None, None)
        ms = median_ms(lambda: sample(logits[:rows].clone(), params, seeds, steps, *hist), repeats)
        print(f"sampling penalties rows={rows} {name}: {ms:.2f} ms, plain {base:.2f} ms, "
              f"adds {ms - base:.2f} ms, ratio {ms / base:.2f}x")


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="8,32,64", help="sampling rows per step (default 8,32,64)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--grammar-rows", type=int, default=64, help="rows with a JSON-schema grammar (default 64)")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats, the tiny model: a smoke run")
    ap.add_argument("--grammar-only", action="store_true", help="only the grammar-mask figures")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.vocab, a.repeats, a.grammar_rows = "4", 2048, 1, 8
    common.announce_machine("sampling")
    base = torch.randn(max(int(b) for b in a.rows.split(",")), a.vocab, generator=torch.Generator().manual_seed(0))
    for shape, scale in ({} if a.grammar_only else SHAPES).items():
        logits = base * scale
        mass = torch.softmax(logits / 0.8, -1).topk(_TOP_P_CANDIDATES, -1).values.sum(-1).median()
        print(f"sampling logits {shape}: N(0, {scale}^2), top {_TOP_P_CANDIDATES} tokens hold {mass:.2f} of the mass")
        for b in (int(x) for x in a.rows.split(",")):
            for name, kw in CASES.items():
                params, seeds, steps = [SamplingParams(**kw)] * b, list(range(b)), [7] * b
                ours = median_ms(lambda: sample(logits[:b].clone(), params, seeds, steps), a.repeats)
                ref = median_ms(lambda: sorted_reference(logits[:b], params, seeds, steps), a.repeats)
                print(f"sampling {shape} rows={b} {name}: ours {ours:.2f} ms, sort-every-row {ref:.2f} ms, "
                      f"ratio {ref / ours:.1f}x")
    if not a.grammar_only:
        rows = max(int(b) for b in a.rows.split(","))
        penalties(base * SHAPES["peaked"], rows, 32 if a.quick else 512, 8 if a.quick else 128, a.repeats)
    grammar_masks.report(a.grammar_rows, a.repeats, a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
