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
        outputs, states = [], []
        for i in range(len(cu_seqlens) - 1):
            start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            state = None if initial_state is None else initial_state[i : i + 1]
            y, s = causal_conv1d(x[:, start:end], weight, initial_state=state, output_final_state=True,
                                 activation=activation)
            outputs.append(y)
            states.append(s)
        return torch.cat(outputs, dim=1), torch.cat(states) if output_final_state else None
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
