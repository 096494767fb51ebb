"""Causal depthwise conv1d over time for prefill; the reference twin is `hybridlm.ops.conv.causal_conv1d`.

One program per (channel block, token block, sequence): y_t = act(sum_j w[:, j] x_{t-W+1+j}), where positions
before the sequence start read the carried state [N, C, W-1] (or zeros). The program holding a sequence's last
token block also writes that sequence's final state: the last W-1 pre-conv inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, check_cu_seqlens, next_power_of_2, prepare_chunks

BLOCK_T = 32
BLOCK_C = 128
NUM_WARPS = 4  # the tile and warps: `benchmarks/sweep_kernels.py --kernels conv` times the alternatives


@triton.jit
def causal_conv1d_fwd_kernel(
    x,  # [B, T, C], token stride stride_x
    weight,  # [C, W]
    initial_state,  # [N, C, W-1]
    y,  # out [B, T, C]
    final_state,  # out [N, C, W-1]
    cu_seqlens,
    chunk_indices,
    T,
    stride_x,
    C: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BW: tl.constexpr,
    SILU: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    W_DTYPE = weight.dtype.element_ty
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        i_n = i_b
        bos = i_b.to(tl.int64) * T
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_x = x + bos * stride_x

    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        o_src = o_t - (W - 1) + j  # source position inside the sequence; negative = carried state
        m_x = (o_src >= 0) & (o_src < T)
        b_x = tl.load(p_x + o_src[:, None].to(tl.int64) * stride_x + o_c[None, :], mask=m_x[:, None] & m_c[None, :],
                      other=0.)
        if USE_INITIAL_STATE:
            m_s = (o_src < 0) & (o_src >= -(W - 1))
            p_s = initial_state + i_n.to(tl.int64) * C * (W - 1) + o_c[None, :] * (W - 1) + (o_src + W - 1)[:, None]
            b_s = tl.load(p_s, mask=m_s[:, None] & m_c[None, :], other=0.)
            b_x = tl.where(m_x[:, None], b_x, b_s.to(b_x.dtype))
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0.).to(tl.float32)
        b_y += b_x.to(W_DTYPE).to(tl.float32) * b_w[None, :]
    # causal_conv1d computes in the weight's dtype and returns x's dtype
    b_y = b_y.to(W_DTYPE).to(tl.float32)
    if SILU:
        b_y = (b_y * tl.sigmoid(b_y)).to(W_DTYPE).to(tl.float32)
    m_t = o_t < T
    tl.store(y + (bos + o_t[:, None]) * C + o_c[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])

    if STORE_FINAL_STATE:
        if i_t == tl.cdiv(T, BT) - 1:
            o_w = tl.arange(0, BW)
            o_last = T - (W - 1) + o_w  # the last W-1 positions of [state | x]
            m_w = o_w < W - 1
            m_lx = (o_last >= 0) & m_w
            b_f = tl.load(p_x + o_last[:, None].to(tl.int64) * stride_x + o_c[None, :], mask=m_lx[:, None] & m_c[None, :],
                          other=0.)
            if USE_INITIAL_STATE:
                m_ls = (o_last < 0) & m_w
                p_ls = initial_state + i_n.to(tl.int64) * C * (W - 1) + o_c[None, :] * (W - 1) + (o_last + W - 1)[:, None]
                b_ls = tl.load(p_ls, mask=m_ls[:, None] & m_c[None, :], other=0.)
                b_f = tl.where(m_lx[:, None], b_f, b_ls.to(b_f.dtype))
            p_f = final_state + i_n.to(tl.int64) * C * (W - 1) + o_c[None, :] * (W - 1) + o_w[:, None]
            tl.store(p_f, b_f.to(final_state.dtype.element_ty), mask=m_w[:, None] & m_c[None, :])


def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `hybridlm.ops.conv.causal_conv1d`: y [B, T, C] in x's dtype and the final state
    [N, C, W-1] (x's dtype) or None. x may have any token stride (last axis contiguous); the final state is a new
    tensor, never written over `initial_state`."""
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [B, T, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    batch, length, channels = x.shape
    width = weight.shape[1]
    check_cu_seqlens(cu_seqlens, batch, length)
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and tuple(initial_state.shape) != (num_states, channels, width - 1):
        raise ValueError(f"conv state must be {(num_states, channels, width - 1)}, got {tuple(initial_state.shape)}")
    if x.stride(-1) != 1 or (batch > 1 and x.stride(0) != length * x.stride(1)):
        x = x.contiguous()
    weight = weight.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()

    if cu_seqlens is not None:
        cu_seqlens, chunk_indices, _, grid_t = prepare_chunks(cu_seqlens, BLOCK_T, x.device)  # memoised on cu_seqlens
    else:
        chunk_indices, grid_t = None, cdiv(length, BLOCK_T)
    y = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device)  # [B, T, C]
    final_state = (torch.empty(num_states, channels, width - 1, dtype=x.dtype, device=x.device)
                   if output_final_state else None)
    if length == 0 or grid_t == 0:
        if final_state is not None:
            final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return y, final_state
    launch(causal_conv1d_fwd_kernel, (cdiv(channels, BLOCK_C), grid_t, 1 if cu_seqlens is not None else batch),
        x, weight, initial_state, y, final_state, cu_seqlens, chunk_indices, length, x.stride(1),
        C=channels, W=width, BT=BLOCK_T, BC=BLOCK_C, BW=next_power_of_2(max(width - 1, 1)),
        SILU=activation == "silu", USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None, num_warps=NUM_WARPS,
    )
    return y, final_state
