"""The GDN prepare step in phases (behind `gdn_chunk.PHASED_PREPARE`, off): the same outputs as
`gdn_chunk.chunk_gdn_fwd_prepare_kernel`, with (I + A)^-1 built one block diagonal at a time in a private fp32
scratch, so that few 16x16 blocks are live at once (80 registers at 9B heads offline, against 255 with spills).

Measured on the H100 and why it is still off: `gdn_chunk.py`'s note above PHASED_PREPARE and benchmarks/NOTES.md.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_chunk import _chunk_bounds, _gates, _kkt_block, _load_rows, _mm, _store_rows


@triton.jit
def _a_block(p_s, i, j, BT: tl.constexpr, BC: tl.constexpr):
    """Block (i, j), i > j, of A from the phased kernel's scratch, where A lies transposed (A[r, c] at [c, r])."""
    o_c = tl.arange(0, BC)
    return tl.load(p_s + (j * BC + o_c[None, :]) * BT + i * BC + o_c[:, None])


@triton.jit
def _x_block(p_s, i, j, BT: tl.constexpr, BC: tl.constexpr):
    """Block (i, j), i >= j, of X = (I + A)^-1 from the phased kernel's scratch, where X lies as it is."""
    o_c = tl.arange(0, BC)
    return tl.load(p_s + (i * BC + o_c[:, None]) * BT + j * BC + o_c[None, :])


@triton.jit
def _put_x_block(p_s, b_x, i, j, BT: tl.constexpr, BC: tl.constexpr):
    o_c = tl.arange(0, BC)
    tl.store(p_s + (i * BC + o_c[:, None]) * BT + j * BC + o_c[None, :], b_x)


@triton.jit
def _diagonal_inverses(p_s, BT: tl.constexpr, BC: tl.constexpr):
    """(I + A_dd)^-1 of all BT // BC diagonal blocks at once by `_unit_lower_inverse`'s forward substitution, the
    blocks side by side (BC - 1 steps instead of BT - BT // BC), each step reading row i of every block from the
    scratch (A transposed: A_dd[i, j] at [d BC + j, d BC + i]). Returned transposed, [BT // BC, BC (col), BC (row)]
    fp32: the sum over rows then runs along the fastest axis, inside a warp (no shared memory, no barrier)."""
    NC: tl.constexpr = BT // BC
    o_d = tl.arange(0, NC)
    o_c = tl.arange(0, BC)
    b_Xt = tl.zeros([NC, BC, BC], dtype=tl.float32) + tl.where(o_c[:, None] == o_c[None, :], 1., 0.)[None, :, :]
    p_row = p_s + (o_d[:, None] * BC + o_c[None, :]) * BT + o_d[:, None] * BC  # + i: row i of each block, [NC, BC]
    for i in tl.static_range(1, BC):  # unrolled: the row loads do not wait for the steps before them
        b_row = tl.load(p_row + i, mask=o_c[None, :] < i, other=0.)  # A_dd[i, :], zero from the diagonal on
        # X[i, :] = e_i - sum_{j < i} A[i, j] X[j, :]; rows j < i are final already
        b_new = tl.where(o_c == i, 1., 0.)[None, :] - tl.sum(b_row[:, None, :] * b_Xt, axis=2)
        b_Xt = tl.where(o_c[None, None, :] == i, b_new[:, :, None], b_Xt)
    return b_Xt


@triton.jit
def chunk_gdn_fwd_prepare_phased_kernel(
    k,  # [B, T, H, K], token stride stride_k
    v,  # [B, T, HV, V], token stride stride_v
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] fp32
    dt_bias,  # [HV] fp32
    g_cumsum,  # out [B, T, HV] fp32, cumulative log decay inside each chunk
    w,  # out [B, T, HV, K] if STORE_WU
    u,  # out [B, T, HV, V] if STORE_WU
    x_inv,  # out [B, T, HV, BT] if STORE_X: (I + A)^-1 of each chunk, row-major, lower block triangle only
    kn,  # out [B, T, H, K] if STORE_KN: the L2-normalised keys (written by each key head's first value head)
    scratch,  # [NT, HV, BT, BT] fp32, one private BT x BT matrix per program (chunk, value head)
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
    BW: tl.constexpr,  # w and u are made BW columns at a time
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_X: tl.constexpr,
    STORE_KN: tl.constexpr,
    STORE_WU: tl.constexpr,
):
    """`chunk_gdn_fwd_prepare_kernel`'s outputs with few registers live at a time. The fused kernel holds the k
    sub-blocks and all ten 16x16 A and X blocks at once, and each "ieee" (FMA) block product needs its operands
    spread to whole rows and columns per thread: 255 registers and spills, even with w and u moved out. Here the
    whole-chunk A comes from one dot and goes to a private fp32 scratch (in L2 while the program runs); X is
    built there in phases separated by barriers (the diagonal blocks together, then one block diagonal of X per
    phase, each block product from operands loaded just before it); w and u are made BW columns at a time from X
    and the keys read again. The same fp32 formulas as the fused kernel; the sums differ only in order (G is one
    cumulative sum over the chunk, w and u one dot over it), so results agree to rounding."""
    tl.static_assert(BT % BC == 0, "the chunk is a whole number of sub-chunks")
    NC: tl.constexpr = BT // BC
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = k.dtype.element_ty

    p_k = k + bos * stride_k + i_hk * K
    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    b_g, b_beta = _gates(a + bos * HV + i_h, b + bos * HV + i_h, tl.exp(tl.load(A_log + i_h).to(tl.float32)),
                         tl.load(dt_bias + i_h).to(tl.float32), i_s, T, HV, BT)
    b_gc = tl.cumsum(b_g, axis=0)
    tl.store(g_cumsum + (bos + o_t) * HV + i_h, b_gc, mask=m_t)

    # A = strictly-lower(beta k k^T * D) for the whole chunk; 1 / |k| per row is kept for w
    b_k = _load_rows(p_k, i_s, T, stride_k, K, BT, BK).to(tl.float32)
    b_rnorm = tl.rsqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)  # as `_l2norm_rows`
    b_k *= b_rnorm[:, None]
    if STORE_KN:
        if i_h % (HV // H) == 0:
            _store_rows(kn + bos * H * K + i_hk * K, b_k, i_s, T, H * K, K, BT, BK)
    b_A = _kkt_block((b_k * b_beta[:, None]).to(dtype), b_k.to(dtype), b_gc, b_gc, True, BT, DOT_PRECISION)
    o_i = tl.arange(0, BT)
    p_s = scratch + (i_tg * HV + i_h) * BT * BT
    # stored transposed: A fills the upper triangle and leaves the lower one (and the diagonal blocks) for X
    tl.store(p_s + o_i[None, :] * BT + o_i[:, None], b_A)
    tl.debug_barrier()

    # X = (I + A)^-1: the diagonal blocks by forward substitution (in place: every thread is past its reads of
    # A_dd at the barrier), then X_ij = -X_ii sum_{j <= m < i} A_im X_mj one block diagonal i - j at a time
    b_Xt = _diagonal_inverses(p_s, BT, BC)  # [NC, BC, BC], X_dd[j, c] at [d, c, j]
    tl.debug_barrier()
    o_d = tl.arange(0, NC)[:, None, None]
    o_c = tl.arange(0, BC)
    tl.store(p_s + (o_d * BC + o_c[None, None, :]) * BT + o_d * BC + o_c[None, :, None], b_Xt)
    tl.debug_barrier()
    for i_dist in tl.static_range(1, NC):
        for i_i in tl.static_range(i_dist, NC):
            b_Y = _mm(_a_block(p_s, i_i, i_i - i_dist, BT, BC), _x_block(p_s, i_i - i_dist, i_i - i_dist, BT, BC))
            for i_m in tl.static_range(i_i - i_dist + 1, i_i):
                b_Y += _mm(_a_block(p_s, i_i, i_m, BT, BC), _x_block(p_s, i_m, i_i - i_dist, BT, BC))
            _put_x_block(p_s, -_mm(_x_block(p_s, i_i, i_i, BT, BC), b_Y), i_i, i_i - i_dist, BT, BC)
        tl.debug_barrier()

    # X is the lower block triangle of the scratch
    m_X = (o_i[:, None] // BC) >= (o_i[None, :] // BC)
    b_X = tl.load(p_s + o_i[:, None] * BT + o_i[None, :], mask=m_X, other=0.).to(dtype)
    if STORE_X:  # kept for the backward's WY gradient (gdn_chunk_bwd.py) or the w/u kernel
        p_x = x_inv + (bos + o_t[:, None]) * (HV * BT) + i_h * BT + o_i[None, :]
        tl.store(p_x, b_X, mask=m_t[:, None] & m_X)
    if STORE_WU:
        # w = X (beta k exp(G)) with k normalised again as above (k rounded to dtype first, as the fused kernel)
        b_kscale = b_beta * tl.exp(b_gc)
        p_w = w + bos * HV * K + i_h * K
        for i_c in tl.static_range(0, (K + BW - 1) // BW):
            b_kc = (_load_rows(p_k + i_c * BW, i_s, T, stride_k, K - i_c * BW, BT, BW).to(tl.float32)
                    * b_rnorm[:, None]).to(dtype)
            b_kg = (b_kc.to(tl.float32) * b_kscale[:, None]).to(dtype)
            _store_rows(p_w + i_c * BW, tl.dot(b_X, b_kg, input_precision=DOT_PRECISION), i_s, T, HV * K,
                        K - i_c * BW, BT, BW)
        # u = X (beta v)
        p_v = v + bos * stride_v + i_h * V
        p_u = u + bos * HV * V + i_h * V
        for i_c in tl.static_range(0, (V + BW - 1) // BW):
            b_vc = _load_rows(p_v + i_c * BW, i_s, T, stride_v, V - i_c * BW, BT, BW).to(tl.float32)
            b_vb = (b_vc * b_beta[:, None]).to(dtype)
            _store_rows(p_u + i_c * BW, tl.dot(b_X, b_vb, input_precision=DOT_PRECISION), i_s, T, HV * V,
                        V - i_c * BW, BT, BW)
