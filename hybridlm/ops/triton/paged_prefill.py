"""Paged prefill attention (varlen flash attention over KV blocks); the reference twin is
`hybridlm.ops.paged_attention.paged_prefill_attention_reference`.

One launch serves the whole packed batch. Grid (tiles, Hkv): a program owns one query tile of one sequence and
one kv head, and serves all G = Hq/Hkv query heads of that kv head at once: its BM score rows are BQ = BM // G
tokens x G heads (token-major, so the rows are contiguous in q). K/V tiles are thus read once per kv head, a
decode row (L = 1) fills G rows of the tile instead of 1, and the causal diagonal is only BQ tokens wide.

Tiles map to sequences the way vLLM's unified attention does it: sequence s owns the global tiles
f(s) .. f(s+1) - 1 with f(s) = cu_seqlens[s] // BQ + s, which is never fewer than cdiv(L_s, BQ); a program
finds its sequence by binary search over cu_seqlens (log2 S scalar loads). The grid, N // BQ + S tiles, is
known from the shapes alone: no host sync, no tile table, at most S programs that exit at once, and the
launch can be captured in a CUDA graph. (A (S, cdiv(max_len, BQ)) grid launches S x cdiv(max_len, BQ) programs,
nearly all idle on a step with one long prompt among many short rows; a host-built table costs a sync and a copy.)
Programs run in reverse tile order so each sequence's last tiles, which see the most keys, start first.

Each program walks the context in BN-key tiles: tiles wholly below its first query position need no mask at
all, the tiles crossing the diagonal are masked, tiles above it are never visited. A key's block comes from
the block table row by row, so any block size works; when BN divides the block size a tile sits in one block
and a single table entry is read. Softmax is online (flash attention) in fp32 and base 2, with the scale and
log2(e) applied to the fp32 scores. Pool offsets are int64 (pools may exceed 2^31 elements).

Tiles (module settings below): 16-bit heads up to 128 wide BM = 64 rows, BN = 64 keys, 4 warps, 2 stages;
256-wide heads (Qwen3.5's) 128 x 64 at 8 warps and 3 stages where a program may take 200 KB of shared memory
(Hopper), else 64 x 32 at 2 stages; fp32 64 x 32 at 8 warps, 2 stages. K/V tiles come through tensor descriptors
(TMA) on Hopper and newer where a tile sits in one block (`TMA`). On an H100 (Triton 3.6, 2026-12-05,
`benchmarks/bench_prefill_attention.py`, pointer loads) 128 x 64 ran 256-wide heads at 375-385 TFLOP/s, 2.5x the
64 x 32 tile and 1.3-1.4x torch's flash SDPA on the same K/V; 128 x 32 ran at 1.2x SDPA, 64 x 64 and 3 stages of
64 x 32 at 0.55-0.7x, 4 warps at 0.4x; 128 x 128 ran out of shared memory. TMA then took 128 x 64 to 498 TFLOP/s,
531 at 3 stages (1.9x SDPA).

`max_len` only picks the tile height (short rows get BM < 64); the grid never depends on it, so a wrong hint
costs speed, never correctness.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import descriptor, dot_precision, next_power_of_2, tma_capable
from hybridlm.ops.varlen import host_bounds

LOG2E = 1.4426950408889634
# Tiles (`benchmarks/bench_prefill_attention.py --variant` times others against torch's flash SDPA): score rows per
# program (BQ tokens x G heads; at most this many, fewer for short batches), keys per step, warps and stages, for
# heads up to 128 wide in 16 bits and for 256-wide heads (Qwen3.5's) or fp32
BLOCK_M = 64
BLOCK_N, WARPS, STAGES = 64, 4, 2
BLOCK_M_WIDE, BLOCK_N_WIDE, WARPS_WIDE, STAGES_WIDE = 128, 64, 8, 3  # (3 stages timed with TMA)
WIDE_SHARED_MEMORY = 200 * 1024  # bytes a program may take for the wide tile; GPUs with less take the fp32 tile
BLOCK_M_FP32, BLOCK_N_FP32, WARPS_FP32, STAGES_FP32 = 64, 32, 8, 2
# K/V tiles through tensor descriptors (TMA on Hopper: the copy engine fetches each [BN, D] tile, no address math or
# load instructions in the warps) where a tile sits in one block and D is a power of two. H100, 9B heads, the last
# 8192-token step of a 262k prompt (2026-12-05): 91.9 ms (377 TFLOP/s) -> 69.6 (498) -> 65.2 (531) with 3 stages,
# against torch's flash SDPA at 122.7 (282); the 262k prompt 18.9 -> 15.2 s. False: pointer loads everywhere.
TMA = True
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _find_sequence(cu_seqlens, i_t, S, BQ: tl.constexpr):
    """The sequence owning global tile i_t: the last s with cu_seqlens[s] // BQ + s <= i_t (strictly increasing)."""
    lo = i_t * 0  # int32 tensors, even when S == 1 is specialised to a constant
    hi = lo + S
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens + mid) // BQ + mid <= i_t:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _kv_tile(key_pool, value_pool, p_table, o_k, i_n, kv_end, stride_kb, stride_kt, o_kvh, m_d, BS: tl.constexpr,
             BN: tl.constexpr, DIAGONAL: tl.constexpr):
    """K and V [BN, BD] of keys o_k = i_n .. i_n + BN through pointers; DIAGONAL: keys past kv_end read as 0."""
    if BS % BN == 0:
        # i_n is a multiple of BN and BN divides BS: the tile lies in one block, one table entry (i_n < kv_end)
        i_blk = tl.load(p_table + i_n // BS).to(tl.int64)
        o_kv = i_blk * stride_kb + ((i_n % BS) + tl.arange(0, BN)).to(tl.int64) * stride_kt
    else:
        if DIAGONAL:
            b_blk = tl.load(p_table + o_k // BS, mask=o_k < kv_end, other=0).to(tl.int64)
        else:
            b_blk = tl.load(p_table + o_k // BS).to(tl.int64)
        o_kv = b_blk * stride_kb + (o_k % BS).to(tl.int64) * stride_kt
    p_kv = o_kv[:, None] + o_kvh[None, :]  # [BN, BD]
    if DIAGONAL:
        m_kv = (o_k < kv_end)[:, None] & m_d[None, :]
        b_k = tl.load(key_pool + p_kv, mask=m_kv, other=0.)
        b_v = tl.load(value_pool + p_kv, mask=m_kv, other=0.)
    else:
        b_k = tl.load(key_pool + p_kv, mask=m_d[None, :], other=0.)
        b_v = tl.load(value_pool + p_kv, mask=m_d[None, :], other=0.)
    return b_k, b_v


@triton.jit
def _kv_tile_tma(k_desc, v_desc, p_table, o_k, i_n, kv_end, kv_col, BS: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, DIAGONAL: tl.constexpr):
    """The same tile through tensor descriptors over the pools as [NB, BS, HKV * D] (BS % BN == 0, D == BD): one
    [1, BN, BD] box. A diagonal tile's keys past kv_end are loaded too (their scores are masked); their values are
    zeroed, since slots not yet written may hold NaN."""
    i_blk = tl.load(p_table + i_n // BS)
    b_k = k_desc.load([i_blk, i_n % BS, kv_col]).reshape(BN, BD)
    b_v = v_desc.load([i_blk, i_n % BS, kv_col]).reshape(BN, BD)
    if DIAGONAL:
        b_v = tl.where((o_k < kv_end)[:, None], b_v, 0.)
    return b_k, b_v


@triton.jit
def _attend_tile(b_q, b_m, b_l, b_acc, key_pool, value_pool, k_desc, v_desc, p_table, i_n, kv_end, pos_q, qk_scale,
                 stride_kb, stride_kt, o_kvh, m_d, kv_col, BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 DIAGONAL: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys i_n .. i_n + BN. DIAGONAL: the tile may hold keys past a row's position
    or past kv_end (masked); otherwise every key is visible to every row."""
    o_k = i_n + tl.arange(0, BN)  # [BN] key positions
    if TMA:
        b_k, b_v = _kv_tile_tma(k_desc, v_desc, p_table, o_k, i_n, kv_end, kv_col, BS, BN, BD, DIAGONAL)
    else:
        b_k, b_v = _kv_tile(key_pool, value_pool, p_table, o_k, i_n, kv_end, stride_kb, stride_kt, o_kvh, m_d, BS,
                            BN, DIAGONAL)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN] fp32, log2 units
    if DIAGONAL:
        b_s = tl.where(pos_q[:, None] >= o_k[None, :], b_s, float("-inf"))
    # every row sees key 0 in the first tile it visits, so b_m_new is finite and no -inf - -inf occurs
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, acc=b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def paged_prefill_attention_kernel(
    q,  # [N, HQ, D], token stride stride_q
    key_pool,  # [NB, BS, HKV, D], block / token strides stride_kb, stride_kt (value_pool alike)
    value_pool,
    block_tables,  # [R, max_blocks] int32
    rows,  # [S] int32: row of block_tables per sequence
    cu_seqlens,  # [S + 1] int32
    starts,  # [S] int32: position of each sequence's first query token
    o,  # [N, HQ, D] contiguous
    qk_scale,  # scale * log2(e)
    S,
    stride_q,
    stride_kb,
    stride_kt,
    stride_table,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
    BQ: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr = False,  # K/V tiles through k_desc, v_desc (tensor descriptors over [NB, BS, HKV * D])
    k_desc=None,
    v_desc=None,
):
    i_t = tl.num_programs(0) - 1 - tl.program_id(0)  # reverse order: heavy tiles first
    i_kvh = tl.program_id(1)
    i_s = _find_sequence(cu_seqlens, i_t, S, BQ)
    bos = tl.load(cu_seqlens + i_s)
    L = tl.load(cu_seqlens + i_s + 1) - bos
    q0 = (i_t - bos // BQ - i_s) * BQ  # first query token of the tile, within its sequence
    if q0 >= L:
        return
    start = tl.load(starts + i_s)
    row = tl.load(rows + i_s)

    o_r, o_d = tl.arange(0, BM), tl.arange(0, BD)
    m_d = o_d < D
    o_qt = q0 + o_r // G  # [BM] token of each row within the sequence; row r serves head i_kvh * G + r % G
    m_r = (o_r < BQ * G) & (o_qt < L)
    pos_q = start + o_qt  # [BM] absolute positions
    o_qrow = (bos + o_qt).to(tl.int64) * stride_q + (i_kvh * G + o_r % G) * D  # [BM]
    b_q = tl.load(q + o_qrow[:, None] + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.)

    kv_end = start + tl.minimum(q0 + BQ, L)  # keys 0 .. kv_end - 1 are seen by some row of the tile
    full_end = (start + q0 + 1) // BN * BN  # keys below it are seen by every row: no mask
    p_table = block_tables + row.to(tl.int64) * stride_table
    o_kvh = i_kvh * D + o_d  # [BD] offset of this kv head's elements within a token
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i_n in range(0, full_end, BN):
        b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, key_pool, value_pool, k_desc, v_desc, p_table, i_n,
                                       kv_end, pos_q, qk_scale, stride_kb, stride_kt, o_kvh, m_d, i_kvh * D, BS, BN,
                                       BD, False, TMA, DOT_PRECISION)
    for i_n in range(full_end, kv_end, BN):
        b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, key_pool, value_pool, k_desc, v_desc, p_table, i_n,
                                       kv_end, pos_q, qk_scale, stride_kb, stride_kt, o_kvh, m_d, i_kvh * D, BS, BN,
                                       BD, True, TMA, DOT_PRECISION)
    b_o = b_acc / b_l[:, None]
    o_orow = (bos + o_qt).to(tl.int64) * (HQ * D) + (i_kvh * G + o_r % G) * D
    tl.store(o + o_orow[:, None] + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


def _check_lengths(cu_seqlens: torch.Tensor, num_tokens: int) -> int:
    """Reads cu_seqlens on the host (one sync unless its values are attached): validates it and returns the
    longest length."""
    bounds = host_bounds(cu_seqlens)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != num_tokens or min(lengths) < 1:
        raise ValueError(f"cu_seqlens must rise strictly from 0 to N={num_tokens}, got {bounds}")
    return max(lengths)


def _tiles(BD: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BM, BN, warps, stages) for this head width, dtype and GPU. fp32's full-precision dots run on FMA units,
    whose operands spill badly past 32 keys x 4 warps (ptxas, sm_90); a 256-wide 16-bit head takes the wide tile
    where the GPU grants a program enough shared memory, else the fp32 one (98 KB)."""
    if dtype == torch.float32:
        return BLOCK_M_FP32, BLOCK_N_FP32, WARPS_FP32, STAGES_FP32
    if BD <= 128:
        return BLOCK_M, BLOCK_N, WARPS, STAGES
    if device.type == "cuda" and _shared_memory(device) < WIDE_SHARED_MEMORY:
        return BLOCK_M_FP32, BLOCK_N_FP32, WARPS_FP32, STAGES_FP32
    return BLOCK_M_WIDE, BLOCK_N_WIDE, WARPS_WIDE, STAGES_WIDE


def _descriptors(key_pool: torch.Tensor, value_pool: torch.Tensor, block_size: int, BN: int, BD: int) -> dict:
    """The kernel's TMA arguments: with TMA on, a tile in one block (BS % BN == 0), D a power of two, the pools'
    rows 16-byte aligned, and on CUDA a Hopper or newer GPU, tensor descriptors over the pools viewed as
    [NB, BS, HKV * D] with [1, BN, D] boxes; else nothing (pointer loads)."""
    num_blocks, _, kv_heads, dim = key_pool.shape
    if not TMA or block_size % BN or dim != BD or not tma_capable(key_pool.device):
        return {}
    k_desc, v_desc = (descriptor(pool, [num_blocks, block_size, kv_heads * dim], [pool.stride(0), pool.stride(1), 1],
                                 [1, BN, BD]) for pool in (key_pool, value_pool))
    return {} if k_desc is None or v_desc is None else dict(TMA=True, k_desc=k_desc, v_desc=v_desc)


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may opt into on this GPU."""
    return _shared_memory_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory_of(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def paged_prefill_attention_fwd(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    cu_seqlens: torch.Tensor,
    starts: torch.Tensor,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """q [N, Hq, D] (S packed chunks); pools [NB, BS, Hkv, D]; block_tables [R, max_blocks], rows [S],
    cu_seqlens [S + 1], starts [S], all int32 -> o [N, Hq, D]. max_len (the longest chunk) is a tile-size hint;
    None reads cu_seqlens on the host once to find it, and checks it."""
    if q.ndim != 3 or key_pool.ndim != 4:
        raise ValueError(f"q must be [N, Hq, D] and pools [NB, BS, Hkv, D], got {tuple(q.shape)} and "
                         f"{tuple(key_pool.shape)}")
    num_tokens, query_heads, dim = q.shape
    _, block_size, kv_heads, pool_dim = key_pool.shape
    if value_pool.shape != key_pool.shape or pool_dim != dim or query_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(key_pool.shape)} / "
                         f"{tuple(value_pool.shape)}: head dims must match and Hq be a multiple of Hkv")
    if q.dtype not in SUPPORTED_DTYPES or key_pool.dtype != q.dtype or value_pool.dtype != q.dtype:
        raise ValueError(f"q and pools must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {key_pool.dtype}, "
                         f"{value_pool.dtype}")
    if key_pool.stride() != value_pool.stride() or key_pool.stride(3) != 1 or key_pool.stride(2) != dim:
        raise ValueError(f"pools need packed heads and dims and equal strides, got {key_pool.stride()} and "
                         f"{value_pool.stride()}")
    num_sequences = starts.shape[0] if starts.ndim == 1 else -1
    if (cu_seqlens.ndim != 1 or num_sequences < 0 or cu_seqlens.shape[0] != num_sequences + 1
            or rows.shape != starts.shape or block_tables.ndim != 2):
        raise ValueError(f"need cu_seqlens [S + 1], starts [S], rows [S] and block_tables [R, max_blocks], got "
                         f"{tuple(cu_seqlens.shape)}, {tuple(starts.shape)}, {tuple(rows.shape)}, "
                         f"{tuple(block_tables.shape)}")
    for name, t in (("block_tables", block_tables), ("rows", rows), ("cu_seqlens", cu_seqlens), ("starts", starts)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if key_pool.device != q.device or value_pool.device != q.device:
        raise ValueError(f"pools are on {key_pool.device} / {value_pool.device}, q on {q.device}")
    if num_tokens == 0:
        return torch.empty_like(q)
    if num_sequences == 0:
        raise ValueError(f"{num_tokens} query tokens but no sequences")
    if max_len is None:
        max_len = _check_lengths(cu_seqlens, num_tokens)
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()

    group = query_heads // kv_heads
    BD = next_power_of_2(dim)
    block_m, BN, num_warps, num_stages = _tiles(BD, q.dtype, q.device)
    # short chunks (a batch of decode rows, say) get a shorter tile; BM >= 16 for the tensor-core dot
    BM = max(16, next_power_of_2(group), min(block_m, next_power_of_2(max(1, max_len) * group)))
    BQ = BM // group
    o = torch.empty(num_tokens, query_heads, dim, dtype=q.dtype, device=q.device)
    num_tiles = num_tokens // BQ + num_sequences
    launch(paged_prefill_attention_kernel, (num_tiles, kv_heads),
        q, key_pool, value_pool, block_tables, rows, cu_seqlens, starts, o, scale * LOG2E, num_sequences,
        q.stride(0), key_pool.stride(0), key_pool.stride(1), block_tables.stride(0),
        HQ=query_heads, D=dim, BS=block_size, G=group, BQ=BQ, BM=BM, BN=BN, BD=BD,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        **_descriptors(key_pool, value_pool, block_size, BN, BD))
    return o
