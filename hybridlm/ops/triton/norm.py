"""Fused RMSNorms: the gated one (the GDN output norm; reference twin `hybridlm.ops.norm.gated_rms_norm`) and the
zero-centred one with an optional fused residual add (twin `hybridlm.ops.norm.rms_norm`). A decode step of a
PyTorch-op RMSNorm is ~8 kernels of a few microseconds each; at batch 1 those launches, not the bytes, set the
step's time, so every norm of the model is one launch here (and SwiGLU's silu(gate) * up and the attention's
output gate, for the same reason).

One program per block of rows; a whole row (a value head, a q/k head or the hidden state) sits in registers. The
gated norm's casts follow the reference step by step (normalise in fp32, round to x's dtype, multiply by the weight in the promoted dtype,
then by silu(gate) in fp32) so bf16 results match it bit for bit up to rsqrt rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, next_power_of_2


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
    BD = next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    prod_in_x_dtype = torch.promote_types(weight.dtype, x.dtype) == x.dtype
    if rows:
        launch(gated_rms_norm_fwd_kernel, (cdiv(rows, BR),),
            x2, gate2, weight.contiguous(), y, eps, rows, D=dim, BR=BR, BD=BD, PROD_IN_X_DTYPE=prod_in_x_dtype,
            num_warps=4)
    return y.reshape(x.shape)


@triton.jit
def rms_norm_fwd_kernel(
    x,  # [R, D]
    residual,  # [R, D] (HAS_RESIDUAL)
    weight,  # [D]: applied as 1 + w
    y,  # out [R, D]
    summed,  # out [R, D]: x + residual (HAS_RESIDUAL)
    eps,
    R,
    D: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    o_rd = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + o_rd, mask=m, other=0.)
    if HAS_RESIDUAL:  # the residual add rounds to x's dtype, as `x + h` does, before the norm reads it
        b_x = (b_x.to(tl.float32) + tl.load(residual + o_rd, mask=m, other=0.).to(tl.float32)).to(x.dtype.element_ty)
        tl.store(summed + o_rd, b_x, mask=m)
    b_xf = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_xf * b_xf, axis=1) / D + eps)
    b_w = 1. + tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)
    tl.store(y + o_rd, (b_xf * b_rstd[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=m)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm (`hybridlm.ops.norm.rms_norm`) over the last axis in one launch. With `residual`,
    normalises s = x + residual and returns (rms_norm(s), s): the decoder's residual add fused into its norm."""
    dim = x.shape[-1]
    if weight.shape != (dim,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"expected x [..., D], weight [D] and residual like x, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if residual is None else tuple(residual.shape)}")
    x2 = x.reshape(-1, dim).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    summed = torch.empty_like(x2) if residual is not None else y
    residual2 = residual.reshape(-1, dim).contiguous() if residual is not None else x2
    BD = next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    if rows:
        launch(rms_norm_fwd_kernel, (cdiv(rows, BR),),
            x2, residual2, weight.contiguous(), y, summed, eps, rows, D=dim, BR=BR, BD=BD,
            HAS_RESIDUAL=residual is not None, num_warps=4 if BD <= 1024 else 8)
    if residual is None:
        return y.reshape(x.shape)
    return y.reshape(x.shape), summed.reshape(x.shape)


@triton.jit
def silu_mul_fwd_kernel(gate, up, y, C, stride_g, stride_u, BLOCK: tl.constexpr):
    """silu(gate) * up for one row's BLOCK columns, rounded as PyTorch does: silu's result to the dtype, then the
    product. gate and up may be column slices of one GEMM's output (row strides stride_g, stride_u)."""
    i_r = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < C
    b_g = tl.load(gate + i_r * stride_g + o, mask=m, other=0.).to(tl.float32)
    b_s = (b_g * tl.sigmoid(b_g)).to(y.dtype.element_ty).to(tl.float32)
    b_u = tl.load(up + i_r * stride_u + o, mask=m, other=0.).to(tl.float32)
    tl.store(y + i_r * C + o, (b_s * b_u).to(y.dtype.element_ty), mask=m)


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU product silu(gate) * up [..., C] in one launch (two as PyTorch ops); gate and up may be strided
    slices (the halves of one fused gate/up GEMM) as long as their last axis is contiguous."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    shape, columns = gate.shape, gate.shape[-1] if gate.ndim else 1
    gate, up = (x.reshape(-1, columns) for x in (gate, up))  # views when the leading axes merge
    gate, up = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate, up))
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, block = gate.shape[0], min(1024, next_power_of_2(max(columns, 1)))
    if rows and columns:
        launch(silu_mul_fwd_kernel, (rows, cdiv(columns, block)), gate, up, y, columns, gate.stride(0),
               up.stride(0), BLOCK=block, num_warps=4)
    return y.view(shape)


@triton.jit
def sigmoid_gate_fwd_kernel(o, gate, y, R, T, H, so_b, so_t, so_h, sg_b, sg_t, sg_h,
                            D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """y = o * sigmoid(gate) for BR rows (b, t, h) of D channels, rounded as PyTorch does (sigmoid to the dtype, then
    the product); o and gate may have any strides over b, t and h."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    i_b, i_t, i_h = o_r // (T * H), (o_r // H) % T, o_r % H
    b_o = tl.load(o + (i_b * so_b + i_t * so_t + i_h * so_h)[:, None] + o_d[None, :], mask=m, other=0.)
    b_g = tl.load(gate + (i_b * sg_b + i_t * sg_t + i_h * sg_h)[:, None] + o_d[None, :], mask=m, other=0.)
    b_s = tl.sigmoid(b_g.to(tl.float32)).to(y.dtype.element_ty).to(tl.float32)
    tl.store(y + o_r[:, None] * D + o_d[None, :], (b_o.to(tl.float32) * b_s).to(y.dtype.element_ty), mask=m)


def sigmoid_gate_fwd(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The attention's output gate: o [B, T, H, D] * sigmoid(gate [B, T, H, D]) -> [B, T, H * D] contiguous, in one
    launch (a copy of the strided gate, sigmoid and the product as PyTorch ops). Any strides with a unit last one."""
    if o.shape != gate.shape or o.ndim != 4 or o.dtype != gate.dtype:
        raise ValueError(f"o and gate must be [B, T, H, D] of one dtype, got {tuple(o.shape)} {o.dtype} and "
                         f"{tuple(gate.shape)} {gate.dtype}")
    o, gate = (x if x.stride(-1) == 1 else x.contiguous() for x in (o, gate))
    batch, length, heads, dim = o.shape
    y = torch.empty(batch, length, heads * dim, dtype=o.dtype, device=o.device)
    rows = batch * length * heads
    BD = next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    if rows:
        launch(sigmoid_gate_fwd_kernel, (cdiv(rows, BR),),
            o, gate, y, rows, length, heads, o.stride(0), o.stride(1), o.stride(2), gate.stride(0), gate.stride(1),
            gate.stride(2), D=dim, BR=BR, BD=BD, num_warps=4)
    return y
