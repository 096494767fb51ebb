"""Causal depthwise conv1d over time with a carried state (the GDN layer's short convolution)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = act(sum_j weight[:, j] * x_{t - K + 1 + j}), with the K-1 inputs before x taken from the state.

    x [B, T, C]; weight [C, K]; states [N, C, K-1] hold the last K-1 *pre-conv* inputs (zeros at the start).
    With `cu_seqlens` (B = 1) each packed sequence starts from its own state. Computed in weight's dtype,
    as transformers does, and returned in x's dtype.
    """
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [B, T, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {x.shape[0]}")
        # one call on one stream: each sequence's K-1 carried inputs, then its tokens, sequence after sequence,
        # so every window sees only its own sequence (no padding to the longest: decode rows cost one column)
        cu_seqlens = cu_seqlens.to(x.device)
        count, width, channels = len(cu_seqlens) - 1, weight.shape[1], x.shape[-1]
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        sequence = torch.repeat_interleave(torch.arange(count, device=x.device), lengths)  # [T]
        positions = torch.arange(x.shape[1], device=x.device) + (sequence + 1) * (width - 1)  # token -> stream
        carried = (cu_seqlens[:-1] + torch.arange(count, device=x.device) * (width - 1))[:, None] + torch.arange(
            width - 1, device=x.device)  # [N, K-1] stream columns of each carried state
        # the stream keeps the inputs exactly (the final states are copies of them); the conv runs in weight's dtype
        stream = x.new_zeros(channels, x.shape[1] + count * (width - 1), dtype=torch.promote_types(x.dtype, weight.dtype))
        stream[:, positions] = x[0].T.to(stream.dtype)
        if initial_state is not None:
            stream[:, carried.flatten()] = initial_state.to(stream.dtype).permute(1, 0, 2).reshape(channels, -1)
        y = F.conv1d(stream[None].to(weight.dtype), weight.unsqueeze(1), groups=channels)[0]  # [C, len - (K-1)]
        if activation == "silu":
            y = F.silu(y)
        y = y[:, positions - (width - 1)].T[None].to(x.dtype)  # [1, T, C]
        final = None
        if output_final_state:  # the last K-1 stream columns of each sequence
            ends = cu_seqlens[1:] + torch.arange(1, count + 1, device=x.device) * (width - 1)
            index = ends[:, None] - (width - 1) + torch.arange(width - 1, device=x.device)  # [N, K-1]
            final = stream[:, index.flatten()].reshape(channels, count, width - 1).transpose(0, 1).to(x.dtype)
        return y, final
    batch, length, channels = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width - 1)
    elif tuple(initial_state.shape) != (batch, channels, width - 1):
        raise ValueError(f"conv state must be {(batch, channels, width - 1)}, got {tuple(initial_state.shape)}")
    # [B, C, K-1+T]: the carried inputs, then the new ones
    padded = torch.cat([initial_state.to(weight.dtype), x.transpose(1, 2).to(weight.dtype)], dim=-1)
    y = F.conv1d(padded, weight.unsqueeze(1), groups=channels)  # [B, C, T]
    if activation == "silu":
        y = F.silu(y)
    final = padded[:, :, padded.shape[-1] - (width - 1):].to(x.dtype) if output_final_state else None
    return y.transpose(1, 2).to(x.dtype), final
