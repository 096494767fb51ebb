"""Backward of the chunked gated delta rule in Triton, and the differentiable `chunk_gdn`; the reference twin is
autograd through `hybridlm.ops.delta_rule.gdn_gates` + `chunk_gated_delta_rule`.

The forward (`ChunkGDNFunction`) runs `chunk_gdn_fwd`'s launches with the prepare kernel also keeping
X = (I + A)^-1 per chunk, and saves the inputs, X and g_cumsum (as fla saves its A). The backward, after fla's
chunk_gated_delta_rule backward:

0. `gdn_prepare_kkt.chunk_gdn_wu_kernel` recomputes w = X (beta k exp(G)), u = X (beta v) (no triangular
   solve), then the forward's h kernel recomputes the chunk states h and v_new. (The forward may fold w and u into
   its state pass, `gdn_chunk.FOLD_WU_INTO_H`; the backward never does: on an H200 the folded recompute and dH pass
   were no faster at 9B heads and 6% slower at 0.8B, B = 4, T = 4k.)
1. `gdn_bwd_dh.chunk_gdn_bwd_dv_local_kernel` (parallel): dv_new = tril(q k^T exp(G_i - G_j))^T do, the values'
   share of o.
2. `gdn_bwd_dh.chunk_gdn_bwd_dh_kernel` (sequential over the chunks, backwards): with dH the gradient of the state
   leaving a chunk, dv_new += (k exp(G_last - G)) dH and dH <- exp(G_last) dH + (q exp(G))^T do - w^T dv_new;
   stores dH per chunk, the full dv_new and dh0.
3. `chunk_gdn_bwd_dqk_kernel` (parallel): dq; the shares of dk and dG from o and the state update. (With
   `BWD_DQK_BK`, `gdn_bwd_dqk.chunk_gdn_bwd_dqkw_kblocked_kernel` instead: the same over key blocks, plus dw.)
   `chunk_gdn_bwd_wy_kernel` (parallel; `BWD_WY_BK`: over key blocks, `gdn_bwd_wy`): dw = -dv_new h^T unless
   given; the WY backward through w, u and X (dA = -X^T dX X^T on the strict lower triangle, A = beta k k^T
   exp(G_i - G_j)) for dk, dv, dbeta, dG; the reverse cumsum dG -> dg inside the chunk and the gate chain rules
   (softplus, exp(A_log), sigmoid) -> da, db and per-chunk sums for dA_log, ddt_bias.
4. `chunk_gdn_bwd_qk_norm_kernel` (parallel): sums dq, dk over the value heads of each key head and takes them
   through the in-kernel L2 norm. (Where Hk == Hv, step 3's kernels do this instead: `BWD_QK_NORM_FUSED`.)

The gradients of q and k are carried per value head until step 4, stored in the input dtype (`BWD_QK_GRAD_DTYPE`);
every accumulation is fp32; w, u, h, v_new, dv_new and the per-chunk dH are stored in the input dtype too (as the
forward and fla do).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.gdn_chunk import (
    CHUNK_SIZE, _check_inputs, _chunk_gdn_fwd, _multiprocessors, _segmented_state_pass, chunk_gdn_fwd,
    may_split, plain_state_pass_launch, segment_plan, sequence_bounds, state_pass_block, state_pass_kernel,
)
from hybridlm.ops.triton.gdn_bwd_dqk import (
    _dqk_gate_shares, _dqk_products, _masked_dst, chunk_gdn_bwd_dqkw_kblocked_kernel,
)
from hybridlm.ops.triton.gdn_bwd_dh import chunk_gdn_bwd_dh_kernel, chunk_gdn_bwd_dv_local_kernel
from hybridlm.ops.triton.gdn_bwd_wy import chunk_gdn_bwd_wy_kblocked_kernel, chunk_gdn_bwd_wy_kernel
from hybridlm.ops.triton.gdn_common import (
    _chunk_bounds, _chunk_log_decay, _chunk_program, _l2norm_bwd, _l2norm_rows, _load_rows, _store_rows,
)
from hybridlm.ops.triton.gdn_prepare_kkt import chunk_gdn_wu_kernel
from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import (
    HOPPER_FIXED_TRITON, cdiv, chunk_launch, descriptor, dot_precision, hopper_miscompiles, next_power_of_2,
    prepare_chunks, rows_packed, tma_capable, triton_release,
)


# (The kernels taking T leave it unspecialised, as fla does: one compile for every length, and T = 1 is never a
# constexpr that _chunk_bounds would hand back.)
@triton.jit(do_not_specialize=["T"])
def chunk_gdn_bwd_dqk_kernel(
    q,  # [B, T, H, K], token stride stride_q
    k,  # [B, T, H, K], token stride stride_k
    g_cumsum,  # [B, T, HV] fp32
    h,  # [NT, HV, K, V]: the state entering each chunk
    dh,  # [NT, HV, K, V]: the gradient of the state leaving each chunk
    v_new,  # [B, T, HV, V]
    do,  # [B, T, HV, V]
    dq,  # out [B, T, HV, K] (BWD_QK_GRAD_DTYPE): gradient of l2norm(q), per value head
    dk,  # out [B, T, HV, K] (BWD_QK_GRAD_DTYPE): the output's and the state update's share of d l2norm(k)
    dG,  # out [B, T, HV] fp32: their share of the gradient of the cumulative log decay G
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
    DST_PRODUCT: tl.constexpr,  # dS^T by its own product, not tl.trans(dS) (see `BWD_DQK_DST_PRODUCT_BKS`)
    A_GIVEN: tl.constexpr = False,  # aqk read instead of q k^T made (`BWD_AQK_FROM_FORWARD`)
    NORM_Q: tl.constexpr = False,  # (H == HV) dq taken through q's L2 norm: dq is q's gradient (`BWD_QK_NORM_FUSED`)
    HEADS_FASTEST: tl.constexpr = False,  # the grid is (B x heads, chunks) (`gdn_common._chunk_program`)
):
    """o's and the state update's gradients: dq, and the shares of dk and dG that do not go through w and u."""
    i_t, i_bh = _chunk_program(HEADS_FASTEST)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // H)
    i_tg, i_t, bos, T = _chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    dtype = v_new.dtype.element_ty

    i_s = i_t * BT
    o_t = i_s + tl.arange(0, BT)
    m_t = o_t < T
    i_last = tl.minimum(i_s + BT, T) - 1
    o_k = tl.arange(0, BK)
    b_q = (_l2norm_rows(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK)) * scale).to(dtype)
    b_k = _l2norm_rows(_load_rows(k + bos * stride_k + i_hk * K, i_s, T, stride_k, K, BT, BK)).to(dtype)
    b_gc = _chunk_log_decay(g_cumsum + bos * HV + i_h, i_s, T, HV, BT)
    b_g_last = tl.load(g_cumsum + bos * HV + i_h + i_last * HV)

    # o = (q exp(G)) h + tril(q k^T exp(G_i - G_j)) v_new, S_next = exp(G_last) S + (k exp(G_last - G))^T v_new
    p_h = h + (i_tg * HV + i_h) * K * V
    p_dh = dh + (i_tg * HV + i_h) * K * V
    p_do = do + bos * HV * V + i_h * V
    p_vn = v_new + bos * HV * V + i_h * V
    # (no dw here: its dv_new pointer is never read without WITH_DW, so p_vn stands in)
    b_dq, b_dk, _, b_ds, b_dsT, b_dg_last = _dqk_products(p_h, p_dh, p_do, p_vn, p_vn, o_k, i_s, T, K, V, HV,
                                                          BT, BK, BV, DOT_PRECISION, False, DST_PRODUCT)
    if A_GIVEN:
        o_c = tl.arange(0, BT)
        b_Aqk = tl.load(aqk + (bos + o_t[:, None]).to(tl.int64) * (HV * BT) + i_h * BT + o_c[None, :],
                        mask=m_t[:, None] & (o_c[:, None] >= o_c[None, :]), other=0.)  # (j > i unwritten)
    else:
        b_Aqk = b_ds  # (unused)
    b_dq, b_dk, b_dG, b_ds = _dqk_gate_shares(b_dq, b_dk, b_ds, b_dg_last, b_q, b_k, b_gc, b_g_last, o_t, m_t,
                                              i_last, BT, DOT_PRECISION, A_GIVEN, b_Aqk)
    b_ds = b_ds.to(dtype)
    b_dq += tl.dot(b_ds, b_k, input_precision=DOT_PRECISION)
    if DST_PRODUCT:
        b_dk += tl.dot(_masked_dst(b_dsT, b_gc, BT).to(dtype), b_q, input_precision=DOT_PRECISION)
    else:
        b_dk += tl.dot(tl.trans(b_ds), b_q, input_precision=DOT_PRECISION)
    # q entered as l2norm(q) * scale
    b_dq = b_dq * scale
    if NORM_Q:  # (dn in dq's dtype first, as the norm kernel reads it)
        b_dq = _l2norm_bwd(_load_rows(q + bos * stride_q + i_hk * K, i_s, T, stride_q, K, BT, BK),
                           b_dq.to(dq.dtype.element_ty))
    _store_rows(dq + bos * HV * K + i_h * K, b_dq, i_s, T, HV * K, K, BT, BK)
    _store_rows(dk + bos * HV * K + i_h * K, b_dk, i_s, T, HV * K, K, BT, BK)
    tl.store(dG + bos * HV + i_h + o_t * HV, b_dG, mask=m_t)


@triton.jit
def _l2norm_bwd_rows(x, dn, dx, i_r, NR, stride_x, i_hk, HV: tl.constexpr, GROUP: tl.constexpr,
                     K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """x's gradient through its L2 norm (`_l2norm_bwd`), dn summed over the group's value heads."""
    b_dn = tl.zeros([BR, BK], dtype=tl.float32)
    for i_g in range(0, GROUP):
        b_dn += _load_rows(dn + (i_hk * GROUP + i_g) * K, i_r, NR, HV * K, K, BR, BK)
    b_dx = _l2norm_bwd(_load_rows(x + i_hk * K, i_r, NR, stride_x, K, BR, BK), b_dn)
    _store_rows(dx + i_hk * K, b_dx, i_r, NR, (HV // GROUP) * K, K, BR, BK)


@triton.jit
def chunk_gdn_bwd_qk_norm_kernel(
    q,  # [B * T, H, K], token stride stride_q
    k,  # [B * T, H, K], token stride stride_k
    dq_n,  # [B * T, HV, K]: gradient of l2norm(q) per value head (summed here in fp32)
    dk_n,  # [B * T, HV, K]
    dq,  # out [B * T, H, K]
    dk,  # out [B * T, H, K]
    NR,
    stride_q,
    stride_k,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    i_r, i_hk = tl.program_id(0) * BR, tl.program_id(1)
    _l2norm_bwd_rows(q, dq_n, dq, i_r, NR, stride_q, i_hk, HV, HV // H, K, BR, BK)
    _l2norm_bwd_rows(k, dk_n, dk, i_r, NR, stride_k, i_hk, HV, HV // H, K, BR, BK)


def backward_verified(dtype: torch.dtype, dk: int, dv: int) -> str | None:
    """Why the Triton backward is not yet trusted for these shapes on a GPU, or None if it is.

    Checked against float64 autograd on an H100 (Triton 3.6, `benchmarks/gpu_tests.py`): bf16 and fp16 at head dims
    16 to 128 (16-wide dims since tiles are padded to 32; before, they faulted or gave wrong gradients), packed
    sequences included; fp32 up to 64, and since 2026-11-23 (fifth session) fp32 at 64/128 and 128/128 as well
    (the dh kernel once needed 280 KB of shared memory there; it runs 2 stages now). Untrusted shapes train
    through the differentiable reference. On an H200 (2026-12-04) unequal dims below 64 faulted after all, in the
    forward too; `hopper_head_dims_fault` keeps those off the kernels on Hopper with Triton < 3.7.1."""
    largest, smallest = max(dk, dv), min(dk, dv)
    if smallest < 16 or largest > 128:
        return f"{dtype} head dims {dk}/{dv} (verified: 16 to 128)"
    return None


def hopper_head_dims_fault(dk: int, dv: int, capability: tuple[int, int], triton_version: str) -> str | None:
    """Why the chunked GDN kernels must not run these head dims on this GPU and Triton, or None.

    On Hopper, Triton 3.4 to 3.7.0 miscompiles some tiles of this family of kernels (fla's gated backward gave wrong
    gradients there, fla-org/flash-linear-attention#640 and #984; fixed in 3.7.1). On an H200 with Triton 3.6
    (2026-12-04, `benchmarks/gdn_fault_map.py`, bf16, forward + backward twice per shape) unequal head dims with one
    below 64 hit illegal shared-memory addresses: dk/dv 32/64 in the backward's WY kernel, 64/32, 96/32 and 128/32 in
    the forward's state and output kernels, fp16 24/40 in the WY kernel. Equal dims (32, 64, 128), dims of 64 and
    more (64/128, 96/64, 96/128, 128/64) and 32/128 passed. On 2026-12-05 (same GPU and Triton) the map with value
    dims of 96 and one-token batches agreed, but a test's training step at 96/64 (two one-token sequences with
    states, after three others in the same process) faulted in the state pass in three runs out of three. The rule
    lets through equal dims and unequal powers of two from 64 on (64/128, 128/64: Qwen's 128/128 is equal)."""
    powers_of_two = next_power_of_2(dk) == dk and next_power_of_2(dv) == dv
    if capability[0] != 9 or dk == dv or (min(dk, dv) >= 64 and powers_of_two):
        return None
    if triton_release(triton_version) >= HOPPER_FIXED_TRITON:
        return None
    return (f"head dims {dk}/{dv} on sm_90 with Triton {triton_version} (Triton before 3.7.1 miscompiles unequal "
            f"head dims below 64 or not powers of two on Hopper; upgrade Triton to run the kernels)")


def dqk_narrowest_block(device: torch.device) -> int:
    """The key-blocked dq/dk kernel's narrowest block: 32, or 64 where Triton miscompiles on Hopper (on an H200 with
    Triton 3.6, 2026-12-05, blocks of 32 gave dk that changed between runs, bf16 64/64 and 96/64; blocks of 64 gave
    the same bits each run)."""
    return 64 if hopper_miscompiles(device) else 32


@functools.cache
def head_dims_fault(device: torch.device, dk: int, dv: int) -> str | None:
    """`hopper_head_dims_fault` for a CUDA device and the installed Triton (None elsewhere)."""
    if device.type != "cuda":
        return None
    return hopper_head_dims_fault(dk, dv, torch.cuda.get_device_capability(device), triton.__version__)


# Launch settings of the backward; `benchmarks/sweep_kernels.py --kernels bwd` times each at the training shape
# (B = 4, T = 4k) against the whole backward's gradients at these defaults. H200, bf16 (eighth session, whole
# backward, ms, 9B / 0.8B heads): the dH pass at BV 64, 4 warps, 2 stages 4.12 / 2.19 (BV 32, 3 stages: 4.46 / 2.30);
# the w/u recompute at BV 128, 8 warps 4.45 / 2.28 (BV 64, 4 warps 4.46 / 2.29); the h recompute reading keys
# normalised by the w/u recompute instead of normalising them itself was slower (4.49 / 2.33). The dq/dk/dv/dg step
# was one kernel at 255 registers with ~1.3 KB spilled (Triton 3.6, sm_90, 8 warps) and took 2.86 / 1.43 ms of it;
# as fla splits it, two kernels now (dk and dG shares through memory between them, fp32): the whole backward
# 4.06 -> 2.90 at 9B heads and 2.17 -> 1.61 at 0.8B (8 + 8 warps, V blocks of 64, 3 stages; 2 stages 2.99 / 1.66,
# 4 warps in either 3.05-3.13 at 9B, V blocks of 32 or 128 3.33-3.34).
BWD_WU_BV, BWD_WU_WARPS = 128, 8  # the w/u recompute
BWD_DV_LOCAL_WARPS = 4
# the sequential dH pass (fp32: 2 stages, shared memory); BV 64 only while that leaves at least half as many
# programs as SMs (B = 4 at 9B and 0.8B heads was measured; B = 1 keeps 32, unmeasured at 64)
# (1 stage: 49 KB of shared memory instead of 115, two programs per SM, yet train at B = 4, T = 4k ran at 0.97x at
# 9B heads and 0.94x at 0.8B on an H100, 2026-12-05, `gpu_plan.sh 29`, `dhs1`)
BWD_DH_BV, BWD_DH_WARPS, BWD_DH_STAGES = 64, 4, 2
# its q, k, w, do and dv_local tiles through tensor descriptors (TMA; Hopper and later, dk a power of two, V blocks
# dividing dv). Train at B = 4, T = 4k on an H100 (2026-12-05, `gpu_plan.sh 29`, `dhtma`): 9B heads 3.580 -> 3.553
# ms, 0.8B 2.071 -> 2.029; with kept states 3.107 -> 3.079 and 1.802 -> 1.768; same gradients (GPU tests passed).
BWD_DH_TMA = True
# (dv_local made inside the dH pass from the q, k and do tiles it loads anyway, so chunk_gdn_bwd_dv_local_kernel and
# dv_local's round trip went away, lost on an H100 (2026-12-06, `gpu_plan.sh 38`): the pass went 0.334 -> 0.776 ms
# (255 registers, 132 B spilled, 140 KB of shared memory) against the 0.162 ms kernel saved; train at 4 x 4k 3.507 ->
# 3.777 ms at 9B heads, 2.003 -> 2.061 at 0.8B; and on the GPU bf16 64/64 faulted (illegal address) and packed
# sequences gave wrong gradients. Removed. Products added to a sequential pass cost more than a parallel kernel.)
BWD_DQK_WARPS, BWD_WY_WARPS, BWD_DQK_STAGES = 8, 8, 3  # the two kernels of step 3 (fp32: 2 stages)
# The key-row widths (BK) at which the whole-row dq/dk kernel makes dS^T by a product of its own (one more [64, 64]
# product per V block) instead of `tl.dot(tl.trans(dS), q)`: that line miscompiles on Hopper with Triton 3.4-3.7.0
# at 64-wide key blocks in fla's kernel (fla-org/flash-linear-attention#640). Ours passed float64 checks on Hopper at
# 32-wide (padded) and 128-wide rows; 64-wide 16-bit rows were never checked there, so they take the product.
BWD_DQK_DST_PRODUCT_BKS = (64,)
# The WY kernel's key columns per block (`gdn_bwd_wy`): None keeps whole rows (`chunk_gdn_bwd_wy_kernel`); a number
# takes `chunk_gdn_bwd_wy_kblocked_kernel` with blocks of max(32, min(dk, BWD_WY_BK)) columns, BWD_WY_KB_WARPS warps
# and BWD_WY_KB_STAGES stages (fp32: 8 and 2), where that leaves at least two blocks (one block would be the whole-row
# kernel's footprint, and on an H200 it gave wrong dk in rows late in a chunk, cause not found). H200, whole backward
# at B = 4, T = 4k (`sweep_kernels.py --kernels bwd --bwd-groups wy`, 2026-12-04): 9B heads whole rows 2.670 ms,
# blocks of 64 at 4 warps / 2 stages 2.492, of 32 2.600 (3 stages 2.513), at 8 warps 3.006-3.409; 0.8B heads 1.496,
# 1.407, 1.455 (1.418), 1.662-1.883. Blocks of 32 at 1 stage, and at 8 warps, gave gradients that changed between runs
# on the GPU; 4 warps / 2 stages gave the same bits each run. 3 stages (H100, 2026-12-06, with BWD_WY_KK_FREE): train
# 9B 4 x 4k 3.101 -> 3.033 ms, 1 x 16k 3.692 -> 3.632, 0.8B 1.930 -> 1.895, 2.439 -> 2.360 (4 stages 1.00x / 0.98x),
# the same bits, and every backward GPU test passed (94, `benchmarks/gpu_tests.py`, determinism checks included).
BWD_WY_BK: int | None = 64
BWD_WY_KB_WARPS, BWD_WY_KB_STAGES = 4, 3
# a register cap per thread (Triton's maxnreg): 168 (3 programs per SM, ~440 B spilled) lost, 0.92-0.93x at every
# train shape (H100, 2026-12-06, `gpu_plan.sh 54`)
BWD_WY_KB_MAXNREG: int | None = None
# The key-blocked WY kernel sums k k^T in its second pass over the key blocks (which loads them anyway) instead of the
# first, so the [64, 64] fp32 sum is not held beside X and dX there: offline (Triton 3.6, sm_90, 9B heads) 152 -> 12 B
# spilled, 57 -> 41 KB of shared memory. H100 (2026-12-06, `gpu_plan.sh 51`), forward + backward, same bits: 9B heads
# 4 x 4k 3.555 -> 3.460 ms, 1 x 16k 4.221 -> 4.110; 0.8B 2.035 -> 1.975, 2.726 -> 2.658. False: summed in the first.
BWD_WY_KK_LATE = True
# No k k^T in the key-blocked WY kernel: beta's and G's shares through A = beta k k^T exp(G_i - G_j) taken from the
# E k and E^T (beta k) products that dk needs anyway (row dots with k), so one [64, 64] product per key block and
# the [64, 64] fp32 sum go away (dk: the same bits; da, db, dA_log, ddt_bias ~2e-3 apart, as E enters those products
# in the input dtype, float64 errors alike). H100 (2026-12-06, `gpu_plan.sh 56`), train at 2 stages: 9B 4 x 4k
# 3.135 -> 3.096 ms, 1 x 16k 3.724 -> 3.693, 0.8B 1.945 -> 1.930, 2.446 -> 2.438; 94 backward GPU tests passed.
# False: k k^T summed (in pass 1 or 2 by BWD_WY_KK_LATE).
BWD_WY_KK_FREE = True
# Both WY kernels take E^T (E = dA exp(G_i - G_j), made from products) through a [64, 64] scratch per chunk and head
# (8 KB in 16-bit) instead of tl.trans(E): a remedy held ready for Triton 3.4-3.7.0's Hopper miscompile of
# transposed product results (fla-org/flash-linear-attention#640), should a GPU check fail there (the whole-row kernel
# at dk = 64 was never checked on Hopper; the key-blocked one gave wrong dk with one 32-wide block). Off: untimed.
BWD_WY_E_SCRATCH = False
# The dq/dk kernel's key columns per program (`gdn_bwd_dqk`): None keeps whole rows (`chunk_gdn_bwd_dqk_kernel`,
# dw made in the WY kernel from h); a number takes `chunk_gdn_bwd_dqkw_kblocked_kernel` with max(32, min(dk,
# BWD_DQK_BK)) columns per program, BWD_DQK_KB_WARPS warps and BWD_DQK_KB_STAGES stages (fp32: 8 and 2), which also
# stores dw for the WY kernel (as fla's dqkwg kernel), where that leaves at least two blocks. Blocks are at least 64
# wide where Triton miscompiles on Hopper (`dqk_narrowest_block`). Not yet timed on a GPU.
BWD_DQK_BK: int | None = None
BWD_DQK_KB_WARPS, BWD_DQK_KB_STAGES = 4, 2
BWD_DQK_KB_MAXNREG: int | None = None  # a register cap per thread (Triton's maxnreg), so more programs fit on an SM
# (dw = -dv_new h^T made in the whole-row dq/dk kernel from the h tiles it loads, so the WY kernel reads no h (256 MB
# less at 9B heads, B = 4, T = 4k; `BWD_DQK_DW`), lost on an H100 (2026-12-06, `gpu_plan.sh 54`/`56`): 0.98-1.00x at
# every train shape (offline the dq/dk kernel reached 255 registers and spilled what the WY kernel saved). Removed.)
# the whole-row dq/dk kernel's register cap: 128 with 2 stages (2 programs per SM, ~460 B spilled) lost, 0.91-0.92x
BWD_DQK_MAXNREG: int | None = None
# (dq summed over each key head's value heads inside the whole-row dq/dk kernel, one program per chunk and key head
# walking the group, and taken through q's L2 norm there, so the per-value-head dq never existed, lost on an H100
# (2026-12-06, `gpu_plan.sh 54`, `BWD_DQ_NORM_IN_DQK`): 0.8B heads 1.01x at 4 x 4k and 0.99x at 1 x 16k, 9B heads
# 0.98x / 0.99x (the group walked in series; 160 B spilled offline). Removed.)
# Where training's forward made tril(q k^T exp(G_i - G_j)) per chunk for its fused output (aqk [B, T, Hv, 64], the
# w/u kernel's STORE_AQK), keep it for the backward: the dv_local kernel reads it (transposed) instead of normalising
# q, k and multiplying them, and the whole-row dq/dk kernel takes dS * A for its share of dG instead of a q k^T
# product. Costs what x_inv costs: 128 B per token and value head, kept from forward to backward. H100 (2026-12-07,
# `gpu_plan.sh 57`), train: 9B heads 4 x 4k 3.036 -> 3.020 ms, 1 x 16k 3.635 -> 3.613 (1.01x); 0.8B 1.00x / 1.01x.
# Not adopted: half a percent for 4 KB more memory per token and layer at 9B heads.
BWD_AQK_FROM_FORWARD = False
# BWD_HEADS_FASTEST: from this many chunks on the grid (None: never), the chunk-parallel backward kernels (w/u
# recompute, dv_local, dq/dk, WY) on a grid (heads, chunks), the heads of each chunk side by side
# (`utils.chunk_launch`): the value heads of a key head read its q, k rows from L2 after the first. H100 (train):
# 1 x 16k 1.02x at 9B and 0.8B heads; 4 x 4k 0.99x (9B), 1.01x (0.8B).
BWD_HEADS_FASTEST: int | None = 256
# The per-value-head gradients of l2norm(q), l2norm(k) between steps 3 and 4: "input" stores them in the input dtype
# (as fla does; sums stay fp32 in registers), "fp32" in fp32. At 9B heads, B = 4, T = 4k they are [16k, 32, 128]
# each, written, read back and (dk) written again: 1.6 GB of traffic in fp32, half that in bf16.
BWD_QK_GRAD_DTYPE = "input"
# The q/k L2-norm backward's token rows per program and warps (0.177 ms at 9B heads, B = 4, T = 4k on an H100, about
# what its 536 MB take at the copy rate). 64 rows and 8 warps (H100, 2026-12-07, `gpu_plan.sh 57`): 1.00x at 9B heads,
# 0.99x at 0.8B heads 1 x 16k.
BWD_QK_NORM_ROWS, BWD_QK_NORM_WARPS = 32, 4
# Where each key head has one value head (0.8B, 2B, the bundled model) and the dq/dk kernel holds whole rows, step 4
# runs inside step 3: the dq/dk kernel takes dq through q's L2 norm and the WY kernel takes dk through k's (the
# key-blocked one by a third pass over its blocks), so no norm launch and no per-value-head copies are read back
# (~270 MB less traffic at 0.8B heads, B = 4, T = 4k). H100 (2026-12-07, `gpu_plan.sh 57`), train: 0.8B heads
# 4 x 4k 1.896 -> 1.837 ms (1.03x), 1 x 16k 2.384 -> 2.356 (1.01x); 9B heads (grouped, so unchanged) 1.00x.
# False: the norm kernel runs for every head layout.
BWD_QK_NORM_FUSED = True
# Keep the forward's w, h and v_new for the backward instead of recomputing them (the w/u and state-pass launches,
# 0.17 + 0.28 ms of the 2.49 ms backward at 9B heads, B = 4, T = 4k, on an H200). They cost 2 (dk + dv + dk dv / 64)
# bytes per token and value head in 16-bit (1 KB at dk = dv = 128: 512 MB per layer for 16k tokens at 9B heads),
# held from each layer's forward to its backward; fla recomputes them, as the default here does. `hybridlm train
# --gdn-keep-states` sets it.
BWD_REUSE_FORWARD_STATES = False


def dh_pass_descriptors(q, k, w, do, dv_local, BV: int) -> dict:
    """The dH pass's TMA arguments (`BWD_DH_TMA`): descriptors over the [B * T, columns] rows of q, k, w, do and
    dv_local with [64, width] boxes, or nothing where one does not apply."""
    batch, length, key_heads, dk = q.shape
    value_heads, dv = do.shape[2], do.shape[3]
    # (the kernel's key tiles are at least 32 wide: BK = max(32, dk's power of two), so the box must be as wide)
    if not BWD_DH_TMA or next_power_of_2(dk) != dk or dk < 32 or dv % BV or not tma_capable(q.device):
        return {}
    rows, BT = batch * length, CHUNK_SIZE
    descs = dict(q_desc=descriptor(q, [rows, key_heads * dk], [q.stride(1), 1], [BT, dk]),
                 k_desc=descriptor(k, [rows, key_heads * dk], [k.stride(1), 1], [BT, dk]),
                 w_desc=descriptor(w, [rows, value_heads * dk], [value_heads * dk, 1], [BT, dk]),
                 do_desc=descriptor(do, [rows, value_heads * dv], [value_heads * dv, 1], [BT, BV]),
                 dvl_desc=descriptor(dv_local, [rows, value_heads * dv], [value_heads * dv, 1], [BT, BV]))
    return {} if None in descs.values() else dict(TMA=True, **descs)


@contextlib.contextmanager
def forward_states_kept(enabled: bool = True):
    """Within: `BWD_REUSE_FORWARD_STATES` = enabled (restored after)."""
    global BWD_REUSE_FORWARD_STATES
    saved, BWD_REUSE_FORWARD_STATES = BWD_REUSE_FORWARD_STATES, enabled
    try:
        yield
    finally:
        BWD_REUSE_FORWARD_STATES = saved


def chunk_gdn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    g_cumsum: torch.Tensor,
    x_inv: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    forward_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    aqk: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of the forward's inputs given do [B, T, Hv, dv] and optionally dht, the gradient of the final
    state [N, Hv, dk, dv]. g_cumsum and x_inv are the forward's (`_chunk_gdn_fwd(..., store_x=True)`).
    Returns dq, dk, dv, da, db (each in its input's dtype), dA_log, ddt_bias (fp32) and dh0 (fp32; None without an
    initial state). `chunk_tables` = prepare_chunks(cu_seqlens, 64) when known (saves a host read of cu_seqlens).
    `forward_states` = the forward's (w, h, v_new): then they are not recomputed (see `BWD_REUSE_FORWARD_STATES`).
    `aqk` = the forward's tril(q k^T exp(G_i - G_j)) per chunk [B, T, Hv, 64] (`BWD_AQK_FROM_FORWARD`), read instead of
    remade by the dv_local and dq/dk kernels."""
    q, k, v = rows_packed(q), rows_packed(k), rows_packed(v)
    a, b, do = a.contiguous(), b.contiguous(), do.contiguous()
    A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    batch, length, key_heads, dk = q.shape
    value_heads, dv = v.shape[2], v.shape[3]
    scale = dk ** -0.5 if scale is None else float(scale)
    BT = CHUNK_SIZE
    # tiles at least 32 wide: on the H100 (Triton 3.6) 16-wide tiles in 16-bit dtypes made the (then one) dq/dk/dv/dg
    # kernel fault (bf16, dk = 16) or return wrong gradients (dk or dv = 16); masks cover the padding
    BK = max(32, next_power_of_2(dk))
    BV_full = max(32, next_power_of_2(dv))
    BV, BV_chunk = min(BV_full, 32), min(BV_full, 64)  # V blocks of the sequential and of the parallel kernels
    BV_dh = max(32, min(BV_full, BWD_DH_BV))
    device, dtype = v.device, v.dtype

    cu_seqlens_given = cu_seqlens  # the caller's tensor: its host bounds are memoised (the recompute's segments)
    if cu_seqlens is not None:
        cu_seqlens, chunk_indices, chunk_offsets, num_chunks = chunk_tables or prepare_chunks(cu_seqlens, BT, device)
        num_states, grid_chunks = len(cu_seqlens) - 1, num_chunks
    else:
        chunk_indices = chunk_offsets = None
        grid_chunks = cdiv(length, BT)
        num_states, num_chunks = batch, batch * grid_chunks
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if dht is not None:
        dht = dht.contiguous()
    common = dict(H=key_heads, HV=value_heads, K=dk, V=dv, BT=BT, BK=BK, IS_VARLEN=cu_seqlens is not None,
                  DOT_PRECISION=dot_precision(dtype))
    chunk_grid, order = chunk_launch(grid_chunks, batch * value_heads, BWD_HEADS_FASTEST)
    if BV_dh > BV and 2 * cdiv(dv, BV_dh) * num_states * value_heads < _multiprocessors(device):
        BV_dh = BV

    if forward_states is not None:
        w, h, v_new = forward_states
        expected = ((batch, length, value_heads, dk), (num_chunks, value_heads, dk, dv), tuple(v.shape))
        if tuple(tuple(x.shape) for x in forward_states) != expected or any(x.dtype != dtype for x in forward_states):
            raise ValueError(f"forward_states must be w, h, v_new of shapes {expected} in {dtype}, got "
                             f"{[(tuple(x.shape), x.dtype) for x in forward_states]}")
    if aqk is not None and (tuple(aqk.shape) != (batch, length, value_heads, BT) or aqk.dtype != dtype):
        raise ValueError(f"aqk must be [{batch}, {length}, {value_heads}, {BT}] in {dtype}, got {tuple(aqk.shape)} "
                         f"in {aqk.dtype}")
    if forward_states is None:  # w, u recomputed from the saved X, then the chunk states h, v_new (the h kernel)
        w = torch.empty(batch, length, value_heads, dk, dtype=dtype, device=device)  # [B, T, Hv, dk]
        u = torch.empty(batch, length, value_heads, dv, dtype=dtype, device=device)  # [B, T, Hv, dv]
        launch(chunk_gdn_wu_kernel, chunk_grid,
            k, v, b, g_cumsum, x_inv, w, u, None, cu_seqlens, chunk_indices, length, k.stride(1), v.stride(1),
            BV=max(32, min(BV_full, BWD_WU_BV)), STORE_KN=False, num_warps=BWD_WU_WARPS, **order, **common)
        h = torch.empty(num_chunks, value_heads, dk, dv, dtype=dtype, device=device)  # [NT, Hv, dk, dv]
        v_new = torch.empty(batch, length, value_heads, dv, dtype=dtype, device=device)  # [B, T, Hv, dv]
        BV_h = state_pass_block(dk, dv, num_states * value_heads, v.element_size(), device, dtype == torch.float32,
                                narrowest=32)  # the backward's tiles are all at least 32 wide
        plan = (segment_plan(sequence_bounds(cu_seqlens_given, batch, length), value_heads, device)
                if may_split(batch * length, value_heads) else None)
        if plan is None:
            launch(state_pass_kernel(length, cu_seqlens is not None), (cdiv(dv, BV_h), num_states * value_heads),
                k, w, u, g_cumsum, h, v_new, initial_state, None, cu_seqlens, chunk_offsets, length, k.stride(1),
                BV=BV_h, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=False,
                **plain_state_pass_launch(dtype == torch.float32), **common)
        else:  # the forward's context-parallel pass, keys normalised in the loop
            _segmented_state_pass(plan, k, w, u, g_cumsum, h, v_new, initial_state, None, length, {}, common,
                                  narrowest=32, norm_k=True)

    dv_local = torch.empty_like(v_new)  # [B, T, Hv, dv]
    launch(chunk_gdn_bwd_dv_local_kernel, chunk_grid,
        q, k, do, g_cumsum, dv_local, aqk, cu_seqlens, chunk_indices, scale, length, q.stride(1), k.stride(1),
        BV=BV_chunk, A_GIVEN=aqk is not None, num_warps=BWD_DV_LOCAL_WARPS, **order, **common)

    dv_new = torch.empty_like(v_new)  # [B, T, Hv, dv]
    dh = torch.empty_like(h)  # [NT, Hv, dk, dv]
    dh0 = (torch.empty(num_states, value_heads, dk, dv, dtype=torch.float32, device=device)
           if initial_state is not None else None)
    launch(chunk_gdn_bwd_dh_kernel, (cdiv(dv, BV_dh), num_states * value_heads),
        q, k, w, g_cumsum, do, dv_local, dv_new, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, length,
        q.stride(1), k.stride(1), BV=BV_dh, USE_FINAL_STATE_GRADIENT=dht is not None,
        STORE_INITIAL_STATE_GRADIENT=initial_state is not None, num_warps=BWD_DH_WARPS,
        # three [64, dk] fp32 tiles per stage: at dk = 128, 3 stages need 280 KB of shared memory (sm_90: 227 KB)
        num_stages=2 if dtype == torch.float32 else BWD_DH_STAGES,
        **dh_pass_descriptors(q, k, w, do, dv_local, BV_dh), **common)

    grad_dtype = dtype if BWD_QK_GRAD_DTYPE == "input" else torch.float32
    dq_n = torch.empty(batch, length, value_heads, dk, dtype=grad_dtype, device=device)  # [B, T, Hv, dk]
    dk_n = torch.empty_like(dq_n)
    dv_out = torch.empty(batch, length, value_heads, dv, dtype=dtype, device=device)  # [B, T, Hv, dv]
    da = torch.empty(batch, length, value_heads, dtype=a.dtype, device=device)  # [B, T, Hv]
    db = torch.empty(batch, length, value_heads, dtype=b.dtype, device=device)
    dA_log = torch.empty(num_chunks, value_heads, dtype=torch.float32, device=device)  # [NT, Hv] per-chunk sums
    ddt_bias = torch.empty_like(dA_log)
    dqk_stages = 2 if dtype == torch.float32 else BWD_DQK_STAGES  # fp32 tiles: 3 stages were never run
    BKQ = max(dqk_narrowest_block(device), min(BK, BWD_DQK_BK)) if BWD_DQK_BK is not None else dk
    norm_fused = (BWD_QK_NORM_FUSED and key_heads == value_heads and BKQ >= dk and grad_dtype == dtype
                  and q.dtype == k.dtype == dtype)
    if BKQ >= dk:
        num_shares = 1
        dw = None  # the WY kernel makes dw from h
        dG = torch.empty(batch, length, value_heads, dtype=torch.float32, device=device)  # [B, T, Hv]
        launch(chunk_gdn_bwd_dqk_kernel, chunk_grid,
            q, k, g_cumsum, h, dh, v_new, do, dq_n, dk_n, dG, aqk, cu_seqlens, chunk_indices, scale,
            length, q.stride(1), k.stride(1), BV=BV_chunk, DST_PRODUCT=BK in BWD_DQK_DST_PRODUCT_BKS,
            A_GIVEN=aqk is not None, NORM_Q=norm_fused, num_warps=BWD_DQK_WARPS,
            num_stages=dqk_stages, **order, **common,
            **({} if BWD_DQK_MAXNREG is None or dtype == torch.float32 else dict(maxnreg=BWD_DQK_MAXNREG)))
    else:  # key blocks; dw made here, and each block's share of dG
        num_shares = cdiv(dk, BKQ)
        dw = torch.empty(batch, length, value_heads, dk, dtype=dtype, device=device)  # [B, T, Hv, dk]
        dG = torch.empty(num_shares, batch, length, value_heads, dtype=torch.float32, device=device)  # [NK, B, T, Hv]
        launch(chunk_gdn_bwd_dqkw_kblocked_kernel, (num_shares * grid_chunks, batch * value_heads),
            q, k, g_cumsum, h, dh, v_new, do, dv_new, dq_n, dk_n, dw, dG, cu_seqlens, chunk_indices, scale, length,
            q.stride(1), k.stride(1), batch * length * value_heads, BV=BV_chunk, BKQ=BKQ,
            num_warps=8 if dtype == torch.float32 else BWD_DQK_KB_WARPS,
            num_stages=2 if dtype == torch.float32 else BWD_DQK_KB_STAGES, **common,
            **({} if BWD_DQK_KB_MAXNREG is None or dtype == torch.float32 else dict(maxnreg=BWD_DQK_KB_MAXNREG)))
    e_scratch = (torch.empty(num_chunks, value_heads, BT, BT, dtype=dtype, device=device)
                 if BWD_WY_E_SCRATCH else None)  # [NT, Hv, 64, 64]
    wy_args = (k, v, a, b, A_log, dt_bias, g_cumsum, x_inv, h, dv_new, dw, dk_n, dG, dv_out, da, db, dA_log, ddt_bias,
               e_scratch, cu_seqlens, chunk_indices, length, k.stride(1), v.stride(1), batch * length * value_heads)
    wy_flags = dict(DW_GIVEN=dw is not None, NKD=num_shares, E_SCRATCH=BWD_WY_E_SCRATCH, NORM_K=norm_fused)
    BKW = max(32, min(BK, BWD_WY_BK)) if BWD_WY_BK is not None else dk
    if BKW >= dk:
        launch(chunk_gdn_bwd_wy_kernel, chunk_grid, *wy_args, BV=BV_chunk, num_warps=BWD_WY_WARPS,
               num_stages=dqk_stages, **wy_flags, **order, **common)
    else:
        launch(chunk_gdn_bwd_wy_kblocked_kernel, chunk_grid,
            *wy_args, BV=BV_chunk, BKW=BKW, KK_IN_PASS2=BWD_WY_KK_LATE, KK_FREE=BWD_WY_KK_FREE, **wy_flags,
            # fp32's "ieee" dots hold whole operand rows per thread: 4 warps spilled 50 KB at the tests' shapes
            num_warps=8 if dtype == torch.float32 else BWD_WY_KB_WARPS,
            num_stages=2 if dtype == torch.float32 else BWD_WY_KB_STAGES, **order, **common,
            **({} if BWD_WY_KB_MAXNREG is None or dtype == torch.float32 else dict(maxnreg=BWD_WY_KB_MAXNREG)))

    if norm_fused:  # (step 4 ran inside step 3)
        return dict(dq=dq_n, dk=dk_n, dv=dv_out, da=da, db=db, dA_log=dA_log.sum(0), ddt_bias=ddt_bias.sum(0),
                    dh0=dh0)
    rows, BR = batch * length, BWD_QK_NORM_ROWS
    dq = torch.empty(batch, length, key_heads, dk, dtype=q.dtype, device=device)  # [B, T, Hk, dk]
    dk_out = torch.empty_like(dq)
    launch(chunk_gdn_bwd_qk_norm_kernel, (cdiv(rows, BR), key_heads),
        q, k, dq_n, dk_n, dq, dk_out, rows, q.stride(1), k.stride(1), H=key_heads, HV=value_heads, K=dk, BR=BR,
        BK=BK, num_warps=BWD_QK_NORM_WARPS)
    return dict(dq=dq, dk=dk_out, dv=dv_out, da=da, db=db, dA_log=dA_log.sum(0), ddt_bias=ddt_bias.sum(0), dh0=dh0)


class ChunkGDNFunction(torch.autograd.Function):
    """`chunk_gdn_fwd` with its backward. Saves the inputs, g_cumsum [B, T, Hv] fp32 and X [B, T, Hv, 64]."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, A_log, dt_bias, scale, initial_state, output_final_state, cu_seqlens):
        ctx.reuse = BWD_REUSE_FORWARD_STATES
        out = _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, store_x=True,
                             keep_states=ctx.reuse)
        states = (out["w"], out["h"], out["v_new"]) if ctx.reuse else ()
        aqk = out["aqk"] if BWD_AQK_FROM_FORWARD else None  # (made only where the forward fused its output)
        ctx.save_for_backward(q, k, v, a, b, A_log, dt_bias, out["g_cumsum"], out["x_inv"], initial_state,
                              cu_seqlens, aqk, *states)
        ctx.scale = out["scale"]
        ctx.chunk_tables = out["chunk_tables"]
        return out["o"], out["final_state"]

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, A_log, dt_bias, g_cumsum, x_inv, initial_state, cu_seqlens, aqk, *states = ctx.saved_tensors
        grads = chunk_gdn_bwd(q, k, v, a, b, A_log, dt_bias, g_cumsum, x_inv, do, dht, scale=ctx.scale,
                              initial_state=initial_state, cu_seqlens=cu_seqlens, chunk_tables=ctx.chunk_tables,
                              forward_states=tuple(states) if ctx.reuse else None, aqk=aqk)
        dh0 = grads["dh0"]
        return (grads["dq"], grads["dk"], grads["dv"], grads["da"], grads["db"], grads["dA_log"].to(A_log.dtype),
                grads["ddt_bias"].to(dt_bias.dtype), None, None if dh0 is None else dh0.to(initial_state.dtype),
                None, None)


def chunk_gdn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunk_gdn_fwd` (same arguments and results), differentiable in q, k, v, a, b, A_log, dt_bias and
    initial_state, with a gradient flowing into the final state too. Without gradients it is `chunk_gdn_fwd`."""
    inputs = (q, k, v, a, b, A_log, dt_bias, initial_state)
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)):
        return chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    _check_inputs(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens)
    return ChunkGDNFunction.apply(q, k, v, a, b, A_log, dt_bias, scale, initial_state, output_final_state,
                                  cu_seqlens)
