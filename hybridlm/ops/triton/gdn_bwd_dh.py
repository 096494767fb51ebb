"""The chunked GDN backward's steps 1 and 2 (`gdn_chunk_bwd`): the values' local gradient from the output
(parallel over chunks) and the sequential pass backwards over the chunks that carries dH, the gradient of the state.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import (
    _chunk_bounds, _chunk_log_decay, _chunk_program, _l2norm_rows, _load_rows, _store_rows,
)


# The kernels taking T leave it unspecialised (as fla does): one compile for every length, and T = 1 is never a
# constexpr that _chunk_bounds would hand back.
@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_dv_local_kernel(
    q,  # [B, T, H, K], token stride stride_q
    k,  # [B, T, H, K], token stride stride_k
    do,  # [B, T, HV, V]
    g_cumsum,  # [B, T, HV] fp32
    dv,  # out [B, T, HV, V]
    aqk,  # [B, T, HV, BT] if A_GIVEN: the forward's tril(q k^T exp(G_i - G_j)) per chunk (q scaled), else unused
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
    A_GIVEN: tl.constexpr = False,  # the scores read from aqk, transposed, instead of made from q and k
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
):
    i_t, i_bh = _chunk_program(HEADS_FASTEST)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    _, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = do.dtype.element_ty

    i_s = i_t * BT
    # the transposed intra-chunk scores [j, i] = k_j . q_i exp(G_i - G_j) for j <= i (exponent masked: overflow)
    o_i = tl.arange(0, BT)
    if A_GIVEN:  # aqk[i, j] loaded at [j, i]
        b_At = tl.load(aqk + (bos + i_s + o_i[None, :]).to(tl.int64) * (HV * BT) + i_h * BT + o_i[:, None],
                       mask=((i_s + o_i[None, :]) < T) & (o_i[:, None] <= o_i[None, :]), other=0.)  # (j > i unwritten)
    else:
        b_q = (_l2norm_rows(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK)) * scale).to(dtype)
        b_k = _l2norm_rows(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK)).to(dtype)
        b_gc = _chunk_log_decay(g_cumsum + bos * HV + i_h, i_s, T, HV, BT)
        m_A = o_i[:, None] <= o_i[None, :]
        b_At = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
        b_At = tl.where(m_A, b_At * tl.exp(tl.where(m_A, b_gc[None, :] - b_gc[:, None], 0.)), 0.).to(dtype)
    p_do = do + bos * HV * V + i_h * V
    p_dv = dv + bos * HV * V + i_h * V
    for i_v in range(0, tl.cdiv(V, BV)):
        b_do = _load_rows(p_do + i_v * BV, i_s, T, HV * V, V - i_v * BV, BT, BV)
        b_dv = tl.dot(b_At, b_do, input_precision=DOT_PRECISION)
        _store_rows(p_dv + i_v * BV, b_dv, i_s, T, HV * V, V - i_v * BV, BT, BV)


@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_dh_kernel(
    q,  # [B, T, H, K], token stride stride_q
    k,  # [B, T, H, K], token stride stride_k
    w,  # [B, T, HV, K]
    g_cumsum,  # [B, T, HV] fp32
    do,  # [B, T, HV, V]
    dv_local,  # [B, T, HV, V] from chunk_gdn_bwd_dv_local_kernel
    dv_new,  # out [B, T, HV, V]: the full gradient of v_new
    dh,  # out [NT, HV, K, V]: the gradient of the state leaving each chunk
    dht,  # [N, HV, K, V] gradient of the final state
    dh0,  # out [N, HV, K, V] fp32, gradient of the initial state
    cu_seqlens,
    chunk_offsets,
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
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # TMA (`BWD_DH_TMA`): the q, k, w, do and dv_local tiles through tensor descriptors over [B * T, columns] views;
    # rows past a sequence's end then hold the next one's rows: do's and dv_local's are zeroed (they would reach dH
    # through q and w), k's meet a zeroed decay
    TMA: tl.constexpr = False,
    q_desc=None,
    k_desc=None,
    w_desc=None,
    do_desc=None,
    dvl_desc=None,
):
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
    dtype = dv_new.dtype.element_ty
    i_cq, i_cw, i_cv = i_hk * K, i_h * K, i_h * V + i_v * BV  # first columns in the descriptors' views

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)

    p_q = q + bos * stride_q + i_hk * K
    p_k = k + bos * stride_k + i_hk * K
    p_w = w + bos * HV * K + i_h * K
    p_gc = g_cumsum + bos * HV + i_h
    p_do = do + bos * HV * V + i_h * V + i_v * BV
    p_dvl = dv_local + bos * HV * V + i_h * V + i_v * BV
    p_dvn = dv_new + bos * HV * V + i_h * V + i_v * BV
    for i_t in range(NT - 1, -1, -1):
        tl.store(dh + ((boh + i_t) * HV + i_h) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        i_s = i_t * BT
        o_t = i_s + tl.arange(0, BT)
        m_t = o_t < T
        b_g_last = tl.load(p_gc + (tl.minimum(i_s + BT, T) - 1) * HV)
        b_gc = tl.load(p_gc + o_t * HV, mask=m_t, other=0.)
        i_r = (bos + i_s).to(tl.int32)  # the chunk's first row in the descriptors' views
        # v_new also wrote the state: dv_new += (k exp(G_last - G)) dH
        if TMA:
            b_k = k_desc.load([i_r, i_cq])
        else:
            b_k = _load_rows(p_k, i_s, T, stride_k, K, BT, BK)
        b_k = _l2norm_rows(b_k).to(dtype)
        b_dv = tl.dot(b_k, b_dh.to(dtype), input_precision=DOT_PRECISION)
        b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_gc), 0.)[:, None]
        if TMA:
            b_dv += tl.where(m_t[:, None], dvl_desc.load([i_r, i_cv]).to(tl.float32), 0.)
        else:
            b_dv += _load_rows(p_dvl, i_s, T, HV * V, V - i_v * BV, BT, BV).to(tl.float32)
        _store_rows(p_dvn, b_dv, i_s, T, HV * V, V - i_v * BV, BT, BV)
        # dH of the state entering the chunk: decay, the read o += (q exp(G)) h, and v_new = u - w h
        if TMA:
            b_q = q_desc.load([i_r, i_cq])
            b_do = tl.where(m_t[:, None], do_desc.load([i_r, i_cv]).to(tl.float32), 0.)
            b_w = w_desc.load([i_r, i_cw])
        else:
            b_q = _load_rows(p_q, i_s, T, stride_q, K, BT, BK)
            b_do = _load_rows(p_do, i_s, T, HV * V, V - i_v * BV, BT, BV).to(tl.float32)
            b_w = _load_rows(p_w, i_s, T, HV * K, K, BT, BK)
        b_q = (_l2norm_rows(b_q) * scale).to(dtype)
        b_do_g = (b_do * tl.exp(b_gc)[:, None]).to(dtype)
        b_dh = b_dh * tl.exp(b_g_last) + tl.dot(tl.trans(b_q), b_do_g, input_precision=DOT_PRECISION)
        b_dh -= tl.dot(tl.trans(b_w), b_dv.to(dtype), input_precision=DOT_PRECISION)

    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)
