"""Tiny random checkpoints of every supported family, written by transformers (the oracle)."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_tokenizer import write_tiny_tokenizer

FAMILIES = ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next")
VOCAB = 336  # the tiny tokenizer's 329 ids, padded as real checkpoints pad theirs

TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=8, linear_conv_kernel_dim=4, intermediate_size=96, max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)


def hf_model_class(family: str):
    import transformers as tf

    return {
        "qwen3_5_text": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
        "qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
        "qwen3_5_moe_text": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
        "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration),
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
    }[family]


def make_hf_model(family: str, seed: int = 0, **text_overrides):
    """A transformers model of `family` with every weight random (norms and gates included, so a
    missing 1 + w or a swapped gate cannot hide behind an all-zero init)."""
    config_class, model_class = hf_model_class(family)
    text = dict(TEXT, **(MOE if "moe" in family or family == "qwen3_next" else {}), **text_overrides)
    if family in ("qwen3_5", "qwen3_5_moe"):
        config = config_class(text_config=text, vision_config=VISION, tie_word_embeddings=False)
    else:
        config = config_class(**text)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(-2, 1, generator=generator))
            elif param.ndim == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    return model


def write_checkpoint(family: str, directory: Path, seed: int = 0, **text_overrides):
    """Save a random `family` model with transformers plus the tiny tokenizer; return the HF model."""
    model = make_hf_model(family, seed=seed, **text_overrides)
    model.save_pretrained(directory)
    vocab = write_tiny_tokenizer(directory)
    assert vocab <= VOCAB
    return model
