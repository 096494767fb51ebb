"""Fused gated RMSNorm (the GDN output norm); the reference twin is `hybridlm.ops.norm.gated_rms_norm`.

One program per block of rows; the whole row (one value head, dv) sits in registers. The casts follow the
reference step by step (normalise in fp32, round to x's dtype, multiply by the weight in the promoted dtype,
then by silu(gate) in fp32) so bf16 results match it bit for bit up to rsqrt rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gated_rms_norm_fwd_kernel(
    x,  # [R, D]
    gate,  # [R, D]
    weight,  # [D]
    y,  # out [R, D]
    eps,
    R,
    D: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    PROD_IN_X_DTYPE: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    o_rd = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + o_rd, mask=m, other=0.).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_n = (b_x * b_rstd[:, None]).to(x.dtype.element_ty).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)
    b_n = b_w[None, :] * b_n
    if PROD_IN_X_DTYPE:  # weight * normed rounds to torch's promoted dtype: x's, or else fp32
        b_n = b_n.to(x.dtype.element_ty).to(tl.float32)
    b_g = tl.load(gate + o_rd, mask=m, other=0.).to(tl.float32)
    tl.store(y + o_rd, (b_n * b_g * tl.sigmoid(b_g)).to(y.dtype.element_ty), mask=m)


def gated_rms_norm_fwd(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last axis; x, gate [..., D], weight [D]; returns x's dtype."""
    if gate.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ValueError(f"expected x, gate [..., D] and weight [D], got {tuple(x.shape)}, {tuple(gate.shape)}, "
                         f"{tuple(weight.shape)}")
    dim = x.shape[-1]
    x2, gate2 = x.reshape(-1, dim).contiguous(), gate.reshape(-1, dim).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    BD = triton.next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    prod_in_x_dtype = torch.promote_types(weight.dtype, x.dtype) == x.dtype
    if rows:
        gated_rms_norm_fwd_kernel[(triton.cdiv(rows, BR),)](
            x2, gate2, weight.contiguous(), y, eps, rows, D=dim, BR=BR, BD=BD, PROD_IN_X_DTYPE=prod_in_x_dtype,
            num_warps=4)
    return y.reshape(x.shape)
