"""The GDN prepare step's triangular solve, and the prepare step in one launch (`KKT_PREPARE = False` in
`gdn_chunk`; the default is `gdn_prepare_kkt`'s two kernels, which share the solve).

`chunk_gdn_fwd_prepare_kernel` (parallel over chunks and value heads): gates g, beta from the raw a, b; the
cumulative log decay G inside the chunk; the strictly lower A = beta k k^T * exp(G_i - G_j) in 16-row blocks;
X = (I + A)^-1 (`_chunk_inverse`: forward substitution on the four diagonal blocks, block substitution for the
rest; the WY form); w = X (beta k exp(G)) and u = X (beta v); the normalised keys for the state pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import _gates, _l2norm_rows, _load_rows, _store_rows


@triton.jit
def _mm(b_x, b_y, DOT_PRECISION: tl.constexpr):
    """Product of two small fp32 blocks of the triangular solve: "ieee" (FMA units, whole operand rows per thread)
    for fp32 inputs; "tf32" tensor cores for bf16/fp16 inputs, as fla's solve_tril does: its ~1e-3 relative
    rounding sits below the bf16 rounding of the stored w, u and X, and the operands stay spread over the warp's
    lanes instead of filling every thread's registers."""
    return tl.dot(b_x, b_y, input_precision=DOT_PRECISION)


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
def _merge_halves(b_X, b_L, o_i, S: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """From X = (I + L_S)^-1, where L_S is L inside the diagonal S x S blocks, the same inverse for 2S x 2S blocks:
    with C the part of L between the two S-halves of each 2S block, (D + C)^-1 = D^-1 - D^-1 C D^-1 (D^-1 C squares to
    zero), from final blocks only, as block substitution is."""
    m_C = ((o_i[:, None] // S) != (o_i[None, :] // S)) & ((o_i[:, None] // (2 * S)) == (o_i[None, :] // (2 * S)))
    return b_X - _mm(b_X, _mm(tl.where(m_C, b_L, 0.), b_X, DOT_PRECISION), DOT_PRECISION)


@triton.jit
def _unit_lower_inverse_recursive(b_L, BC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I + L)^-1 for a strictly lower 16 x 16 block by recursive halving: I - L inside the 2 x 2 diagonal blocks,
    then three merges (`_merge_halves`) of two small products each, six dependent products in all, instead of
    fifteen dependent row steps of two cross-lane reductions (`_unit_lower_inverse`)."""
    tl.static_assert(BC == 16, "the halving is written for 16-row blocks")
    o_i = tl.arange(0, BC)
    m_2 = (o_i[:, None] // 2) == (o_i[None, :] // 2)
    b_X = tl.where(o_i[:, None] == o_i[None, :], 1., 0.) - tl.where(m_2, b_L, 0.)
    b_X = _merge_halves(b_X, b_L, o_i, 2, DOT_PRECISION)
    b_X = _merge_halves(b_X, b_L, o_i, 4, DOT_PRECISION)
    return _merge_halves(b_X, b_L, o_i, 8, DOT_PRECISION)


@triton.jit
def _chunk_inverse(b_A00, b_A11, b_A22, b_A33, b_A10, b_A20, b_A21, b_A30, b_A31, b_A32, BC: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERLEAVE: tl.constexpr, RECURSIVE: tl.constexpr = False):
    """X = (I + A)^-1 of a chunk's strictly lower A given as its ten 16-row blocks (fp32): the diagonal blocks by
    recursive halving (`_unit_lower_inverse_recursive`, RECURSIVE) or by forward substitution
    (`_unit_lower_inverse`, or `_unit_lower_inverses` with INTERLEAVE); the rest by block substitution
    X_ij = -X_ii sum_{j <= m < i} A_im X_mj. (Merging the 64 rows by halves as well, four products on the chain after
    the diagonal blocks instead of six, was no faster on an H100 and was removed, 2026-12-07.)
    Returns X00, X11, X22, X33, X10, X20, X21, X30, X31, X32."""
    if RECURSIVE:
        b_X00 = _unit_lower_inverse_recursive(b_A00, BC, DOT_PRECISION)
        b_X11 = _unit_lower_inverse_recursive(b_A11, BC, DOT_PRECISION)
        b_X22 = _unit_lower_inverse_recursive(b_A22, BC, DOT_PRECISION)
        b_X33 = _unit_lower_inverse_recursive(b_A33, BC, DOT_PRECISION)
    elif INTERLEAVE:
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
