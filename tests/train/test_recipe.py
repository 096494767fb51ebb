"""TrainConfig: validation with clear errors, the model it describes, its JSON record."""
from __future__ import annotations

import pytest

from hybridlm.config import FULL, LINEAR
from hybridlm.train import TrainConfig
from hybridlm.train.recipe import DEFAULT_STEPS


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"data": ("corpus",), "out": "run", "steps": 100, "warmup": 10, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ratio": 3, "pattern": "LLLA"}, "ratio (3) or pattern ('LLLA'), not both"),
        ({"steps": 10, "tokens": 1000}, "steps (10) or tokens (1000), not both"),
        ({"pattern": "LLXA"}, "layer pattern must be a string of 'L'"),
        ({"pattern": "LLA", "num_layers": 8}, "does not tile 8 layers"),
        ({"ratio": -1}, "ratio must be a non-negative integer, got -1"),
        ({"num_heads": 3, "num_kv_heads": 2}, "must be a multiple of num_key_value_heads (2)"),
        ({"gdn_heads": 3, "gdn_value_heads": 4}, "linear_num_value_heads (4) must be a multiple of"),
        ({"batch_size": 10, "grad_accum": 4}, "batch_size (10) must be a multiple of grad_accum (4)"),
        ({"vocab_size": 200}, "vocab_size must be at least 260"),
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0"),
        ({"heldout_fraction": 1.0}, "heldout_fraction must be in [0, 1), got 1.0"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"warmup": 100}, "warmup (100) must be shorter than the run (100 steps)"),
        ({"eval_every": -1}, "eval_every must be a non-negative integer, got -1"),
        ({"data": ()}, "data needs at least one file or folder"),
    ],
)
def test_invalid_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match="invalid training config") as error:
        config(**overrides)
    assert message in str(error.value)


def test_ratio_and_pattern_give_the_layer_types():
    assert config(num_layers=8).model_config(512).layer_pattern == "LLLA" * 2  # default ratio 3
    assert config(num_layers=6, ratio=2).model_config(512).layer_pattern == "LLA" * 2
    assert config(num_layers=4, pattern="lala").model_config(512).layer_types == (LINEAR, FULL, LINEAR, FULL)
    assert config(num_layers=3, ratio=0).model_config(512).layer_pattern == "AAA"


def test_model_config_is_a_qwen3_5_text_model():
    model = config(hidden_size=128, intermediate_size=None, tie_embeddings=False).model_config(4096, (0, 2), 0)
    assert model.model_type == "qwen3_5_text"
    assert model.intermediate_size == 3 * 128
    assert model.eos_token_id == (0, 2) and model.pad_token_id == 0
    assert not model.tie_word_embeddings
    assert model.to_dict()["architectures"] == ["Qwen3_5ForCausalLM"]


def test_steps_from_a_token_budget():
    assert config(steps=None, tokens=10 * 16 * 512 + 1, warmup=0).total_steps == 11
    assert config(steps=None, warmup=0).total_steps == DEFAULT_STEPS
    assert config().tokens_per_step == 16 * 512


def test_json_round_trip_and_resume_checks(tmp_path):
    original = config(data=["a", "b"], eval_data="c")
    assert original.data == ("a", "b") and original.eval_data == ("c",)
    original.save(tmp_path)
    loaded = TrainConfig.load(tmp_path)
    assert loaded == original
    assert config(data=["a", "b"], eval_data="c", steps=200, eval_every=5).resume_mismatches(loaded) == []
    mismatches = config(data=["a", "b"], eval_data="c", lr=1e-3, seq_len=256).resume_mismatches(loaded)
    assert mismatches == ["seq_len: 512 -> 256", "lr: 0.003 -> 0.001"]
    with pytest.raises(ValueError, match="unknown training config field"):
        TrainConfig.from_dict({**original.to_dict(), "learning_rate": 1.0})
