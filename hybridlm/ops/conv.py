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
        # one call on a right-padded batch [N, T_max, C]: padding comes after each sequence, so no real
        # output sees it; the final state is read at each sequence's own end
        from hybridlm.ops.delta_rule import packed_to_padded

        cu_seqlens = cu_seqlens.to(x.device)
        rows, cols, longest = packed_to_padded(cu_seqlens)
        count, width = len(cu_seqlens) - 1, weight.shape[1]
        padded = x.new_zeros(count, longest, x.shape[-1])
        padded[rows, cols] = x[0]
        if initial_state is None:
            initial_state = x.new_zeros(count, x.shape[-1], width - 1)
        y, _ = causal_conv1d(padded, weight, initial_state=initial_state, activation=activation)
        final = None
        if output_final_state:
            history = torch.cat([initial_state.to(x.dtype), padded.transpose(1, 2)], dim=-1)  # [N, C, K-1+T_max]
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None, None]
            index = lengths + torch.arange(width - 1, device=x.device)  # the last K-1 inputs of each sequence
            final = history.gather(-1, index.expand(-1, x.shape[-1], -1))
        return y[rows, cols][None], final
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
