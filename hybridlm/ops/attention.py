"""Causal grouped-query softmax attention over a KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """Boolean [B, 1, T, S]: query i may see key j iff key j is a real token at or before query i.

    Positions are indices in the cache (not RoPE positions). A query at a padding slot may at least see
    itself, so no softmax row is empty (an empty row would be NaN and could leak through 0 * NaN).
    """
    causal = key_positions[None, None, :] <= query_positions[None, :, None]  # [1, T, S]
    allowed = causal & key_valid[:, None, :]  # [B, T, S]
    allowed = allowed | (key_positions[None, None, :] == query_positions[None, :, None])
    return allowed[:, None]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain GQA attention: q [B, Hq, T, D], k/v [B, Hkv, S, D], boolean mask [B, 1, T, S] -> [B, Hq, T, D].

    Scores and softmax in fp32; each kv head serves Hq/Hkv consecutive query heads.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Same contract as `attention_reference`, through PyTorch's fused SDPA (no K/V repeat in memory).

    mask None means plain causal attention of T queries over the same T keys: no mask tensor is built,
    so SDPA can take its flash kernel (a [T, T] mask at 32k tokens would be 1 GB).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
