"""The WY part of the chunked GDN backward (`gdn_chunk_bwd` step 3): per chunk and value head, dw = -dv_new h^T,
the backward through w = X (beta k exp(G)), u = X (beta v) and X = (I + A)^-1, and the gates' chain rules.

Two kernels compute the same thing:
- `chunk_gdn_bwd_wy_kernel` holds whole rows of k (BK = dk wide) in registers: at 9B heads 255 registers with
  spills at 8 warps, one program per SM, and 1.04 of the backward's 2.65 ms (H200, B = 4, T = 4k).
- `chunk_gdn_bwd_wy_kblocked_kernel` walks the key columns in blocks of BKW: a first pass over the blocks makes
  dw, the X-gradient's share from it, the block's share of dk (stored, then read back), dbeta and dG; a second pass
  adds the shares through A = beta k k^T exp(G_i - G_j), which need the whole dX first (by default without k k^T:
  `KK_FREE`; else k k^T summed in either pass, `KK_IN_PASS2`). Four [64, BKW]
  fp32 tiles instead of four [64, dk] ones, for one more read of k and dv_new and a round trip of dk through memory
  (L2). Chosen by `gdn_chunk_bwd.BWD_WY_BK` (64: 9B heads' whole backward 2.67 -> 2.49 ms on an H200; None: the
  first kernel, which also runs where one block would cover dk).
With DW_GIVEN, either kernel reads dw from the key-blocked dq/dk kernel
(`gdn_bwd_dqk.chunk_gdn_bwd_dqkw_kblocked_kernel`) instead of making it from h and dv_new (no h read, four fewer
products on the chain at 9B heads), and adds that kernel's NKD shares of dG.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import (
    _chunk_bounds, _chunk_log_decay, _chunk_program, _l2norm_bwd, _l2norm_rows, _load_rows, _store_rows,
)


@triton.jit
def _wy_gates(a, b, A_log, dt_bias, bos, i_h, o_t, m_t, HV: tl.constexpr):
    """g, dg/d(a + dt_bias) and beta of these rows, recomputed from the raw a, b (rows past T: beta = 0, g = 0)."""
    b_A_exp = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_x = tl.load(a + bos * HV + i_h + o_t * HV, mask=m_t, other=0.).to(tl.float32) + tl.load(dt_bias + i_h)
    # torch's softplus and its gradient: x above 20 passes through with slope 1
    b_softplus = tl.where(b_x > 20., b_x, tl.maximum(b_x, 0.) + tl.log(1. + tl.exp(-tl.abs(b_x))))
    b_g = tl.where(m_t, -b_A_exp * b_softplus, 0.)
    b_dg_dx = tl.where(m_t, -b_A_exp * tl.where(b_x > 20., 1., tl.sigmoid(b_x)), 0.)
    b_beta = tl.where(m_t, tl.sigmoid(tl.load(b + bos * HV + i_h + o_t * HV, mask=m_t, other=0.).to(tl.float32)), 0.)
    return b_g, b_dg_dx, b_beta


@triton.jit
def _wy_gate_grads(b_dG, b_dbeta, b_g, b_dg_dx, b_beta, dG, stride_dG, da, db, dA_log, ddt_bias, bos, i_tg, i_h,
                   o_t, m_t, HV: tl.constexpr, NKD: tl.constexpr):
    """Adds the dq/dk kernel's share of dG (NKD key blocks' shares, stride_dG apart); G = cumsum(g) inside the
    chunk, so dg_t = sum_{s >= t} dG_s; then the gate chain rules: da, db per row, the chunk's sums for dA_log and
    ddt_bias."""
    for i_n in tl.static_range(NKD):
        b_dG += tl.load(dG + i_n * stride_dG + bos * HV + i_h + o_t * HV, mask=m_t, other=0.)
    b_dG = tl.where(m_t, b_dG, 0.)
    b_dg = tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG
    b_da = b_dg * b_dg_dx
    tl.store(da + bos * HV + i_h + o_t * HV, b_da.to(da.dtype.element_ty), mask=m_t)
    tl.store(db + bos * HV + i_h + o_t * HV, (b_dbeta * b_beta * (1. - b_beta)).to(db.dtype.element_ty), mask=m_t)
    tl.store(dA_log + i_tg * HV + i_h, tl.sum(b_dg * b_g, axis=0))  # dg/dA_log = g
    tl.store(ddt_bias + i_tg * HV + i_h, tl.sum(b_da, axis=0))


@triton.jit
def _transposed(b_Ed, e_scratch, i_tg, i_h, HV: tl.constexpr, BT: tl.constexpr, E_SCRATCH: tl.constexpr):
    """E^T for `tl.dot(E^T, ...)`: tl.trans(E), or with E_SCRATCH E stored to this chunk and head's [BT, BT] of
    e_scratch and loaded back transposed. E is made from products, and a transposed product result feeding another
    product is what Triton 3.4-3.7.0 miscompiles on Hopper in fla's kernels (fla-org/flash-linear-attention#640;
    fla's #826 takes the same round trip)."""
    if E_SCRATCH:
        o_i = tl.arange(0, BT)
        p_e = e_scratch + (i_tg * HV + i_h).to(tl.int64) * BT * BT
        tl.store(p_e + o_i[:, None] * BT + o_i[None, :], b_Ed)
        tl.debug_barrier()  # read back by other threads than those that stored it
        return tl.load(p_e + o_i[None, :] * BT + o_i[:, None])
    else:
        return tl.trans(b_Ed)


@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_wy_kernel(
    k,  # [B, T, H, K], token stride stride_k
    v,  # [B, T, HV, V], token stride stride_v
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g_cumsum,  # [B, T, HV] fp32
    x_inv,  # [B, T, HV, BT]: (I + A)^-1 per chunk, lower triangle
    h,  # [NT, HV, K, V]: the state entering each chunk
    dv_new,  # [B, T, HV, V]
    dw,  # [B, T, HV, K]: -dv_new h^T if DW_GIVEN (`gdn_bwd_dqk`), else unused
    dk,  # in/out [B, T, HV, K]: the dq/dk kernel's share in, the whole gradient of l2norm(k) out
    dG,  # [NKD, B, T, HV] fp32: the dq/dk kernel's shares
    dv,  # out [B, T, HV, V]
    da,  # out [B, T, HV]
    db,  # out [B, T, HV]
    dA_log,  # out [NT, HV] fp32: per-chunk sums
    ddt_bias,  # out [NT, HV] fp32: per-chunk sums
    e_scratch,  # [NT, HV, BT, BT] in the input dtype if E_SCRATCH, else unused
    cu_seqlens,
    chunk_indices,
    T,
    stride_k,
    stride_v,
    stride_dG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DW_GIVEN: tl.constexpr,
    NKD: tl.constexpr,
    E_SCRATCH: tl.constexpr,
    NORM_K: tl.constexpr = False,  # (H == HV) dk taken through k's L2 norm: dk is k's gradient (`BWD_QK_NORM_FUSED`)
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
):
    """dw = -dv_new h^T (or read, DW_GIVEN), the WY backward and the gates' chain rules; the dq/dk kernel's shares of
    dk and dG are added last, so they are not held through the products."""
    i_t, i_bh = _chunk_program(HEADS_FASTEST)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = dv_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    b_k = _l2norm_rows(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK)).to(dtype)
    b_kf = b_k.to(tl.float32)
    b_gc = _chunk_log_decay(g_cumsum + bos * HV + i_h, i_s, T, HV, BT)

    b_g, b_dg_dx, b_beta = _wy_gates(a, b, A_log, dt_bias, bos, i_h, o_t, m_t, HV)

    # WY: u = X (beta v), w = X (beta k exp(G)) with du = dv_new, and X = (I + A)^-1
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_A = o_i[:, None] >= o_i[None, :]
    p_x = x_inv + bos * HV * BT + i_h * BT
    b_X = tl.load(p_x + o_t[:, None] * (HV * BT) + o_i[None, :], mask=m_A & m_t[:, None], other=0.)  # [BT, BT]
    b_dX = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    p_h = h + (i_tg * HV + i_h) * K * V
    p_dvn = dv_new + bos * HV * V + i_h * V
    p_v = v + bos * stride_v + i_h * V
    p_dv = dv + bos * HV * V + i_h * V
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        if not DW_GIVEN:
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & (o_v[None, :] < V),
                          other=0.)
        b_v = _load_rows(p_v + i_v * BV, i_s, T, stride_v, V - i_v * BV, BT, BV)
        b_du = _load_rows(p_dvn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        if not DW_GIVEN:
            b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=DOT_PRECISION)  # v_new = u - w h
        b_dX += tl.dot(b_du, tl.trans((b_v.to(tl.float32) * b_beta[:, None]).to(dtype)),
                       input_precision=DOT_PRECISION)
        b_dvb = tl.dot(tl.trans(b_X), b_du, input_precision=DOT_PRECISION)  # gradient of beta v
        b_dbeta += tl.sum(b_dvb * b_v.to(tl.float32), axis=1)
        _store_rows(p_dv + i_v * BV, b_dvb * b_beta[:, None], i_s, T, HV * V, V - i_v * BV, BT, BV)
    b_kbg = b_kf * (b_beta * tl.exp(b_gc))[:, None]
    if DW_GIVEN:
        b_dw = _load_rows(dw + bos * HV * K + i_h * K, i_s, T, HV * K, K, BT, BK).to(dtype)
    else:
        b_dw = b_dw.to(dtype)
    b_dX += tl.dot(b_dw, tl.trans(b_kbg.to(dtype)), input_precision=DOT_PRECISION)
    b_dkbg = tl.dot(tl.trans(b_X), b_dw, input_precision=DOT_PRECISION)  # gradient of beta k exp(G)
    b_dk = b_dkbg * (b_beta * tl.exp(b_gc))[:, None]
    b_dbeta += tl.sum(b_dkbg * b_kf, axis=1) * tl.exp(b_gc)
    b_dG = tl.sum(b_dkbg * b_kbg, axis=1)
    # dA = -X^T dX X^T on the strict lower triangle (X is unit lower, so only that part of dX matters)
    m_L = o_i[:, None] > o_i[None, :]
    b_dX = tl.where(m_L, b_dX, 0.).to(dtype)
    b_dA = tl.dot(b_dX, tl.trans(b_X), input_precision=DOT_PRECISION).to(dtype)
    b_dA = tl.dot(tl.trans(b_X), b_dA, input_precision=DOT_PRECISION)
    # through A_ij = beta_i k_i . k_j exp(G_i - G_j): E = dA exp(G_i - G_j)
    b_E = tl.where(m_L, -b_dA * tl.exp(tl.where(m_L, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_dbeta += tl.sum(b_E * b_kk, axis=1)
    b_dAA = b_E * b_kk * b_beta[:, None]
    b_dG += tl.sum(b_dAA, axis=1) - tl.sum(b_dAA, axis=0)
    b_Ed = b_E.to(dtype)
    b_dk += tl.dot(b_Ed, b_k, input_precision=DOT_PRECISION) * b_beta[:, None]
    b_dk += tl.dot(_transposed(b_Ed, e_scratch, i_tg, i_h, HV, BT, E_SCRATCH), (b_kf * b_beta[:, None]).to(dtype),
                   input_precision=DOT_PRECISION)
    p_dk = dk + bos * HV * K + i_h * K
    b_dk += _load_rows(p_dk, i_s, T, HV * K, K, BT, BK)
    if NORM_K:  # (dn in dk's dtype first, as the norm kernel reads it)
        b_dk = _l2norm_bwd(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK),
                           b_dk.to(dk.dtype.element_ty))
    _store_rows(p_dk, b_dk, i_s, T, HV * K, K, BT, BK)

    _wy_gate_grads(b_dG, b_dbeta, b_g, b_dg_dx, b_beta, dG, stride_dG, da, db, dA_log, ddt_bias, bos, i_tg, i_h, o_t,
                   m_t, HV, NKD)


@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_wy_kblocked_kernel(
    k,  # [B, T, H, K], token stride stride_k
    v,  # [B, T, HV, V], token stride stride_v
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g_cumsum,  # [B, T, HV] fp32
    x_inv,  # [B, T, HV, BT]: (I + A)^-1 per chunk, lower triangle
    h,  # [NT, HV, K, V]: the state entering each chunk
    dv_new,  # [B, T, HV, V]
    dw,  # [B, T, HV, K]: -dv_new h^T if DW_GIVEN (`gdn_bwd_dqk`), else unused
    dk,  # in/out [B, T, HV, K]: the dq/dk kernel's share in, the whole gradient of l2norm(k) out
    dG,  # [NKD, B, T, HV] fp32: the dq/dk kernel's shares
    dv,  # out [B, T, HV, V]
    da,  # out [B, T, HV]
    db,  # out [B, T, HV]
    dA_log,  # out [NT, HV] fp32: per-chunk sums
    ddt_bias,  # out [NT, HV] fp32: per-chunk sums
    e_scratch,  # [NT, HV, BT, BT] in the input dtype if E_SCRATCH, else unused
    cu_seqlens,
    chunk_indices,
    T,
    stride_k,
    stride_v,
    stride_dG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DW_GIVEN: tl.constexpr,
    NKD: tl.constexpr,
    E_SCRATCH: tl.constexpr,
    BKW: tl.constexpr,  # key columns per block
    KK_IN_PASS2: tl.constexpr = False,  # k k^T summed in pass 2 instead of pass 1 (`gdn_chunk_bwd.BWD_WY_KK_LATE`)
    # No k k^T at all (`gdn_chunk_bwd.BWD_WY_KK_FREE`): sum_j E_ij (k_i . k_j) = k_i . (E k)_i and
    # sum_j E_ji beta_j (k_j . k_i) = k_i . (E^T (beta k))_i, and pass 2 makes E k and E^T (beta k) for dk anyway
    # (E in the input dtype there, as dk takes it)
    KK_FREE: tl.constexpr = False,
    # (H == HV) dk taken through k's L2 norm (`gdn_chunk_bwd.BWD_QK_NORM_FUSED`): pass 2 sums each row's n . dn over
    # the blocks (n = l2norm(k), dn the block's final dk in dk's dtype), and a third pass rewrites the blocks
    NORM_K: tl.constexpr = False,
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
):
    """`chunk_gdn_bwd_wy_kernel`'s results with the key columns in blocks of BKW (see the module's docstring)."""
    i_t, i_bh = _chunk_program(HEADS_FASTEST)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = dv_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    b_gc = _chunk_log_decay(g_cumsum + bos * HV + i_h, i_s, T, HV, BT)
    b_g, b_dg_dx, b_beta = _wy_gates(a, b, A_log, dt_bias, bos, i_h, o_t, m_t, HV)
    b_bg = b_beta * tl.exp(b_gc)
    p_k = k + bos * stride_k + i_hk * K
    # the keys' L2 norm, over the blocks (`_l2norm_rows` on whole rows)
    b_ss = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKW)):
        b_kb = _load_rows(p_k + i_k * BKW, i_s, T, stride_k, K - i_k * BKW, BT, BKW).to(tl.float32)
        b_ss += tl.sum(b_kb * b_kb, axis=1)
    b_rk = tl.rsqrt(b_ss + 1e-6)

    # u = X (beta v) with du = dv_new: dv, beta's share, X's share
    o_i = tl.arange(0, BT)
    p_x = x_inv + bos * HV * BT + i_h * BT
    b_X = tl.load(p_x + o_t[:, None] * (HV * BT) + o_i[None, :], mask=(o_i[:, None] >= o_i[None, :]) & m_t[:, None],
                  other=0.)  # [BT, BT]
    b_dX = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    p_dvn = dv_new + bos * HV * V + i_h * V
    p_v = v + bos * stride_v + i_h * V
    p_dv = dv + bos * HV * V + i_h * V
    for i_v in range(0, tl.cdiv(V, BV)):
        b_v = _load_rows(p_v + i_v * BV, i_s, T, stride_v, V - i_v * BV, BT, BV)
        b_du = _load_rows(p_dvn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        b_dX += tl.dot(b_du, tl.trans((b_v.to(tl.float32) * b_beta[:, None]).to(dtype)),
                       input_precision=DOT_PRECISION)
        b_dvb = tl.dot(tl.trans(b_X), b_du, input_precision=DOT_PRECISION)  # gradient of beta v
        b_dbeta += tl.sum(b_dvb * b_v.to(tl.float32), axis=1)
        _store_rows(p_dv + i_v * BV, b_dvb * b_beta[:, None], i_s, T, HV * V, V - i_v * BV, BT, BV)

    # pass 1 over the key blocks: w = X (beta k exp(G)) with dw = -dv_new h^T
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dG = tl.zeros([BT], dtype=tl.float32)
    p_h = h + (i_tg * HV + i_h) * K * V
    p_dk = dk + bos * HV * K + i_h * K
    for i_k in range(0, tl.cdiv(K, BKW)):
        o_k = i_k * BKW + tl.arange(0, BKW)
        b_k = (_load_rows(p_k + i_k * BKW, i_s, T, stride_k, K - i_k * BKW, BT, BKW).to(tl.float32)
               * b_rk[:, None]).to(dtype)
        b_kf = b_k.to(tl.float32)
        if DW_GIVEN:
            b_dw = _load_rows(dw + bos * HV * K + i_h * K + i_k * BKW, i_s, T, HV * K, K - i_k * BKW, BT, BKW)
        else:
            b_dw = tl.zeros([BT, BKW], dtype=tl.float32)
            for i_v in range(0, tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & (o_v[None, :] < V),
                              other=0.)  # [BKW, BV]
                b_du = _load_rows(p_dvn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
                b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=DOT_PRECISION)  # v_new = u - w h
        b_kbg = b_kf * b_bg[:, None]
        b_dwd = b_dw.to(dtype)
        b_dX += tl.dot(b_dwd, tl.trans(b_kbg.to(dtype)), input_precision=DOT_PRECISION)
        b_dkbg = tl.dot(tl.trans(b_X), b_dwd, input_precision=DOT_PRECISION)  # gradient of beta k exp(G)
        b_dbeta += tl.sum(b_dkbg * b_kf, axis=1) * tl.exp(b_gc)
        b_dG += tl.sum(b_dkbg * b_kbg, axis=1)
        if not KK_IN_PASS2 and not KK_FREE:
            b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_dk = b_dkbg * b_bg[:, None] + _load_rows(p_dk + i_k * BKW, i_s, T, HV * K, K - i_k * BKW, BT, BKW)
        _store_rows(p_dk + i_k * BKW, b_dk, i_s, T, HV * K, K - i_k * BKW, BT, BKW)

    # dA = -X^T dX X^T on the strict lower triangle (X is unit lower, so only that part of dX matters)
    m_L = o_i[:, None] > o_i[None, :]
    b_dA = tl.dot(tl.where(m_L, b_dX, 0.).to(dtype), tl.trans(b_X), input_precision=DOT_PRECISION).to(dtype)
    b_dA = tl.dot(tl.trans(b_X), b_dA, input_precision=DOT_PRECISION)
    # through A_ij = beta_i k_i . k_j exp(G_i - G_j): E = dA exp(G_i - G_j)
    b_E = tl.where(m_L, -b_dA * tl.exp(tl.where(m_L, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
    b_Ed = b_E.to(dtype)
    tl.debug_barrier()  # pass 1's dk is read back by other threads than those that stored it
    b_EdT = _transposed(b_Ed, e_scratch, i_tg, i_h, HV, BT, E_SCRATCH)
    # pass 2: dk += E k beta + E^T (k beta) (and with KK_IN_PASS2, k k^T from the same key blocks)
    b_ndn = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKW)):
        b_kn = _load_rows(p_k + i_k * BKW, i_s, T, stride_k, K - i_k * BKW, BT, BKW).to(tl.float32) * b_rk[:, None]
        b_kd = b_kn.to(dtype)
        b_kf = b_kd.to(tl.float32)
        b_Ek = tl.dot(b_Ed, b_kd, input_precision=DOT_PRECISION)
        b_ETk = tl.dot(b_EdT, (b_kf * b_beta[:, None]).to(dtype), input_precision=DOT_PRECISION)
        if KK_FREE:  # beta's and G's shares through A from the products dk needs (see KK_FREE above)
            b_kEk = tl.sum(b_kf * b_Ek, axis=1)
            b_dbeta += b_kEk
            b_dG += b_kEk * b_beta - tl.sum(b_kf * b_ETk, axis=1)
        elif KK_IN_PASS2:
            b_kk += tl.dot(b_kd, tl.trans(b_kd), input_precision=DOT_PRECISION)
        b_dk = b_Ek * b_beta[:, None] + b_ETk
        b_dk += _load_rows(p_dk + i_k * BKW, i_s, T, HV * K, K - i_k * BKW, BT, BKW).to(tl.float32)
        if NORM_K:
            b_ndn += tl.sum(b_kn * b_dk.to(dk.dtype.element_ty).to(tl.float32), axis=1)
        _store_rows(p_dk + i_k * BKW, b_dk, i_s, T, HV * K, K - i_k * BKW, BT, BKW)
    if not KK_FREE:  # (k k^T summed in pass 1 or pass 2)
        b_dbeta += tl.sum(b_E * b_kk, axis=1)
        b_dAA = b_E * b_kk * b_beta[:, None]
        b_dG += tl.sum(b_dAA, axis=1) - tl.sum(b_dAA, axis=0)

    _wy_gate_grads(b_dG, b_dbeta, b_g, b_dg_dx, b_beta, dG, stride_dG, da, db, dA_log, ddt_bias, bos, i_tg, i_h, o_t,
                   m_t, HV, NKD)
    if NORM_K:  # pass 3: dk = r (dn - n (n . dn)) over the blocks
        tl.debug_barrier()  # pass 2's dk is read back by other threads than those that stored it
        for i_k in range(0, tl.cdiv(K, BKW)):
            b_kn = (_load_rows(p_k + i_k * BKW, i_s, T, stride_k, K - i_k * BKW, BT, BKW).to(tl.float32)
                    * b_rk[:, None])
            b_dn = _load_rows(p_dk + i_k * BKW, i_s, T, HV * K, K - i_k * BKW, BT, BKW).to(tl.float32)
            _store_rows(p_dk + i_k * BKW, (b_dn - b_kn * b_ndn[:, None]) * b_rk[:, None], i_s, T, HV * K,
                        K - i_k * BKW, BT, BKW)
