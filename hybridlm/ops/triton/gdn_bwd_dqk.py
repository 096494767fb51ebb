"""The chunked GDN backward's step 3a over key blocks: dq, the shares of dk and dG from the output and the state
update, and dw = -dv_new h^T, with one program per (key block, chunk, value head).

`gdn_chunk_bwd.chunk_gdn_bwd_dqk_kernel` does the same for whole key rows at 8 warps (228 registers on sm_90, one
program per SM) and leaves dw to the WY kernel, which then reads h a second time and puts four more products on its
chain. Here, as fla's chunk_bwd_kernel_dqkwg splits it, each program holds [64, BKQ] tiles: more programs per SM to
hide the loads, and dw (T x dk values per head) goes through memory instead of h (T x dk x dv / 64). Every program
of a chunk recomputes the [64, 64] do v_new^T (and its transpose, by a product of its own: see `_dqk_products`), and
each stores its share of dG (dG is linear in the key columns: sums over columns of products of q, k with their
gradients, and of dS with q k^T); the WY kernel adds the shares. Chosen by `gdn_chunk_bwd.BWD_DQK_BK`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import _chunk_bounds, _chunk_log_decay, _load_rows, _store_rows


@triton.jit
def _row_rsqrt(p, i_s, T, stride, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """rsqrt(sum(x^2) + 1e-6) of whole rows (`_l2norm_rows`' factor), fp32 [BT]."""
    b_x = _load_rows(p, i_s, T, stride, K, BT, BK).to(tl.float32)
    return tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)


@triton.jit
def _dqk_products(p_h, p_dh, p_do, p_vn, p_dvn, o_k, i_s, T, K: tl.constexpr, V: tl.constexpr, HV: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  WITH_DW: tl.constexpr, WITH_DST: tl.constexpr):
    """The dq/dk kernels' loop over V for key columns o_k (BC of them) of one chunk: do h^T, v_new dH^T, do v_new^T,
    rowsum(h * dH); WITH_DW also -dv_new h^T; WITH_DST also (do v_new^T)^T by a product of its own (tl.trans of a
    product's result feeding another product is what Triton 3.4-3.7.0 miscompiles on Hopper at 64-wide key blocks,
    fla-org/flash-linear-attention#640, fixed in 3.7.1)."""
    b_dq = tl.zeros([BT, BC], dtype=tl.float32)
    b_dk = tl.zeros([BT, BC], dtype=tl.float32)
    b_dw = tl.zeros([BT, BC], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dsT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dg_last = tl.zeros([BC], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)  # [BC, BV]
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_do = _load_rows(p_do + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)  # [BT, BV]
        b_vn = _load_rows(p_vn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        if WITH_DW:
            b_du = _load_rows(p_dvn + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=DOT_PRECISION)
        b_dk += tl.dot(b_vn, tl.trans(b_dh), input_precision=DOT_PRECISION)
        if WITH_DW:
            b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=DOT_PRECISION)
        b_ds += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PRECISION)
        if WITH_DST:
            b_dsT += tl.dot(b_vn, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dg_last += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
    return b_dq, b_dk, b_dw, b_ds, b_dsT, b_dg_last


@triton.jit
def _dqk_gate_shares(b_dq, b_dk, b_ds, b_dg_last, b_q, b_k, b_gc, b_g_last, o_t, m_t, i_last, BT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, A_GIVEN: tl.constexpr, b_Aqk):
    """The dq/dk kernels' step after their loop over V: given b_dq = do h^T, b_dk = v_new dH^T, b_ds = do v_new^T
    and b_dg_last = rowsum(h * dH) over their key columns, the gates' factors on dq and dk, the masked and decayed
    dS, and these columns' share of dG (G's last row also takes the decay of the state's gradient). With A_GIVEN,
    b_Aqk is the forward's tril(q k^T exp(G_i - G_j)) of whole rows (q scaled), which stands in for q k^T there."""
    b_qf, b_kf = b_q.to(tl.float32), b_k.to(tl.float32)
    b_dq = b_dq * tl.exp(b_gc)[:, None]
    b_dG = tl.sum(b_dq * b_qf, axis=1)
    b_dk = b_dk * tl.where(m_t, tl.exp(b_g_last - b_gc), 0.)[:, None]
    b_dG -= tl.sum(b_dk * b_kf, axis=1)
    b_dG_last = tl.sum(b_dg_last, axis=0) * tl.exp(b_g_last) + tl.sum(tl.sum(b_dk * b_kf, axis=1), axis=0)
    o_i = tl.arange(0, BT)
    m_A = o_i[:, None] >= o_i[None, :]
    if A_GIVEN:  # dS exp(G_i - G_j) * q k^T = dS * A
        b_dsA = tl.where(m_A, b_ds * b_Aqk.to(tl.float32), 0.)
    b_ds = tl.where(m_A, b_ds * tl.exp(tl.where(m_A, b_gc[:, None] - b_gc[None, :], 0.)), 0.)
    if not A_GIVEN:
        b_dsA = b_ds * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # these columns' share of q k^T
    b_dG += tl.sum(b_dsA, axis=1) - tl.sum(b_dsA, axis=0)
    b_dG += tl.where(o_t == i_last, b_dG_last, 0.)
    return b_dq, b_dk, b_dG, b_ds


@triton.jit
def _masked_dst(b_dsT, b_gc, BT: tl.constexpr):
    """dS^T (made by its own product) masked and decayed as `_dqk_gate_shares` does dS: [j, i] for j <= i."""
    o_i = tl.arange(0, BT)
    m_At = o_i[:, None] <= o_i[None, :]
    return tl.where(m_At, b_dsT * tl.exp(tl.where(m_At, b_gc[None, :] - b_gc[:, None], 0.)), 0.)


@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_dqkw_kblocked_kernel(
    q,  # [B, T, H, K], token stride stride_q
    k,  # [B, T, H, K], token stride stride_k
    g_cumsum,  # [B, T, HV] fp32
    h,  # [NT, HV, K, V]: the state entering each chunk
    dh,  # [NT, HV, K, V]: the gradient of the state leaving each chunk
    v_new,  # [B, T, HV, V]
    do,  # [B, T, HV, V]
    dv_new,  # [B, T, HV, V]: the full gradient of v_new (the dH pass's)
    dq,  # out [B, T, HV, K]: gradient of l2norm(q), per value head
    dk,  # out [B, T, HV, K]: the output's and the state update's share of d l2norm(k)
    dw,  # out [B, T, HV, K]: -dv_new h^T
    dG,  # out [NK, B, T, HV] fp32: each key block's share of the gradient of G (from o and the state update)
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    stride_q,
    stride_k,
    stride_dG,  # B * T * HV: one key block's share to the next
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,  # dk's power of two: the norms' whole rows
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BKQ: tl.constexpr,  # key columns per program
):
    NK = (K + BKQ - 1) // BKQ
    i_kt, i_bh = tl.program_id(0), tl.program_id(1)
    i_k, i_t = i_kt % NK, i_kt // NK  # a chunk's key blocks run side by side (do, v_new, dv_new shared in L2)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = v_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    i_last = tl.minimum(i_s + BT, T) - 1
    i_c = i_k * BKQ
    p_q = q + bos * stride_q + i_hk * K
    p_k = k + bos * stride_k + i_hk * K
    # o = (q exp(G)) h + tril(q k^T exp(G_i - G_j)) v_new, S_next = exp(G_last) S + (k exp(G_last - G))^T v_new,
    # v_new = u - w h
    o_k = i_c + tl.arange(0, BKQ)
    p_h = h + (i_tg * HV + i_h) * K * V
    p_dh = dh + (i_tg * HV + i_h) * K * V
    p_do = do + bos * HV * V + i_h * V
    p_vn = v_new + bos * HV * V + i_h * V
    p_dvn = dv_new + bos * HV * V + i_h * V
    b_dq, b_dk, b_dw, b_ds, b_dsT, b_dg_last = _dqk_products(p_h, p_dh, p_do, p_vn, p_dvn, o_k, i_s, T, K, V, HV, BT,
                                                             BKQ, BV, DOT_PRECISION, True, True)
    _store_rows(dw + bos * HV * K + i_h * K + i_c, b_dw, i_s, T, HV * K, K - i_c, BT, BKQ)

    # q, k enter as l2norm(q) * scale and l2norm(k): norms of whole rows, then this program's columns (loaded after
    # the loop, as fla does, so that they are not held through it)
    b_rq = _row_rsqrt(p_q, i_s, T, stride_q, K, BT, BK) * scale
    b_rk = _row_rsqrt(p_k, i_s, T, stride_k, K, BT, BK)
    b_q = (_load_rows(p_q + i_c, i_s, T, stride_q, K - i_c, BT, BKQ).to(tl.float32) * b_rq[:, None]).to(dtype)
    b_k = (_load_rows(p_k + i_c, i_s, T, stride_k, K - i_c, BT, BKQ).to(tl.float32) * b_rk[:, None]).to(dtype)
    b_gc = _chunk_log_decay(g_cumsum + bos * HV + i_h, i_s, T, HV, BT)
    b_g_last = tl.load(g_cumsum + bos * HV + i_h + i_last * HV)
    b_dq, b_dk, b_dG, b_ds = _dqk_gate_shares(b_dq, b_dk, b_ds, b_dg_last, b_q, b_k, b_gc, b_g_last, o_t, m_t, i_last,
                                              BT, DOT_PRECISION, False, b_ds)
    b_dq += tl.dot(b_ds.to(dtype), b_k, input_precision=DOT_PRECISION)
    b_dk += tl.dot(_masked_dst(b_dsT, b_gc, BT).to(dtype), b_q, input_precision=DOT_PRECISION)
    _store_rows(dq + bos * HV * K + i_h * K + i_c, b_dq * scale, i_s, T, HV * K, K - i_c, BT, BKQ)
    _store_rows(dk + bos * HV * K + i_h * K + i_c, b_dk, i_s, T, HV * K, K - i_c, BT, BKQ)
    tl.store(dG + i_k.to(tl.int64) * stride_dG + bos * HV + i_h + o_t * HV, b_dG, mask=m_t)
