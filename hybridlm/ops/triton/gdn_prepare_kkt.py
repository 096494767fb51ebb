"""The GDN prepare step as two light kernels (behind `gdn_chunk.KKT_PREPARE`): the same outputs as
`gdn_prepare.chunk_gdn_fwd_prepare_kernel` (g_cumsum, w, u, the normalised keys, and X = (I + A)^-1 per chunk).

1. `chunk_gdn_fwd_kkt_solve_kernel` (per chunk and value head): the gates, their cumulative sum, A and X. The keys
   are never held whole: the ten 16x16 blocks of the raw Gram matrix K K^T are summed over slices of BK columns,
   and the L2 norms come from its diagonal (|k_i|^2 = (K K^T)_ii), so A = beta_i r_i r_j (k_i . k_j) exp(G_i - G_j)
   with r = rsqrt(|k|^2 + 1e-6), the reference's norm. The inverse: the diagonal 16 x 16 blocks by recursive
   halving (`gdn_chunk.KKT_RECURSIVE`; else forward substitution), block substitution for the rest, on tensor cores
   in tf32 for bf16/fp16 inputs (fla's solve_tril substitutes on the diagonal blocks and merges the same way).
   X is stored in the input dtype, as the backward already reads it.
2. `chunk_gdn_wu_kernel` (the backward recomputes w, u with it too): w = X (beta k_n exp(G)) and u = X (beta v),
   each one 64 x 64 by 64 x d tensor-core product, the keys normalised there (and, with STORE_KN, stored once per
   key head for the state pass).

Why: the fused kernel holds the four normalised 16 x 128 key blocks, their beta-scaled copies, ten A blocks and the
inverse at once, and sits at 255 registers with spills (one program per SM). Here the first kernel keeps ten
fp32 16 x 16 accumulators and four 16 x BK key slices; the second is two plain products.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import (
    _chunk_bounds, _chunk_program, _gates, _l2norm_rows_rsqrt, _load_rows, _store_rows,
)
from hybridlm.ops.triton.gdn_prepare import _chunk_inverse


@triton.jit
def _key_slice(p_k, i_s, T, stride_k, i_k, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Rows i_s .. i_s + BC, columns i_k BK .. (i_k + 1) BK of the raw keys (zeros past T or K)."""
    o_r = i_s + tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_r[:, None] < T) & (o_k[None, :] < K)
    return tl.load(p_k + o_r[:, None].to(tl.int64) * stride_k + o_k[None, :], mask=m, other=0.)


@triton.jit
def _diagonal(b_G, BC: tl.constexpr):
    """The diagonal of a BC x BC block, as a row-indexed and as a column-indexed vector."""
    o_c = tl.arange(0, BC)
    b_eye = o_c[:, None] == o_c[None, :]
    return tl.sum(tl.where(b_eye, b_G, 0.), axis=1), tl.sum(tl.where(b_eye, b_G, 0.), axis=0)


@triton.jit
def _scaled_block(b_G, b_rb_i, b_r_j, b_gc_i, b_gc_j, DIAGONAL: tl.constexpr, BC: tl.constexpr):
    """Block (i, j) of A from the raw Gram block: G_ij (beta_i r_i) r_j exp(G_i - G_j), strictly lower on the
    diagonal (the exponent masked there too: above the diagonal G_i - G_j > 0 could overflow)."""
    b_A = b_G * b_rb_i[:, None] * b_r_j[None, :]
    if DIAGONAL:
        o_c = tl.arange(0, BC)
        m_A = o_c[:, None] > o_c[None, :]
        return tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_gc_i[:, None] - b_gc_j[None, :], 0.)), 0.)
    return b_A * tl.exp(b_gc_i[:, None] - b_gc_j[None, :])


@triton.jit
def _chunk_gates(a, b, A_log, dt_bias, g_cumsum, bos, i_h, i_s0, T, HV: tl.constexpr, BC: tl.constexpr):
    """The gates of one value head over the chunk's four sub-chunks: the cumulative log decay G (stored to
    g_cumsum) and beta, as (G_0, .., G_3, beta_0, .., beta_3)."""
    i_s1, i_s2, i_s3 = i_s0 + BC, i_s0 + 2 * BC, i_s0 + 3 * BC
    p_a = a + bos * HV + i_h
    p_b = b + bos * HV + i_h
    b_decay = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_dt_bias = tl.load(dt_bias + i_h).to(tl.float32)
    b_g0, b_beta0 = _gates(p_a, p_b, b_decay, b_dt_bias, i_s0, T, HV, BC)
    b_g1, b_beta1 = _gates(p_a, p_b, b_decay, b_dt_bias, i_s1, T, HV, BC)
    b_g2, b_beta2 = _gates(p_a, p_b, b_decay, b_dt_bias, i_s2, T, HV, BC)
    b_g3, b_beta3 = _gates(p_a, p_b, b_decay, b_dt_bias, i_s3, T, HV, BC)
    b_gc0 = tl.cumsum(b_g0, axis=0)
    b_gc1 = tl.cumsum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    b_gc2 = tl.cumsum(b_g2, axis=0) + tl.sum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    b_gc3 = tl.cumsum(b_g3, axis=0) + tl.sum(b_g2, axis=0) + tl.sum(b_g1, axis=0) + tl.sum(b_g0, axis=0)
    p_gc = g_cumsum + bos * HV + i_h
    o_c = tl.arange(0, BC)
    tl.store(p_gc + (i_s0 + o_c) * HV, b_gc0, mask=i_s0 + o_c < T)
    tl.store(p_gc + (i_s1 + o_c) * HV, b_gc1, mask=i_s1 + o_c < T)
    tl.store(p_gc + (i_s2 + o_c) * HV, b_gc2, mask=i_s2 + o_c < T)
    tl.store(p_gc + (i_s3 + o_c) * HV, b_gc3, mask=i_s3 + o_c < T)
    return b_gc0, b_gc1, b_gc2, b_gc3, b_beta0, b_beta1, b_beta2, b_beta3


@triton.jit
def _gram_blocks(p_k, i_s0, T, stride_k, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """The ten lower 16 x 16 blocks of the chunk's raw Gram matrix K K^T, summed over slices of BK key columns:
    (G00, G11, G22, G33, G10, G20, G21, G30, G31, G32)."""
    i_s1, i_s2, i_s3 = i_s0 + BC, i_s0 + 2 * BC, i_s0 + 3 * BC
    b_G00 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G11 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G22 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G33 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G10 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G20 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G21 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G30 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G31 = tl.zeros([BC, BC], dtype=tl.float32)
    b_G32 = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k0 = _key_slice(p_k, i_s0, T, stride_k, i_k, K, BC, BK)
        b_k1 = _key_slice(p_k, i_s1, T, stride_k, i_k, K, BC, BK)
        b_k2 = _key_slice(p_k, i_s2, T, stride_k, i_k, K, BC, BK)
        b_k3 = _key_slice(p_k, i_s3, T, stride_k, i_k, K, BC, BK)
        b_G00 = tl.dot(b_k0, tl.trans(b_k0), b_G00, input_precision=DOT_PRECISION)
        b_G11 = tl.dot(b_k1, tl.trans(b_k1), b_G11, input_precision=DOT_PRECISION)
        b_G22 = tl.dot(b_k2, tl.trans(b_k2), b_G22, input_precision=DOT_PRECISION)
        b_G33 = tl.dot(b_k3, tl.trans(b_k3), b_G33, input_precision=DOT_PRECISION)
        b_G10 = tl.dot(b_k1, tl.trans(b_k0), b_G10, input_precision=DOT_PRECISION)
        b_G20 = tl.dot(b_k2, tl.trans(b_k0), b_G20, input_precision=DOT_PRECISION)
        b_G21 = tl.dot(b_k2, tl.trans(b_k1), b_G21, input_precision=DOT_PRECISION)
        b_G30 = tl.dot(b_k3, tl.trans(b_k0), b_G30, input_precision=DOT_PRECISION)
        b_G31 = tl.dot(b_k3, tl.trans(b_k1), b_G31, input_precision=DOT_PRECISION)
        b_G32 = tl.dot(b_k3, tl.trans(b_k2), b_G32, input_precision=DOT_PRECISION)
    return b_G00, b_G11, b_G22, b_G33, b_G10, b_G20, b_G21, b_G30, b_G31, b_G32


@triton.jit
def _inverse_stored(grams, gates, p_x, i_s0, T, HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERLEAVE: tl.constexpr, RECURSIVE: tl.constexpr):
    """From the raw Gram blocks and one value head's gates: A = beta_i r_i r_j (k_i . k_j) exp(G_i - G_j) with the
    key norms r from the Gram diagonal, X = (I + A)^-1, stored (in x_inv's dtype) at p_x."""
    b_G00, b_G11, b_G22, b_G33, b_G10, b_G20, b_G21, b_G30, b_G31, b_G32 = grams
    b_gc0, b_gc1, b_gc2, b_gc3, b_beta0, b_beta1, b_beta2, b_beta3 = gates
    i_s1, i_s2, i_s3 = i_s0 + BC, i_s0 + 2 * BC, i_s0 + 3 * BC
    dtype = p_x.dtype.element_ty
    # 1 / |k| from the Gram diagonal, by rows (with beta folded in) and by columns
    b_n0, b_m0 = _diagonal(b_G00, BC)
    b_n1, b_m1 = _diagonal(b_G11, BC)
    b_n2, b_m2 = _diagonal(b_G22, BC)
    b_n3, b_m3 = _diagonal(b_G33, BC)
    b_rb0, b_r0 = b_beta0 * tl.rsqrt(b_n0 + 1e-6), tl.rsqrt(b_m0 + 1e-6)
    b_rb1, b_r1 = b_beta1 * tl.rsqrt(b_n1 + 1e-6), tl.rsqrt(b_m1 + 1e-6)
    b_rb2, b_r2 = b_beta2 * tl.rsqrt(b_n2 + 1e-6), tl.rsqrt(b_m2 + 1e-6)
    b_rb3, b_r3 = b_beta3 * tl.rsqrt(b_n3 + 1e-6), tl.rsqrt(b_m3 + 1e-6)
    b_A00 = _scaled_block(b_G00, b_rb0, b_r0, b_gc0, b_gc0, True, BC)
    b_A11 = _scaled_block(b_G11, b_rb1, b_r1, b_gc1, b_gc1, True, BC)
    b_A22 = _scaled_block(b_G22, b_rb2, b_r2, b_gc2, b_gc2, True, BC)
    b_A33 = _scaled_block(b_G33, b_rb3, b_r3, b_gc3, b_gc3, True, BC)
    b_A10 = _scaled_block(b_G10, b_rb1, b_r0, b_gc1, b_gc0, False, BC)
    b_A20 = _scaled_block(b_G20, b_rb2, b_r0, b_gc2, b_gc0, False, BC)
    b_A21 = _scaled_block(b_G21, b_rb2, b_r1, b_gc2, b_gc1, False, BC)
    b_A30 = _scaled_block(b_G30, b_rb3, b_r0, b_gc3, b_gc0, False, BC)
    b_A31 = _scaled_block(b_G31, b_rb3, b_r1, b_gc3, b_gc1, False, BC)
    b_A32 = _scaled_block(b_G32, b_rb3, b_r2, b_gc3, b_gc2, False, BC)

    b_X00, b_X11, b_X22, b_X33, b_X10, b_X20, b_X21, b_X30, b_X31, b_X32 = _chunk_inverse(
        b_A00, b_A11, b_A22, b_A33, b_A10, b_A20, b_A21, b_A30, b_A31, b_A32, BC, DOT_PRECISION, INTERLEAVE, RECURSIVE)

    _store_rows(p_x, b_X00.to(dtype), i_s0, T, HV * BT, BC, BC, BC)
    _store_rows(p_x, b_X10.to(dtype), i_s1, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + BC, b_X11.to(dtype), i_s1, T, HV * BT, BC, BC, BC)
    _store_rows(p_x, b_X20.to(dtype), i_s2, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + BC, b_X21.to(dtype), i_s2, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + 2 * BC, b_X22.to(dtype), i_s2, T, HV * BT, BC, BC, BC)
    _store_rows(p_x, b_X30.to(dtype), i_s3, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + BC, b_X31.to(dtype), i_s3, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + 2 * BC, b_X32.to(dtype), i_s3, T, HV * BT, BC, BC, BC)
    _store_rows(p_x + 3 * BC, b_X33.to(dtype), i_s3, T, HV * BT, BC, BC, BC)


# T stays unspecialised (as in the backward): one compile for every length
@triton.jit(do_not_specialize=["T"])
def chunk_gdn_fwd_kkt_solve_kernel(
    k,  # [B, T, H, K] raw keys, token stride stride_k
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g_cumsum,  # out [B, T, HV] fp32, cumulative log decay inside each chunk
    x_inv,  # out [B, T, HV, BT]: (I + A)^-1 of each chunk, row-major, lower triangle only
    cu_seqlens,
    chunk_indices,
    T,
    stride_k,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,  # key columns per slice of the Gram sum
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERLEAVE: tl.constexpr,  # the four diagonal inverses in one loop (gdn_chunk.KKT_INTERLEAVE)
    RECURSIVE: tl.constexpr = False,  # the diagonal inverses by halving (gdn_chunk.KKT_RECURSIVE)
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
):
    # (One program per chunk and key head, making K K^T once for the group's value heads and looping them, lost on an
    # H100: 9B heads, 16k 0.676 -> 0.726 ms, 4k 0.267 -> 0.277, train 4 x 4k 3.55 -> 3.60 (2026-12-06,
    # `gpu_plan.sh 32`, `kkth`; 244-300 B spilled with the Gram blocks live across the loop). Removed.)
    tl.static_assert(BT == 4 * BC, "the block solve is written for four sub-chunks")
    i_t, i_bh = _chunk_program(HEADS_FASTEST)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    _, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    i_s0 = i_t * BT
    gates = _chunk_gates(a, b, A_log, dt_bias, g_cumsum, bos, i_h, i_s0, T, HV, BC)
    grams = _gram_blocks(k + bos * stride_k + i_hk * K, i_s0, T, stride_k, K, BC, BK, DOT_PRECISION)
    _inverse_stored(grams, gates, x_inv + bos * HV * BT + i_h * BT, i_s0, T, HV, BT, BC, DOT_PRECISION, INTERLEAVE,
                    RECURSIVE)


@triton.jit(do_not_specialize=["T"])
def chunk_gdn_wu_kernel(
    k,  # [B, T, H, K], token stride stride_k
    v,  # [B, T, HV, V], token stride stride_v
    b,  # [B, T, HV]
    g_cumsum,  # [B, T, HV] fp32
    x_inv,  # [B, T, HV, BT]: (I + A)^-1 per chunk, lower triangle
    w,  # out [B, T, HV, K]
    u,  # out [B, T, HV, V]
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_KN: tl.constexpr,
    STORE_WU: tl.constexpr = True,  # False: only the normalised keys (gdn_chunk.FOLD_WU_INTO_H makes w h, u later)
    # STORE_QN: also qn [B, T, H, K] = the L2-normalised queries times `scale`, in dtype, as the output pass rounds
    # them (for gdn_chunk.FUSED_OUTPUT's state pass); q [B, T, H, K], token stride stride_q
    STORE_QN: tl.constexpr = False,
    q=None,
    qn=None,
    stride_q=0,
    scale=1.0,
    # STORE_AQK: also aqk [B, T, HV, BT] = tril(qn k_n^T exp(G_i - G_j)) per chunk, in dtype, as the output pass
    # makes it; only its lower 16 x 16 block triangle is written (readers mask j <= i); for gdn_chunk.FUSED_OUTPUT's
    # state pass, which then does not make it in its loop
    STORE_AQK: tl.constexpr = False,
    aqk=None,
    # KEY_HEAD_PROGRAMS (only without STORE_WU): one program per chunk and key head, which normalises q and k once
    # and makes q k^T once for all HV / H value heads of the group (each with its own decay), instead of one program
    # per value head repeating both
    KEY_HEAD_PROGRAMS: tl.constexpr = False,
    # STORE_RSTD: instead of normalised copies of q and k, their rows' inverse norms rk, rq [B, T, H] fp32
    # (rq times `scale`), for the fused state pass that takes raw q, k and scales its products' rows
    # (gdn_chunk.ROW_NORMS_IN_PASS); written by each key head's first value head
    STORE_RSTD: tl.constexpr = False,
    rk=None,
    rq=None,
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
    # CHUNKS (only without STORE_WU): each program makes CHUNKS neighbouring chunks in a loop of STAGES stages, so the
    # next chunk's q, k loads are in flight while this one's products and stores run; the grid's chunk axis is then
    # cdiv(num_chunks, CHUNKS) (num_chunks: the grid's chunks at CHUNKS = 1; a program past the end repeats the last)
    CHUNKS: tl.constexpr = 1,
    STAGES: tl.constexpr = 2,
    num_chunks=1,
):
    """w = X (beta k_n exp(G)) and u = X (beta v) for one chunk and value head from the stored X: the forward's
    second prepare kernel (with STORE_KN, for the state pass) and the backward's recomputation of w, u."""
    tl.static_assert(not (KEY_HEAD_PROGRAMS and STORE_WU), "KEY_HEAD_PROGRAMS makes no w, u")
    tl.static_assert(CHUNKS == 1 or not STORE_WU, "CHUNKS > 1 makes no w, u")
    G: tl.constexpr = HV // H
    i_p, i_bh = _chunk_program(HEADS_FASTEST)
    if KEY_HEAD_PROGRAMS:
        i_b, i_hk = i_bh // H, i_bh % H
        i_h = i_hk * G  # the group's first value head
    else:
        i_b, i_h = i_bh // HV, i_bh % HV
        i_hk = i_h // G
    if CHUNKS == 1:
        _wu_chunk(i_p, i_b, i_h, i_hk, k, v, b, g_cumsum, x_inv, w, u, kn, cu_seqlens, chunk_indices, T, stride_k,
                  stride_v, H, HV, K, V, BT, BK, BV, IS_VARLEN, DOT_PRECISION, STORE_KN, STORE_WU, STORE_QN, q, qn,
                  stride_q, scale, STORE_AQK, aqk, KEY_HEAD_PROGRAMS, STORE_RSTD, rk, rq)
    else:
        for i_c in tl.range(0, CHUNKS, num_stages=STAGES):
            i_t = tl.minimum(i_p * CHUNKS + i_c, num_chunks - 1)
            _wu_chunk(i_t, i_b, i_h, i_hk, k, v, b, g_cumsum, x_inv, w, u, kn, cu_seqlens, chunk_indices, T,
                      stride_k, stride_v, H, HV, K, V, BT, BK, BV, IS_VARLEN, DOT_PRECISION, STORE_KN, STORE_WU,
                      STORE_QN, q, qn, stride_q, scale, STORE_AQK, aqk, KEY_HEAD_PROGRAMS, STORE_RSTD, rk, rq)


@triton.jit
def _wu_chunk(i_t, i_b, i_h, i_hk, k, v, b, g_cumsum, x_inv, w, u, kn, cu_seqlens, chunk_indices, T, stride_k,
              stride_v, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
              STORE_KN: tl.constexpr, STORE_WU: tl.constexpr, STORE_QN: tl.constexpr, q, qn, stride_q, scale,
              STORE_AQK: tl.constexpr, aqk, KEY_HEAD_PROGRAMS: tl.constexpr, STORE_RSTD: tl.constexpr, rk, rq):
    """`chunk_gdn_wu_kernel`'s work on chunk i_t (of the grid's chunk axis) for batch row i_b, value head i_h."""
    G: tl.constexpr = HV // H
    _, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = k.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    # the forward's roundings: k normalised in fp32, stored in dtype, scaled in fp32, stored in dtype
    b_k, b_rk = _l2norm_rows_rsqrt(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK))
    b_k = b_k.to(dtype)
    if STORE_KN:
        if i_h % G == 0:
            _store_rows(kn + bos * H * K + i_hk * K, b_k, i_s, T, H * K, K, BT, BK)
    if STORE_RSTD:
        if i_h % G == 0:
            tl.store(rk + (bos + o_t) * H + i_hk, b_rk, mask=m_t)
    if STORE_QN or STORE_AQK:
        b_q, b_rq = _l2norm_rows_rsqrt(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK))
        b_q = (b_q * scale).to(dtype)
        if STORE_QN:
            if i_h % G == 0:
                _store_rows(qn + bos * H * K + i_hk * K, b_q, i_s, T, H * K, K, BT, BK)
        if STORE_RSTD:
            if i_h % G == 0:
                tl.store(rq + (bos + o_t) * H + i_hk, b_rq * scale, mask=m_t)
    if STORE_AQK:
        o_j = tl.arange(0, BT)
        m_A = (o_j[:, None] >= o_j[None, :]) & m_t[:, None]
        # only the lower 16 x 16 block triangle is stored (its zeros above the diagonal included, so each row writes
        # whole 32-byte sectors): the blocks above it are never read, their sectors never written
        m_store = (o_j[None, :] // 16 <= o_j[:, None] // 16) & m_t[:, None]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        for i_g in tl.static_range(G if KEY_HEAD_PROGRAMS else 1):
            b_gq = tl.load(g_cumsum + bos * HV + i_h + i_g + o_t * HV, mask=m_t, other=0.)
            b_A = tl.where(m_A, b_qk * tl.exp(tl.where(m_A, b_gq[:, None] - b_gq[None, :], 0.)), 0.)
            p_A = aqk + bos * HV * BT + (i_h + i_g) * BT + o_t[:, None].to(tl.int64) * (HV * BT) + o_j[None, :]
            tl.store(p_A, b_A.to(aqk.dtype.element_ty), mask=m_store)
    if STORE_WU:
        o_i = tl.arange(0, BT)
        b_X = tl.load(x_inv + bos * HV * BT + i_h * BT + o_t[:, None] * (HV * BT) + o_i[None, :],
                      mask=(o_i[:, None] >= o_i[None, :]) & m_t[:, None], other=0.)  # [BT, BT]
        b_gc = tl.load(g_cumsum + bos * HV + i_h + o_t * HV, mask=m_t, other=0.)
        b_beta = tl.where(m_t, tl.sigmoid(tl.load(b + bos * HV + i_h + o_t * HV, mask=m_t, other=0.).to(tl.float32)),
                          0.)
        b_kbg = (b_k.to(tl.float32) * (b_beta * tl.exp(b_gc))[:, None]).to(dtype)
        _store_rows(w + bos * HV * K + i_h * K, tl.dot(b_X, b_kbg, input_precision=DOT_PRECISION), i_s, T, HV * K,
                    K, BT, BK)
        p_v = v + bos * stride_v + i_h * V
        p_u = u + bos * HV * V + i_h * V
        for i_v in range(0, tl.cdiv(V, BV)):
            b_vb = (_load_rows(p_v + i_v * BV, i_s, T, stride_v, V - i_v * BV, BT, BV).to(tl.float32)
                    * b_beta[:, None])
            b_u = tl.dot(b_X, b_vb.to(dtype), input_precision=DOT_PRECISION)
            _store_rows(p_u + i_v * BV, b_u, i_s, T, HV * V, V - i_v * BV, BT, BV)
