"""What a checkpoint is and what it costs: layer pattern, parameters, state and KV memory."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.config import ModelConfig
from hybridlm.engine.cache import CachePlan, plan_cache
from hybridlm.model import CacheLayout, HybridLM


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    layer_pattern: str
    num_parameters: int
    dtype: torch.dtype
    weight_bytes: int
    state_bytes_per_sequence: int  # conv + recurrent state of every GDN layer (fixed, any length)
    kv_bytes_per_token: int  # K and V of every attention layer
    context_length: int
    cache_layout: CacheLayout

    def cache_plan(self, memory_bytes: int, max_num_seqs: int = 64, block_size: int = 64) -> CachePlan:
        """How the engine would split `memory_bytes` of cache: state slots, snapshots, KV blocks."""
        return plan_cache(self.cache_layout, self.dtype, memory_bytes, max_num_seqs, block_size)

    def memory_at(self, tokens: int) -> int:
        """Cache bytes of one sequence of `tokens` tokens."""
        return self.state_bytes_per_sequence + tokens * self.kv_bytes_per_token

    @property
    def all_attention_kv_bytes_per_token(self) -> int:
        """What the KV cache would cost if every layer were attention (what naive planners assume)."""
        attention_layers = self.layer_pattern.count("A")
        return self.kv_bytes_per_token * len(self.layer_pattern) // max(attention_layers, 1)


def describe(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> ModelInfo:
    """Sizes from the config alone: the model is built on the meta device, no weights are read."""
    with torch.device("meta"):
        model = HybridLM(config)
    layout = model.cache_layout
    itemsize = torch.empty((), dtype=dtype).element_size()
    parameters = model.num_parameters()
    return ModelInfo(
        model_type=config.model_type,
        layer_pattern=config.layer_pattern,
        num_parameters=parameters,
        dtype=dtype,
        weight_bytes=parameters * itemsize,
        state_bytes_per_sequence=layout.state_bytes_per_sequence(dtype),
        kv_bytes_per_token=layout.kv_bytes_per_token(dtype),
        context_length=config.max_position_embeddings,
        cache_layout=layout,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
