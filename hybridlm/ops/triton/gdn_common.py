"""Helpers shared by the chunked GDN kernels (`gdn_chunk`, `gdn_prepare`, `gdn_prepare_kkt`, `gdn_chunk_bwd`,
`gdn_bwd_wy`): row loads and stores, the L2 norm and the gates in the reference's form, a chunk's place in a packed
batch and its log decay, the state pass's row factors. They are inlined into the kernels that call them."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(p, i_s, T, stride, D, BR: tl.constexpr, BD: tl.constexpr):
    """Rows i_s .. i_s + BR of a [T, D] view with row stride `stride` (zeros past T or D), in storage dtype."""
    o_r = i_s + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < T) & (o_d[None, :] < D)
    return tl.load(p + o_r[:, None].to(tl.int64) * stride + o_d[None, :], mask=m, other=0.)


@triton.jit
def _chunk_program(HEADS_FASTEST: tl.constexpr):
    """(chunk, batch x head) of this program: from a grid (chunks, B x heads), or with HEADS_FASTEST from a grid
    (B x heads, chunks), whose neighbouring programs are the heads of one chunk: the value heads of one key head then
    run side by side and read its key (and query) rows of the chunk once from memory, the rest from L2."""
    if HEADS_FASTEST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


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
def _l2norm_rows_rsqrt(b_x):
    """`_l2norm_rows(b_x)` (the same operations) and the rows' rsqrt(sum(x^2) + 1e-6), both fp32."""
    b_x = b_x.to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)
    return b_x * b_r[:, None], b_r


@triton.jit
def _l2norm_bwd(b_x, b_dn):
    """The gradient of x given dn, the gradient of n = l2norm(x) = x r with r = rsqrt(sum(x^2) + 1e-6):
    r (dn - n (n . dn)) per row, in fp32."""
    b_n, b_r = _l2norm_rows_rsqrt(b_x)
    b_dn = b_dn.to(tl.float32)
    return (b_dn - b_n * tl.sum(b_n * b_dn, axis=1)[:, None]) * b_r[:, None]


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
def _chunk_log_decay(p_gc, i_s, T, HV: tl.constexpr, BT: tl.constexpr):
    """G of the chunk's rows, rows past T holding the last row's G (as the forward's prepare kernel has them): then
    every exp(G_i - G_j) with i >= j is at most 1 even where a padded row i meets a real row j. (With 0 there, a
    strongly decaying chunk, G < -88, overflows to inf and 0 * inf poisons the real rows.)"""
    o_t = i_s + tl.arange(0, BT)
    b_gc = tl.load(p_gc + o_t * HV, mask=o_t < T, other=0.)
    return tl.where(o_t < T, b_gc, tl.load(p_gc + (tl.minimum(i_s + BT, T) - 1) * HV))


@triton.jit
def _row_factors(p_gc, rk, rq, bos, i_t, T, H: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr, i_hk,
                 ROW_NORMS: tl.constexpr, FUSED_O: tl.constexpr):
    """A chunk's row factors in the state pass: G (rows past T: 0), exp(G) for the rows of k h and q h, exp(G_last -
    G) for the rows of v_new in the update, each times 1 / |k| (q h: scale / |q|) with ROW_NORMS, and exp(G_last).
    Past the sequence's last chunk (a prefetch) every row is masked and G_last is the last token's."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_g_last = tl.load(p_gc + (tl.minimum(i_t * BT + BT, T) - 1) * HV)
    b_gc = tl.load(p_gc + o_t * HV, mask=m_t, other=0.)
    b_kh = tl.exp(b_gc)
    b_update = tl.exp(b_g_last - b_gc)
    b_q = tl.exp(b_gc)
    if ROW_NORMS:
        b_rk = tl.load(rk + (bos + o_t) * H + i_hk, mask=m_t, other=0.)
        b_kh = b_kh * b_rk
        b_update = b_update * b_rk
        if FUSED_O:
            b_q = b_q * tl.load(rq + (bos + o_t) * H + i_hk, mask=m_t, other=0.)
    return b_gc, b_kh, b_update, b_q, tl.exp(b_g_last)
