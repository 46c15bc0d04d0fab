"""Random-weight Mixtral checkpoints in exactly the Hugging Face layout.

They let every path (in-process, gRPC, Ray Serve) run against `transformers` as the
oracle without downloading 90 GB. Each tensor is drawn from its own generator seeded by
(seed, tensor name), so values do not depend on sharding or on what else is generated,
and only one shard's tensors are ever in memory.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file

from mixtral.checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, CheckpointError, expected_tensors
from mixtral.config import ModelConfig

# vocab size -> (file shipped in mistral_common's data/ folder, name in the checkpoint)
_TOKENIZERS = {
    32000: ("tokenizer.model.v1", "tokenizer.model"),
    32768: ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, cfg: ModelConfig) -> torch.Tensor:
    # torch's CPU generator keeps only 32 bits of its seed, so mix seed and name into 32.
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    t = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        return t.mul_(0.1).add_(1.0)  # not all ones, so a missed norm shows in the logits
    if name == "model.embed_tokens.weight":
        return t
    if name == "lm_head.weight":
        return t.div_(cfg.hidden_size**0.5)
    return t.div_(shape[1] ** 0.5)  # linear [out, in]: keeps activations O(1) through depth


def _split(sizes: list[int], shards: int) -> list[list[int]]:
    """Contiguous groups of tensor indices, `shards` of them, all non-empty, near-equal bytes."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"cannot spread {len(sizes)} tensors over {shards} shards")
    groups: list[list[int]] = [[]]
    cur, left = 0, sum(sizes)  # bytes in the open group; bytes not in closed groups
    for i, size in enumerate(sizes):
        to_open = shards - len(groups)
        if groups[-1] and to_open and (
            len(sizes) - i <= to_open or cur + size / 2 > left / (to_open + 1)
        ):
            groups.append([])
            left -= cur
            cur = 0
        groups[-1].append(i)
        cur += size
    return groups


def _copy_tokenizer(cfg: ModelConfig, out: Path) -> None:
    if cfg.vocab_size not in _TOKENIZERS:
        raise CheckpointError(
            f"no tokenizer for vocab_size {cfg.vocab_size}; random checkpoints support "
            f"{sorted(_TOKENIZERS)} (the v1 and v3 SentencePiece vocabs)"
        )
    import mistral_common

    src, dst = _TOKENIZERS[cfg.vocab_size]
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / src, out / dst)


def _favour(tensors: dict[str, torch.Tensor], experts: list[int], bias: float) -> None:
    """Make every router prefer `experts`, for skewed-load tests and benchmarks.

    A gate has no bias term, so one is built from the weights: every token embedding gets
    a large constant in hidden dim 0, which the residual stream carries into each layer's
    normed router input as a large positive value; the favoured experts' gate rows get a
    weight on that dim, `bias` / sqrt(D). On the tiny preset, 0.4 sends about 80% of the
    routed pairs to experts 0, 2, 4, 6 when those are favoured, 1.0 nearly all.
    """
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            t[:, 0] += 4.0 * t.shape[1] ** 0.5
        elif name.endswith("block_sparse_moe.gate.weight"):
            t[:, 0] = 0.0
            t[experts, 0] = bias / t.shape[1] ** 0.5


def write_random_checkpoint(
    cfg: ModelConfig, out: Path, shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
    favour_experts: list[int] | None = None, favour: float = 0.4,
) -> Path:
    """Write config, generation config, tokenizer and random weights into `out`; returns `out`.
    favour_experts: experts every router should prefer, `favour` saying how strongly (skewed load)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(_DTYPE_NAMES.values())}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A stale index or tokenizer from an earlier write would shadow the new files, and
    # config.json goes last so that its presence means the folder is complete.
    for old in [out / "config.json", *out.glob("model*.safetensors*"), *(out / n for n in TOKENIZER_FILES)]:
        old.unlink(missing_ok=True)
    cfg = msgspec.structs.replace(cfg, torch_dtype=_DTYPE_NAMES[dtype])
    _copy_tokenizer(cfg, out)

    layout = list(expected_tensors(cfg).items())
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [itemsize * math.prod(shape) for _, shape in layout]
    groups = _split(sizes, shards)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        fname = SINGLE_FILE if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        tensors = {layout[i][0]: _random_tensor(layout[i][0], layout[i][1], seed, cfg) for i in group}
        if favour_experts:
            _favour(tensors, favour_experts, favour)
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors writes 0600; Ray workers may run as another user
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    return out

