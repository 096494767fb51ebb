"""q/k RMSNorm fused with partial RoPE, one launch per tensor; the reference twin is
`hybridlm.ops.rope.rms_norm_rope` (rms_norm, then apply_partial_rope).

The attention layer normalises q and k per head and rotates their first rotary_dim channels: as PyTorch ops that
is ~8 kernels for each norm and ~6 for each rotation, on a few kilobytes at decode time. One program per block of
(token, head) rows; the rotation's partner channel (c + rd/2, or c - rd/2 with the sign flipped) is loaded as a
second view of the same row, so no permutation is done in registers. Every rounding follows the reference: the
normalised row is rounded to x's dtype, then x cos and x' sin are each rounded and their sum rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_rope_fwd_kernel(
    x,  # [N, H, D], strides stride_n, stride_h, 1
    weight,  # [D]: applied as 1 + w
    cos,  # [N, RD]
    sin,  # [N, RD]
    y,  # out [N, H, D] contiguous
    eps,
    R,  # N * H rows
    stride_n,
    stride_h,
    H: tl.constexpr,
    D: tl.constexpr,
    RD: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m = m_r[:, None] & (o_d[None, :] < D)
    i_n, i_h = o_r // H, o_r % H
    p_row = x + i_n.to(tl.int64) * stride_n + i_h * stride_h  # [BR]
    b_x = tl.load(p_row[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_w = 1. + tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)
    b_n = (b_x * b_rstd[:, None] * b_w[None, :]).to(y.dtype.element_ty).to(tl.float32)

    HALF: tl.constexpr = RD // 2
    m_rot = o_d < RD
    o_p = tl.where(o_d < HALF, o_d + HALF, o_d - HALF)  # the partner channel within the rotary part
    b_xp = tl.load(p_row[:, None] + o_p[None, :], mask=m_r[:, None] & m_rot[None, :], other=0.).to(tl.float32)
    b_wp = 1. + tl.load(weight + o_p, mask=m_rot, other=0.).to(tl.float32)
    b_np = (b_xp * b_rstd[:, None] * b_wp[None, :]).to(y.dtype.element_ty).to(tl.float32)
    b_np = tl.where((o_d < HALF)[None, :], -b_np, b_np)  # rotate_half: (-x2, x1)
    m_cs = m_r[:, None] & m_rot[None, :]
    o_cs = i_n.to(tl.int64)[:, None] * RD + o_d[None, :]
    b_cos = tl.load(cos + o_cs, mask=m_cs, other=0.).to(tl.float32)
    b_sin = tl.load(sin + o_cs, mask=m_cs, other=0.).to(tl.float32)
    b_a = (b_n * b_cos).to(y.dtype.element_ty).to(tl.float32)
    b_b = (b_np * b_sin).to(y.dtype.element_ty).to(tl.float32)
    b_y = tl.where(m_rot[None, :], b_a + b_b, b_n)
    tl.store(y + o_r.to(tl.int64)[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


def rms_norm_rope_fwd(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """x [B, T, H, D] (any strides with a unit last one) -> [B, T, H, D] contiguous: zero-centred RMSNorm per head,
    then the first rotary_dim channels rotated by cos, sin [B, T, rotary_dim] (rotate-half convention)."""
    batch, length, heads, dim = x.shape
    rotary = cos.shape[-1]
    if weight.shape != (dim,) or cos.shape != (batch, length, rotary) or sin.shape != cos.shape:
        raise ValueError(f"expected x [B, T, H, D], weight [D], cos and sin [B, T, rotary_dim], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if rotary % 2 or rotary > dim:
        raise ValueError(f"rotary_dim must be even and at most the head dim {dim}, got {rotary}")
    if x.stride(3) != 1 or (batch > 1 and x.stride(0) != length * x.stride(1)):
        x = x.contiguous()
    tokens = batch * length
    y = torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device)
    rows = tokens * heads
    BD = triton.next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    if rows:
        rms_norm_rope_fwd_kernel[(triton.cdiv(rows, BR),)](
            x, weight.contiguous(), cos.reshape(tokens, rotary).contiguous(), sin.reshape(tokens, rotary).contiguous(),
            y, eps, rows, x.stride(1), x.stride(2), H=heads, D=dim, RD=rotary, BR=BR, BD=BD, num_warps=4)
    return y
