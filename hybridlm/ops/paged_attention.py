"""Attention over a paged KV cache: keys and values in fixed-size blocks found through a block table. The
plain-PyTorch references: decode (one new query token per sequence; the Triton kernel is
`hybridlm.ops.triton.paged_attention`) and prefill (packed chunks of query tokens attending causally to their
cached context; the Triton kernel is `hybridlm.ops.triton.paged_prefill`).

Pools are [num_blocks, block_size, Hkv, D]; `block_tables` [R, max_blocks] is indexed by a row id per query
(the engine uses state-slot ids, so a sequence's table lives in one place for its whole life) and
`context_lens` [S] counts the tokens each query sees (its own included). A query with context length 0 is
a padding row (a CUDA graph captured for a larger batch): its output is zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_reference(key_pool: torch.Tensor, value_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """k, v [N, Hkv, D] (token order) into the pools [NB, BS, Hkv, D] at flat token slots `slot_mapping` [N]."""
    heads, dim = key_pool.shape[2], key_pool.shape[3]
    slot_mapping = slot_mapping.long()  # int32 (the decode graphs' inputs) or int64
    key_pool.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    value_pool.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def paged_decode_attention_reference(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [S, Hq, D] -> o [S, Hq, D]: query s attends to the first context_lens[s] tokens of the blocks listed
    in block_tables[rows[s]]. Gathers every sequence's blocks up to the longest context (fine on the CPU)."""
    num_queries, query_heads, dim = q.shape
    block_size, kv_heads = key_pool.shape[1], key_pool.shape[2]
    longest = int(context_lens.max()) if num_queries else 0
    if longest == 0:
        return torch.zeros_like(q)
    num_blocks = -(-longest // block_size)
    tables = block_tables.index_select(0, rows.clamp(min=0).long())[:, :num_blocks].long()  # [S, nb]
    length = num_blocks * block_size
    keys = key_pool[tables].reshape(num_queries, length, kv_heads, dim).transpose(1, 2)  # [S, Hkv, L, D]
    values = value_pool[tables].reshape(num_queries, length, kv_heads, dim).transpose(1, 2)
    visible = torch.arange(length, device=q.device)[None, :] < context_lens[:, None].to(q.device)  # [S, L]
    # padding rows see nothing: let them see one key, then zero their output
    padding = context_lens.to(q.device) == 0
    visible[:, 0] |= padding
    o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible[:, None, None, :], scale=scale,
                                       enable_gqa=query_heads != kv_heads)[:, :, 0]
    return o.masked_fill(padding[:, None, None], 0)


def paged_prefill_attention_reference(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    cu_seqlens: torch.Tensor,
    starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [N, Hq, D] -> o [N, Hq, D]: S chunks packed one after another, chunk s in rows cu_seqlens[s] ..
    cu_seqlens[s + 1] of q. Its tokens sit at positions starts[s], starts[s] + 1, ... of sequence s, whose keys
    and values for positions 0 .. starts[s] + L_s - 1 (the chunk's own included) are already in the blocks listed
    by block_tables[rows[s]]. The query at position p sees key positions 0 .. p. Softmax in fp32 (float64 inputs
    stay float64); one SDPA per sequence over its gathered blocks."""
    block_size, kv_heads = key_pool.shape[1], key_pool.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    bounds, offsets, table_rows = cu_seqlens.tolist(), starts.tolist(), rows.tolist()
    outputs = []
    for s, start in enumerate(offsets):
        bos, eos = bounds[s], bounds[s + 1]
        length, context = eos - bos, start + eos - bos
        blocks = block_tables[table_rows[s], : -(-context // block_size)].long()
        keys = key_pool[blocks].flatten(0, 1)[:context].transpose(0, 1)  # [Hkv, C, D]
        values = value_pool[blocks].flatten(0, 1)[:context].transpose(0, 1)
        positions = start + torch.arange(length, device=q.device)
        visible = torch.arange(context, device=q.device)[None, :] <= positions[:, None]  # [L, C]
        o = F.scaled_dot_product_attention(q[bos:eos].transpose(0, 1).to(compute), keys.to(compute),
                                           values.to(compute), attn_mask=visible, scale=scale,
                                           enable_gqa=q.shape[1] != kv_heads)  # [Hq, L, D]
        outputs.append(o.transpose(0, 1).to(q.dtype))
    return torch.cat(outputs) if outputs else torch.empty_like(q)
