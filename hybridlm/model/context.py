"""ForwardContext: what one forward call needs besides the weights.

RoPE positions, which tokens are padding, how packed documents are delimited, where each layer's
recurrent state comes from and goes to, and how attention reaches earlier keys. The model asks the
context and never looks at cache internals; the engine supplies its own context over paged pools.
"""
from __future__ import annotations

import torch

from hybridlm.model.cache import HybridCache
from hybridlm.ops import attention
from hybridlm.ops import attention_mask as build_attention_mask
from hybridlm.ops.varlen import attach_host_bounds, host_bounds


class ForwardContext:
    """A plain forward (no cache), a forward on packed documents (`cu_seqlens`), or a step on a HybridCache.

    positions [B, T]: RoPE positions; pad_mask [B, T] or None: real tokens of left-padded rows;
    cu_seqlens [N+1] or None: N documents packed in one row.
    """

    # [1, T, 1] bool, True on rows past a padded prefill's real tokens (the engine's prefill graphs), else None
    padding = None

    def __init__(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> None:
        batch, length = input_ids.shape
        device = input_ids.device
        self.cache = cache
        self.pad_mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if self.pad_mask is not None and self.pad_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(self.pad_mask.shape)}"
            )
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has {batch}")
        self.valid = torch.ones_like(input_ids, dtype=torch.bool) if self.pad_mask is None else self.pad_mask
        past_slots = 0 if cache is None else cache.seq_len
        past_tokens = 0 if cache is None else cache.lengths[:, None]
        self.positions = (past_tokens + self.valid.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        self.cu_seqlens = None
        document = None
        if cu_seqlens is not None:
            self.cu_seqlens, document = _check_packing(cu_seqlens, batch, length, cache, attention_mask, device)
            self.positions = (torch.arange(length, device=device) - self.cu_seqlens[document])[None]
        self._mask = None  # plain causal attention over this chunk alone needs no mask tensor
        if cache is None and self.pad_mask is None and cu_seqlens is None:
            return
        # attention may see key j from query i iff j is real, not in the future, and in the same document
        key_valid = self.valid if cache is None else torch.cat([cache.key_valid, self.valid], dim=1)
        query_slots = torch.arange(past_slots, past_slots + length, device=device)
        self._mask = build_attention_mask(query_slots, torch.arange(past_slots + length, device=device), key_valid)
        if document is not None:
            self._mask = self._mask & (document[:, None] == document[None, :])

    @property
    def keeps_state(self) -> bool:
        """Whether layers must hand their final recurrent / conv states back."""
        return self.cache is not None

    @property
    def single_token_decode(self) -> bool:
        """Every row advances by one token from an existing state: the step form applies."""
        return self.cache is not None and self.positions.shape[1] == 1 and self.cache.seq_len > 0

    def decode_pools(self, layer: int) -> None:
        """State pools for a fused decode kernel; only the engine's paged context has them."""
        return None

    def gdn_states(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.cache is None:
            return None, None
        return self.cache.conv_states.get(layer), self.cache.recurrent_states.get(layer)

    def store_gdn_states(self, layer: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.cache.conv_states[layer] = conv_state
        self.cache.recurrent_states[layer] = recurrent_state

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, Hq, T, D] and this chunk's k, v [B, Hkv, T, D] -> o [B, Hq, T, D]."""
        if self.cache is not None:
            k, v = self.cache.append_kv(layer, k, v)
        return attention(q, k, v, self._mask, scale)

    def finish(self) -> None:
        if self.cache is not None:
            self.cache.advance(self.valid)


def _check_packing(cu_seqlens, batch, length, cache, attention_mask, device):
    """Validate `cu_seqlens`; return it on `device` and the document index of every token [T]."""
    if batch != 1 or cache is not None or attention_mask is not None:
        raise ValueError("cu_seqlens packs documents into one row: it needs batch size 1, no cache and no attention_mask")
    given = cu_seqlens
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long, device=device)
    if cu_seqlens.ndim != 1:
        raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
    # the host values, read once (or as attached by the caller) and kept with the tensor for every layer's kernels
    bounds = host_bounds(given) if isinstance(given, torch.Tensor) and given.ndim == 1 else cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"cu_seqlens must run from 0 to the row length {length}, got {bounds}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {bounds}")
    attach_host_bounds(cu_seqlens, bounds)
    document = torch.searchsorted(cu_seqlens, torch.arange(length, device=device), right=True) - 1
    return cu_seqlens, document
