"""ModelConfig: published sizes, Hugging Face config.json round trips, refusals."""

import json

import msgspec
import pytest

from mixtral.config import PRESETS, ConfigError, from_hf_dict, load_model_config, preset

# Mixtral-8x7B-v0.1's config.json as published, training knobs and all.
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    "name, total, active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("mixtral-8x22b", 141e9, 39e9)]
)
def test_published_parameter_counts(name, total, active):
    cfg = preset(name)
    assert cfg.total_params() == pytest.approx(total, rel=0.01)
    assert cfg.active_params() == pytest.approx(active, rel=0.01)


def test_mixtral_8x7b_sizes_match_design_table():
    cfg = preset("mixtral-8x7b")
    assert cfg.dim_head == 128
    assert cfg.kv_bytes_per_token() == 128 * 1024
    assert cfg.attention_params() * 2 == pytest.approx(3.2e9, rel=0.02)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    cfg = PRESETS[name]
    raw = json.loads(json.dumps(cfg.to_hf_dict()))  # through JSON, as a file would
    assert raw["model_type"] == "mixtral"
    assert from_hf_dict(raw) == cfg


def test_explicit_head_dim_round_trips():
    cfg = msgspec.structs.replace(preset("tiny"), head_dim=32)
    assert cfg.dim_head == 32
    assert from_hf_dict(cfg.to_hf_dict()) == cfg


def test_published_mixtral_config_decodes():
    assert from_hf_dict(MIXTRAL_8X7B_CONFIG) == preset("mixtral-8x7b")


def test_transformers_v5_config_decodes():
    """transformers >= 5 writes `dtype` and nests rope_theta in rope_parameters."""
    raw = dict(MIXTRAL_8X7B_CONFIG, dtype="bfloat16", transformers_version="5.0.0", head_dim=None,
               rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    del raw["torch_dtype"], raw["rope_theta"]
    assert from_hf_dict(raw) == preset("mixtral-8x7b")
    raw["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn"):
        from_hf_dict(raw)


def test_eos_list_takes_first():
    assert from_hf_dict(dict(MIXTRAL_8X7B_CONFIG, eos_token_id=[2, 32000])).eos_token_id == 2


def test_non_mixtral_rejected():
    raw = dict(MIXTRAL_8X7B_CONFIG, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="llama"):
        from_hf_dict(raw)


def test_missing_field_named():
    raw = dict(MIXTRAL_8X7B_CONFIG)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        from_hf_dict(raw)


def test_inconsistent_heads_rejected():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        from_hf_dict(dict(MIXTRAL_8X7B_CONFIG, num_key_value_heads=5))


def test_load_from_folder_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    assert load_model_config(tmp_path) == preset("mixtral-8x7b")
    assert load_model_config(tmp_path / "config.json") == preset("mixtral-8x7b")
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_model_config(tmp_path)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        preset("mixtral-9x9b")

