"""Checkpoint: the HF layout, header-only validation, sharding, selective reads."""

import json
import pickle
import shutil

import mistral_common
import msgspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    attention_tensor_names,
    expected_tensors,
    expert_tensor_names,
)
from mixtral.config import ConfigError, preset
from mixtral.random_checkpoint import write_random_checkpoint

TINY = preset("tiny")
W2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture
def tiny_copy(tiny_ckpt, tmp_path):
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def test_layout_names_and_shapes():
    shapes = expected_tensors(TINY)
    L, E = TINY.num_hidden_layers, TINY.num_local_experts
    assert len(shapes) == 1 + L * (6 + 1 + 3 * E) + 2
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 16, 64)  # KV heads * dim_head
    assert shapes["model.layers.1.block_sparse_moe.experts.7.w1.weight"] == (128, 64)
    assert shapes[W2] == (64, 128)
    assert expert_tensor_names(1, 3)[1] == W2
    attention = attention_tensor_names(TINY)
    assert "lm_head.weight" in attention and "model.layers.1.block_sparse_moe.gate.weight" in attention
    assert len(attention) + 3 * L * E == len(shapes)
    tied = expected_tensors(msgspec.structs.replace(TINY, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied


@pytest.mark.parametrize("name", ["tiny", "tiny-v3"])
def test_every_tensor_reads_with_its_shape(make_ckpt, name):
    cfg = preset(name)
    ckpt = Checkpoint(make_ckpt(cfg))
    assert ckpt.config == cfg and ckpt.dtype == torch.float32
    for tname, shape in expected_tensors(cfg).items():
        t = ckpt.read(tname)
        assert tuple(t.shape) == shape and t.dtype == torch.float32 and torch.isfinite(t).all()


def test_random_weights_have_the_intended_scale(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    norm = ckpt.read("model.layers.0.input_layernorm.weight")
    assert not torch.equal(norm, torch.ones_like(norm)) and abs(norm.mean().item() - 1) < 0.1
    assert ckpt.read("model.embed_tokens.weight").std().item() == pytest.approx(1.0, rel=0.05)
    assert ckpt.read(W2).std().item() == pytest.approx(128**-0.5, rel=0.1)  # fan_in = F


def test_sharded_matches_single_file(make_ckpt):
    single, sharded = Checkpoint(make_ckpt(TINY)), Checkpoint(make_ckpt(TINY, shards=3))
    index = json.loads((sharded.path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert list(index["weight_map"]) == list(expected_tensors(TINY))  # file order kept
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in single.read_many(single.tensor_names).values())
    for name in expected_tensors(TINY):
        assert torch.equal(single.read(name), sharded.read(name)), name


def test_bfloat16_checkpoint(make_ckpt):
    ckpt = Checkpoint(make_ckpt(TINY, dtype=torch.bfloat16))
    assert ckpt.dtype == torch.bfloat16 and ckpt.config.torch_dtype == "bfloat16"
    assert ckpt.read(W2, dtype=torch.float32).dtype == torch.float32
    fp32 = Checkpoint(make_ckpt(TINY)).read(W2)
    assert torch.allclose(ckpt.read(W2).float(), fp32, rtol=1e-2, atol=1e-3)


def test_reads_only_what_is_asked(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    assert dict(ckpt.reads) == {}
    mine = [n for layer in range(TINY.num_hidden_layers) for e in (0, 3) for n in expert_tensor_names(layer, e)]
    got = ckpt.read_many(mine, progress=True)
    assert set(got) == set(ckpt.reads) == set(mine)
    assert all(count == 1 for count in ckpt.reads.values())


def test_fingerprint(make_ckpt, tiny_ckpt):
    fp = Checkpoint(tiny_ckpt).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert Checkpoint(tiny_ckpt).fingerprint() == fp
    assert Checkpoint(make_ckpt(TINY, seed=1)).fingerprint() != fp
    assert Checkpoint(make_ckpt(TINY, seed=1)).read(W2).ne(Checkpoint(tiny_ckpt).read(W2)).any()


def test_pickles_by_path(tiny_ckpt):
    ckpt = pickle.loads(pickle.dumps(Checkpoint(tiny_ckpt)))
    assert ckpt.fingerprint() == Checkpoint(tiny_ckpt).fingerprint() and ckpt.read(W2).shape == (64, 128)


def test_missing_tensor_named(tiny_copy):
    f = tiny_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors[W2]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing tensor {W2}"):
        Checkpoint(tiny_copy)


def test_wrong_shape_named(tiny_copy):
    f = tiny_copy / "model.safetensors"
    tensors = load_file(f)
    tensors[W2] = tensors[W2].T.contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{W2} has shape \[128, 64\], expected \[64, 128\]"):
        Checkpoint(tiny_copy)


def test_tensors_beyond_the_config_refused(tiny_copy):
    f = tiny_copy / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # harmless extra
    save_file(tensors, f, metadata={"format": "pt"})
    Checkpoint(tiny_copy)
    tensors["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = torch.ones(128, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="experts.8.w1.weight is beyond the config"):
        Checkpoint(tiny_copy)


def test_sharded_index_errors(make_ckpt, tmp_path):
    ckpt = shutil.copytree(make_ckpt(TINY, shards=3), tmp_path / "ckpt")
    index = json.loads((ckpt / INDEX_FILE).read_text())
    del index["weight_map"][W2]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor {W2}"):
        Checkpoint(ckpt)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file model-00002-of-00003.safetensors"):
        Checkpoint(ckpt)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(tmp_path)


def test_non_mixtral_config_refused(tiny_copy):
    raw = json.loads((tiny_copy / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tiny_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="not a Mixtral config"):
        Checkpoint(tiny_copy)


def test_tokenizer_vocab_mismatch_names_both(tiny_copy):
    assert Checkpoint(tiny_copy).tokenizer_path.name == "tokenizer.model"
    v3 = mistral_common.__path__[0] + "/data/mistral_instruct_tokenizer_240323.model.v3"
    shutil.copyfile(v3, tiny_copy / "tokenizer.model.v3")  # v3 is preferred over tokenizer.model
    with pytest.raises(CheckpointError, match=r"tokenizer.model.v3: tokenizer vocab 32768 .* vocab_size 32000.*v1"):
        Checkpoint(tiny_copy)


def test_missing_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer file"):
        Checkpoint(tiny_copy)
    assert Checkpoint(tiny_copy, require_tokenizer=False).tokenizer_path is None


def test_unsupported_vocab_has_no_tokenizer(tmp_path):
    cfg = msgspec.structs.replace(TINY, vocab_size=1000)
    with pytest.raises(CheckpointError, match="vocab_size 1000"):
        write_random_checkpoint(cfg, tmp_path)


def test_transformers_loads_it_unchanged(tiny_ckpt):
    """transformers is the numerical oracle: it must read our files with nothing missing."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.MixtralForCausalLM.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ckpt = Checkpoint(tiny_ckpt)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert torch.equal(model.state_dict()[name], ckpt.read(name))
    logits = model(torch.tensor([[1, 330, 1207, 28705]])).logits
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 3

