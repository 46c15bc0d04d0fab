"""The sections of bench/gpu.py: expert FFNs, decode attention, an engine step, token agreement.

Each takes the device, whether this is the CPU smoke run, and returns its figures as a dict,
printing one line per figure as it goes.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import torch

from attention_service.attention import AttentionMetadata, paged_attention
from attention_service.config import EngineConfig
from attention_service.decode_graphs import DecodeGraphs
from attention_service.model_runner import attention_kernels
from attention_service.sampling_params import SamplingParams
from expert_service.experts import ExpertWeights
from mixtral.config import preset
from mixtral.random_checkpoint import write_random_checkpoint


def _timeit(fn, device, iters, warmup=2):
    from bench.gpu import timeit
    return timeit(fn, device, iters, warmup)


def _say(line: str) -> None:
    print(line, flush=True)


# --- experts ---------------------------------------------------------------------------------
def expert_figures(device: torch.device, smoke: bool, peaks: dict) -> dict:
    models = {"tiny": (64, 128)} if smoke else {"8x22b": (6144, 16384), "8x7b": (4096, 14336)}
    rows = (16, 64) if smoke else (16, 64, 256, 1024, 4096)
    dtype = torch.float32 if smoke else torch.bfloat16
    E, K = 8, 2
    out = {}
    for name, (D, F) in models.items():
        g = torch.Generator(device=device).manual_seed(0)
        r = lambda *s: (torch.randn(*s, generator=g, device=device) * 0.02).to(dtype)    # noqa: E731
        tensors = {(0, e): (r(F, D), r(D, F), r(F, D)) for e in range(E)}
        for fp8 in (False, True):
            shard = ExpertWeights(tensors, E, fp8=fp8, grouped=True)
            kind = "fp8" if fp8 else "bf16"
            peak = peaks.get("fp8_matmul_tflops" if fp8 else "matmul_tflops") or peaks.get("matmul_tflops")
            for R in rows:
                T = R * E // K        # expert 2t mod E and 2t+1 mod E for token t: R rows each
                t_ = torch.arange(T, device=device)
                ids = torch.stack([(2 * t_) % E, (2 * t_ + 1) % E], 1).to(torch.int32)
                y = torch.randn(T, D, generator=g, device=device).to(dtype)
                w = torch.rand(T, K, generator=g, device=device)
                sec = _timeit(lambda: shard.forward(0, y, ids, w), device, 1 if smoke else 5)
                tflops = 6 * D * F * R * E / sec / 1e12
                fig = {"seconds": sec, "tflops": tflops, "of_peak": tflops / peak if peak else None,
                       "matmul": shard.mm.mode}
                line = f"experts {name} {kind} rows/expert={R}: {tflops:.1f} TFLOP/s"
                if peak:
                    line += f" = {tflops / peak:.2f} of the measured dense {kind} peak"
                if R == 16 and peaks.get("hbm_gb_s"):
                    gbs = shard.weight_bytes / sec / 1e9
                    fig |= {"weight_gb_s": gbs, "of_hbm": gbs / peaks["hbm_gb_s"]}
                    line += f"; weights {gbs:.0f} GB/s = {gbs / peaks['hbm_gb_s']:.2f} of HBM"
                out[f"{name} {kind} {R}"] = fig
                _say(line + f" [{shard.mm.mode}]")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --- decode attention ------------------------------------------------------------------------
def attention_figures(device: torch.device, smoke: bool, peaks: dict) -> dict:
    H, KVH, Dh, bs = (8, 2, 64, 16) if smoke else (48, 8, 128, 16)
    L = 512 if smoke else 65536
    dtype = torch.float32 if smoke else torch.bfloat16
    decode, _ = attention_kernels(dtype, device)
    out = {"kernel": getattr(decode, "__module__", None) or str(decode)}
    hbm = peaks.get("hbm_gb_s")
    for B in ((2, 4) if smoke else (8, 64)):
        g = torch.Generator(device=device).manual_seed(B)
        nb = L // bs
        S = (B * nb + 1) * bs
        kc = torch.randn(S, KVH, Dh, generator=g, device=device, dtype=dtype)
        vc = torch.randn(S, KVH, Dh, generator=g, device=device, dtype=dtype)
        tables = torch.randperm(B * nb, generator=g, device=device).view(B, nb)   # blocks out of order
        lens = torch.full((B,), L, dtype=torch.int64, device=device)
        q = torch.randn(B, H, Dh, generator=g, device=device, dtype=dtype)
        kv_bytes = 2 * B * L * KVH * Dh * dtype.itemsize
        fig = {}
        paths = {"paged kernel": lambda: decode(q, kc, vc, tables, lens, bs, Dh ** -0.5)} if decode else {}
        meta = AttentionMetadata.build([1] * B, [L] * B, tables.tolist(), bs, device)
        k1, v1 = kc[-1:].expand(B, -1, -1), vc[-1:].expand(B, -1, -1)
        paths["torch gather + SDPA"] = lambda: paged_attention(q, k1, v1, kc, vc, meta)
        for name, fn in paths.items():
            sec = _timeit(fn, device, 2 if smoke else 10)
            gbs = kv_bytes / sec / 1e9
            fig[name] = {"seconds": sec, "kv_gb_s": gbs, "of_hbm": gbs / hbm if hbm else None}
            _say(f"attention decode {B} seqs x {L} tokens, {name}: {sec * 1e3:.2f} ms, KV {gbs:.0f} GB/s"
                 + (f" = {gbs / hbm:.2f} of HBM" if hbm else ""))
        out[f"{B} seqs"] = fig
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --- one engine step -------------------------------------------------------------------------
def _set_mode(engine, micro_batches: int, graphs: bool) -> None:
    r = engine.runner
    r.micro_batches = micro_batches
    r._pool = ThreadPoolExecutor(1, thread_name_prefix="compute") if micro_batches > 1 else None
    r.graphs = DecodeGraphs(engine.model, engine.kv, r.decode_kernel, engine.max_model_len, capture=graphs)
    for shard in getattr(engine.transport, "groups", []):       # in-process experts
        if hasattr(shard, "graphs"):
            shard.graphs.capture = graphs and shard.device.type == "cuda"


async def _decode_step_seconds(engine, seqs: int, prompt_len: int, steps: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    live = [engine.add(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), params) for _ in range(seqs)]
    while any(s.num_computed < s.num_prompt_tokens for s in live):  # prompts in, first tokens out
        await engine.step()
    for _ in range(2):                                               # graphs captured here
        await engine.step()
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        await engine.step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    for s in live:
        engine.finish(s)
    return sec


def engine_step_figures(device: torch.device, smoke: bool, work: Path) -> dict:
    from attention_service.loader import connect_engine
    from cluster.local import build_engine
    from expert_service.launcher import start_shards, stop_shards

    cfg = preset("tiny") if smoke else msgspec.structs.replace(preset("mixtral-8x22b"), num_hidden_layers=2)
    path = work / "step-ckpt"
    if not (path / "config.json").exists():
        write_random_checkpoint(cfg, path, shards=1 if smoke else 4, dtype=torch.float32 if smoke else torch.bfloat16)
    seqs, prompt_len, steps = (8, 8, 3) if smoke else (64, 32, 10)
    ecfg = EngineConfig(device=str(device), block_size=16, max_num_seqs=seqs, max_model_len=256,
                        kv_cache_bytes=(64 << 20) if smoke else (2 << 30))
    modes = [(m, gr) for m in (1, 2) for gr in (True, False)]
    out: dict = {}

    def measure(engine, where: str) -> None:
        for m, gr in modes:
            _set_mode(engine, m, gr)
            sec = asyncio.run(_decode_step_seconds(engine, seqs, prompt_len, steps, cfg.vocab_size)) \
                if where == "in-process" else None
            out[f"{where} M={m} graphs={'on' if gr else 'off'}"] = sec
            _say(f"step {where}, {seqs} decodes, M={m}, CUDA graphs {'on' if gr else 'off'}: {sec * 1e3:.1f} ms")

    engine, _ = build_engine(path, ecfg)
    measure(engine, "in-process")
    del engine
    shards = start_shards(path, [list(range(cfg.num_local_experts))], device=str(device),
                          timeout=120 if smoke else 400)
    try:
        async def over_grpc():
            engine, _ = await connect_engine(path, [shards[0].address], ecfg)
            try:
                for m, gr in modes:
                    _set_mode(engine, m, gr)
                    sec = await _decode_step_seconds(engine, seqs, prompt_len, steps, cfg.vocab_size)
                    out[f"gRPC M={m} graphs={'on' if gr else 'off'}"] = sec
                    _say(f"step gRPC to a shard on the same {device.type}, {seqs} decodes, M={m}, "
                         f"CUDA graphs {'on' if gr else 'off'}: {sec * 1e3:.1f} ms")
            finally:
                await engine.close()
        asyncio.run(over_grpc())
    finally:
        stop_shards(shards)
    return out


# --- token agreement -------------------------------------------------------------------------
def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def token_agreement(device: torch.device, smoke: bool, work: Path) -> dict:
    from cluster.local import build_engine

    cfg = preset("tiny" if smoke else "bench")
    path = work / "tokens-ckpt"
    if not (path / "config.json").exists():
        write_random_checkpoint(cfg, path)
    n = 8 if smoke else 64
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (k,), generator=g).tolist() for k in (7, 30, 61, 120)]
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def run(ecfg: EngineConfig, expert_dtype: str | None = None) -> list[list[int]]:
        engine, _ = build_engine(path, ecfg, expert_dtype=expert_dtype)
        return [s.output_ids for s in asyncio.run(engine.generate(prompts, params))]

    ref = run(EngineConfig(device="cpu", dtype="float32"))
    gpu = EngineConfig(device=str(device), dtype="bfloat16", kv_cache_bytes=256 << 20)
    bf16, fp8 = run(gpu), run(gpu, "fp8")
    eager = run(msgspec.structs.replace(gpu, cuda_graphs=False))
    out = {"tokens": n, "bf16_vs_fp32": [_first_difference(a, b) for a, b in zip(bf16, ref)],
           "graphs_vs_eager": [_first_difference(a, b) for a, b in zip(bf16, eager)],
           "fp8_vs_bf16": [_first_difference(a, b) for a, b in zip(fp8, bf16)],
           "fp8_vs_bf16_equal_share": sum(x == y for a, b in zip(fp8, bf16) for x, y in zip(a, b)) / (n * len(prompts))}
    _say(f"tokens bf16 {device.type} vs fp32 cpu: equal for the first N = {out['bf16_vs_fp32']} of {n} "
         f"(per prompt, random weights)")
    _say(f"tokens CUDA graphs vs eager (bf16): equal for the first N = {out['graphs_vs_eager']} of {n}")
    _say(f"tokens fp8 vs bf16 experts: equal for the first N = {out['fp8_vs_bf16']} of {n}; "
         f"{out['fp8_vs_bf16_equal_share']:.2f} of all positions equal")
    return out
