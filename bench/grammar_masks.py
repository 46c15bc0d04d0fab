"""Grammar masks per step (part of bench/sampling.py): what constrained decoding adds to a step.

What it measures
    Rows with a JSON-schema grammar (SCHEMA: nested keys, bounded and free strings, an enum
    array), their matchers walked to different places in it by random allowed tokens first.
    1. The sampler alone on logits [rows, V]: plain `sample` against fill the batch's
       mask (the bitmask, unpacked) and apply it, both on the grammar worker as the engine
       does (attention_service.grammar.start_masks, apply_masks), + `sample`; the fill on
       its own too, since in the engine it runs beside the forward, and the apply (logits
       copy included) against xgrammar's own CPU kernel on the same bitmask.
    2. A decode step of the engine (model `bench`; `--quick`: `tiny`) with that many
       sequences, none constrained against all constrained: the mask's added time per step
       as the engine pays it (fill hidden behind the forward where it fits), and that
       against the plain step. Median of the decode steps.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from concurrent.futures import Future

import torch
import xgrammar as xgr

from attention_service.grammar import Grammars, apply_masks, fill_masks, start_masks
from attention_service.grammar_spec import GrammarSpec
from attention_service.sampler import sample
from attention_service.sampling_params import SamplingParams
from attention_service.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "address", "note"],
          "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
                         "address": {"type": "object", "required": ["city", "zip"], "additionalProperties": False,
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                        "pattern": "[0-9]{5}"}}},
                         "note": {"type": "string"}}}
SPEC = GrammarSpec(json.dumps(SCHEMA))


def _walked(grammars: Grammars, rows: int, vocab: int) -> list:
    """Matchers each advanced by 0..40 random allowed tokens: a batch spread over the grammar."""
    g = torch.Generator().manual_seed(0)
    out = []
    for r in range(rows):
        m = grammars.matcher(SPEC)
        for _ in range(int(torch.randint(41, (1,), generator=g))):
            logits = torch.randn(1, vocab, generator=g)
            fill_masks([m]).apply_(logits)
            if m.accept(int(logits.argmax())):
                break
        out.append(m)
    return out


def sampler_part(tok: Tokenizer, rows: int, repeats: int) -> None:
    from bench.sampling import median_ms  # here: bench.sampling imports this module

    V = tok.vocab_size
    matchers = _walked(Grammars(tok), rows, V)
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(1)) * 4
    params, seeds, steps = [SamplingParams(temperature=0.8)] * rows, list(range(rows)), [7] * rows

    rows_ = list(range(rows))

    def masked() -> None:           # as the engine does it: fill and apply on the grammar worker
        x = logits.clone()
        apply_masks(start_masks(matchers, rows_, rows, x.device), x).result()
        sample(x, params, seeds, steps)

    plain = median_ms(lambda: sample(logits.clone(), params, seeds, steps), repeats)
    fill = median_ms(lambda: start_masks(matchers, rows_, rows, logits.device).result(), repeats)
    ready = Future()
    ready.set_result(fill_masks(matchers))
    mask = ready.result()
    apply = median_ms(lambda: apply_masks(ready, logits.clone()).result(), repeats)
    kernel = median_ms(lambda: xgr.apply_token_bitmask_inplace(logits.clone(), mask.bitmask), repeats)
    both = median_ms(masked, repeats)
    print(f"grammar sampler rows={rows}: plain {plain:.2f} ms, fill mask {fill:.2f} ms, apply mask {apply:.2f} ms "
          f"(xgrammar's CPU kernel {kernel:.2f} ms), fill+apply+sample {both:.2f} ms, ratio {both / plain:.2f}x")


def engine_part(preset_name: str, rows: int, steps: int) -> None:
    from bench import common
    from cluster.local import build_engine

    engine, tok = build_engine(common.checkpoint(preset_name))
    prompts = common.random_prompts(rows, 12, 20, tok.vocab_size)

    async def decode_steps(grammar: GrammarSpec | None) -> list[float]:
        p = SamplingParams(max_tokens=steps + 2, temperature=0.8, ignore_eos=True, grammar=grammar)
        seqs = [engine.add(q, p) for q in prompts]
        await engine.step()                                    # the prefill
        times = []
        while engine.has_work and all(not s.is_finished for s in seqs):
            t = time.perf_counter()
            await engine.step()
            times.append(time.perf_counter() - t)
        for s in seqs:
            engine.finish(s)
        return times[:steps]

    async def run() -> tuple[float, float, int]:
        await decode_steps(None)                               # warm up
        await decode_steps(SPEC)
        plain, masked = [], []
        for _ in range(3):                                     # interleaved: noise hits both alike
            plain += await decode_steps(None)
            masked += await decode_steps(SPEC)
        return statistics.median(plain) * 1e3, statistics.median(masked) * 1e3, min(len(plain), len(masked))

    plain, masked, n = asyncio.run(run())
    added = masked - plain
    print(f"grammar decode step {preset_name} rows={rows}: plain {plain:.2f} ms, JSON-schema masks {masked:.2f} ms, "
          f"added {added:.2f} ms = {100 * added / plain:.1f}% of a decode step ({n} steps each)")


def report(rows: int, repeats: int, quick: bool) -> None:
    from bench import common

    tok = Tokenizer.from_checkpoint(common.checkpoint("tiny" if quick else "bench"))
    sampler_part(tok, rows, repeats)
    engine_part("tiny" if quick else "bench", rows, 4 if quick else 16)
