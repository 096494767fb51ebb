"""Chunked gated delta rule forward in Triton; the reference twin is `hybridlm.ops.delta_rule.chunk_gated_delta_rule`.

Three launches, after fla's chunk_gated_delta_rule decomposition, with the gate math, q/k L2 norm and scale
moved inside the kernels so nothing but q, k, v, a, b is read from the caller:

1. The prepare step (parallel over chunks and value heads): gates g, beta from the raw a, b; cumulative log
   decay G inside the chunk; the strictly lower A = beta k k^T * exp(G_i - G_j) in 16-row blocks; (I + A)^-1 by
   forward substitution on the four diagonal blocks and block substitution for the rest (the WY form);
   w = (I + A)^-1 (beta k exp(G)) and u = (I + A)^-1 (beta v); the normalised keys for 2. By default
   (`KKT_PREPARE`) two launches from `gdn_prepare_kkt`: the Gram matrix and the inverse, then w and u; else
   `gdn_prepare.chunk_gdn_fwd_prepare_kernel`, all of it in one launch.
2. `gdn_state_pass.chunk_gdn_fwd_h_kernel` (sequential over the chunks of a sequence, parallel over heads and V blocks):
   stores the state entering each chunk h, the corrected values v_new = u - w h, and the final state. With
   `FOLD_WU_INTO_H` it takes v_new = X (beta (v - exp(G) k h)) instead, and 1. stores no w, u (where many programs
   run the pass). With `STATE_PASS_CP` long sequences (from 16k tokens at 9B heads) are cut into segments that run
   at once (`gdn_cp`).
3. `gdn_output.chunk_gdn_fwd_o_looped_kernel` (parallel over chunks and value heads): o = (q exp(G)) h
   + tril(q k^T exp(G_i - G_j)) v_new, the 64x64 q k^T made once per chunk and the V blocks walked in a loop;
   with `LOOPED_O` off, `chunk_gdn_fwd_o_kernel` (also parallel over V blocks, each redoing q k^T) instead.
   With `FUSED_OUTPUT` (by rule, in training's forward too: where 2. runs at least 1.5 programs per SM: long
   sequences cut into segments, or batches) 2. makes o itself from the normalised q and the decayed q k^T that 1.
   stores, and stores neither h nor v_new (9B heads, 16k tokens on an H200: 0.78 -> 0.66 ms).

Value head i_h reads key head i_h // (HV // H); q and k are never repeated in memory. The recurrent state and
every accumulation are fp32; h and v_new are stored in the input dtype (as fla does) for the tensor-core dots.
Tried and removed (benchmarks/NOTES.md, eighth session): w and u made inside 2. from the stored X; it put more dots
on 2.'s sequential chain and took 2x as long on an H200. 3. made inside 2. (FlashQLA's fused forward) lost then with
one program per SM (1.5x); it is back as `FUSED_OUTPUT` for the many-program passes the context-parallel cut and
batches make, where it wins (fourteenth session).
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from hybridlm.ops.triton import gdn_cp
from hybridlm.ops.triton.gdn_output import chunk_gdn_fwd_o_kernel, chunk_gdn_fwd_o_looped_kernel
from hybridlm.ops.triton.gdn_prepare import chunk_gdn_fwd_prepare_kernel
from hybridlm.ops.triton.gdn_prepare_kkt import chunk_gdn_fwd_kkt_solve_kernel, chunk_gdn_wu_kernel
from hybridlm.ops.triton.gdn_state_pass import chunk_gdn_fwd_h_kernel
from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import (
    cdiv, check_cu_seqlens, chunk_launch, dot_precision, hopper_miscompiles, next_power_of_2, prepare_chunks,
    rows_packed,
)
from hybridlm.ops.varlen import host_bounds

CHUNK_SIZE = 64
SUB_CHUNK = 16  # the triangular solve works on 16x16 blocks of the 64x64 chunk matrix


# The state pass for rows of one token (T == 1, not packed). Triton turns an integer argument equal to 1 into a
# constant, so T == 1 compiles a variant of its own: the loop's single trip known, nothing pipelined, 36 KB of shared
# memory against ~109 KB (sm_90, Triton 3.6, bf16 128/64). On Hopper with Triton 3.6 that variant hit illegal
# addresses: bf16 128/64 with two one-token rows at V blocks of 16, and 128/128 at V blocks of 32 (blocking launches,
# an H100 and an H200; benchmarks/NOTES.md, twentieth session), while one-token sequences in packed batches, whose T
# the kernel reads from cu_seqlens, passed. This copy takes T as a plain integer, so such batches run the code that
# every other length runs. On an H100 (2026-12-06, `gpu_plan.sh 35`) the faulting test passed and the fault map at
# 64/96/128 showed no fault, with V blocks of 16 or 32.
_chunk_gdn_fwd_h_kernel_any_length = triton.jit(do_not_specialize=["T"])(chunk_gdn_fwd_h_kernel.fn)


def state_pass_kernel(length: int, packed: bool):
    """The state pass's kernel for rows of `length` tokens (`packed`: cu_seqlens given, T read from it)."""
    return _chunk_gdn_fwd_h_kernel_any_length if length == 1 and not packed else chunk_gdn_fwd_h_kernel


def _check_inputs(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, T, Hk, dk] and v [B, T, Hv, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q, k, v must share one of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, length, key_heads, _ = q.shape
    value_heads = v.shape[2]
    if value_heads % key_heads:
        raise ValueError(f"value heads ({value_heads}) must be a multiple of key heads ({key_heads})")
    if a.shape != v.shape[:3] or b.shape != v.shape[:3]:
        raise ValueError(f"a and b must be [B, T, Hv] = {tuple(v.shape[:3])}, got {tuple(a.shape)}, {tuple(b.shape)}")
    if A_log.shape != (value_heads,) or dt_bias.shape != (value_heads,):
        raise ValueError(f"A_log and dt_bias must be [Hv] = [{value_heads}], got {tuple(A_log.shape)}, "
                         f"{tuple(dt_bias.shape)}")
    check_cu_seqlens(cu_seqlens, batch, length)
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    expected = (num_states, value_heads, q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be {expected}, got {tuple(initial_state.shape)}")


def chunk_gdn_fwd(
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
    """Chunked gated delta rule from raw gate inputs: o [B, T, Hv, dv] (dtype of v), final state fp32 or None.

    q, k [B, T, Hk, dk] un-normalised (L2 norm and the 1/sqrt(dk) scale happen in-kernel); v [B, T, Hv, dv];
    a, b [B, T, Hv] raw (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), in fp32); A_log, dt_bias [Hv];
    states [N, Hv, dk, dv]; `cu_seqlens` [N + 1] packs N sequences into B = 1 (one host read of it).
    q, k, v may be column slices of one [B, T, C] tensor (only the token stride is free).
    """
    _check_inputs(q, k, v, a, b, A_log, dt_bias, initial_state, cu_seqlens)
    out = _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return out["o"], out["final_state"]


# How the prepare step runs (`benchmarks/sweep_kernels.py --kernels prepare,kkt` times the settings; numbers and what
# lost: benchmarks/NOTES.md, RESULTS.md):
# - KKT_PREPARE (the default): `gdn_prepare_kkt`'s kkt_solve (the Gram matrix over key slices of KKT_BK, the norms
#   from its diagonal, the inverse; 1 warp: wider repeats its 16 x 16 dots in every warp) and the w/u kernel (64 x 64
#   by 64 x BV products); else `gdn_prepare.chunk_gdn_fwd_prepare_kernel`, all in one launch at 255 registers (2x).
# - KKT_RECURSIVE: the four diagonal 16 x 16 inverses by recursive halving (`gdn_prepare._unit_lower_inverse_recursive`,
#   six dependent tensor-core products each); else forward substitution, the four loops in one with KKT_INTERLEAVE.
#   H100, 9B heads (2026-12-07): kkt_solve 0.145 -> 0.079 ms at 16k (188 registers, no spills; 255 with spills
#   before), the forward 1.05-1.12x at every shape, train 1.03x; 2 warps 0.92-0.96x.
# - KKT_HEADS_FASTEST: from this many chunks on the grid (None: never), kkt_solve and the w/u kernel on a grid (heads,
#   chunks) (`utils.chunk_launch`): the value heads of a key head read its k (and q) rows of a chunk from L2 after the
#   first, where a pass over all chunks would evict them. H100, 9B heads: 1 x 64k 1.07x, 1 x 16k 0.99x, 8 x 4k 0.97x.
# - KKT_MAXNREG, KKT_WU_MAXNREG: register caps (Triton's maxnreg; None: the compiler's pick), 16-bit only. H100
#   (2026-12-06, before KKT_RECURSIVE): w/u at 128 unchanged; kkt_solve at 168 / 128 lost 1.45x / 3x to spills.
KKT_PREPARE = True
KKT_BK = 64  # key columns per slice of the Gram sum
KKT_WARPS = 1
KKT_RECURSIVE = True
KKT_INTERLEAVE = True
KKT_HEADS_FASTEST: int | None = 512
# (kkt_solve making aqk, rk, rq itself where w/u would make only them, with no w/u launch, lost on an H100: 9B heads
# 16k 0.594 -> 0.699 ms, 64k 2.130 -> 2.468, train 1 x 16k 3.516 -> 3.631; kkt_solve 0.080 -> 0.297 ms at 16k
# against the w/u launch's 0.104: 255 registers with spills at one warp. 2026-12-07, `gpu_plan.sh 62`. Removed.)
KKT_WARPS_FP32 = 4  # fp32's "ieee" dots hold whole operand rows per thread: 1 warp spills 1.7 KB
KKT_WU_BV = 128  # value columns per step of the w/u kernel
KKT_WU_WARPS = 8
# WU_CHUNKS, WU_STAGES: where the w/u kernel makes no w, u (the fold), each program makes WU_CHUNKS neighbouring chunks
# in a loop of WU_STAGES stages, so one chunk's q, k loads overlap the last one's products and stores (95 -> 127
# registers at 8 warps, sm_90). None: 2 where it makes aqk and the row norms (a cut) for two or more value heads per
# key head, else 1. H100 (2026-12-07, `gpu_plan.sh 63`/`64`, forward ms): 9B heads 16k 0.556 -> 0.541, 32k 1.063 ->
# 1.014, 64k 2.100 -> 2.007 (w/u 0.431 -> 0.350 at 4 chunks), 2 x 16k 1.046 -> 1.026; at 0.8B heads (one value head
# per key head) 1-2% slower (64k w/u 0.269 -> 0.279); 9B 8 x 4k (no cut) 1.055 -> 1.094.
WU_CHUNKS: int | None = None
WU_STAGES = 2
KKT_MAXNREG: int | None = None
KKT_WU_MAXNREG: int | None = None
FUSED_PREPARE_WARPS = 2
# FOLD_WU_INTO_H (with KKT_PREPARE, 16-bit inputs): w and u are not stored; the state pass takes v_new =
# X (beta (v - exp(G) (k h))), the same products regrouped: per chunk step it reads X (64 x 64) and v instead of w
# and u (40 KB instead of 48 at 9B heads, BV 32), one more 64 x 64 x BV product on the sequential chain. None (the
# default) folds where the state pass runs at least FOLD_MIN_PROGRAMS sequences (or segments) x value heads; True /
# False force it. H200 (tenth session): with 128 or more the fold won (B = 8, T = 4k: 9B 1.49 -> 1.40 ms; 64k cut
# 3.33 -> 3.07), with 16 or 32 it lost (9B 16k uncut 0.899 -> 1.065): few programs cannot hide the longer chain.
# Training's forward folds by the same rule (TRAIN_FORWARD_AS_INFERENCE); its backward never folds.
FOLD_WU_INTO_H: bool | None = None
# With the fold the w/u kernel only normalises k (and, for FUSED_OUTPUT, q and the decayed q k^T per value head): run
# it one program per key head, for the group's value heads at once. H100 (2026-12-05, `gpu_plan.sh 24`, CUDA graphs,
# same bits): 9B heads 16k 0.687 -> 0.675 ms, 64k 2.64 -> 2.52, 4k and 8 x 4k even; 0.8B heads even.
WU_KEY_HEAD_PROGRAMS = True
FOLD_MIN_PROGRAMS = 128
# TRAIN_FORWARD_AS_INFERENCE: training's forward (X kept for the backward) takes the inference forward's rules (the
# fold, the fused output, row norms on cut segments) where its states are not kept; the backward recomputes w, u, h and
# v_new either way (same gradients). H100 (2026-12-06, `gpu_plan.sh 51`), forward + backward: 9B heads 4 x 4k 3.555 ->
# 3.282 ms, 1 x 16k 4.221 -> 3.887; 0.8B 1 x 16k 2.726 -> 2.525, 4 x 4k even. False: training never folds or fuses.
TRAIN_FORWARD_AS_INFERENCE = True

# How the output step runs where the state pass does not make it; `benchmarks/sweep_kernels.py --kernels o` times both
# kernels and their settings (RESULTS.md, sixth session).
# - LOOPED_O: `chunk_gdn_fwd_o_looped_kernel`, one program per chunk and value head that makes q, k and the 64x64
#   decayed q k^T once and walks the V blocks; else `chunk_gdn_fwd_o_kernel`, one program per V block, each redoing
#   all of that. H200, 9B heads, 64k tokens: looped BV 64, 4 warps, 2 stages 0.882 ms; the per-block kernel at its
#   best 1.052. One stage faulted at BV 32: not used. Registers (sm_90): bf16 154, no spills; fp32 dots ("ieee") run
#   on FMAs holding whole operand rows per thread, so every fp32 forward kernel spills (`compile_check.py -k o=`).
LOOPED_O = True
LOOPED_O_BV = 64  # V columns per step of the looped kernel (bf16, fp16)
LOOPED_O_WARPS = 4
LOOPED_O_STAGES = 2
LOOPED_O_BV_FP32 = 32
LOOPED_O_WARPS_FP32 = 8


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100); 1 elsewhere (the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# The state pass's V block. Each program walks its sequence's chunks in order, and per chunk moves
# 2 BT dk (w, k in) + BV (BT + dk + BT) (u in, h and v_new out) elements, so narrower blocks re-read w and k more
# often, wider ones leave SMs idle. What bounds the pass on an H200 is what one SM can move from L2 per step: at 9B
# heads, B = 1, 16k tokens its 128 programs (BV 32) move 48 KB per 1.27 us step, ~4.8 TB/s in all, and at B = 4 (four
# programs per SM) a step takes ~4x as long (eighth session, benchmarks/NOTES.md). So a block costs
# max(1, programs / SMs) x bytes per program-step, and the narrowest of the cheapest wins: B = 1 keeps BV 32 at 9B
# heads and 16 at 0.8B; B = 4, T = 4k takes 64 for both: 9B 0.331 -> 0.220 ms, 0.8B 0.171 -> 0.115 (keys normalised
# beforehand; normalised in the loop, as the backward's recompute runs it: 0.336 -> 0.238-0.279, 0.171 -> 0.142).
# BV 128 (8 warps: the fp32 state alone is 128 registers a thread at 4) lost to 64 at both (0.240, 0.244), so the
# list stops at 64. fp32 keeps 32 (its FMA dots spill at wider blocks).
STATE_PASS_BVS = (16, 32, 64)
# The narrowest V block of the (unfolded) state pass on Hopper with a Triton that miscompiles there. Two one-token
# rows (bf16) faulted in this pass with blocking launches on an H100 and an H200 (Triton 3.6): at 128/64 with blocks
# of 16; with blocks of at least 32, 128/64 passed and 128/128 faulted instead, while 0.8B heads lost 14% at 4k and
# 16k (2026-12-06, RESULTS.md). So the width is not the cause (the T == 1 variant is: `state_pass_kernel`): 16.
HOPPER_STATE_PASS_NARROWEST = 16
# Pipeline stages of the plain state pass (not the fused one: FUSED_OUTPUT_STAGES), in 16-bit dtypes (fp32 keeps
# Triton's default, 3). At 3, V blocks of 64 take 123 KB of shared memory at 9B heads (Triton 3.6, sm_90), so one
# program per SM: B = 4 at 9B heads is 256 programs, two waves on an H100. At 2 (~82 KB) two fit an SM, yet train
# (forward + backward, B = 4, T = 4k; training's forward and the backward's recompute take this pass) ran at 1.00x
# (9B heads) and 0.97x (0.8B) on an H100 (2026-12-05, `gpu_plan.sh 29`, `hs2`): the pass's chain, not the SM count,
# bounds it.
STATE_PASS_STAGES = 3


def plain_state_pass_launch(fp32: bool) -> dict:
    """The plain state pass's launch settings (warps, stages)."""
    return dict(num_warps=4, num_stages=3 if fp32 else STATE_PASS_STAGES)


# STATE_PASS_CP: cut long sequences into segments that run in parallel (`gdn_cp`: a pre-pass from the gates, a chain
# over the segments, then the state pass over every segment at once) where few sequences x heads leave SMs idle or
# force narrow V blocks (B = 1-4 at 9B and 0.8B heads), by gdn_cp.worth_splitting (timings there);
# CP_SEGMENT_CHUNKS (None: `gdn_cp`'s rule) fixes the segment length (tests use 2).
STATE_PASS_CP = True
CP_SEGMENT_CHUNKS: int | None = None
# (STATE_PASS_TRANSPOSED, the state pass carrying S^T so that every product on the state's chain takes its left
# operand from registers, flash attention's P V pattern, at whole 128-wide values, 8 warps, 1 stage, without row norms
# (offline: 255 registers, no spill, 37 KB): lost on an H100, 9B heads 1 x 16k 0.542 -> 0.686 ms, 64k 2.006 -> 2.628,
# 8 x 4k 1.047 -> 1.237 (0.85x / 0.83x / 0.85x of the plain pass without row norms, its fair reference).
# STATE_PASS_BLOCK_MASKS, X and A read under their 16 x 16 block triangle and copied asynchronously (no spill, 123 KB
# of shared memory, one program an SM): lost too, 0.655 / 2.442 / 1.340 ms. Removed, 2026-12-08, `gpu_plan.sh 89`.)
# FUSED_OUTPUT: the output made inside the state pass (`chunk_gdn_fwd_h_kernel`'s FUSED_O, FlashQLA's layout), so
# neither h (T / 64 x Hv x dk x dv: 268 MB at 9B heads and 16k tokens) nor v_new (134 MB) is written and read back,
# ~0.8 GB of traffic (~0.19 ms at an H200's copy rate), and the output launch is gone. The cost: per chunk step the
# pass also reads q (normalised and scaled by the w/u kernel) and the decayed causal q k^T (FUSED_OUTPUT_QK_GIVEN)
# and makes q h and A v_new, of which only A v_new waits on the state's chain. With one
# program per SM (9B heads, B = 1, 16k uncut, BV 32) that lost in the eighth session (fused pass 0.847 ms against
# 0.326 + 0.211 for h and o apart): the extra products lengthened each step and nothing ran beside them. With the
# context-parallel cut or a batch, the pass runs 512 programs at 9B heads (16k, or B = 8 at 4k), two or more per SM,
# which can overlap one program's products with another's loads. None fuses where the state pass runs at least
# FUSED_MIN_PROGRAMS_PER_SM programs (V blocks included) per SM, in 16-bit, at inference and in training's forward
# (TRAIN_FORWARD_AS_INFERENCE); True fuses every forward (any dtype: the tests use fp32; training's too, whose backward
# recomputes h and v_new from X), except where the forward's states are kept for the backward
# (`gdn_chunk_bwd.BWD_REUSE_FORWARD_STATES`); False never. On an H200 (2026-12-05,
# `sweep_kernels.py --kernels fusedo`, whole forward, bf16) fused at V blocks of 64, 4 warps, 2 stages against unfused:
# 9B heads 16k (cut) 0.665 vs 0.781 ms, 64k 2.562 vs 3.034, 8 x 4k 1.164 vs 1.388; 0.8B 64k 1.459 vs 1.672, 8 x 4k 0.642
# vs 0.761 (256 programs); where fewer programs run it lost (0.8B 16k uncut, 32 programs: 1.150 vs 0.568). V blocks of
# 32, 8 warps or 3 stages lost everywhere (128 at 8 warps 0.63-0.65x, H100, 2026-12-06). Training's forward fused
# but not folded, q k^T made in the pass, lost at every shape timed (`bench_gdn.py --kinds train`, eleventh session):
# 4 x 4k 3.515 vs 3.229 ms at 9B heads, 1.968 vs 1.818 at 0.8B; 1 x 16k 3.387 vs 2.826 (0.8B), 4.135 vs 3.863 (9B).
# Registers and shared memory of the fused pass (sm_90, Triton 3.6, 9B heads, the cut's main pass): two programs of
# 4 warps fit an SM at up to 255 registers and ~113 KB; folded, V blocks of 32 at 2 stages 249 registers, 94 KB; of 64
# 255 with 60 B spilled, 107 KB; at 3 stages 132-148 KB (one program). `sweep_kernels.py --kernels fusedo` times them.
FUSED_OUTPUT: bool | None = None
# 256 programs on 132 SMs won (0.8B heads, 8 x 4k: 0.642 vs 0.761 ms), 32 lost; nothing between was timed
FUSED_MIN_PROGRAMS_PER_SM = 1.5
FUSED_OUTPUT_WARPS = 4
FUSED_OUTPUT_STAGES = 2  # at 3 the pipelined loads take 148 KB of shared memory (9B heads, folded): one program per SM
# (The folded, fused pass's k, q, v, X and q k^T tiles through tensor descriptors (TMA) lost on an H100: 9B heads
# 16k 0.674 -> 0.861 ms, 64k 2.52 -> 3.32, 8 x 4k 1.18 -> 1.56; at 1 stage (49 KB of shared memory instead of 123)
# 0.82-0.86x; and the packed GPU test gave a wrong o (0.55). Removed, 2026-12-05, `gpu_plan.sh 29`.)
FUSED_OUTPUT_BV: int | None = 64  # (at most dv's power of two); None: state_pass_block's pick
# FUSED_OUTPUT_MAXNREG: a register cap for the fused pass (Triton's maxnreg; None: the compiler's pick, 255 at 9B heads,
# so two 4-warp programs an SM). At 168 three fit where shared memory allows (V blocks of 32 or one stage).
FUSED_OUTPUT_MAXNREG: int | None = None
# (STATE_PASS_STACK_QH, q h and k h as one product [q; k] h split after, one wgmma round trip a step fewer: lost on
# an H100, 9B heads 64k 2.03 -> 3.30 ms (2.56 at 1 stage), 8 x 4k 1.05 -> 1.74 (1.34), 0.8B alike; it spills
# 116-184 B. Removed, 2026-12-07, `gpu_plan.sh 72`.)
# the decayed causal q k^T of each chunk made by the w/u kernel (a [B, T, Hv, 64] tensor in the input dtype, 67 MB at
# 9B heads and 16k tokens, written and read once) instead of inside the fused pass's loop, where it cost a
# 64 x 64 x dk product per V block and step and the registers to hold it (sm_90, Triton 3.6, 9B heads, the cut's
# folded main pass at 4 warps: V blocks of 64 at 2 stages 176 B spilled -> 60; of 32 at 3 stages 56 B -> none, 202
# registers). False: made in the loop (the sweep times both).
FUSED_OUTPUT_QK_GIVEN = True
# ROW_NORMS_IN_PASS (with the fold, the fused output and q k^T given): the w/u kernel stores the rows' inverse norms
# of q and k (fp32, [B, T, Hk] each) instead of normalised copies, and the state pass (and the cut's pre-passes) read
# the raw q, k and put 1 / |k| and scale / |q| into the row factors they already apply (exp(G) on k h and q h,
# exp(G_last - G) on v_new before k^T v_new): no new product, two 64-float loads per chunk step, and the w/u kernel
# no longer writes 2 x T x Hk x dk elements (9B heads: its time 0.143 -> 0.107 ms at 16k, 0.634 -> 0.507 at 64k).
# Those loads slowed the pass (1.289 -> 1.542 ms at 64k) until the pass took them a chunk ahead
# (STATE_PASS_PREFETCH_ROWS: 1.359). H100, 2026-12-06 (twenty-third session, `bench_gdn.py --variant`, one process
# each), whole forward, both on: 9B heads 16k 0.683 -> 0.650 ms, 64k 2.513 -> 2.464, 0.8B 64k 1.538 -> 1.436, where the
# sequences are cut (context-parallel segments); uncut batches lost at 9B heads (8 x 4k 1.177 -> 1.239, 1.237 with the
# row norms alone; 0.8B won 3-4%). So None (the default) takes both where the state pass runs over segments; True /
# False force the row norms, and the prefetch follows STATE_PASS_PREFETCH_ROWS (None: with the row norms).
# (The prefetch alone: 9B 16k 1.02x, 64k 0.99x, 8 x 4k 0.90x.)
ROW_NORMS_IN_PASS: bool | None = None
STATE_PASS_PREFETCH_ROWS: bool | None = None
# STATE_PASS_PREFETCH_TILES (folded passes): each step loads the next chunk's X, beta and (fused) q k^T, under the
# 16 x 16 block triangle, once this chunk's have gone into their products. Without it the step loads its own X and
# q k^T under the element triangle j <= i, which no vector load covers: the compiled main pass (sm_90, Triton 3.6,
# 9B heads, the cut) issues them as 2-byte `ld.global` in the loop, on the state's chain, beside the pipelined
# asynchronous copies of k, q and v. Off until timed.
STATE_PASS_PREFETCH_TILES = False
# STATE_PASS_PREFETCH_KV (folded passes): k and v of the next chunk loaded into registers during each step as well, and
# (fused, q k^T given) the output made after the update. With two stages Triton's pipeliner issues the asynchronous
# copies of step t + 1 (k, q, v) at the end of step t and waits for them at the start of step t + 1 (its schedule puts
# a stage's loads after the stage it overlaps: nothing is left in flight between them in this loop), so each step
# waits one global load on the chain; three stages hide it but take 147 KB of shared memory (one program an SM).
# Offline it spills (the cut's main pass: 716 B at V blocks of 64, 432 at 32, 20 at 8 warps). Off until timed.
STATE_PASS_PREFETCH_KV = False
# STATE_PASS_GLUON: the fused, folded state pass (q k^T given; dk 128, 16-bit, CUDA; the cut's main pass and uncut
# rows or packed sequences) as the Gluon kernel of `gdn_state_pass_gluon`, which places its own copies (chunk t + 1's
# issued at the start of step t) and waits three times a step instead of five. Offline (sm_90, Triton 3.6, the cut's
# pass): V blocks of 32 251 registers, no spill, 96 KB of shared memory; of 64 255 registers, 356 B spilled, 112 KB
# (two programs an SM either way). Off: never run (`benchmarks/gluon_compile_check.py` compiles it).
STATE_PASS_GLUON = False
STATE_PASS_GLUON_BV = 32
# (Storing q k^T once per key head without the decay, for the pass to decay per value head, lost on an H100:
# 9B heads, 16k 0.687 -> 0.883 ms, 64k 2.64 -> 3.47, 8 x 4k 1.18 -> 1.35; `qkkh` in `gpu_plan.sh 24`. Removed.
# Having kkt_solve make the decayed q k^T and the normalised q, k in a second pass over the key slices after its
# inverse, so that the folded, fused forward runs no w/u kernel (255 registers, 152 B spilled), lost too: 16k
# 0.673 -> 0.850 ms, 64k 2.52 -> 3.39, 8 x 4k 1.18 -> 1.55; `kktqk` in `gpu_plan.sh 27`. Removed.
# Two regroupings lost on an H100 (2026-12-06, RESULTS.md, twenty-first session) and were removed:
# - the update's operand P = diag(beta) X^T (k exp(G_last - G)) and M = A X diag(beta) made by the w/u kernel, so the
#   pass takes S <- exp(G_last) S + P^T Y, o = exp(G) q S + M Y with Y = v - exp(G) k S (two products on the state's
#   chain instead of three, as FlashQLA regroups): 9B 16k 0.671 -> 1.069-1.169 ms. The w/u kernel went 0.143 ->
#   0.513 ms (255 registers: one program per SM) and the pass 0.363 -> 0.496 at 2 stages (131 KB of shared memory:
#   one program per SM) or 0.393 at 1 stage: the shorter chain bought nothing the lost pipelining did not cost.
# - raw q, k into the pass (their norms scaling the products' rows, q k^T made in the loop) and no w/u kernel: the
#   pass went 0.359 -> 0.612 ms (255 registers, ~450 B spilled) against the w/u kernel's 0.142 saved; at 3 stages
#   9B 64k lost 10% and 0.8B 8 x 4k won 17% (0.704 -> 0.603), and the cut pass gave a wrong o at 64/64 on the GPU.)


def state_pass_block(dk: int, dv: int, programs_per_block: int, element_size: int, device: torch.device,
                     fp32: bool, narrowest: int = 16) -> int:
    """The V block of `chunk_gdn_fwd_h_kernel` for `programs_per_block` = sequences x value heads, at least
    `narrowest` (32 where a 16-wide block was never run on a GPU, or faulted: the backward, FOLD_WU_INTO_H)."""
    BT, BK = CHUNK_SIZE, max(16, next_power_of_2(dk))
    widest = max(narrowest, next_power_of_2(dv))
    if fp32:
        return min(widest, max(narrowest, 32))
    sms = _multiprocessors(device)

    def cost(BV):
        programs = cdiv(dv, BV) * programs_per_block
        return max(1.0, programs / sms) * (2 * BT * BK + BV * (2 * BT + BK)) * element_size

    return min((bv for bv in STATE_PASS_BVS if narrowest <= bv <= widest), key=lambda bv: (cost(bv), bv))


def _register_cap(maxnreg: int | None, fp32: bool) -> dict:
    """Triton's maxnreg launch option where a cap is set (never for fp32, whose dots hold whole rows)."""
    return {} if maxnreg is None or fp32 else dict(maxnreg=maxnreg)


def may_split(tokens: int, value_heads: int) -> bool:
    """STATE_PASS_CP is on and `tokens` (all sequences together) could hold a sequence long enough to cut, so the
    sequence bounds are worth reading (cheap host-side exit for short batches)."""
    return STATE_PASS_CP and cdiv(tokens, CHUNK_SIZE) * value_heads >= gdn_cp.CP_MIN_HEAD_CHUNKS


def sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> tuple[int, ...]:
    """Token bounds of the sequences on the host: cu_seqlens' (read once per tensor), else B rows of T."""
    if cu_seqlens is not None:
        return tuple(host_bounds(cu_seqlens))
    return tuple(range(0, (batch + 1) * length, length)) if length else (0,) * (batch + 1)


def _gluon_pass_applies(keys, fold_args, fused_args, dk, length) -> bool:
    """Whether the fused, folded state pass runs as `gdn_state_pass_gluon` (STATE_PASS_GLUON, on a CUDA GPU): q k^T
    given, and q either raw with row norms or normalised (never both), dk = 128, 16-bit, more than one token a row."""
    return (STATE_PASS_GLUON and keys.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and dk == 128
            and length > 1 and keys.dtype in (torch.bfloat16, torch.float16) and fold_args.get("FOLD_WU", False)
            and fused_args.get("A_GIVEN", False)
            and fold_args.get("ROW_NORMS", False) != fused_args.get("Q_NORMED", False))


def _gluon_pass(rows, keys, g_cumsum, initial_state, final_state, cu_seqlens, length, fold_args, fused_args, common,
                final_slot=None):
    """`gdn_state_pass_gluon.gdn_fused_pass_gluon_kernel` over `rows` sequences (segments, with `final_slot`) x value
    heads, with the arguments the Triton pass would take."""
    from hybridlm.ops.triton.gdn_state_pass_gluon import gdn_fused_pass_gluon_kernel

    row_norms = fold_args.get("ROW_NORMS", False)
    gdn_fused_pass_gluon_kernel[(cdiv(common["V"], STATE_PASS_GLUON_BV), rows * common["HV"])](
        keys, fused_args["q"], fold_args["v"], fold_args["b"], g_cumsum, fold_args["x_inv"], fused_args["aqk"],
        fold_args["rk"] if row_norms else None, fused_args["rq"] if row_norms else None, fused_args["o"],
        initial_state, final_state, final_slot, cu_seqlens, length, keys.stride(1), fused_args["stride_q"],
        fold_args["stride_v"], H=common["H"], HV=common["HV"], K=common["K"], V=common["V"], BT=CHUNK_SIZE,
        BV=STATE_PASS_GLUON_BV, STORE_FINAL_STATE=final_state is not None, IS_VARLEN=cu_seqlens is not None,
        USE_INITIAL_STATE=initial_state is not None, FINAL_SLOT=final_slot is not None, ROW_NORMS=row_norms,
        num_warps=4)


def segment_plan(bounds: tuple[int, ...], value_heads: int, device: torch.device) -> gdn_cp.SegmentPlan | None:
    """The context-parallel segments for these sequences, or None where the plain state pass fits better."""
    total_chunks = sum(cdiv(b - a, CHUNK_SIZE) for a, b in zip(bounds[:-1], bounds[1:]))
    if total_chunks == 0 or any(b == a for a, b in zip(bounds[:-1], bounds[1:])):
        return None
    segment = CP_SEGMENT_CHUNKS or gdn_cp.segment_chunks_for(value_heads, total_chunks, _multiprocessors(device))
    if not gdn_cp.worth_splitting(bounds, value_heads, segment, CHUNK_SIZE):
        return None
    return gdn_cp.plan_segments(bounds, segment, CHUNK_SIZE, device)


def _segmented_state_pass(plan, keys, w, u, g_cumsum, h, v_new, initial_state, final_state, length, fold_args,
                          common, narrowest, norm_k=False, fused_args=None, main_bv=None, prefetch_rows=False):
    """`chunk_gdn_fwd_h_kernel` over the segments of `plan` (gdn_cp's three steps): the same h, v_new and final
    state as the plain pass, up to rounding and (for segments whose gates decay fast) terms below e^CP_LOG_DECAY.
    `keys`: normalised, or raw with `norm_k` (normalised in the loop, as the backward runs it) or with
    ROW_NORMS in `fold_args` (their inverse norms given); token stride keys.stride(1).
    `fused_args` (FUSED_OUTPUT): the main pass makes the output instead of storing h and v_new (both None), with
    these launch settings and V blocks of `main_bv` (None: the pre-pass's). `prefetch_rows`: every pass takes the
    next chunk's row factors during each step (STATE_PASS_PREFETCH_ROWS)."""
    value_heads, dk, dv = common["HV"], common["K"], common["V"]
    segments, device, fp32 = plan.num_segments, g_cumsum.device, common["DOT_PRECISION"] == "ieee"
    stride_k = keys.stride(1)
    seg = dict(common, IS_VARLEN=True, NORM_K=norm_k, PREFETCH_ROWS=prefetch_rows, **plain_state_pass_launch(fp32))
    tables = (plan.cu_seqlens, plan.chunk_offsets, length, stride_k)
    first, first_m, fallback = gdn_cp.warmup_tables(g_cumsum, plan).unbind(0)
    # 1. what each segment with a successor leaves from zero (over its warmup chunks), and the fallbacks' transitions
    BV = state_pass_block(dk, dv, segments * value_heads, keys.element_size(), device, fp32, narrowest)
    ht = torch.empty(segments, value_heads, dk, dv, dtype=torch.float32, device=device)
    launch(chunk_gdn_fwd_h_kernel, (cdiv(dv, BV), segments * value_heads),
        keys, w, u, g_cumsum, None, None, None, ht, *tables, BV=BV, USE_INITIAL_STATE=False,
        STORE_FINAL_STATE=True, STORE_H=False, HAS_FIRST_CHUNK=True, first_chunk=first, **fold_args, **seg)
    BV_m = state_pass_block(dk, dk, segments * value_heads, keys.element_size(), device, fp32, narrowest)
    mt = torch.empty(segments, value_heads, dk, dk, dtype=torch.float32, device=device)
    launch(chunk_gdn_fwd_h_kernel, (cdiv(dk, BV_m), segments * value_heads),
        keys, w, None, g_cumsum, None, None, None, mt, *tables, BV=BV_m, USE_INITIAL_STATE=False,
        STORE_FINAL_STATE=True, STORE_H=False, ZERO_U=True, IDENTITY_INIT=True, HAS_FIRST_CHUNK=True,
        first_chunk=first_m, **fold_args, **dict(seg, V=dk))
    # 2. the state entering each segment, along each sequence
    h_in = torch.empty(segments, value_heads, dk, dv, dtype=torch.float32, device=device)
    BK = common["BK"]
    BV_c = min(32, max(16, next_power_of_2(dv)))
    sequences = len(plan.last_segment)
    launch(gdn_cp.gdn_cp_chain_kernel, (cdiv(dv, BV_c), sequences * value_heads),
        initial_state, ht, mt, fallback, plan.first_segment, h_in, HV=value_heads, K=dk, V=dv, BK=BK, BV=BV_c,
        BKC=min(32, BK), USE_INITIAL_STATE=initial_state is not None, num_warps=4)
    # 3. the state pass proper, every segment at once
    if fused_args is not None and _gluon_pass_applies(keys, fold_args, fused_args, dk, length):
        _gluon_pass(segments, keys, g_cumsum, h_in, final_state, plan.cu_seqlens, length, fold_args, fused_args,
                    common, final_slot=plan.final_slot)
        return
    BV = main_bv or BV
    launch(chunk_gdn_fwd_h_kernel, (cdiv(dv, BV), segments * value_heads),
        keys, w, u, g_cumsum, h, v_new, h_in, final_state, *tables, BV=BV, USE_INITIAL_STATE=True,
        STORE_FINAL_STATE=final_state is not None, FINAL_SLOT=True, final_slot=plan.final_slot, **fold_args,
        **dict(seg, **(fused_args or {})))


def _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, *, scale, initial_state, output_final_state, cu_seqlens,
                   store_x=False, keep_states=False):
    """The three launches; returns every intermediate (the backward recomputes from some of them). With `store_x`
    the prepare kernel also keeps X = (I + A)^-1 per chunk for the backward (x_inv [B, T, Hv, 64]); `keep_states`:
    the caller keeps w, h and v_new for the backward (so they are made and stored whatever the flags say)."""
    q, k, v = rows_packed(q), rows_packed(k), rows_packed(v)
    a, b = a.contiguous(), b.contiguous()
    A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    batch, length, key_heads, dk = q.shape
    value_heads, dv = v.shape[2], v.shape[3]
    scale = dk ** -0.5 if scale is None else float(scale)
    BT, BC = CHUNK_SIZE, SUB_CHUNK
    BK = max(16, next_power_of_2(dk))
    BV_full = max(16, next_power_of_2(dv))
    BV = min(BV_full, 32)
    precision = dot_precision(v.dtype)
    device = v.device

    bounds = sequence_bounds(cu_seqlens, batch, length) if may_split(batch * length, value_heads) else None
    chunk_tables = None
    if cu_seqlens is not None:
        chunk_tables = prepare_chunks(cu_seqlens, BT, device)  # memoised: no host read after the first layer
        cu_seqlens, chunk_indices, chunk_offsets, num_chunks = chunk_tables
        num_states, grid_chunks = len(cu_seqlens) - 1, num_chunks
    else:
        chunk_indices = chunk_offsets = None
        grid_chunks = cdiv(length, BT)
        num_states, num_chunks = batch, batch * grid_chunks
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    common = dict(H=key_heads, HV=value_heads, K=dk, V=dv, BT=BT, BK=BK, IS_VARLEN=cu_seqlens is not None,
                  DOT_PRECISION=precision)

    g_cumsum = torch.empty(batch, length, value_heads, dtype=torch.float32, device=device)  # [B, T, Hv]
    fp32 = precision == "ieee"
    plan = segment_plan(bounds, value_heads, device) if bounds is not None else None
    programs = (plan.num_segments if plan is not None else num_states) * value_heads
    # w h and u made inside the state pass from X; for training (store_x) only with TRAIN_FORWARD_AS_INFERENCE
    inference_rules = not store_x or (TRAIN_FORWARD_AS_INFERENCE and not keep_states)
    fold = KKT_PREPARE and not fp32 and inference_rules and (programs >= FOLD_MIN_PROGRAMS if FOLD_WU_INTO_H is None
                                                             else FOLD_WU_INTO_H)

    unfolded_narrowest = HOPPER_STATE_PASS_NARROWEST if hopper_miscompiles(device) else 16

    def blocks(fold):  # the state pass's V blocks, unfused and fused
        narrowest = 32 if fold else unfolded_narrowest
        bv = state_pass_block(dk, dv, programs, v.element_size(), device, fp32, narrowest=narrowest)
        return bv, min(FUSED_OUTPUT_BV, max(narrowest, next_power_of_2(dv))) if FUSED_OUTPUT_BV else bv

    BV_h, BV_fused = blocks(fold)
    # (programs counted in 4-warp units: a program of 8 warps holds an SM's warps as two of 4 do)
    fuse_o = not keep_states and (FUSED_OUTPUT if FUSED_OUTPUT is not None else not fp32 and inference_rules and (
        cdiv(dv, BV_fused) * programs * FUSED_OUTPUT_WARPS / 4 >= FUSED_MIN_PROGRAMS_PER_SM * _multiprocessors(device)))
    # folded and fused at once, head dims 32/32 wrote outside shared memory on an H100 with Triton 3.6 (2026-12-05,
    # `gpu_plan.sh 25`: `b_o += tl.dot(b_A, v_new)`, three packed one-chunk sequences; either alone passed, as did
    # 32/128, 64/64, 128/128): with both dims narrow, such GPUs keep w and u where the output is fused
    if fold and fuse_o and max(dk, dv) < 64 and hopper_miscompiles(device):
        fold = False
        BV_h, BV_fused = blocks(fold)
    row_norms = fuse_o and fold and KKT_PREPARE and FUSED_OUTPUT_QK_GIVEN and (
        plan is not None if ROW_NORMS_IN_PASS is None else ROW_NORMS_IN_PASS)
    prefetch_rows = row_norms if STATE_PASS_PREFETCH_ROWS is None else STATE_PASS_PREFETCH_ROWS
    w = None if fold else torch.empty(batch, length, value_heads, dk, dtype=v.dtype, device=device)  # [.., dk]
    u = None if fold else torch.empty(batch, length, value_heads, dv, dtype=v.dtype, device=device)  # [.., dv]
    x_inv = (torch.empty(batch, length, value_heads, BT, dtype=v.dtype, device=device)
             if store_x or KKT_PREPARE else None)
    # the state pass takes k normalised by the w/u kernel, or raw with its rows' inverse norms (row_norms)
    k_normed = None if row_norms else torch.empty(batch, length, key_heads, dk, dtype=k.dtype, device=device)
    # the fused state pass takes q normalised and scaled by the w/u kernel (fewer registers in its loop), or raw
    q_normed = (torch.empty(batch, length, key_heads, dk, dtype=q.dtype, device=device)
                if fuse_o and KKT_PREPARE and not row_norms else None)  # [B, T, Hk, dk]
    rk, rq = ((torch.empty(batch, length, key_heads, dtype=torch.float32, device=device) for _ in range(2))
              if row_norms else (None, None))  # [B, T, Hk]
    aqk = (torch.empty(batch, length, value_heads, BT, dtype=v.dtype, device=device)
           if fuse_o and KKT_PREPARE and FUSED_OUTPUT_QK_GIVEN else None)  # [B, T, Hv, 64]
    if KKT_PREPARE:  # tiles at least 32 wide, as in the backward (16-wide 16-bit dots fault in Triton 3.6, sm_90)
        grid, order = chunk_launch(grid_chunks, batch * value_heads, KKT_HEADS_FASTEST)
        launch(chunk_gdn_fwd_kkt_solve_kernel, grid,
            k, a, b, A_log, dt_bias, g_cumsum, x_inv, cu_seqlens, chunk_indices, length, k.stride(1), H=key_heads,
            HV=value_heads, K=dk, BT=BT, BC=BC, BK=max(32, min(BK, KKT_BK)), IS_VARLEN=cu_seqlens is not None,
            DOT_PRECISION=precision, INTERLEAVE=KKT_INTERLEAVE, RECURSIVE=KKT_RECURSIVE,
            num_warps=KKT_WARPS_FP32 if fp32 else KKT_WARPS, **_register_cap(KKT_MAXNREG, fp32), **order)
        per_key_head = fold and WU_KEY_HEAD_PROGRAMS  # (only where it makes no w, u)
        if WU_CHUNKS is None:
            chunks = 2 if row_norms and per_key_head and value_heads >= 2 * key_heads else 1
        else:
            chunks = WU_CHUNKS if fold else 1
        grid, order = chunk_launch(cdiv(grid_chunks, chunks), batch * (key_heads if per_key_head else value_heads),
                                   KKT_HEADS_FASTEST)
        if chunks > 1:
            order = dict(order, CHUNKS=chunks, STAGES=WU_STAGES, num_chunks=grid_chunks)
        launch(chunk_gdn_wu_kernel, grid,
            k, v, b, g_cumsum, x_inv, w, u, k_normed, cu_seqlens, chunk_indices, length, k.stride(1),
            v.stride(1), BV=max(32, min(BV_full, KKT_WU_BV)), STORE_KN=not row_norms, STORE_WU=not fold,
            KEY_HEAD_PROGRAMS=per_key_head, num_warps=KKT_WU_WARPS, **_register_cap(KKT_WU_MAXNREG, fp32), **order,
            **dict(common, BK=max(32, BK)),
            **(dict(STORE_QN=q_normed is not None, q=q, qn=q_normed, stride_q=q.stride(1), scale=scale,
                    STORE_AQK=aqk is not None, aqk=aqk, STORE_RSTD=row_norms, rk=rk, rq=rq)
               if fuse_o and KKT_PREPARE else {}))
    else:
        launch(chunk_gdn_fwd_prepare_kernel, (grid_chunks, batch * value_heads),
            k, v, a, b, A_log, dt_bias, g_cumsum, w, u, x_inv, k_normed, cu_seqlens, chunk_indices, length,
            k.stride(1), v.stride(1), BC=BC, BV=BV_full, STORE_X=store_x, STORE_KN=True,
            num_warps=4 if fp32 else FUSED_PREPARE_WARPS, **common)

    h = None if fuse_o else torch.empty(num_chunks, value_heads, dk, dv, dtype=v.dtype, device=device)
    v_new = None if fuse_o else torch.empty_like(v, memory_format=torch.contiguous_format)  # [B, T, Hv, dv]
    final_state = (torch.empty(num_states, value_heads, dk, dv, dtype=torch.float32, device=device)
                   if output_final_state else None)
    o = torch.empty(batch, length, value_heads, dv, dtype=v.dtype, device=device)  # [B, T, Hv, dv]
    # (with the fold, BV_h is at least 32: X met a 16-wide block (64 x 64 by 64 x 16, 16-bit), which faulted in the
    # w/u kernel, Triton 3.6)
    fold_args = (dict(FOLD_WU=True, x_inv=x_inv, v=v, b=b, stride_v=v.stride(1),
                      PREFETCH_TILES=STATE_PASS_PREFETCH_TILES, PREFETCH_KV=STATE_PASS_PREFETCH_KV) if fold else {})
    if row_norms:  # (every pass of the state: the cut's pre-passes too)
        fold_args.update(ROW_NORMS=True, rk=rk)
    k_pass = k if row_norms else k_normed
    fused_args = None
    if fuse_o:
        BV_h = BV_fused
        fused_args = dict(FUSED_O=True, q=q if q_normed is None else q_normed, o=o, scale=scale,
                          stride_q=q.stride(1) if q_normed is None else key_heads * dk,
                          Q_NORMED=q_normed is not None, A_GIVEN=aqk is not None, aqk=aqk, STORE_H=False,
                          num_warps=FUSED_OUTPUT_WARPS, num_stages=FUSED_OUTPUT_STAGES,
                          **_register_cap(FUSED_OUTPUT_MAXNREG, fp32), **(dict(rq=rq) if row_norms else {}))
    if plan is None and fuse_o and _gluon_pass_applies(k_pass, fold_args, fused_args, dk, length):
        _gluon_pass(num_states, k_pass, g_cumsum, initial_state, final_state, cu_seqlens, length, fold_args,
                    fused_args, common)
    elif plan is None:
        launch(state_pass_kernel(length, cu_seqlens is not None), (cdiv(dv, BV_h), num_states * value_heads),
            k_pass, w, u, g_cumsum, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets, length,
            k_pass.stride(1), BV=BV_h, USE_INITIAL_STATE=initial_state is not None,
            STORE_FINAL_STATE=output_final_state, NORM_K=False, PREFETCH_ROWS=prefetch_rows, **fold_args, **common,
            **(fused_args or plain_state_pass_launch(fp32)))
    else:
        _segmented_state_pass(plan, k_pass, w, u, g_cumsum, h, v_new, initial_state, final_state, length,
                              fold_args, common, narrowest=32 if fold else unfolded_narrowest, fused_args=fused_args,
                              main_bv=BV_h if fuse_o else None, prefetch_rows=prefetch_rows)

    if not fuse_o and LOOPED_O:  # (fused: the state pass made o)
        BV_o = min(BV_full, LOOPED_O_BV_FP32 if fp32 else LOOPED_O_BV)
        launch(chunk_gdn_fwd_o_looped_kernel, (grid_chunks, batch * value_heads),
            q, k_normed, v_new, h, g_cumsum, o, cu_seqlens, chunk_indices, scale, length, q.stride(1),
            BV=BV_o, num_warps=LOOPED_O_WARPS_FP32 if fp32 else LOOPED_O_WARPS, num_stages=LOOPED_O_STAGES, **common)
    elif not fuse_o:
        launch(chunk_gdn_fwd_o_kernel, (cdiv(dv, BV), grid_chunks, batch * value_heads),
            q, k, v_new, h, g_cumsum, o, cu_seqlens, chunk_indices, scale, length, q.stride(1), k.stride(1),
            BV=BV, num_warps=4, **common)
    return dict(o=o, final_state=final_state, g_cumsum=g_cumsum, w=w, u=u, x_inv=x_inv, h=h, v_new=v_new, aqk=aqk,
                scale=scale, chunk_tables=chunk_tables)
