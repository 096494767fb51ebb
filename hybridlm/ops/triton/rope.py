"""q/k RMSNorm fused with partial RoPE; the reference twins are `hybridlm.ops.rope.rms_norm_rope` (rms_norm, then
apply_partial_rope) and `qk_rms_norm_rope` (that on q and on k).

The attention layer normalises q and k per head and rotates their first rotary_dim channels: as PyTorch ops that
is ~8 kernels for each norm and ~6 for each rotation, on a few kilobytes at decode time. One program per block of
(token, head) rows; the rotation's partner channel (c + rd/2, or c - rd/2 with the sign flipped) is loaded as a
second view of the same row, so no permutation is done in registers. Every rounding follows the reference: the
normalised row is rounded to x's dtype, then x cos and x' sin are each rounded and their sum rounded again.

`qk_rms_norm_rope_fwd` does q and k in one launch (the first programs take q's rows, the rest k's) and computes
cos and sin itself from the positions, as `rope_cos_sin` does, so a decode step builds no cos/sin tensors (six
launches) and runs one q/k launch per attention layer instead of two.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hybridlm.ops.rope import RopeInputs
from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_enabled, pdl_wait

# The CPU interpreter runs no libdevice calls: numpy's cos and sin there (within an ulp or two of PyTorch's)
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# Angles in the kernel (libdevice cos/sin over each program's whole [16, 256] tile) cost the step more than they
# save: on an H200 the q/k launch took 39 us against 2.3 us for each of the two launches that read ATen's cos/sin
# (benchmarks/RESULTS.md, sixth session), 0.8B decode 774 vs 933 tok/s. Off until the angles are made only for the
# rotary half-width and shared by the rows of a token.
ANGLES_IN_KERNEL = False
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}


@triton.jit
def _cos_sin(b_angle):
    """fp32 cos and sin as PyTorch's: libdevice's cosf/sinf, named rather than left to how tl.cos and tl.sin lower
    (an approximate cos.approx.f32 / sin.approx.f32 would be far off at the angles of positions ~1e5; on Triton 3.6
    they matched PyTorch too, on an H200 at angles up to 262144)."""
    if INTERPRET:
        b_cos, b_sin = tl.cos(b_angle), tl.sin(b_angle)
    else:
        b_cos, b_sin = libdevice.cos(b_angle), libdevice.sin(b_angle)
    return b_cos, b_sin


@triton.jit
def _rms_norm_rope_rows(
    x,  # [N, H, D], strides stride_n, stride_h, 1
    weight,  # [D]: applied as 1 + w
    y,  # out [N, H, D] contiguous
    cos,  # [N, RD] (not ANGLES)
    sin,  # [N, RD] (not ANGLES)
    positions,  # [N] integers, stride stride_p (ANGLES)
    inv_freq,  # [RD / 2] fp32 (ANGLES)
    scaling,  # fp32 attention scaling (ANGLES)
    eps,
    i_r,  # this program's block of rows
    R,  # N * H rows
    stride_n,
    stride_h,
    stride_p,
    H: tl.constexpr,
    D: tl.constexpr,
    RD: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    ANGLES: tl.constexpr,  # cos and sin from positions x inv_freq, else loaded
    CS: tl.constexpr,  # the dtype cos and sin are rounded to (ANGLES)
):
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
    if ANGLES:  # as rope_cos_sin: the fp32 product position x inv_freq (the frequencies repeat in the second half),
        # fp32 cos and sin, times the scaling in fp32, rounded to CS
        b_pos = tl.load(positions + i_n.to(tl.int64) * stride_p, mask=m_r, other=0).to(tl.float32)  # [BR]
        b_freq = tl.load(inv_freq + tl.where(o_d < HALF, o_d, o_d - HALF), mask=m_rot, other=0.)  # [BD]
        b_cos, b_sin = _cos_sin(b_pos[:, None] * b_freq[None, :])
        b_cos = (b_cos * scaling).to(CS).to(tl.float32)
        b_sin = (b_sin * scaling).to(CS).to(tl.float32)
    else:
        m_cs = m_r[:, None] & m_rot[None, :]
        o_cs = i_n.to(tl.int64)[:, None] * RD + o_d[None, :]
        b_cos = tl.load(cos + o_cs, mask=m_cs, other=0.).to(tl.float32)
        b_sin = tl.load(sin + o_cs, mask=m_cs, other=0.).to(tl.float32)
    b_a = (b_n * b_cos).to(y.dtype.element_ty).to(tl.float32)
    b_b = (b_np * b_sin).to(y.dtype.element_ty).to(tl.float32)
    b_y = tl.where(m_rot[None, :], b_a + b_b, b_n)
    tl.store(y + o_r.to(tl.int64)[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


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
    _rms_norm_rope_rows(x, weight, y, cos, sin, x, weight, 1., eps, tl.program_id(0), R, stride_n, stride_h, 0,
                        H, D, RD, BR, BD, False, tl.float32)


@triton.jit
def qk_rms_norm_rope_fwd_kernel(
    q,  # [N, HQ, D], strides stride_qn, stride_qh, 1
    q_weight,  # [D]
    q_out,  # out [N, HQ, D] contiguous
    k,  # [N, HK, D], strides stride_kn, stride_kh, 1
    k_weight,  # [D]
    k_out,  # out [N, HK, D] contiguous
    cos,  # [N, RD] (not ANGLES)
    sin,  # [N, RD] (not ANGLES)
    positions,  # [N] integers, stride stride_p (ANGLES)
    inv_freq,  # [RD / 2] fp32 (ANGLES)
    scaling,
    eps,
    RQ,  # N * HQ rows
    RK,  # N * HK rows
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_p,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    RD: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    CS: tl.constexpr,
    ANGLES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    i_r = tl.program_id(0)
    NQ = tl.cdiv(RQ, BR)  # q's programs come first
    if i_r < NQ:
        _rms_norm_rope_rows(q, q_weight, q_out, cos, sin, positions, inv_freq, scaling, eps, i_r, RQ, stride_qn,
                            stride_qh, stride_p, HQ, D, RD, BR, BD, ANGLES, CS)
    else:
        _rms_norm_rope_rows(k, k_weight, k_out, cos, sin, positions, inv_freq, scaling, eps, i_r - NQ, RK, stride_kn,
                            stride_kh, stride_p, HK, D, RD, BR, BD, ANGLES, CS)


def _rows_of_tokens(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] with a unit last stride and B, T mergeable into one token axis (any token and head strides);
    copies otherwise."""
    batch, length = x.shape[:2]
    if x.stride(3) != 1 or (batch > 1 and x.stride(0) != length * x.stride(1)):
        return x.contiguous()
    return x


def _blocks(dim: int) -> tuple[int, int]:
    """(BR, BD): rows per program and the head dim's power of two."""
    block_d = next_power_of_2(dim)
    return max(1, min(16, 4096 // block_d)), block_d


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
    x = _rows_of_tokens(x)
    tokens = batch * length
    y = torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device)
    rows = tokens * heads
    BR, BD = _blocks(dim)
    if rows:
        launch(rms_norm_rope_fwd_kernel, (cdiv(rows, BR),),
            x, weight.contiguous(), cos.reshape(tokens, rotary).contiguous(), sin.reshape(tokens, rotary).contiguous(),
            y, eps, rows, x.stride(1), x.stride(2), H=heads, D=dim, RD=rotary, BR=BR, BD=BD, num_warps=4)
    return y


def qk_rms_norm_rope_fwd(q: torch.Tensor, q_weight: torch.Tensor, k: torch.Tensor, k_weight: torch.Tensor,
                         rope: RopeInputs, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, D] and k [B, T, Hk, D] (any strides with a unit last one) -> (q, k) contiguous, in one launch:
    zero-centred RMSNorm per head (q_weight, k_weight [D]), then the first rotary_dim = 2 len(inv_freq) channels
    rotated at `rope.positions` [B, T] by `rope.cos_sin()` (or, with ANGLES_IN_KERNEL, cos and sin computed in the
    kernel exactly as that would make them). Reads nothing on the host (CUDA-graph safe)."""
    batch, length, q_heads, dim = q.shape
    positions, inv_freq = rope.positions, rope.inv_freq
    rotary = 2 * inv_freq.numel()
    if (k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != dim or q_weight.shape != (dim,)
            or k_weight.shape != (dim,) or positions.shape != (batch, length) or inv_freq.ndim != 1):
        raise ValueError(f"expected q [B, T, Hq, D], k [B, T, Hk, D], q_weight and k_weight [D], positions [B, T] and "
                         f"inv_freq [rotary_dim / 2], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(q_weight.shape)}, "
                         f"{tuple(k_weight.shape)}, {tuple(positions.shape)}, {tuple(inv_freq.shape)}")
    if rotary > dim:
        raise ValueError(f"rotary_dim must be at most the head dim {dim}, got {rotary}")
    if q.dtype != k.dtype or positions.is_floating_point() or inv_freq.dtype != torch.float32:
        raise ValueError(f"expected q and k of one dtype, integer positions and fp32 inv_freq, got {q.dtype}, "
                         f"{k.dtype}, {positions.dtype}, {inv_freq.dtype}")
    if positions.device != q.device or inv_freq.device != q.device:
        raise ValueError(f"positions and inv_freq must be on q's device {q.device} (a copy here would break CUDA-graph "
                         f"capture), got {positions.device} and {inv_freq.device}")
    if rope.dtype not in TL_DTYPES:
        raise ValueError(f"cos and sin are rounded to float32, bfloat16, float16 or float64, got {rope.dtype}")
    q, k = _rows_of_tokens(q), _rows_of_tokens(k)
    k_heads, tokens = k.shape[2], batch * length
    positions = positions.reshape(tokens)  # a view for the contexts' [B, T] and [S, 1]
    q_out = torch.empty(batch, length, q_heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(batch, length, k_heads, dim, dtype=k.dtype, device=k.device)
    q_rows, k_rows = tokens * q_heads, tokens * k_heads
    BR, BD = _blocks(dim)
    pdl = pdl_enabled(q.device)
    if ANGLES_IN_KERNEL:
        cos = sin = q_out  # not read
    else:  # built once per forward by ATen and shared by every attention layer (`RopeInputs.cos_sin`)
        cos, sin = (t.reshape(tokens, rotary).contiguous() for t in rope.cos_sin())
    if q_rows + k_rows:
        launch(qk_rms_norm_rope_fwd_kernel, (cdiv(q_rows, BR) + cdiv(k_rows, BR),),
            q, q_weight.contiguous(), q_out, k, k_weight.contiguous(), k_out, cos, sin, positions,
            inv_freq.contiguous(), float(rope.attention_scaling), eps, q_rows, k_rows, q.stride(1), q.stride(2),
            k.stride(1), k.stride(2), positions.stride(0), HQ=q_heads, HK=k_heads, D=dim, RD=rotary, BR=BR, BD=BD,
            CS=TL_DTYPES[rope.dtype], ANGLES=ANGLES_IN_KERNEL, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return q_out, k_out
