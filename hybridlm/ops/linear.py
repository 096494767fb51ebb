"""Projections with their neighbours folded in: the plain-PyTorch twins of the decode GEMVs in
`hybridlm.ops.triton.gemv`, composed of the ops the unfused model runs (the kernels round where these round)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.norm import rms_norm


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x) @ weight.T: x [..., K], norm_weight [K] (zero-centred), weight [N, K] -> [..., N]. With
    `residual`, of s = x + residual, returning (y, s): the decoder's deferred residual add, then its norm."""
    if residual is None:
        return F.linear(rms_norm(x, norm_weight, eps), weight)
    summed = x + residual
    return F.linear(rms_norm(summed, norm_weight, eps), weight), summed


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU's down projection: gate_up [..., 2I] (the gate columns, then up), weight [N, I] -> [..., N]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def sigmoid_gate_linear(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The attention's output gate and o_proj: o, gate [..., H, D], weight [N, H * D] -> [..., N]; o * sigmoid(gate)
    rounds as the unfused gate does (sigmoid's result, then the product)."""
    return F.linear(o.flatten(-2) * torch.sigmoid(gate.flatten(-2)), weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T, bias-free."""
    return F.linear(x, weight)
