"""The GDN forward's state pass (`gdn_chunk` step 2): `chunk_gdn_fwd_h_kernel`, sequential over the chunks of a
sequence, parallel over heads and V blocks; `gdn_chunk._chunk_gdn_fwd` and `gdn_chunk_bwd` launch it (through
`gdn_chunk.state_pass_kernel`), `gdn_cp` runs it over segments. Its options are documented where they are chosen,
in `gdn_chunk`."""
from __future__ import annotations

import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_common import _l2norm_rows, _load_rows, _row_factors, _store_rows


@triton.jit
def _block_tril_tile(p, bos, i_t, T, HV: tl.constexpr, BT: tl.constexpr, i_h):
    """Chunk i_t's [BT, BT] tile of a [B, T, HV, BT] tensor (X or q k^T, lower triangular, stored as its lower 16 x 16
    block triangle with zeros above the diagonal) under that block triangle: zeros above it and past T."""
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = tl.arange(0, BT)
    m = (o_t[:, None] < T) & (o_c[None, :] // 16 <= o_c[:, None] // 16)
    return tl.load(p + (bos + o_t[:, None]).to(tl.int64) * (HV * BT) + i_h * BT + o_c[None, :], mask=m, other=0.)


@triton.jit
def _beta_rows(b, bos, i_t, T, HV: tl.constexpr, BT: tl.constexpr, i_h):
    """sigmoid(b) for chunk i_t's rows, fp32 (0 past T)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    return tl.where(m_t, tl.sigmoid(tl.load(b + (bos + o_t) * HV + i_h, mask=m_t, other=0.).to(tl.float32)), 0.)


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
    FOLD_WU: tl.constexpr = False,  # v_new = X (beta (v - exp(G) k h)) from X, v, b instead of u - w h (w, u unused)
    x_inv=None,  # [B, T, HV, BT] if FOLD_WU: (I + A)^-1 of each chunk, lower triangle
    v=None,  # [B, T, HV, V] if FOLD_WU, token stride stride_v
    b=None,  # [B, T, HV] raw if FOLD_WU
    stride_v=0,
    # the context-parallel passes (`gdn_cp`): STORE_H False stores neither h nor v_new (only the final state);
    # ZERO_U takes u = 0 (v = 0 with FOLD_WU) and IDENTITY_INIT starts from the identity, so the pass makes a
    # segment's 128 x 128 transition; first_chunk [N, HV] int32: the chunk each program starts at (h = 0 or I there)
    STORE_H: tl.constexpr = True,
    ZERO_U: tl.constexpr = False,
    IDENTITY_INIT: tl.constexpr = False,
    HAS_FIRST_CHUNK: tl.constexpr = False,
    first_chunk=None,
    FINAL_SLOT: tl.constexpr = False,  # final_slot [N] int32: where program row i_n's final state goes (-1: nowhere)
    final_slot=None,
    # FUSED_O: the output pass inside this one (`FUSED_OUTPUT`): per chunk o = (q exp(G)) h + tril(q k^T
    # exp(G_i - G_j)) v_new for this V block, from the state and v_new in registers, so h and v_new need no round
    # trip through memory (pass STORE_H False); q [B, T, H, K] (token stride stride_q), o [B, T, HV, V]; with
    # Q_NORMED q arrives L2-normalised and scaled in dtype (the w/u kernel's STORE_QN), else raw
    FUSED_O: tl.constexpr = False,
    Q_NORMED: tl.constexpr = False,
    A_GIVEN: tl.constexpr = False,  # aqk [B, T, HV, BT]: the decayed causal q k^T per chunk (w/u kernel's STORE_AQK)
    aqk=None,
    q=None,
    o=None,
    scale=1.0,
    stride_q=0,
    # ROW_NORMS (`ROW_NORMS_IN_PASS`): k (and with FUSED_O q) arrive raw, and their rows' inverse norms rk (rq, times
    # the scale) [B, T, H] fp32 scale the products' rows: (k_n h) = diag(rk) (k h), k_n^T v = k^T (diag(rk) v),
    # (q_n h) scale = diag(rq) (q h); each factor joins a row vector the step already applies (the decays)
    ROW_NORMS: tl.constexpr = False,
    rk=None,
    rq=None,
    # PREFETCH_ROWS (`STATE_PASS_PREFETCH_ROWS`): each step loads the next chunk's G (and norms) and makes its row
    # factors, so the step's own come from registers instead of loads on the state's chain
    PREFETCH_ROWS: tl.constexpr = False,
    # PREFETCH_TILES (`STATE_PASS_PREFETCH_TILES`, with FOLD_WU): X and beta (and with A_GIVEN the q k^T tile) of the
    # next chunk are loaded during each step, right after this chunk's have gone into their products, under the 16 x 16
    # block triangle (whole 16-byte vectors) instead of the element triangle (2-byte loads issued on the chain)
    PREFETCH_TILES: tl.constexpr = False,
    PREFETCH_KV: tl.constexpr = False,
):
    tl.static_assert(not (ROW_NORMS and NORM_K), "ROW_NORMS takes raw keys with their norms given")
    tl.static_assert(not (ROW_NORMS and FUSED_O and not A_GIVEN), "ROW_NORMS with FUSED_O takes q k^T given")
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
    dtype = k.dtype.element_ty

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if IDENTITY_INIT:
        b_h = tl.where(o_k[:, None] == o_v[None, :], 1., b_h)
    if USE_INITIAL_STATE:
        b_h += tl.load(initial_state + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    i_t0 = 0
    if HAS_FIRST_CHUNK:
        i_t0 = tl.load(first_chunk + i_nh)

    p_k = k + bos * stride_k + i_hk * K
    if FOLD_WU:
        if not ZERO_U:
            p_v = v + bos * stride_v + i_h * V + i_v * BV
        o_c = tl.arange(0, BT)
    else:
        p_w = w + bos * HV * K + i_h * K
        if not ZERO_U:
            p_u = u + bos * HV * V + i_h * V + i_v * BV
    if STORE_H:
        p_vn = v_new + bos * HV * V + i_h * V + i_v * BV
    p_gc = g_cumsum + bos * HV + i_h
    if FUSED_O:
        p_q = q + bos * stride_q + i_hk * K
        p_o = o + bos * HV * V + i_h * V + i_v * BV
        o_i = tl.arange(0, BT)
    if PREFETCH_ROWS:
        f_gc, f_kh, f_up, f_q, f_last = _row_factors(p_gc, rk, rq, bos, i_t0, T, H, HV, BT, i_hk, ROW_NORMS, FUSED_O)
    prefetch_a: tl.constexpr = PREFETCH_TILES and FUSED_O and A_GIVEN
    # PREFETCH_KV (with FOLD_WU): k and v of the next chunk loaded into registers during each step (not through the
    # pipeliner, which issues step t + 1's copies at the end of step t and waits for them at once), and with q k^T
    # given (ROW_NORMS or Q_NORMED q) the output made last, so the wait for q's copy comes after the state's chain
    late_q: tl.constexpr = PREFETCH_KV and FUSED_O and A_GIVEN and (ROW_NORMS or Q_NORMED)
    if PREFETCH_KV:
        tl.static_assert(FOLD_WU, "PREFETCH_KV takes v from the fold")
    if PREFETCH_TILES:
        tl.static_assert(FOLD_WU, "PREFETCH_TILES takes X from the fold")
        f_X = _block_tril_tile(x_inv, bos, i_t0, T, HV, BT, i_h)
        f_beta = _beta_rows(b, bos, i_t0, T, HV, BT, i_h)
    if prefetch_a:
        f_A = _block_tril_tile(aqk, bos, i_t0, T, HV, BT, i_h)
    if PREFETCH_KV:
        f_k = _load_rows(p_k, i_t0 * BT, T, stride_k, K, BT, BK)
        if not ZERO_U:
            f_vr = _load_rows(p_v, i_t0 * BT, T, stride_v, V - i_v * BV, BT, BV)
    for i_t in range(i_t0, NT):
        b_hd = b_h.to(dtype)  # the state entering the chunk as the dot and the output pass take it
        if STORE_H:
            tl.store(h + ((boh + i_t) * HV + i_h) * K * V + o_kv, b_hd, mask=m_kv)
        i_s = i_t * BT
        o_t = i_s + tl.arange(0, BT)
        m_t = o_t < T
        if PREFETCH_ROWS:  # this chunk's row factors were loaded during the last step; load the next chunk's
            b_gc, b_kh_scale, b_update_scale, b_q_scale, b_last_decay = f_gc, f_kh, f_up, f_q, f_last
            f_gc, f_kh, f_up, f_q, f_last = _row_factors(p_gc, rk, rq, bos, i_t + 1, T, H, HV, BT, i_hk, ROW_NORMS,
                                                         FUSED_O)
        else:
            b_gc, b_kh_scale, b_update_scale, b_q_scale, b_last_decay = _row_factors(p_gc, rk, rq, bos, i_t, T, H,
                                                                                     HV, BT, i_hk, ROW_NORMS, FUSED_O)
        if PREFETCH_KV:
            b_k = f_k
            f_k = _load_rows(p_k, i_s + BT, T, stride_k, K, BT, BK)
        else:
            b_k = _load_rows(p_k, i_s, T, stride_k, K, BT, BK)
        if NORM_K:
            b_k = _l2norm_rows(b_k).to(dtype)
        if FUSED_O and not late_q:  # the products that need no v_new first: off the chain through the update
            b_q = _load_rows(p_q, i_s, T, stride_q, K, BT, BK)
            if not ROW_NORMS and not Q_NORMED:
                b_q = (_l2norm_rows(b_q) * scale).to(dtype)
            b_o = tl.dot(b_q, b_hd, input_precision=DOT_PRECISION) * b_q_scale[:, None]
        if FUSED_O:
            if prefetch_a:
                b_A = f_A
            elif A_GIVEN:
                b_A = tl.load(aqk + (bos + o_t[:, None]).to(tl.int64) * (HV * BT) + i_h * BT + o_i[None, :],
                              mask=m_t[:, None] & (o_i[:, None] >= o_i[None, :]), other=0.)
            else:
                b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
                # causal, rows past T zeroed (their G is 0 here, so exp(G_i - G_j) could overflow there)
                m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
                b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_gc[:, None] - b_gc[None, :], 0.)), 0.).to(dtype)
        if FOLD_WU:  # w h = X (beta exp(G) (k h)) and u = X (beta v), so v_new = X (beta (v - exp(G) (k h)))
            if PREFETCH_TILES:
                b_X, b_beta = f_X, f_beta
            else:
                b_X = tl.load(x_inv + (bos + o_t[:, None]).to(tl.int64) * (HV * BT) + i_h * BT + o_c[None, :],
                              mask=m_t[:, None] & (o_c[:, None] >= o_c[None, :]), other=0.)
                b_beta = _beta_rows(b, bos, i_t, T, HV, BT, i_h)
            b_r = -tl.dot(b_k, b_hd, input_precision=DOT_PRECISION) * b_kh_scale[:, None]
            if not ZERO_U:
                if PREFETCH_KV:
                    b_r += f_vr.to(tl.float32)
                    f_vr = _load_rows(p_v, i_s + BT, T, stride_v, V - i_v * BV, BT, BV)
                else:
                    b_r += _load_rows(p_v, i_s, T, stride_v, V - i_v * BV, BT, BV).to(tl.float32)
            b_v = tl.dot(b_X, (b_r * b_beta[:, None]).to(dtype), input_precision=DOT_PRECISION)
            if PREFETCH_TILES:  # the next chunk's, in flight until the next step needs them
                f_X = _block_tril_tile(x_inv, bos, i_t + 1, T, HV, BT, i_h)
                f_beta = _beta_rows(b, bos, i_t + 1, T, HV, BT, i_h)
        else:
            b_w = _load_rows(p_w, i_s, T, HV * K, K, BT, BK)  # [BT, BK]
            b_v = -tl.dot(b_w, b_hd, input_precision=DOT_PRECISION)
            if not ZERO_U:
                b_v += _load_rows(p_u, i_s, T, HV * V, V - i_v * BV, BT, BV).to(tl.float32)
        if STORE_H:
            _store_rows(p_vn, b_v, i_s, T, HV * V, V - i_v * BV, BT, BV)
        if FUSED_O and not late_q:  # v_new rounded to the input dtype, as the output pass reads it back
            b_o += tl.dot(b_A, b_v.to(dtype), input_precision=DOT_PRECISION)
            if prefetch_a:
                f_A = _block_tril_tile(aqk, bos, i_t + 1, T, HV, BT, i_h)
            _store_rows(p_o, b_o, i_s, T, HV * V, V - i_v * BV, BT, BV)

        # S <- exp(G_last) S + (k exp(G_last - G))^T v_new
        if late_q:
            b_vd = b_v.to(dtype)
        b_v = tl.where(m_t[:, None], b_v * b_update_scale[:, None], 0.).to(dtype)
        b_h = b_h * b_last_decay + tl.dot(tl.trans(b_k), b_v, input_precision=DOT_PRECISION)
        if late_q:  # the output last, from the state that entered the chunk: q's copy has had the step to land
            b_q = _load_rows(p_q, i_s, T, stride_q, K, BT, BK)
            b_o = tl.dot(b_q, b_hd, input_precision=DOT_PRECISION) * b_q_scale[:, None]
            b_o += tl.dot(b_A, b_vd, input_precision=DOT_PRECISION)
            if prefetch_a:
                f_A = _block_tril_tile(aqk, bos, i_t + 1, T, HV, BT, i_h)
            _store_rows(p_o, b_o, i_s, T, HV * V, V - i_v * BV, BT, BV)

    if STORE_FINAL_STATE:
        if FINAL_SLOT:
            i_f = tl.load(final_slot + i_n)
            if i_f >= 0:
                tl.store(final_state + (i_f * HV + i_h).to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)
        else:
            tl.store(final_state + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)
