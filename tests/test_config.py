"""ModelConfig: every family's config.json, layer patterns, and clear errors for bad configs."""
from __future__ import annotations

import json

import pytest
import torch

import hybridlm
from hybridlm.config import ModelConfig, layer_types_from_pattern
from tests.checkpoints import TEXT, VOCAB, make_hf_model


def text_config(**overrides) -> dict:
    return {"model_type": "qwen3_5_text", **TEXT, **overrides}


def test_every_family_parses(checkpoint, family):
    directory, reference = checkpoint(family)
    config = ModelConfig.from_file(directory)
    assert config.model_type == family
    assert config.layer_pattern == "LLLA"
    assert config.hidden_size == 64 and config.vocab_size == VOCAB
    expected_moe = "moe" in family or family == "qwen3_5_moe" or family == "qwen3_next"
    assert (config.num_experts > 0) == expected_moe


def test_layer_types_default_to_every_fourth_layer():
    config = ModelConfig.from_dict(text_config(num_hidden_layers=8))
    assert config.layer_pattern == "LLLALLLA"
    config = ModelConfig.from_dict(text_config(num_hidden_layers=6, full_attention_interval=2))
    assert config.layer_pattern == "LALALA"


@pytest.mark.parametrize("pattern, layers, expected", [
    (3, 8, "LLLALLLA"), (1, 4, "LALA"), (7, 8, "LLLLLLLA"), ("L", 3, "LLL"), ("A", 2, "AA"), ("LLA", 6, "LLALLA"),
])
def test_layer_patterns(pattern, layers, expected):
    types = layer_types_from_pattern(pattern, layers)
    assert "".join("L" if t == "linear_attention" else "A" for t in types) == expected


@pytest.mark.parametrize("layer_types", [
    ["linear_attention", "full_attention"] * 2,  # 1:1
    ["linear_attention"] * 7 + ["full_attention"],  # 7:1
    ["linear_attention"] * 4,  # all GDN
    ["full_attention"] * 2,  # all attention
])
def test_any_layer_pattern_matches_transformers(layer_types, tmp_path):
    reference = make_hf_model("qwen3_5_text", num_hidden_layers=len(layer_types), layer_types=layer_types)
    reference.save_pretrained(tmp_path)
    ours = hybridlm.load(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # use_cache=False: transformers' cache cannot size an all-GDN stack
        torch.testing.assert_close(ours(ids), reference(ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="unknown config field.*frobnicate"):
        ModelConfig.from_dict(text_config(frobnicate=3))
    config = ModelConfig.from_dict(text_config(frobnicate=3), strict=False)  # warns, loads
    assert config.hidden_size == 64


def test_missing_required_field_is_named():
    bad = text_config()
    del bad["linear_num_value_heads"]
    with pytest.raises(ValueError, match="missing required field.*linear_num_value_heads"):
        ModelConfig.from_dict(bad)


@pytest.mark.parametrize("model_type", [None, "llama", "qwen3"])
def test_unsupported_model_type(model_type):
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_dict(text_config(model_type=model_type))


@pytest.mark.parametrize("overrides, message", [
    ({"layer_types": ["linear_attention"] * 3}, "layer_types has 3 entries"),
    ({"layer_types": ["linear_attention", "sliding", "full_attention", "full_attention"]}, "sliding"),
    ({"linear_num_value_heads": 3}, "multiple of linear_num_key_heads"),
    ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "needs 'factor'"),
    ({"rope_parameters": {"rope_theta": 1e4, "wobble": 1}}, "unknown rope parameter.*wobble"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(text_config(**overrides))


def test_wrapper_needs_text_config():
    with pytest.raises(ValueError, match="text_config"):
        ModelConfig.from_dict({"model_type": "qwen3_5"})


def test_legacy_top_level_rope_fields():
    config = ModelConfig.from_dict(text_config(rope_theta=1e7, partial_rotary_factor=0.5,
                                               rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 256}))
    assert (config.rope_theta, config.partial_rotary_factor, config.rope_type) == (1e7, 0.5, "yarn")
    assert config.rope_parameters["factor"] == 4.0


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_to_dict_round_trips(checkpoint, family):
    directory, _ = checkpoint(family)
    config = ModelConfig.from_file(directory)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
