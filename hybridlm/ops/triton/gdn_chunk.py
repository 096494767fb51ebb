"""Chunked gated delta rule forward in Triton; the reference twin is `hybridlm.ops.delta_rule.chunk_gated_delta_rule`.

Three launches, after fla's chunk_gated_delta_rule decomposition, with the gate math, q/k L2 norm and scale
moved inside the kernels so nothing but q, k, v, a, b is read from the caller:

1. The prepare step (parallel over chunks and value heads): gates g, beta from the raw a, b; cumulative log
   decay G inside the chunk; the strictly lower A = beta k k^T * exp(G_i - G_j) in 16-row blocks; (I + A)^-1 by
   forward substitution on the four diagonal blocks and block substitution for the rest (the WY form);
   w = (I + A)^-1 (beta k exp(G)) and u = (I + A)^-1 (beta v); the normalised keys for 2. By default
   (`KKT_PREPARE`) two launches from `gdn_prepare_kkt`: the Gram matrix and the inverse, then w and u; else
   `chunk_gdn_fwd_prepare_kernel`, all of it in one launch.
2. `chunk_gdn_fwd_h_kernel` (sequential over the chunks of a sequence, parallel over heads and V blocks):
   stores the state entering each chunk h, the corrected values v_new = u - w h, and the final state. With
   `FUSE_WU_INTO_H` it makes w and u itself from the stored X (no w/u kernel).
3. `chunk_gdn_fwd_o_looped_kernel` (parallel over chunks and value heads): o = (q exp(G)) h
   + tril(q k^T exp(G_i - G_j)) v_new, the 64x64 q k^T made once per chunk and the V blocks walked in a loop;
   with `LOOPED_O` off, `chunk_gdn_fwd_o_kernel` (also parallel over V blocks, each redoing q k^T) instead.

Value head i_h reads key head i_h // (HV // H); q and k are never repeated in memory. The recurrent state and
every accumulation are fp32; h and v_new are stored in the input dtype (as fla does) for the tensor-core dots.
Room to fuse later: 1 into 2 (w, u never leave the SM), 3 into 2 (FlashQLA's fused forward), and splitting
long sequences over SMs (intra-card context parallel) for B = 1.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.utils import check_cu_seqlens, dot_precision, prepare_chunks, rows_packed

CHUNK_SIZE = 64
SUB_CHUNK = 16  # the triangular solve works on 16x16 blocks of the 64x64 chunk matrix


@triton.jit
def _load_rows(p, i_s, T, stride, D, BR: tl.constexpr, BD: tl.constexpr):
    """Rows i_s .. i_s + BR of a [T, D] view with row stride `stride` (zeros past T or D), in storage dtype."""
    o_r = i_s + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < T) & (o_d[None, :] < D)
    return tl.load(p + o_r[:, None].to(tl.int64) * stride + o_d[None, :], mask=m, other=0.)


@triton.jit
def _store_rows(p, b_x, i_s, T, stride, D, BR: tl.constexpr, BD: tl.constexpr):
    o_r = i_s + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < T) & (o_d[None, :] < D)
    tl.store(p + o_r[:, None].to(tl.int64) * stride + o_d[None, :], b_x.to(p.dtype.element_ty), mask=m)


@triton.jit
def _l2norm_rows(b_x):
    """x * rsqrt(sum(x^2) + 1e-6) per row, in fp32 (the form of `hybridlm.ops.delta_rule.l2norm`)."""
    b_x = b_x.to(tl.float32)
    return b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)[:, None]


@triton.jit
def _gates(a, b, b_A, b_dt_bias, i_s, T, HV: tl.constexpr, BR: tl.constexpr):
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) for rows i_s .. i_s + BR (0 past T), fp32.

    `a`, `b` point at this sequence's first token and this value head; b_A = exp(A_log)."""
    o_r = i_s + tl.arange(0, BR)
    m_r = o_r < T
    b_x = tl.load(a + o_r * HV, mask=m_r, other=0.).to(tl.float32) + b_dt_bias
    # torch's softplus: x above 20 passes through; below, the overflow-free log(1 + exp(x))
    b_softplus = tl.where(b_x > 20., b_x, tl.maximum(b_x, 0.) + tl.log(1. + tl.exp(-tl.abs(b_x))))
    b_g = tl.where(m_r, -b_A * b_softplus, 0.)
    b_beta = tl.where(m_r, tl.sigmoid(tl.load(b + o_r * HV, mask=m_r, other=0.).to(tl.float32)), 0.)
    return b_g, b_beta


@triton.jit
def _unit_lower_inverse(b_L, BC: tl.constexpr):
    """(I + L)^-1 for a strictly lower BC x BC block, by forward substitution one row at a time (fp32)."""
    o_i = tl.arange(0, BC)
    b_X = tl.where(o_i[:, None] == o_i[None, :], 1., 0.)
    for i in range(1, BC):
        b_row = tl.sum(tl.where(o_i[:, None] == i, b_L, 0.), axis=0)  # L[i, :]
        # X[i, :] = e_i - sum_{j < i} L[i, j] X[j, :]; rows j < i are final already
        b_new = tl.where(o_i == i, 1., 0.) - tl.sum(b_row[:, None] * b_X, axis=0)
        b_X = tl.where(o_i[:, None] == i, b_new[None, :], b_X)
    return b_X


@triton.jit
def _unit_lower_inverses(b_L0, b_L1, b_L2, b_L3, BC: tl.constexpr):
    """`_unit_lower_inverse` of four blocks in one loop, so that their chains of dependent reductions can overlap
    (more live registers: 255 with spills in the KKT kernel at 1 warp, against 212 one block at a time)."""
    o_i = tl.arange(0, BC)
    b_X0 = tl.where(o_i[:, None] == o_i[None, :], 1., 0.)
    b_X1, b_X2, b_X3 = b_X0, b_X0, b_X0
    for i in range(1, BC):
        # X[i, :] = e_i - sum_{j < i} L[i, j] X[j, :]; rows j < i are final already
        m_i = o_i[:, None] == i
        b_e = tl.where(o_i == i, 1., 0.)
        b_r0 = tl.sum(tl.where(m_i, b_L0, 0.), axis=0)  # L0[i, :]
        b_r1 = tl.sum(tl.where(m_i, b_L1, 0.), axis=0)
        b_r2 = tl.sum(tl.where(m_i, b_L2, 0.), axis=0)
        b_r3 = tl.sum(tl.where(m_i, b_L3, 0.), axis=0)
        b_X0 = tl.where(m_i, (b_e - tl.sum(b_r0[:, None] * b_X0, axis=0))[None, :], b_X0)
        b_X1 = tl.where(m_i, (b_e - tl.sum(b_r1[:, None] * b_X1, axis=0))[None, :], b_X1)
        b_X2 = tl.where(m_i, (b_e - tl.sum(b_r2[:, None] * b_X2, axis=0))[None, :], b_X2)
        b_X3 = tl.where(m_i, (b_e - tl.sum(b_r3[:, None] * b_X3, axis=0))[None, :], b_X3)
    return b_X0, b_X1, b_X2, b_X3


@triton.jit
def _chunk_inverse(b_A00, b_A11, b_A22, b_A33, b_A10, b_A20, b_A21, b_A30, b_A31, b_A32, BC: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERLEAVE: tl.constexpr):
    """X = (I + A)^-1 of a chunk's strictly lower A given as its ten 16-row blocks (fp32): the diagonal blocks by
    forward substitution (`_unit_lower_inverse`, or `_unit_lower_inverses` with INTERLEAVE), the rest by block
    substitution X_ij = -X_ii sum_{j <= m < i} A_im X_mj. Returns X00, X11, X22, X33, X10, X20, X21, X30, X31, X32."""
    if INTERLEAVE:
        b_X00, b_X11, b_X22, b_X33 = _unit_lower_inverses(b_A00, b_A11, b_A22, b_A33, BC)
    else:
        b_X00 = _unit_lower_inverse(b_A00, BC)
        b_X11 = _unit_lower_inverse(b_A11, BC)
        b_X22 = _unit_lower_inverse(b_A22, BC)
        b_X33 = _unit_lower_inverse(b_A33, BC)
    P: tl.constexpr = DOT_PRECISION
    b_X10 = -_mm(b_X11, _mm(b_A10, b_X00, P), P)
    b_X21 = -_mm(b_X22, _mm(b_A21, b_X11, P), P)
    b_X32 = -_mm(b_X33, _mm(b_A32, b_X22, P), P)
    b_X20 = -_mm(b_X22, _mm(b_A20, b_X00, P) + _mm(b_A21, b_X10, P), P)
    b_X31 = -_mm(b_X33, _mm(b_A31, b_X11, P) + _mm(b_A32, b_X21, P), P)
    b_X30 = -_mm(b_X33, _mm(b_A30, b_X00, P) + _mm(b_A31, b_X10, P) + _mm(b_A32, b_X20, P), P)
    return b_X00, b_X11, b_X22, b_X33, b_X10, b_X20, b_X21, b_X30, b_X31, b_X32


@triton.jit
def _kkt_block(b_kb_i, b_k_j, b_gc_i, b_gc_j, DIAGONAL: tl.constexpr, BC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Block (i, j) of A = beta_i k_i . k_j exp(G_i - G_j), strictly lower when on the diagonal."""
    b_A = tl.dot(b_kb_i, tl.trans(b_k_j), input_precision=DOT_PRECISION)
    if DIAGONAL:
        o_i = tl.arange(0, BC)
        # the exponent is masked too: above the diagonal G_i - G_j > 0 could overflow
        m_A = o_i[:, None] > o_i[None, :]
        b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_gc_i[:, None] - b_gc_j[None, :], 0.)), 0.)
    else:
        b_A = b_A * tl.exp(b_gc_i[:, None] - b_gc_j[None, :])
    return b_A


@triton.jit
def _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Program's chunk -> (its global chunk index, its chunk within the sequence, the sequence's first token,
    the sequence's length): packed sequences through `chunk_indices` [NT, 2] and `cu_seqlens`, else row i_b of
    equal-length rows. (The default prepare and h kernels and the old o kernel still spell this out; they move to it
    once a GPU run has checked the change.)"""
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
        bos = i_b.to(tl.int64) * T
    return i_tg, i_t, bos, T


@triton.jit
def _mm(b_x, b_y, DOT_PRECISION: tl.constexpr):
    """Product of two small fp32 blocks of the triangular solve: "ieee" (FMA units, whole operand rows per thread)
    for fp32 inputs; "tf32" tensor cores for bf16/fp16 inputs, as fla's solve_tril does: its ~1e-3 relative
    rounding sits below the bf16 rounding of the stored w, u and X, and the operands stay spread over the warp's
    lanes instead of filling every thread's registers."""
    return tl.dot(b_x, b_y, input_precision=DOT_PRECISION)


@triton.jit
def chunk_gdn_fwd_prepare_kernel(
    k,  # [B, T, H, K], token stride stride_k
    v,  # [B, T, HV, V], token stride stride_v
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g_cumsum,  # out [B, T, HV] fp32, cumulative log decay inside each chunk
    w,  # out [B, T, HV, K]
    u,  # out [B, T, HV, V]
    x_inv,  # out [B, T, HV, BT] if STORE_X: (I + A)^-1 of each chunk, row-major, lower triangle only
    kn,  # out [B, T, H, K] if STORE_KN: the L2-normalised keys (written by each key head's first value head)
    cu_seqlens,
    chunk_indices,
    T,
    stride_k,
    stride_v,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_X: tl.constexpr,
    STORE_KN: tl.constexpr,
):
    tl.static_assert(BT == 4 * BC, "the block solve is written for four sub-chunks")
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    dtype = k.dtype.element_ty

    p_k = k + bos * stride_k + i_hk * K
    p_v = v + bos * stride_v + i_h * V
    p_a = a + bos * HV + i_h
    p_b = b + bos * HV + i_h
    b_A = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_dt_bias = tl.load(dt_bias + i_h).to(tl.float32)

    # the chunk as four sub-chunks of BC rows: gates, cumulative decay, normalised keys, values
    i_s0 = i_t * BT
    b_g0, b_beta0 = _gates(p_a, p_b, b_A, b_dt_bias, i_s0, T, HV, BC)
    b_g1, b_beta1 = _gates(p_a, p_b, b_A, b_dt_bias, i_s0 + BC, T, HV, BC)
    b_g2, b_beta2 = _gates(p_a, p_b, b_A, b_dt_bias, i_s0 + 2 * BC, T, HV, BC)
    b_g3, b_beta3 = _gates(p_a, p_b, b_A, b_dt_bias, i_s0 + 3 * BC, T, HV, BC)
    b_gc0 = tl.cumsum(b_g0, axis=0)
    b_gc1 = tl.cumsum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    b_gc2 = tl.cumsum(b_g2, axis=0) + tl.sum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    b_gc3 = tl.cumsum(b_g3, axis=0) + tl.sum(b_g2, axis=0) + tl.sum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    p_gc = g_cumsum + bos * HV + i_h
    o_c = tl.arange(0, BC)
    tl.store(p_gc + (i_s0 + o_c) * HV, b_gc0, mask=i_s0 + o_c < T)
    tl.store(p_gc + (i_s0 + BC + o_c) * HV, b_gc1, mask=i_s0 + BC + o_c < T)
    tl.store(p_gc + (i_s0 + 2 * BC + o_c) * HV, b_gc2, mask=i_s0 + 2 * BC + o_c < T)
    tl.store(p_gc + (i_s0 + 3 * BC + o_c) * HV, b_gc3, mask=i_s0 + 3 * BC + o_c < T)

    b_k0 = _l2norm_rows(_load_rows(p_k, i_s0, T, stride_k, K, BC, BK))
    b_k1 = _l2norm_rows(_load_rows(p_k, i_s0 + BC, T, stride_k, K, BC, BK))
    b_k2 = _l2norm_rows(_load_rows(p_k, i_s0 + 2 * BC, T, stride_k, K, BC, BK))
    b_k3 = _l2norm_rows(_load_rows(p_k, i_s0 + 3 * BC, T, stride_k, K, BC, BK))
    b_kb0 = (b_k0 * b_beta0[:, None]).to(dtype)
    b_kb1 = (b_k1 * b_beta1[:, None]).to(dtype)
    b_kb2 = (b_k2 * b_beta2[:, None]).to(dtype)
    b_kb3 = (b_k3 * b_beta3[:, None]).to(dtype)
    b_k0, b_k1, b_k2, b_k3 = b_k0.to(dtype), b_k1.to(dtype), b_k2.to(dtype), b_k3.to(dtype)
    if STORE_KN:  # for the sequential state pass, which then keeps the norm off its critical path
        if i_h % (HV // H) == 0:
            p_kn = kn + bos * H * K + i_hk * K
            _store_rows(p_kn, b_k0, i_s0, T, H * K, K, BC, BK)
            _store_rows(p_kn, b_k1, i_s0 + BC, T, H * K, K, BC, BK)
            _store_rows(p_kn, b_k2, i_s0 + 2 * BC, T, H * K, K, BC, BK)
            _store_rows(p_kn, b_k3, i_s0 + 3 * BC, T, H * K, K, BC, BK)

    # A = strictly-lower(beta k k^T * D), block (i, j) for i >= j
    b_A00 = _kkt_block(b_kb0, b_k0, b_gc0, b_gc0, True, BC, DOT_PRECISION)
    b_A11 = _kkt_block(b_kb1, b_k1, b_gc1, b_gc1, True, BC, DOT_PRECISION)
    b_A22 = _kkt_block(b_kb2, b_k2, b_gc2, b_gc2, True, BC, DOT_PRECISION)
    b_A33 = _kkt_block(b_kb3, b_k3, b_gc3, b_gc3, True, BC, DOT_PRECISION)
    b_A10 = _kkt_block(b_kb1, b_k0, b_gc1, b_gc0, False, BC, DOT_PRECISION)
    b_A20 = _kkt_block(b_kb2, b_k0, b_gc2, b_gc0, False, BC, DOT_PRECISION)
    b_A21 = _kkt_block(b_kb2, b_k1, b_gc2, b_gc1, False, BC, DOT_PRECISION)
    b_A30 = _kkt_block(b_kb3, b_k0, b_gc3, b_gc0, False, BC, DOT_PRECISION)
    b_A31 = _kkt_block(b_kb3, b_k1, b_gc3, b_gc1, False, BC, DOT_PRECISION)
    b_A32 = _kkt_block(b_kb3, b_k2, b_gc3, b_gc2, False, BC, DOT_PRECISION)

    # X = (I + A)^-1 (the WY form's inverse)
    b_X00, b_X11, b_X22, b_X33, b_X10, b_X20, b_X21, b_X30, b_X31, b_X32 = _chunk_inverse(
        b_A00, b_A11, b_A22, b_A33, b_A10, b_A20, b_A21, b_A30, b_A31, b_A32, BC, DOT_PRECISION, False)
    b_X00, b_X11, b_X22, b_X33 = b_X00.to(dtype), b_X11.to(dtype), b_X22.to(dtype), b_X33.to(dtype)
    b_X10, b_X21, b_X32 = b_X10.to(dtype), b_X21.to(dtype), b_X32.to(dtype)
    b_X20, b_X31, b_X30 = b_X20.to(dtype), b_X31.to(dtype), b_X30.to(dtype)
    if STORE_X:  # kept for the backward's WY gradient (gdn_chunk_bwd.py)
        p_x = x_inv + bos * HV * BT + i_h * BT
        _store_rows(p_x, b_X00, i_s0, T, HV * BT, BC, BC, BC)
        _store_rows(p_x, b_X10, i_s0 + BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + BC, b_X11, i_s0 + BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x, b_X20, i_s0 + 2 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + BC, b_X21, i_s0 + 2 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + 2 * BC, b_X22, i_s0 + 2 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x, b_X30, i_s0 + 3 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + BC, b_X31, i_s0 + 3 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + 2 * BC, b_X32, i_s0 + 3 * BC, T, HV * BT, BC, BC, BC)
        _store_rows(p_x + 3 * BC, b_X33, i_s0 + 3 * BC, T, HV * BT, BC, BC, BC)

    # w = X (beta k exp(G)), written one sub-chunk of rows at a time
    b_kg0 = (b_k0.to(tl.float32) * (b_beta0 * tl.exp(b_gc0))[:, None]).to(dtype)
    b_kg1 = (b_k1.to(tl.float32) * (b_beta1 * tl.exp(b_gc1))[:, None]).to(dtype)
    b_kg2 = (b_k2.to(tl.float32) * (b_beta2 * tl.exp(b_gc2))[:, None]).to(dtype)
    b_kg3 = (b_k3.to(tl.float32) * (b_beta3 * tl.exp(b_gc3))[:, None]).to(dtype)
    p_w = w + bos * HV * K + i_h * K
    b_w = tl.dot(b_X00, b_kg0, input_precision=DOT_PRECISION)
    _store_rows(p_w, b_w, i_s0, T, HV * K, K, BC, BK)
    b_w = tl.dot(b_X10, b_kg0, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X11, b_kg1, input_precision=DOT_PRECISION)
    _store_rows(p_w, b_w, i_s0 + BC, T, HV * K, K, BC, BK)
    b_w = tl.dot(b_X20, b_kg0, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X21, b_kg1, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X22, b_kg2, input_precision=DOT_PRECISION)
    _store_rows(p_w, b_w, i_s0 + 2 * BC, T, HV * K, K, BC, BK)
    b_w = tl.dot(b_X30, b_kg0, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X31, b_kg1, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X32, b_kg2, input_precision=DOT_PRECISION)
    b_w += tl.dot(b_X33, b_kg3, input_precision=DOT_PRECISION)
    _store_rows(p_w, b_w, i_s0 + 3 * BC, T, HV * K, K, BC, BK)

    # u = X (beta v)
    b_vb0 = (_load_rows(p_v, i_s0, T, stride_v, V, BC, BV).to(tl.float32) * b_beta0[:, None]).to(dtype)
    b_vb1 = (_load_rows(p_v, i_s0 + BC, T, stride_v, V, BC, BV).to(tl.float32) * b_beta1[:, None]).to(dtype)
    b_vb2 = (_load_rows(p_v, i_s0 + 2 * BC, T, stride_v, V, BC, BV).to(tl.float32) * b_beta2[:, None]).to(dtype)
    b_vb3 = (_load_rows(p_v, i_s0 + 3 * BC, T, stride_v, V, BC, BV).to(tl.float32) * b_beta3[:, None]).to(dtype)
    p_u = u + bos * HV * V + i_h * V
    b_u = tl.dot(b_X00, b_vb0, input_precision=DOT_PRECISION)
    _store_rows(p_u, b_u, i_s0, T, HV * V, V, BC, BV)
    b_u = tl.dot(b_X10, b_vb0, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X11, b_vb1, input_precision=DOT_PRECISION)
    _store_rows(p_u, b_u, i_s0 + BC, T, HV * V, V, BC, BV)
    b_u = tl.dot(b_X20, b_vb0, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X21, b_vb1, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X22, b_vb2, input_precision=DOT_PRECISION)
    _store_rows(p_u, b_u, i_s0 + 2 * BC, T, HV * V, V, BC, BV)
    b_u = tl.dot(b_X30, b_vb0, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X31, b_vb1, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X32, b_vb2, input_precision=DOT_PRECISION)
    b_u += tl.dot(b_X33, b_vb3, input_precision=DOT_PRECISION)
    _store_rows(p_u, b_u, i_s0 + 3 * BC, T, HV * V, V, BC, BV)


@triton.jit
def chunk_gdn_fwd_h_kernel(
    k,  # [B, T, H, K], token stride stride_k
    w,  # [B, T, HV, K]
    u,  # [B, T, HV, V]
    g_cumsum,  # [B, T, HV] fp32
    h,  # out [NT, HV, K, V]: the state entering each chunk (all chunks of all sequences)
    v_new,  # out [B, T, HV, V]: u - w h, the values corrected by what the state already predicts
    initial_state,  # [N, HV, K, V]
    final_state,  # out [N, HV, K, V] fp32
    cu_seqlens,
    chunk_offsets,
    T,
    stride_k,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NORM_K: tl.constexpr = True,  # False: k arrives L2-normalised already (`benchmarks/sweep_kernels.py` times both)
    FUSE_WU: tl.constexpr = False,  # w, u made here from X (x_inv), v and b instead of read (w, u unused)
    x_inv=None,  # [B, T, HV, BT] if FUSE_WU: (I + A)^-1 of each chunk, lower block triangle
    v=None,  # [B, T, HV, V] if FUSE_WU, token stride stride_v
    b=None,  # [B, T, HV] raw if FUSE_WU
    kn=None,  # out [B, T, H, K] if FUSE_WU: the normalised keys (V block 0 of each key head's first value head)
    stride_v=0,
):
    tl.static_assert(NORM_K or not FUSE_WU, "FUSE_WU normalises the raw keys (and stores them for the output pass)")
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
        NT = tl.cdiv(T, BT)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        NT = tl.cdiv(T, BT)
        boh = i_n.to(tl.int64) * NT
    dtype = h.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(initial_state + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)

    p_k = k + bos * stride_k + i_hk * K
    if not FUSE_WU:
        p_w = w + bos * HV * K + i_h * K
        p_u = u + bos * HV * V + i_h * V + i_v * BV
    p_vn = v_new + bos * HV * V + i_h * V + i_v * BV
    p_gc = g_cumsum + bos * HV + i_h
    STORE_KN_HERE = FUSE_WU and (i_v == 0) and (i_h % (HV // H) == 0)
    for i_t in range(0, NT):
        tl.store(h + ((boh + i_t) * HV + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        i_s = i_t * BT
        o_t = i_s + tl.arange(0, BT)
        m_t = o_t < T
        b_g_last = tl.load(p_gc + (tl.minimum(i_s + BT, T) - 1) * HV)
        b_gc = tl.load(p_gc + o_t * HV, mask=m_t, other=0.)
        b_k = _load_rows(p_k, i_s, T, stride_k, K, BT, BK)
        if NORM_K:
            b_k = _l2norm_rows(b_k).to(dtype)
        if FUSE_WU:  # the w/u kernel's products, with its roundings (w, u in dtype)
            if STORE_KN_HERE:
                _store_rows(kn + bos * H * K + i_hk * K, b_k, i_s, T, H * K, K, BT, BK)
            o_c = tl.arange(0, BT)
            b_X = tl.load(x_inv + (bos + o_t[:, None]).to(tl.int64) * (HV * BT) + i_h * BT + o_c[None, :],
                          mask=m_t[:, None] & (o_c[:, None] >= o_c[None, :]), other=0.)
            b_beta = tl.where(m_t, tl.sigmoid(tl.load(b + (bos + o_t) * HV + i_h, mask=m_t, other=0.).to(tl.float32)),
                              0.)
            b_kbg = (b_k.to(tl.float32) * (b_beta * tl.exp(b_gc))[:, None]).to(dtype)
            b_w = tl.dot(b_X, b_kbg, input_precision=DOT_PRECISION).to(dtype)
            b_vb = _load_rows(v + bos * stride_v + i_h * V + i_v * BV, i_s, T, stride_v, V - i_v * BV, BT, BV)
            b_vb = (b_vb.to(tl.float32) * b_beta[:, None]).to(dtype)
            b_v = tl.dot(b_X, b_vb, input_precision=DOT_PRECISION).to(dtype).to(tl.float32)
        else:
            b_w = _load_rows(p_w, i_s, T, HV * K, K, BT, BK)  # [BT, BK]
            b_v = _load_rows(p_u, i_s, T, HV * V, V - i_v * BV, BT, BV).to(tl.float32)
        b_v -= tl.dot(b_w, b_h.to(dtype), input_precision=DOT_PRECISION)
        _store_rows(p_vn, b_v, i_s, T, HV * V, V - i_v * BV, BT, BV)

        # S <- exp(G_last) S + (k exp(G_last - G))^T v_new
        b_v = tl.where(m_t[:, None], b_v * tl.exp(b_g_last - b_gc)[:, None], 0.).to(dtype)
        b_h = b_h * tl.exp(b_g_last) + tl.dot(tl.trans(b_k), b_v, input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(final_state + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def chunk_gdn_fwd_o_kernel(
    q,  # [B, T, H, K], token stride stride_q
    k,  # [B, T, H, K], token stride stride_k
    v_new,  # [B, T, HV, V]
    h,  # [NT, HV, K, V]
    g_cumsum,  # [B, T, HV] fp32
    o,  # out [B, T, HV, V]
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    stride_q,
    stride_k,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
        bos = i_b.to(tl.int64) * T
    dtype = v_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    b_q = (_l2norm_rows(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK)) * scale).to(dtype)
    b_k = _l2norm_rows(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK)).to(dtype)
    b_gc = tl.load(g_cumsum + bos * HV + i_h + o_t * HV, mask=m_t, other=0.)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p_h = h + (i_tg * HV + i_h) * K * V
    b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
    # inter-chunk: the state entering the chunk, decayed to each row
    b_o = tl.dot(b_q, b_h, input_precision=DOT_PRECISION) * tl.exp(b_gc)[:, None]
    # intra-chunk: causal q k^T with decay (exponent masked: above the diagonal G_i - G_j > 0 could overflow)
    b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    o_i = tl.arange(0, BT)
    m_A = o_i[:, None] >= o_i[None, :]
    b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
    p_vn = v_new + bos * HV * V + i_h * V + i_v * BV
    b_vn = _load_rows(p_vn, i_s, T, HV * V, V - i_v * BV, BT, BV)
    b_o += tl.dot(b_A.to(dtype), b_vn, input_precision=DOT_PRECISION)
    _store_rows(o + bos * HV * V + i_h * V + i_v * BV, b_o, i_s, T, HV * V, V - i_v * BV, BT, BV)


@triton.jit
def chunk_gdn_fwd_o_looped_kernel(
    q,  # [B, T, H, K], token stride stride_q
    kn,  # [B, T, H, K]: the L2-normalised keys (the prepare kernel's)
    v_new,  # [B, T, HV, V]
    h,  # [NT, HV, K, V]
    g_cumsum,  # [B, T, HV] fp32
    o,  # out [B, T, HV, V]
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    stride_q,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`chunk_gdn_fwd_o_kernel` with one program per chunk and value head: q, k and the decayed causal q k^T are
    made once, then the V blocks are walked (h block and v_new block per step) instead of being separate programs
    that each redo them. k comes normalised (the prepare kernel stores it rounded to the input dtype, which is what
    `chunk_gdn_fwd_o_kernel` makes of the raw k), so the operands and each product are the same."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = v_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    b_q = (_l2norm_rows(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK)) * scale).to(dtype)
    b_k = _load_rows(kn + bos * H * K + i_hk * K, i_s, T, H * K, K, BT, BK)  # [BT, BK], already in dtype
    b_gc = tl.load(g_cumsum + bos * HV + i_h + o_t * HV, mask=m_t, other=0.)
    b_decay = tl.exp(b_gc)
    # intra-chunk: causal q k^T with decay (exponent masked: above the diagonal G_i - G_j > 0 could overflow)
    b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    o_i = tl.arange(0, BT)
    m_A = o_i[:, None] >= o_i[None, :]
    b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_gc[:, None] - b_gc[None, :], 0.)), 0.).to(dtype)

    o_k = tl.arange(0, BK)
    p_h = h + (i_tg * HV + i_h) * K * V
    p_vn = v_new + bos * HV * V + i_h * V
    p_o = o + bos * HV * V + i_h * V
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
        # inter-chunk: the state entering the chunk, decayed to each row
        b_o = tl.dot(b_q, b_h, input_precision=DOT_PRECISION) * b_decay[:, None]
        b_vn = _load_rows(p_vn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        b_o += tl.dot(b_A, b_vn, input_precision=DOT_PRECISION)
        _store_rows(p_o + i_v * BV, b_o, i_s, T, HV * V, V - i_v * BV, BT, BV)


def _check_inputs(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, T, Hk, dk] and v [B, T, Hv, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q, k, v must share one of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, length, key_heads, _ = q.shape
    value_heads = v.shape[2]
    if value_heads % key_heads:
        raise ValueError(f"value heads ({value_heads}) must be a multiple of key heads ({key_heads})")
    if a.shape != v.shape[:3] or b.shape != v.shape[:3]:
        raise ValueError(f"a and b must be [B, T, Hv] = {tuple(v.shape[:3])}, got {tuple(a.shape)}, {tuple(b.shape)}")
    if A_log.shape != (value_heads,) or dt_bias.shape != (value_heads,):
        raise ValueError(f"A_log and dt_bias must be [Hv] = [{value_heads}], got {tuple(A_log.shape)}, "
                         f"{tuple(dt_bias.shape)}")
    check_cu_seqlens(cu_seqlens, batch, length)
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    expected = (num_states, value_heads, q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be {expected}, got {tuple(initial_state.shape)}")


def chunk_gdn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule from raw gate inputs: o [B, T, Hv, dv] (dtype of v), final state fp32 or None.

    q, k [B, T, Hk, dk] un-normalised (L2 norm and the 1/sqrt(dk) scale happen in-kernel); v [B, T, Hv, dv];
    a, b [B, T, Hv] raw (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), in fp32); A_log, dt_bias [Hv];
    states [N, Hv, dk, dv]; `cu_seqlens` [N + 1] packs N sequences into B = 1 (one host read of it).
    q, k, v may be column slices of one [B, T, C] tensor (only the token stride is free).
    """
    _check_inputs(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens)
    out = _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return out["o"], out["final_state"]


# How the prepare step runs; `benchmarks/sweep_kernels.py --kernels prepare,kkt` times both ways and their settings.
# On an H200 at 64k tokens (seventh session, benchmarks/RESULTS.md), ms:
# - KKT_PREPARE (the default): `gdn_prepare_kkt`'s two kernels (fla's kkt_solve + recompute_w_u split): the Gram
#   matrix summed over key slices with the norms from its diagonal, and the inverse, at 1 warp and BK 64 (9B heads
#   0.695, 0.8B 0.353; 2 warps 1.09 / 0.55, 4 warps 2.02 / 1.01: its 16 x 16 dots repeat in every warp); then w and
#   u as 64 x 64 by 64 x BV products, BV 128 at 8 warps (0.747 / 0.409; BV 64 at 4 warps 0.948 / 0.630).
#   Registers (Triton 3.6, sm_90, 9B heads): 212 at 1 warp, no spills; the w/u kernel 145-156.
# - else `chunk_gdn_fwd_prepare_kernel`, everything in one launch at 255 registers: 9B heads 1.54 at 2 warps, 2.39
#   at 4, 4.88 at 8 (with the tf32 block merges of `_mm`).
# Tried and removed (benchmarks/NOTES.md): w, u moved to a kernel of their own after the fused inverse (3.79 at 9B
# heads) and an inverse built in phases in an fp32 scratch (2.10; wrong values or an illegal address at 0.8B heads).
KKT_PREPARE = True
KKT_BK = 64  # key columns per slice of the Gram sum
KKT_WARPS = 1
KKT_INTERLEAVE = False  # the four diagonal inverses in one loop (`_unit_lower_inverses`): 255 registers with
# small spills at 1 warp, more overlap; not yet timed (`sweep_kernels.py --kernels kkt` has it)
KKT_WARPS_FP32 = 4  # fp32's "ieee" dots hold whole operand rows per thread: 1 warp spills 1.7 KB
KKT_WU_BV = 128  # value columns per step of the w/u kernel
KKT_WU_WARPS = 8
FUSED_PREPARE_WARPS = 2
# FUSE_WU_INTO_H (with KKT_PREPARE): no w/u kernel; the state pass makes w = X (beta k exp(G)) and u = X (beta v)
# per chunk itself from the stored X, saving the w, u round trip through memory (~1 GB at 9B heads and 64k tokens)
# at the price of two products per step on the sequential path (w repeated by each V block). Not yet timed.
FUSE_WU_INTO_H = False

# How the output step runs; `benchmarks/sweep_kernels.py --kernels o` times both kernels and their settings.
# - LOOPED_O: `chunk_gdn_fwd_o_looped_kernel`, one program per chunk and value head that makes q, k (the prepare
#   kernel's normalised keys) and the 64x64 decayed q k^T once and walks the V blocks; else `chunk_gdn_fwd_o_kernel`,
#   one program per 32-wide V block, each redoing all of that (1.79 ms on the H100 at 9B heads and 64k tokens,
#   ~3-4x its memory floor). On an H200 at 9B heads and 64k tokens (`sweep_kernels.py --kernels o`, sixth
#   session): looped BV 64, 4 warps, 2 stages 0.882 ms (3 stages 0.954); the per-block kernel at its old default
#   (BV 32) 1.709 ms, at its best (BV 128) 1.052. One stage faulted (illegal address) at BV 32: not used. Registers
#   and spills: `benchmarks/compile_check.py -k o=`.
# Registers (sm_90, Triton 3.6, 9B and 0.8B heads): bf16 at BV 64 and 4 warps 154, no spills, 80 KB of shared
# memory (BV 32: 151-158; BV 64 at 8 warps: 161; the per-block kernel: 128). fp32 dots ("ieee") run on FMAs, which
# hold whole operand rows per thread, so every fp32 forward kernel spills (the per-block o kernel 29 KB): the looped
# one at 8 warps and BV 32 takes 128 registers with 1.3 KB of spills, at 4 warps and BV 64 31 KB.
LOOPED_O = True
LOOPED_O_BV = 64  # V columns per step of the looped kernel (bf16, fp16)
LOOPED_O_WARPS = 4
LOOPED_O_STAGES = 2
LOOPED_O_BV_FP32 = 32
LOOPED_O_WARPS_FP32 = 8


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100); 1 elsewhere (the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, *, scale, initial_state, output_final_state, cu_seqlens,
                   store_x=False):
    """The three launches; returns every intermediate (the backward recomputes from some of them). With `store_x`
    the prepare kernel also keeps X = (I + A)^-1 per chunk for the backward (x_inv [B, T, Hv, 64])."""
    q, k, v = rows_packed(q), rows_packed(k), rows_packed(v)
    a, b = a.contiguous(), b.contiguous()
    A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    batch, length, key_heads, dk = q.shape
    value_heads, dv = v.shape[2], v.shape[3]
    scale = dk ** -0.5 if scale is None else float(scale)
    BT, BC = CHUNK_SIZE, SUB_CHUNK
    BK = max(16, triton.next_power_of_2(dk))
    BV_full = max(16, triton.next_power_of_2(dv))
    BV = min(BV_full, 32)
    precision = dot_precision(v.dtype)
    device = v.device

    chunk_tables = None
    if cu_seqlens is not None:
        chunk_tables = prepare_chunks(cu_seqlens, BT, device)  # memoised: no host read after the first layer
        cu_seqlens, chunk_indices, chunk_offsets, num_chunks = chunk_tables
        num_states, grid_chunks = len(cu_seqlens) - 1, num_chunks
    else:
        chunk_indices = chunk_offsets = None
        grid_chunks = triton.cdiv(length, BT)
        num_states, num_chunks = batch, batch * grid_chunks
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    common = dict(H=key_heads, HV=value_heads, K=dk, V=dv, BT=BT, BK=BK, IS_VARLEN=cu_seqlens is not None,
                  DOT_PRECISION=precision)

    g_cumsum = torch.empty(batch, length, value_heads, dtype=torch.float32, device=device)  # [B, T, Hv]
    fuse_wu = KKT_PREPARE and FUSE_WU_INTO_H  # w, u then made inside the state pass, never stored
    w = None if fuse_wu else torch.empty(batch, length, value_heads, dk, dtype=v.dtype, device=device)  # [.., dk]
    u = None if fuse_wu else torch.empty(batch, length, value_heads, dv, dtype=v.dtype, device=device)  # [.., dv]
    x_inv = (torch.empty(batch, length, value_heads, BT, dtype=v.dtype, device=device)
             if store_x or KKT_PREPARE else None)
    k_normed = torch.empty(batch, length, key_heads, dk, dtype=k.dtype, device=device)  # [B, T, Hk, dk]
    fp32 = precision == "ieee"
    if KKT_PREPARE:  # tiles at least 32 wide, as in the backward (16-wide 16-bit dots fault in Triton 3.6, sm_90)
        from hybridlm.ops.triton.gdn_prepare_kkt import chunk_gdn_fwd_kkt_solve_kernel, chunk_gdn_wu_kernel

        chunk_gdn_fwd_kkt_solve_kernel[(grid_chunks, batch * value_heads)](
            k, a, b, A_log, dt_bias, g_cumsum, x_inv, cu_seqlens, chunk_indices, length, k.stride(1), H=key_heads,
            HV=value_heads, K=dk, BT=BT, BC=BC, BK=max(32, min(BK, KKT_BK)), IS_VARLEN=cu_seqlens is not None,
            DOT_PRECISION=precision, INTERLEAVE=KKT_INTERLEAVE, num_warps=KKT_WARPS_FP32 if fp32 else KKT_WARPS)
        if not fuse_wu:
            chunk_gdn_wu_kernel[(grid_chunks, batch * value_heads)](
                k, v, b, g_cumsum, x_inv, w, u, k_normed, cu_seqlens, chunk_indices, length, k.stride(1),
                v.stride(1), BV=max(32, min(BV_full, KKT_WU_BV)), STORE_KN=True, num_warps=KKT_WU_WARPS,
                **dict(common, BK=max(32, BK)))
    else:
        chunk_gdn_fwd_prepare_kernel[(grid_chunks, batch * value_heads)](
            k, v, a, b, A_log, dt_bias, g_cumsum, w, u, x_inv, k_normed, cu_seqlens, chunk_indices, length,
            k.stride(1), v.stride(1), BC=BC, BV=BV_full, STORE_X=store_x, STORE_KN=True,
            num_warps=4 if fp32 else FUSED_PREPARE_WARPS, **common)

    h = torch.empty(num_chunks, value_heads, dk, dv, dtype=v.dtype, device=device)  # [NT, Hv, dk, dv]
    v_new = torch.empty_like(v, memory_format=torch.contiguous_format)  # [B, T, Hv, dv]
    final_state = (torch.empty(num_states, value_heads, dk, dv, dtype=torch.float32, device=device)
                   if output_final_state else None)
    # the pass is sequential over chunks, so its programs (V blocks x heads x sequences) should fill the GPU:
    # narrower V blocks when there are too few. H100, 64k tokens at B = 1 (benchmarks/sweep_kernels.py): 0.8B heads
    # (64 programs at BV = 32) 1.23 -> 0.94 ms with 16; 9B heads (128 programs) are best at 32 (1.26 vs 1.62 ms)
    BV_h = BV
    if BV > 16 and 2 * triton.cdiv(dv, BV) * num_states * value_heads <= _multiprocessors(device):
        BV_h = 16
    state_grid = (triton.cdiv(dv, BV_h), num_states * value_heads)
    if fuse_wu:  # raw keys in, normalised there (and stored for the output pass); w, u made from X, v, b
        chunk_gdn_fwd_h_kernel[state_grid](
            k, None, None, g_cumsum, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets, length,
            k.stride(1), BV=BV_h, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
            NORM_K=True, FUSE_WU=True, x_inv=x_inv, v=v, b=b, kn=k_normed, stride_v=v.stride(1), num_warps=4,
            **common)
    else:
        chunk_gdn_fwd_h_kernel[state_grid](
            k_normed, w, u, g_cumsum, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets, length,
            key_heads * dk, BV=BV_h, USE_INITIAL_STATE=initial_state is not None,
            STORE_FINAL_STATE=output_final_state, NORM_K=False, num_warps=4, **common)

    o = torch.empty(batch, length, value_heads, dv, dtype=v.dtype, device=device)  # [B, T, Hv, dv]
    if LOOPED_O:
        BV_o = min(BV_full, LOOPED_O_BV_FP32 if fp32 else LOOPED_O_BV)
        chunk_gdn_fwd_o_looped_kernel[(grid_chunks, batch * value_heads)](
            q, k_normed, v_new, h, g_cumsum, o, cu_seqlens, chunk_indices, scale, length, q.stride(1),
            BV=BV_o, num_warps=LOOPED_O_WARPS_FP32 if fp32 else LOOPED_O_WARPS, num_stages=LOOPED_O_STAGES, **common)
    else:
        chunk_gdn_fwd_o_kernel[(triton.cdiv(dv, BV), grid_chunks, batch * value_heads)](
            q, k, v_new, h, g_cumsum, o, cu_seqlens, chunk_indices, scale, length, q.stride(1), k.stride(1),
            BV=BV, num_warps=4, **common)
    return dict(o=o, final_state=final_state, g_cumsum=g_cumsum, w=w, u=u, x_inv=x_inv, h=h, v_new=v_new,
                scale=scale, chunk_tables=chunk_tables)
