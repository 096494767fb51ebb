"""Paged decode attention (flash-decoding over KV blocks); the reference twin is
`hybridlm.ops.paged_attention.paged_decode_attention_reference`.

One program per (query, kv head, partition) serves the G = Hq/Hkv query heads of its kv head with one tensor-core
dot per block, so K/V are read once per kv head. At small batches the blocks of a sequence are dealt round-robin
to P partitions (block i goes to partition i mod P) whose partial softmax states a second launch combines; the
grid depends on the batch only, never on the context lengths, so the step can be captured in a CUDA graph and
replayed at any context length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, dot_precision, next_power_of_2, pdl_enabled, pdl_wait


@triton.jit
def paged_decode_attention_kernel(
    q,  # [S, HQ, D]
    key_pool,  # [NB, BS, HKV, D]
    value_pool,
    block_tables,  # [R, max_blocks] int32
    rows,  # [S] int32: row of block_tables per query
    context_lens,  # [S] int32
    o,  # [S, HQ, D] (P == 1)
    partial_o,  # [S, HQ, P, D] fp32 (P > 1)
    partial_ml,  # [S, HQ, P, 2] fp32: running max and sum (P > 1)
    scale,
    table_stride,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    i_s, i_h, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_g, o_d, o_t = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BS)
    m_g, m_d = o_g < G, o_d < D
    ctx = tl.load(context_lens + i_s)
    row = tl.load(rows + i_s)
    p_q = q + i_s * HQ * D + (i_h * G + o_g[:, None]) * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.)
    b_q = (b_q.to(tl.float32) * scale).to(q.dtype.element_ty)
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    num_blocks = tl.cdiv(ctx, BS)
    for i_b in range(i_p, num_blocks, P):
        block = tl.load(block_tables + row.to(tl.int64) * table_stride + i_b).to(tl.int64)
        p_kv = block * BS * HKV * D + o_t[:, None] * HKV * D + i_h * D + o_d[None, :]
        b_k = tl.load(key_pool + p_kv, mask=m_d[None, :], other=0.)  # [BS, BD]
        b_v = tl.load(value_pool + p_kv, mask=m_d[None, :], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BG, BS] fp32
        b_s = tl.where((i_b * BS + o_t)[None, :] < ctx, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new
    o_h = i_h * G + o_g
    if P == 1:
        b_o = tl.where(b_l[:, None] > 0, b_acc / tl.where(b_l > 0, b_l, 1.)[:, None], 0.)
        tl.store(o + i_s * HQ * D + o_h[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_g[:, None] & m_d[None, :])
    else:
        base = (i_s * HQ + o_h) * P + i_p  # [BG]
        tl.store(partial_o + base[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])
        tl.store(partial_ml + base * 2, b_m, mask=m_g)
        tl.store(partial_ml + base * 2 + 1, b_l, mask=m_g)


@triton.jit
def write_kv_kernel(key_pool, value_pool, k, v, slot_mapping, R, HKV, sk_n, sk_h, sv_n, sv_h, D: tl.constexpr,
                    BR: tl.constexpr, BD: tl.constexpr, USE_PDL: tl.constexpr):
    """BR rows (token n, kv head h) of k and v into the pools at flat token slot slot_mapping[n]."""
    pdl_wait(USE_PDL)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m = m_r[:, None] & (o_d < D)[None, :]
    i_n, i_h = o_r // HKV, o_r % HKV
    b_slot = tl.load(slot_mapping + i_n, mask=m_r, other=0).to(tl.int64)
    o_pool = ((b_slot * HKV + i_h) * D)[:, None] + o_d[None, :]
    b_k = tl.load(k + (i_n * sk_n + i_h * sk_h)[:, None] + o_d[None, :], mask=m, other=0.)
    b_v = tl.load(v + (i_n * sv_n + i_h * sv_h)[:, None] + o_d[None, :], mask=m, other=0.)
    tl.store(key_pool + o_pool, b_k.to(key_pool.dtype.element_ty), mask=m)
    tl.store(value_pool + o_pool, b_v.to(value_pool.dtype.element_ty), mask=m)


def write_kv_fwd(key_pool: torch.Tensor, value_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """`write_kv_reference` in one launch (two index_copy_ otherwise): k, v [N, Hkv, D] with any strides over tokens
    and heads (a unit last one) into contiguous pools [NB, BS, Hkv, D] at flat token slots `slot_mapping` [N]."""
    if k.shape != v.shape or k.ndim != 3 or tuple(k.shape[1:]) != tuple(key_pool.shape[2:]):
        raise ValueError(f"k and v must be [N, Hkv, D] matching the pools {tuple(key_pool.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (key_pool.is_contiguous() and value_pool.is_contiguous()) or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"pools must be contiguous and slot_mapping [N], got {tuple(slot_mapping.shape)}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    tokens, heads, dim = k.shape
    rows = tokens * heads
    BD = next_power_of_2(dim)
    BR = max(1, min(16, 4096 // BD))
    pdl = pdl_enabled(k.device)
    if rows:
        launch(write_kv_kernel, (cdiv(rows, BR),), key_pool, value_pool, k, v, slot_mapping, rows, heads,
               k.stride(0), k.stride(1), v.stride(0), v.stride(1), D=dim, BR=BR, BD=BD, USE_PDL=pdl, num_warps=4,
               launch_pdl=pdl)


@triton.jit
def paged_decode_combine_kernel(partial_o, partial_ml, o, D: tl.constexpr, BD: tl.constexpr, P: tl.constexpr,
                                USE_PDL: tl.constexpr):
    """One program per (query, query head): merge the P partial softmax states."""
    pdl_wait(USE_PDL)
    i_sh = tl.program_id(0)
    o_p, o_d = tl.arange(0, P), tl.arange(0, BD)
    m_d = o_d < D
    b_m = tl.load(partial_ml + (i_sh * P + o_p) * 2)  # [P]; -inf where a partition got no block
    b_l = tl.load(partial_ml + (i_sh * P + o_p) * 2 + 1)
    b_acc = tl.load(partial_o + (i_sh * P + o_p[:, None]) * D + o_d[None, :], mask=m_d[None, :], other=0.)
    b_max = tl.max(b_m, axis=0)
    # a padding row has no finite max: clamp it so that no -inf - -inf (NaN) is ever formed
    b_w = tl.where(b_m > float("-inf"), tl.exp(b_m - tl.maximum(b_max, -1e30)), 0.)  # [P]
    b_den = tl.sum(b_w * b_l, axis=0)
    b_o = tl.sum(b_w[:, None] * b_acc, axis=0) / tl.where(b_den > 0, b_den, 1.)
    tl.store(o + i_sh * D + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


def num_partitions(num_queries: int, kv_heads: int, device: torch.device) -> int:
    """Enough partitions to give every SM about two programs, at most 32 (a power of two)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    wanted = -(-2 * sms // max(num_queries * kv_heads, 1))
    return min(32, next_power_of_2(wanted)) if wanted > 1 else 1


def paged_decode_attention_fwd(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partitions: int | None = None,
) -> torch.Tensor:
    """q [S, Hq, D]; pools [NB, BS, Hkv, D]; block_tables [R, max_blocks] int32; rows, context_lens [S] int32."""
    num_queries, query_heads, dim = q.shape
    _, block_size, kv_heads, pool_dim = key_pool.shape
    if pool_dim != dim or query_heads % kv_heads or value_pool.shape != key_pool.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(key_pool.shape)} / {tuple(value_pool.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the paged attention kernel needs a power-of-two block size >= 16, got {block_size}")
    q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    group = query_heads // kv_heads
    P = num_partitions(num_queries, kv_heads, q.device) if partitions is None else partitions
    BD = next_power_of_2(dim)
    pdl = pdl_enabled(q.device)
    o = torch.empty_like(q)
    if P > 1:
        partial_o = torch.empty(num_queries, query_heads, P, dim, dtype=torch.float32, device=q.device)
        partial_ml = torch.empty(num_queries, query_heads, P, 2, dtype=torch.float32, device=q.device)
    else:
        partial_o = partial_ml = o
    launch(paged_decode_attention_kernel, (num_queries, kv_heads, P),
        q, key_pool, value_pool, block_tables, rows, context_lens, o, partial_o, partial_ml, scale,
        block_tables.stride(0), HQ=query_heads, HKV=kv_heads, D=dim, BS=block_size, G=group,
        BG=max(16, next_power_of_2(group)), BD=BD, P=P, DOT_PRECISION=dot_precision(q.dtype), USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    if P > 1:
        launch(paged_decode_combine_kernel, (num_queries * query_heads,), partial_o, partial_ml, o, D=dim, BD=BD,
               P=P, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return o
