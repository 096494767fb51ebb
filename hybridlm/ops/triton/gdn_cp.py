"""Context parallelism inside one GPU for the chunked state pass (`gdn_chunk.STATE_PASS_CP`); the reference is the
plain pass (`chunk_gdn_fwd_h_kernel` over whole sequences), which it reproduces.

At B = 1 (or a few long sequences) the state pass has one program per value head and V block, too few to fill the
GPU once the V block is wide, and a wide block is what stops k and w being re-read per block. So a long sequence is
cut into segments of `segment_chunks` chunks that run in parallel, each from the state entering it:

1. Pre-pass (parallel over segments, heads, V blocks; `chunk_gdn_fwd_h_kernel` storing no h, v_new): for every
   segment with a successor, the state it leaves from zero, over only its last W chunks where the gates make that
   exact to e^CP_LOG_DECAY (`warmup_chunks`: the decay over those W chunks is below e^-10 and every factor
   exp(g) (I - beta k k^T) has norm <= 1, so what came before is scaled by less than 4.5e-5), else over the whole
   segment ("fallback"), and then also the segment's transition M (the same pass from the identity with u = 0).
2. Chain (`gdn_cp_chain_kernel`, sequential over the segments of a sequence): h_in[0] = the initial state,
   h_in[s + 1] = M_s h_in[s] + ht_s for fallback heads and ht_s for the others.
3. The state pass proper over the segments with h_in as initial states: the chunks' h and v_new land where the
   plain pass puts them (segments are whole chunks of one sequence), the final state comes from each sequence's
   last segment.

FlashQLA (the Qwen team's TileLang kernels) cuts sequences the same way ("gate-driven intra-card CP"); our segment
rule once took the shape of its latency model (segments of ~3 sqrt(heads x chunks / SMs) chunks, a power of two) and
now aims at one wave of the main pass (`CP_SEGMENT_HEADS_PER_SM`)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, next_power_of_2

CP_LOG_DECAY = -10.0  # a pre-pass may start where the gates have decayed by e^-10 over the chunks up to the boundary
# Cut only where the longest sequence has at least CP_MIN_CHUNKS chunks and its chunks x value heads reach
# CP_MIN_HEAD_CHUNKS. The cut's GPU time wins at every B = 1 length timed, from 4k, but it costs the host ~0.34 ms a
# call (seven launches against three, ~0.18 ms), so an eager call of a short sequence waits on the host. H100, bf16,
# `benchmarks/profile_gdn_host.py` (2026-12-06, twenty-fourth session), eager ms uncut -> cut (GPU time alone in a
# CUDA graph): 9B heads 4k 0.266 -> 0.331 (0.263 -> 0.196), 8k 0.510 -> 0.378; 0.8B heads 4k 0.173
# -> 0.317 (0.171 -> 0.132), 8k 0.332 -> 0.288, 16k 0.630 -> 0.409; training (forward + backward) at 0.8B 1 x 16k
# 2.927 -> 2.700. So both head layouts cut from 8k tokens. (Until then 9B heads cut from 16k and 0.8B from 32k, a rule
# set on an H200 when the cut's host time was 0.2-0.3 ms higher.)
CP_MIN_CHUNKS = 128
CP_MIN_HEAD_CHUNKS = 16 * 128
# ... and only where the sequences, weighed as FlashQLA weighs them (all chunks over the longest's), times the value
# heads stay at most this. Same session, eager ms uncut -> cut: 2 sequences at 9B heads (64) 8k 0.903 -> 0.654, 16k
# 1.828 -> 1.248; 4 at 0.8B heads (64) 16k 1.984 -> 1.331; 2 at 0.8B (32) 16k 1.079 -> 0.699; 4 at 9B heads (128) 16k
# 2.338 -> 2.340 (already full uncut). (Until then 40.)
CP_MAX_SEQUENCE_HEADS = 64


@dataclass(frozen=True)
class SegmentPlan:
    """Segments of `segment_chunks` chunks (the last of a sequence may be shorter), chunk-aligned, never across
    sequences. Device tensors: cu_seqlens [S + 1] int32 (token bounds, as the varlen kernels take them),
    chunk_offsets [S + 1] int32 (first global chunk of each segment), first_segment [N + 1] int32 (segments of
    sequence i are first_segment[i] ... first_segment[i + 1] - 1), last_segment [N] int64, inner [P] int64 (the
    segments with a successor), inner_last_rows [P, segment_chunks] int64 (each of their chunks' last row),
    final_slot [S] int32 (the sequence whose final state a segment leaves; -1 for the inner ones)."""
    segment_chunks: int
    num_segments: int
    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    first_segment: torch.Tensor
    last_segment: torch.Tensor
    inner: torch.Tensor
    inner_last_rows: torch.Tensor
    final_slot: torch.Tensor


# CP_SEGMENT_HEADS_PER_SM: segments x value heads per SM that the cut aims at, so that the main pass (two V blocks of
# 64 at dv = 128, two programs an SM at its 255 registers) runs in one wave; None: FlashQLA's rule shape,
# 3 sqrt(heads x chunks / SMs), which we used until 2026-12-07. H100, forward ms, fixed lengths (`gpu_plan.sh 63`):
# 9B heads 16k 32 chunks (the sqrt rule) 0.588, 64 0.553, 16 0.633; 64k 64 (sqrt) 2.124, 128 2.086, 32 2.214; 0.8B
# heads 16k 16 (sqrt) 0.378, 32 0.345, 64 0.512 (too few programs: not fused); 64k 32 (sqrt) 1.251, 64 1.195, 128
# 1.161: each shape's best was about one wave. This rule at 1 against the sqrt rule (`gpu_plan.sh 64`): 9B 16k 0.589
# -> 0.556, 32k 1.132 -> 1.063, 64k 2.123 -> 2.100, 2 x 16k 1.120 -> 1.046; 0.8B 16k 0.377 -> 0.342, 32k 0.648 ->
# 0.620, 64k 1.245 -> 1.160, 2 x 16k 0.634 -> 0.612; training 1 x 16k 3.485 -> 3.428 (9B), 2.233 -> 2.185 (0.8B).
CP_SEGMENT_HEADS_PER_SM: float | None = 1.0
# ... unless the power-of-two lengths leave fewer than this many segment-heads per SM (48 value heads at 16k: two
# segments, 96 segment-heads on 132 SMs): below it the main pass's 1.5 programs an SM that fuse the output
# (`gdn_chunk.FUSED_MIN_PROGRAMS_PER_SM`, two V blocks) are not reached, and the sqrt rule is kept. Untimed there; at
# 64 value heads, 16k (H100, `gpu_plan.sh 69`), the wave rule's 2 segments 1.011 ms, the sqrt rule's 8 1.087, 4 1.038.
CP_MIN_SEGMENT_HEADS_PER_SM = 0.75


def segment_chunks_for(value_heads: int, total_chunks: int, multiprocessors: int) -> int:
    """Chunks per segment, a power of two, at least 4: with CP_SEGMENT_HEADS_PER_SM, the shortest that makes at most
    that many segments x value heads per SM (if that leaves at least CP_MIN_SEGMENT_HEADS_PER_SM); else
    3 sqrt(heads x chunks / SMs) rounded."""
    if CP_SEGMENT_HEADS_PER_SM is not None:
        segments = max(1, int(CP_SEGMENT_HEADS_PER_SM * multiprocessors // value_heads))
        length = max(4, next_power_of_2(cdiv(total_chunks, segments)))
        if cdiv(total_chunks, length) * value_heads >= CP_MIN_SEGMENT_HEADS_PER_SM * multiprocessors:
            return length
    return max(4, 2 ** round(math.log2(3 * math.sqrt(value_heads * total_chunks / multiprocessors))))


def worth_splitting(bounds: tuple[int, ...], value_heads: int, segment_chunks: int, chunk_size: int,
                    min_head_chunks: int | None = None) -> bool:
    """Whether to cut: few heads x sequence-equivalents (the total over the longest, as FlashQLA weighs it: at most
    CP_MAX_SEQUENCE_HEADS), a longest sequence of at least two segments and CP_MIN_CHUNKS chunks, and its chunks x
    value heads at least `min_head_chunks` (CP_MIN_HEAD_CHUNKS if None)."""
    chunks = [cdiv(b - a, chunk_size) for a, b in zip(bounds[:-1], bounds[1:])]
    longest = max(chunks)
    min_head_chunks = CP_MIN_HEAD_CHUNKS if min_head_chunks is None else min_head_chunks
    return (longest >= 2 * segment_chunks and longest >= CP_MIN_CHUNKS and longest * value_heads >= min_head_chunks
            and sum(chunks) / longest * value_heads <= CP_MAX_SEQUENCE_HEADS)


@functools.lru_cache(maxsize=64)
def plan_segments(bounds: tuple[int, ...], segment_chunks: int, chunk_size: int, device: torch.device
                  ) -> SegmentPlan:
    """The segment tables for sequences with token bounds `bounds` (cu_seqlens on the host)."""
    cu, offsets, first, last, inner, inner_rows, slot = [0], [0], [0], [], [], [], []
    for sequence, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        chunks = cdiv(b - a, chunk_size)
        segments = cdiv(chunks, segment_chunks) if chunks else 0
        for s in range(segments):
            start = a + s * segment_chunks * chunk_size
            end = min(b, start + segment_chunks * chunk_size)
            index = len(cu) - 1
            if s + 1 < segments:  # full segment_chunks chunks, with a successor
                inner.append(index)
                inner_rows.append([min(end, start + (c + 1) * chunk_size) - 1 for c in range(segment_chunks)])
            slot.append(-1 if s + 1 < segments else sequence)
            cu.append(end)
            offsets.append(offsets[-1] + cdiv(end - start, chunk_size))
        first.append(len(cu) - 1)
        last.append(len(cu) - 2 if segments else -1)
    if any(x < 0 for x in last):
        raise ValueError("context-parallel state pass: a sequence of zero tokens has no segment")
    as_int32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    as_int64 = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return SegmentPlan(
        segment_chunks=segment_chunks, num_segments=len(cu) - 1, cu_seqlens=as_int32(cu),
        chunk_offsets=as_int32(offsets), first_segment=as_int32(first), last_segment=as_int64(last),
        inner=as_int64(inner), inner_last_rows=as_int64(inner_rows).reshape(len(inner), segment_chunks),
        final_slot=as_int32(slot))


def warmup_chunks(g_cumsum: torch.Tensor, plan: SegmentPlan, log_decay: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the pre-pass starts: first_chunk [S, HV] int32 (chunk index within the segment; segments without a
    successor get one past their end, so their programs do nothing) and fallback [S, HV] int8 (1 where even the whole
    segment decays by less than e^log_decay: the chain then needs the segment's transition). g_cumsum [rows, HV] is
    the in-chunk cumulative log decay, so a chunk's last row holds its total. `log_decay`: CP_LOG_DECAY if None
    (-inf makes every segment a fallback: the chain is then exact up to rounding)."""
    log_decay = CP_LOG_DECAY if log_decay is None else log_decay
    value_heads = g_cumsum.shape[-1]
    S, P = plan.segment_chunks, len(plan.inner)
    first = torch.full((plan.num_segments, value_heads), S + 1, dtype=torch.int32, device=g_cumsum.device)
    fallback = torch.zeros(plan.num_segments, value_heads, dtype=torch.int8, device=g_cumsum.device)
    if P:
        totals = g_cumsum.reshape(-1, value_heads)[plan.inner_last_rows.reshape(-1)].reshape(P, S, value_heads)
        tail = totals.flip(1).cumsum(1)  # [P, w - 1]: the decay over the segment's last w chunks
        needed = (tail > log_decay).sum(1)  # chunks whose tail decay is still above the bound
        fallback[plan.inner] = (needed >= S).to(torch.int8)
        first[plan.inner] = (S - 1 - needed).clamp(min=0).to(torch.int32)
    return first, fallback


def warmup_tables(g_cumsum: torch.Tensor, plan: SegmentPlan, log_decay: float | None = None) -> torch.Tensor:
    """`warmup_chunks` in one launch (`gdn_cp_warmup_kernel`): int32 [3, S, HV] holding first_chunk, the transition
    pass's first chunk (0 for fallback heads, past the end otherwise) and fallback."""
    log_decay = CP_LOG_DECAY if log_decay is None else log_decay
    value_heads = g_cumsum.shape[-1]
    tables = torch.empty(3, plan.num_segments, value_heads, dtype=torch.int32, device=g_cumsum.device)
    launch(gdn_cp_warmup_kernel, (plan.num_segments,),
        g_cumsum, plan.cu_seqlens, plan.final_slot, tables, float(log_decay), plan.num_segments, HV=value_heads,
        S=plan.segment_chunks, BS=next_power_of_2(plan.segment_chunks),
        BH=next_power_of_2(value_heads), BT=64, num_warps=1)
    return tables


@triton.jit
def gdn_cp_warmup_kernel(
    g_cumsum,  # [rows, HV] fp32: the in-chunk cumulative log decay (a chunk's last row holds its total)
    cu_seqlens,  # [S + 1] int32: the segments' token bounds
    final_slot,  # [S] int32: -1 for the segments with a successor
    tables,  # out [3, S, HV] int32: first_chunk, the transition pass's first chunk, fallback
    log_decay,
    num_segments,
    HV: tl.constexpr,
    S: tl.constexpr,
    BS: tl.constexpr,
    BH: tl.constexpr,
    BT: tl.constexpr,
):
    """One segment, every head: how many of its last w chunks (w = 1 ... S) still decay by more than e^log_decay."""
    i_s = tl.program_id(0)
    o_h = tl.arange(0, BH)
    m_h = o_h < HV
    p_out = tables + i_s * HV + o_h
    stride = num_segments * HV
    if tl.load(final_slot + i_s) < 0:  # a segment with a successor: S full chunks
        start = tl.load(cu_seqlens + i_s).to(tl.int64)
        o_c = tl.arange(0, BS)
        m_c = o_c < S
        rows = start + o_c * BT + BT - 1
        b_tot = tl.load(g_cumsum + rows[:, None] * HV + o_h[None, :], mask=m_c[:, None] & m_h[None, :], other=0.)
        b_tail = tl.sum(b_tot, axis=0)[None, :] - tl.cumsum(b_tot, axis=0) + b_tot  # decay from chunk c to the end
        b_needed = tl.sum((m_c[:, None] & (b_tail > log_decay)).to(tl.int32), axis=0)
        b_fallback = b_needed >= S
        tl.store(p_out, tl.maximum(S - 1 - b_needed, 0), mask=m_h)
        tl.store(p_out + stride, tl.where(b_fallback, 0, S + 1), mask=m_h)
        tl.store(p_out + 2 * stride, b_fallback.to(tl.int32), mask=m_h)
    else:
        tl.store(p_out, tl.full([BH], S + 1, tl.int32), mask=m_h)
        tl.store(p_out + stride, tl.full([BH], S + 1, tl.int32), mask=m_h)
        tl.store(p_out + 2 * stride, tl.zeros([BH], tl.int32), mask=m_h)


@triton.jit
def gdn_cp_chain_kernel(
    initial_state,  # [N, HV, K, V] fp32 (None: zeros)
    ht,  # [S, HV, K, V] fp32: what each segment leaves from zero (over its warmup chunks or all of it)
    mt,  # [S, HV, K, K] fp32: each fallback segment's transition
    fallback,  # [S, HV] int8 or int32
    first_segment,  # [N + 1] int32
    h_in,  # out [S, HV, K, V] fp32: the state entering each segment
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKC: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    """h_in[s + 1] = M_s h_in[s] + ht_s (fallback heads) or ht_s, along one sequence's segments, for one value head
    and V block; M_s h_in[s] in fp32 (ieee), BKC rows of h_in[s] at a time, read back from where it was stored."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(initial_state + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.)
    s0 = tl.load(first_segment + i_n)
    s1 = tl.load(first_segment + i_n + 1)
    for s in range(s0, s1):
        i_sh = (s * HV + i_h).to(tl.int64)
        tl.store(h_in + i_sh * K * V + o_kv, b_h, mask=m_kv)
        if s + 1 < s1:
            b_next = tl.load(ht + i_sh * K * V + o_kv, mask=m_kv, other=0.)
            if tl.load(fallback + i_sh) != 0:
                tl.debug_barrier()  # h_in[s] is read back by other threads than those that stored it
                for i_c in range(0, tl.cdiv(K, BKC)):
                    o_c = i_c * BKC + tl.arange(0, BKC)
                    b_m = tl.load(mt + i_sh * K * K + o_k[:, None] * K + o_c[None, :],
                                  mask=(o_k[:, None] < K) & (o_c[None, :] < K), other=0.)  # [BK, BKC]
                    b_hc = tl.load(h_in + i_sh * K * V + o_c[:, None] * V + o_v[None, :],
                                   mask=(o_c[:, None] < K) & (o_v[None, :] < V), other=0.)  # [BKC, BV]
                    b_next += tl.dot(b_m, b_hc, input_precision="ieee")
            b_h = b_next
