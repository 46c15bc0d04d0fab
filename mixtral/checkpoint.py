"""Reading Hugging Face Mixtral checkpoints (safetensors, single file or sharded).

Opening a checkpoint reads only the safetensors headers, so a shard can check the whole
layout of a 271 GB model in milliseconds and then read just the tensors it owns. Every
read is counted in `Checkpoint.reads`, which is how tests prove that an expert shard
touched nothing but its own experts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from mixtral.config import ModelConfig, load_model_config


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold the model its config.json describes."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Preference order: the newest SentencePiece vocab first; tekken last (not a Mixtral vocab).
TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model", "tekken.json")
_VOCAB_HINT = "vocab 32000 goes with the v1 tokenizer (tokenizer.model), 32768 with v3 (tokenizer.model.v3)"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.")


# --- the layout ------------------------------------------------------------------------
def expert_tensor_names(layer: int, expert: int) -> tuple[str, str, str]:
    """(w1, w2, w3) of one expert: w1/w3 are [F, D], w2 is [D, F]."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w2.weight", f"{p}.w3.weight"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face layout and its shape, in file order."""
    V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.dim_head, cfg.num_key_value_heads * cfg.dim_head
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (D,)
        out[f"{p}.self_attn.q_proj.weight"] = (q, D)
        out[f"{p}.self_attn.k_proj.weight"] = (kv, D)
        out[f"{p}.self_attn.v_proj.weight"] = (kv, D)
        out[f"{p}.self_attn.o_proj.weight"] = (D, q)
        out[f"{p}.post_attention_layernorm.weight"] = (D,)
        out[f"{p}.block_sparse_moe.gate.weight"] = (cfg.num_local_experts, D)
        for e in range(cfg.num_local_experts):
            w1, w2, w3 = expert_tensor_names(layer, e)
            out[w1], out[w2], out[w3] = (F, D), (D, F), (F, D)
    out["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def attention_tensor_names(cfg: ModelConfig) -> list[str]:
    """What an attention shard loads: everything that is not an expert FFN weight."""
    return [n for n in expected_tensors(cfg) if not _EXPERT_RE.search(n)]


def find_tokenizer(folder: str | Path, cfg: ModelConfig) -> Path:
    """The checkpoint's tokenizer file, refused unless its vocab is the model's."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    folder = Path(folder)
    path = next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no tokenizer file (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        n_words = MistralTokenizer.from_file(path).instruct_tokenizer.tokenizer.n_words
    except Exception as e:  # mistral_common raises asserts and its own exceptions alike
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
    if n_words != cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer vocab {n_words} does not match config vocab_size {cfg.vocab_size}; {_VOCAB_HINT}"
        )
    return path


# --- the checkpoint ----------------------------------------------------------------------
class Checkpoint:
    """An opened, validated checkpoint folder; tensors are read on demand.

    `require_tokenizer=False` is for expert shards, which never see text: a missing or
    mismatched tokenizer then leaves `tokenizer_path` None instead of failing.
    """

    def __init__(self, path: str | Path, require_tokenizer: bool = True):
        self.path = Path(path)
        self.config: ModelConfig = load_model_config(self.path)
        self.reads: collections.Counter[str] = collections.Counter()
        self._require_tokenizer = require_tokenizer
        self._file_of = self._weight_map()
        self._handles = {f: self._open(f) for f in sorted(set(self._file_of.values()))}
        self._headers = {n: self._header(n) for n in self._file_of}
        self._validate()
        # The dtype most tensors are stored in (a few may differ, e.g. fp32 router gates).
        stored = collections.Counter(dt for _, dt in self._headers.values()).most_common(1)[0][0]
        if stored not in _DTYPES:
            raise CheckpointError(f"{self.path}: weights stored as {stored}, which is not supported")
        self.dtype: torch.dtype = _DTYPES[stored]
        self.tokenizer_path: Path | None = None
        try:
            self.tokenizer_path = find_tokenizer(self.path, self.config)
        except CheckpointError:
            if require_tokenizer:
                raise

    def __reduce__(self):
        # Handles cannot cross processes (Ray actors); the receiver reopens the folder.
        return Checkpoint, (self.path, self._require_tokenizer)

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).is_file():
                    raise CheckpointError(f"{index}: refers to missing file {f}")
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            return dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: str):
        try:
            return safe_open(str(self.path / file), framework="pt")
        except Exception as e:  # truncated or not safetensors at all
            raise CheckpointError(f"{self.path / file}: unreadable safetensors file ({e})") from None

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        try:
            sl = self._handles[self._file_of[name]].get_slice(name)
        except Exception:
            where = self._file_of[name]
            raise CheckpointError(f"{self.path}: tensor {name} is not in {where} as the index says") from None
        return tuple(sl.get_shape()), sl.get_dtype()

    def _validate(self) -> None:
        cfg = self.config
        for name, shape in expected_tensors(cfg).items():
            if name not in self._headers:
                raise CheckpointError(f"{self.path}: missing tensor {name}")
            if self._headers[name][0] != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has shape {list(self._headers[name][0])}, expected {list(shape)}"
                )
        # Extra tensors are harmless (e.g. rotary buffers), except layers or experts beyond
        # the config: that is a config describing a different model than the weights.
        for name in self._headers:
            layer, expert = _LAYER_RE.match(name), _EXPERT_RE.search(name)
            beyond_layers = layer is not None and int(layer[1]) >= cfg.num_hidden_layers
            if beyond_layers or (expert is not None and int(expert[1]) >= cfg.num_local_experts):
                raise CheckpointError(
                    f"{self.path}: tensor {name} is beyond the config "
                    f"({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts)"
                )

    # --- reading -----------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[name][0]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        t = self._handles[self._file_of[name]].get_tensor(name)
        self.reads[name] += 1
        return t if dtype is None else t.to(dtype)

    def read_many(
        self, names: Iterable[str], dtype: torch.dtype | None = None, progress: bool = False
    ) -> dict[str, torch.Tensor]:
        names = list(names)
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc=f"loading {self.path.name}", unit="tensor")
        return {n: self.read(n, dtype) for n in names}

    def fingerprint(self) -> str:
        """A short id of these weights, cheap to compute on a 271 GB checkpoint.

        Config and tensor table alone cannot tell two fine-tunes (or two seeds) of one
        architecture apart, so 64 bytes from the middle of every tensor go in too.
        """
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        sizes = {f: (self.path / f).stat().st_size for f in self._handles}
        for name in sorted(self._headers):
            shape, dt = self._headers[name]
            h.update(f"\n{name}|{shape}|{dt}|{sizes[self._file_of[name]]}|".encode())
        for f in sorted(self._handles):
            with open(self.path / f, "rb") as fh:
                for start, end in _data_offsets(fh, set(n for n, g in self._file_of.items() if g == f)):
                    fh.seek(start + max(0, (end - start) // 2 - 32))
                    h.update(fh.read(min(64, end - start)))
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._file_of)} tensors in {len(self._handles)} files)"


def _data_offsets(fh, names: set[str]) -> list[tuple[int, int]]:
    """Absolute (start, end) byte ranges of `names` in an open safetensors file, by name."""
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    return [(8 + n + header[k]["data_offsets"][0], 8 + n + header[k]["data_offsets"][1]) for k in sorted(names)]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Expert weights only: e4m3 with per-channel scales, rows still travel in "auto"'s dtype.
EXPERT_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn}


def resolve_dtype(name: str, ckpt: Checkpoint, device: str) -> torch.dtype:
    """'auto' is the checkpoint's dtype on CPU and bfloat16 on GPU; 'fp8' (experts only, see
    expert_service/loader.py) is torch.float8_e4m3fn."""
    if name == "auto":
        return ckpt.dtype if device == "cpu" else torch.bfloat16
    try:
        return EXPERT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16, float16 or (experts) fp8") from None
