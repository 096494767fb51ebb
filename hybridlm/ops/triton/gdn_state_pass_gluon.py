"""The fused, folded state pass (`gdn_state_pass.chunk_gdn_fwd_h_kernel` with FOLD_WU, FUSED_O and A_GIVEN: the
cut's main pass with ROW_NORMS and segment tables, or the uncut pass over rows or packed sequences with q and k
normalised beforehand) written in Gluon (`triton.experimental.gluon`), so that the loop places its own copies and
waits: `gdn_chunk.STATE_PASS_GLUON` (off; GPU-tested against the Triton pass, the interpreter does not run Gluon).

Per chunk step, for chunk t of a segment (4 warps, one value head, a block of BV value columns):
1. the asynchronous copies of chunk t + 1's k and q go out first, into the other of two buffers, and its v, X, q k^T,
   gates and row norms are loaded into registers: all of it lands while this step computes (Triton's pipeliner
   issues them at the end of the step before and waits at once);
2. k h and q h go to the tensor cores together (one wait), then X (beta (v - exp(G) (k h) / |k|)) = v_new;
3. the update S <- exp(G_last) S + (k exp(G_last - G) / |k|)^T v_new and the output
   o = (q h) exp(G) scale / |q| + (q k^T) v_new go together (one wait).
Three waits a step where the Triton pass has five, and no global load on the state's chain.

Imported only where the option is on: Gluon's interface is still experimental (written against Triton 3.6).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _rows(p, bos, i_t, T, stride, BT: gl.constexpr, layout: gl.constexpr):
    """[BT] values p[(bos + i) * stride] of chunk i_t's rows, fp32, 0 past T."""
    o_t = i_t * BT + gl.arange(0, BT, layout=layout)
    return gl.load(p + (bos + o_t).to(gl.int64) * stride, mask=o_t < T, other=0.).to(gl.float32)


@gluon.jit
def _tile(p, bos, i_t, T, stride, D, BT: gl.constexpr, BD: gl.constexpr, layout: gl.constexpr,
          BLOCK_TRIL: gl.constexpr = False):
    """Chunk i_t's [BT, BD] rows of a [T, D] view with token stride `stride` (0 past T or D), into registers; with
    BLOCK_TRIL only the lower 16 x 16 block triangle (where X and q k^T are stored; whole 16-byte vectors)."""
    o_r = gl.arange(0, BT, layout=gl.SliceLayout(1, layout))
    o_t = i_t * BT + o_r
    o_d = gl.arange(0, BD, layout=gl.SliceLayout(0, layout))
    m = (o_t[:, None] < T) & (o_d[None, :] < D)
    if BLOCK_TRIL:
        m = m & (o_d[None, :] // 16 <= o_r[:, None] // 16)
    return gl.load(p + (bos + o_t[:, None]).to(gl.int64) * stride + o_d[None, :], mask=m, other=0.)


@gluon.jit
def _copy_tile(smem, p, bos, i_t, T, stride, BT: gl.constexpr, BD: gl.constexpr, layout: gl.constexpr):
    """Chunk i_t's [BT, BD] rows (zeros past T) copied asynchronously into `smem` (no commit)."""
    o_t = i_t * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, layout))
    o_d = gl.arange(0, BD, layout=gl.SliceLayout(0, layout))
    cp.async_copy_global_to_shared(smem, p + (bos + o_t[:, None]).to(gl.int64) * stride + o_d[None, :],
                                   mask=(o_t[:, None] < T) & (o_d[None, :] >= 0))


@gluon.jit
def gdn_fused_pass_gluon_kernel(
    k,  # [B, T, H, K] raw, token stride stride_k
    q,  # [B, T, H, K] raw, token stride stride_q
    v,  # [B, T, HV, V], token stride stride_v
    b,  # [B, T, HV] raw beta
    g_cumsum,  # [B, T, HV] fp32, cumulative within each chunk
    x_inv,  # [B, T, HV, BT]: (I + A)^-1 per chunk, its lower 16 x 16 block triangle stored
    aqk,  # [B, T, HV, BT]: the decayed causal q_n k_n^T scale per chunk, stored alike
    rk,  # [B, T, H] fp32: 1 / |k| per row (ROW_NORMS)
    rq,  # [B, T, H] fp32: scale / |q| per row (ROW_NORMS)
    o,  # out [B, T, HV, V]
    initial_state,  # [N, HV, K, V] fp32: the state entering each row (segment) if USE_INITIAL_STATE
    final_state,  # out [*, HV, K, V] fp32 at final_slot[row] (-1: none) with FINAL_SLOT, else at row
    final_slot,
    cu_seqlens,  # [N + 1] the sequences' (segments') token bounds if IS_VARLEN
    T,  # tokens per row without IS_VARLEN
    stride_k,
    stride_q,
    stride_v,
    H: gl.constexpr,
    HV: gl.constexpr,
    K: gl.constexpr,
    V: gl.constexpr,
    BT: gl.constexpr,
    BV: gl.constexpr,
    STORE_FINAL_STATE: gl.constexpr,
    IS_VARLEN: gl.constexpr = True,
    USE_INITIAL_STATE: gl.constexpr = True,
    FINAL_SLOT: gl.constexpr = True,  # else the final state of program row i_n goes to row i_n
    ROW_NORMS: gl.constexpr = True,  # else k arrives normalised, q normalised and scaled (rk, rq unused)
):
    gl.static_assert(K == 128, "the Gluon pass is written for dk = 128")
    gl.static_assert(BT == 64, "the Gluon pass is written for 64-token chunks")
    i_v, i_nh = gl.program_id(0), gl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // H)
    if IS_VARLEN:
        bos = gl.load(cu_seqlens + i_n).to(gl.int64)
        T = (gl.load(cu_seqlens + i_n + 1).to(gl.int64) - bos).to(gl.int32)
    else:
        bos = i_n.to(gl.int64) * T
    NT = gl.cdiv(T, BT)
    dtype: gl.constexpr = o.dtype.element_ty

    # layouts: 16-byte rows of k and q for the copies; the tensor cores' accumulators; NVMMA-swizzled operands
    kq_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [64, 128]
    tile_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # X and q k^T [64, 64]
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BV, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    op_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    opv_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BV if BV < 64 else 128, element_bitwidth=16,
                                               rank=2)

    k_smem = gl.allocate_shared_memory(dtype, [2, BT, K], op_l)
    q_smem = gl.allocate_shared_memory(dtype, [2, BT, K], op_l)
    x_smem = gl.allocate_shared_memory(dtype, [BT, BT], op_l)
    a_smem = gl.allocate_shared_memory(dtype, [BT, BT], op_l)
    h_smem = gl.allocate_shared_memory(dtype, [K, BV], opv_l)
    vn_smem = gl.allocate_shared_memory(dtype, [BT, BV], opv_l)  # beta r for X, then v_new for q k^T
    vs_smem = gl.allocate_shared_memory(dtype, [BT, BV], opv_l)  # v_new scaled for the update

    p_k = k + i_hk * K
    p_q = q + i_hk * K
    p_v = v + i_h * V + i_v * BV
    p_x = x_inv + i_h * BT
    p_a = aqk + i_h * BT
    p_b = b + i_h
    p_g = g_cumsum + i_h

    o_kr = gl.arange(0, K, layout=gl.SliceLayout(1, acc_l))
    o_vc = i_v * BV + gl.arange(0, BV, layout=col_l)
    m_kv = (o_kr[:, None] < K) & (o_vc[None, :] < V)
    o_kv = o_kr[:, None] * V + o_vc[None, :]
    if USE_INITIAL_STATE:
        b_h = gl.load(initial_state + i_nh.to(gl.int64) * K * V + o_kv, mask=m_kv, other=0.)
    else:
        b_h = gl.zeros([K, BV], gl.float32, layout=acc_l)

    # chunk 0 of the segment: its copies, and its register tiles and rows
    _copy_tile(k_smem.index(0), p_k, bos, 0, T, stride_k, BT, K, kq_l)
    _copy_tile(q_smem.index(0), p_q, bos, 0, T, stride_q, BT, K, kq_l)
    cp.commit_group()
    f_v = _tile(p_v, bos, 0, T, stride_v, V - i_v * BV, BT, BV, acc_l)
    f_x = _tile(p_x, bos, 0, T, HV * BT, BT, BT, BT, tile_l, BLOCK_TRIL=True)
    f_a = _tile(p_a, bos, 0, T, HV * BT, BT, BT, BT, tile_l, BLOCK_TRIL=True)
    f_g = _rows(p_g, bos, 0, T, HV, BT, row_l)
    f_b = _rows(p_b, bos, 0, T, HV, BT, row_l)
    if ROW_NORMS:
        f_rk = _rows(rk + i_hk, bos, 0, T, H, BT, row_l)
        f_rq = _rows(rq + i_hk, bos, 0, T, H, BT, row_l)
    else:  # (unused: the rows are 1)
        f_rk = gl.full([BT], 1., gl.float32, layout=row_l)
        f_rq = f_rk
    f_last = gl.load(p_g + (bos + gl.minimum(BT, T) - 1) * HV)
    for i_t in range(0, NT):
        s = i_t % 2
        b_v, b_x, b_a, b_g, b_beta, b_rk, b_rq, b_g_last = f_v, f_x, f_a, f_g, f_b, f_rk, f_rq, f_last
        # 1. the next chunk's copies and loads first (past the last chunk every row is masked)
        _copy_tile(k_smem.index(1 - s), p_k, bos, i_t + 1, T, stride_k, BT, K, kq_l)
        _copy_tile(q_smem.index(1 - s), p_q, bos, i_t + 1, T, stride_q, BT, K, kq_l)
        cp.commit_group()
        f_v = _tile(p_v, bos, i_t + 1, T, stride_v, V - i_v * BV, BT, BV, acc_l)
        f_x = _tile(p_x, bos, i_t + 1, T, HV * BT, BT, BT, BT, tile_l, BLOCK_TRIL=True)
        f_a = _tile(p_a, bos, i_t + 1, T, HV * BT, BT, BT, BT, tile_l, BLOCK_TRIL=True)
        f_g = _rows(p_g, bos, i_t + 1, T, HV, BT, row_l)
        f_b = _rows(p_b, bos, i_t + 1, T, HV, BT, row_l)
        if ROW_NORMS:
            f_rk = _rows(rk + i_hk, bos, i_t + 1, T, H, BT, row_l)
            f_rq = _rows(rq + i_hk, bos, i_t + 1, T, H, BT, row_l)
        f_last = gl.load(p_g + (bos + gl.minimum(i_t * BT + 2 * BT, T) - 1) * HV)

        o_t = i_t * BT + gl.arange(0, BT, layout=row_l)
        m_t = o_t < T
        b_beta = gl.where(m_t, 1. / (1. + gl.exp(-b_beta)), 0.)
        b_kh_scale = gl.exp(b_g)
        b_update_scale = gl.exp(b_g_last - b_g)
        b_q_scale = gl.exp(b_g)
        if ROW_NORMS:
            b_kh_scale = b_kh_scale * b_rk
            b_update_scale = b_update_scale * b_rk
            b_q_scale = b_q_scale * b_rq

        h_smem.store(b_h.to(dtype))
        x_smem.store(b_x)
        a_smem.store(b_a)
        cp.wait_group(1)  # this chunk's k and q (copied a step ago) have landed; the next chunk's stay in flight
        fence_async_shared()
        # 2. k h and q h together, then v_new = X (beta (v - exp(G) (k h) / |k|))
        zero = gl.zeros([BT, BV], gl.float32, layout=acc_l)
        t_kh = warpgroup_mma(k_smem.index(s), h_smem, zero, use_acc=False, is_async=True)
        t_qh = warpgroup_mma(q_smem.index(s), h_smem, zero, use_acc=False, is_async=True)
        b_kh, b_qh = warpgroup_mma_wait(0, deps=[t_kh, t_qh])
        b_r = b_v.to(gl.float32) - b_kh * b_kh_scale[:, None]
        vn_smem.store((b_r * b_beta[:, None]).to(dtype))
        fence_async_shared()
        b_vn = warpgroup_mma_wait(0, deps=[warpgroup_mma(x_smem, vn_smem, zero, use_acc=False, is_async=True)])
        # 3. the update and the output together
        vn_smem.store(b_vn.to(dtype))
        vs_smem.store(gl.where(m_t[:, None], b_vn * b_update_scale[:, None], 0.).to(dtype))
        fence_async_shared()
        t_h = warpgroup_mma(k_smem.index(s).permute((1, 0)), vs_smem, b_h * gl.exp(b_g_last), is_async=True)
        t_o = warpgroup_mma(a_smem, vn_smem, b_qh * b_q_scale[:, None], is_async=True)
        b_h, b_o = warpgroup_mma_wait(0, deps=[t_h, t_o])
        gl.store(o + (bos + o_t[:, None]).to(gl.int64) * (HV * V) + i_h * V + o_vc[None, :], b_o.to(dtype),
                 mask=m_t[:, None] & (o_vc[None, :] < V))
    cp.wait_group(0)

    if STORE_FINAL_STATE:  # at row final_slot[i_n] (none where it is -1) with FINAL_SLOT, else at row i_n
        i_f = i_n
        if FINAL_SLOT:
            i_f = gl.load(final_slot + i_n)
        if i_f >= 0:
            gl.store(final_state + (i_f * HV + i_h).to(gl.int64) * K * V + o_kv, b_h, mask=m_kv)
