"""The chunked GDN forward's output kernels (`gdn_chunk`'s third launch, where the state pass does not make the
output itself): o = (q exp(G)) h + tril(q k^T exp(G_i - G_j)) v_new per chunk, from the states h entering each chunk
and the corrected values v_new that the state pass stored. The reference twin is
`hybridlm.ops.delta_rule.chunk_gated_delta_rule`."""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import _chunk_bounds, _l2norm_rows, _load_rows, _store_rows


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
