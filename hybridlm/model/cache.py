"""HybridCache: what a batch of sequences carries between forward calls.

Per Gated DeltaNet layer: the conv state [B, C, K-1] (last K-1 pre-conv inputs) and the recurrent state
[B, Hv, dk, dv] in fp32; per attention layer: K and V [B, Hkv, S, D]. Rows are left-padded: `key_valid`
marks which cache slots hold real tokens and `lengths` counts them (the next RoPE position of each row).
This is the simple contiguous cache of `model.forward`; the engine keeps its own paged pools.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HybridCache:
    batch_size: int
    device: torch.device
    conv_states: dict[int, torch.Tensor] = field(default_factory=dict)
    recurrent_states: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    key_valid: torch.Tensor | None = None  # [B, S] bool
    lengths: torch.Tensor | None = None  # [B] long

    def __post_init__(self) -> None:
        if self.key_valid is None:
            self.key_valid = torch.zeros(self.batch_size, 0, dtype=torch.bool, device=self.device)
        if self.lengths is None:
            self.lengths = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)

    @property
    def seq_len(self) -> int:
        """Cache slots used so far (padding included)."""
        return self.key_valid.shape[1]

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append K/V [B, Hkv, T, D] of one attention layer; return the whole [B, Hkv, S+T, D]."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, valid: torch.Tensor) -> None:
        """Record that a chunk with real-token flags `valid` [B, T] went through every layer."""
        self.key_valid = torch.cat([self.key_valid, valid], dim=1)
        self.lengths = self.lengths + valid.sum(dim=1)

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for states in (self.conv_states, self.recurrent_states, self.keys, self.values):
            for layer in states:
                states[layer] = states[layer].index_select(0, rows)
        self.key_valid = self.key_valid.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.batch_size = len(rows)

    def nbytes(self) -> int:
        tensors = [*self.conv_states.values(), *self.recurrent_states.values(), *self.keys.values(),
                   *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
