"""RMSNorms of the Qwen3.5 hybrid: zero-centred (weight stored as w, applied as 1 + w) and gated."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm: (x / rms(x)) * (1 + w) in fp32, cast back to x's dtype after the multiply.

    The checkpoint stores w initialised at 0; applying 1 + w twice, or not at all, still "runs" but is wrong.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GDN output norm: rmsnorm(x) * w (plain weight, init 1) * silu(gate), per value head.

    The order of casts follows transformers (normalise in fp32, back to x's dtype, weight, then the fp32
    gate) so bf16 runs match it bit for bit.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * normed) * F.silu(gate.float())).to(x.dtype)
