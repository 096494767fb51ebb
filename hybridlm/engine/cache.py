"""The engine's cache tensors and the ForwardContext that reads and writes them.

Sized once from the model's CacheLayout: per GDN layer a pool of conv and recurrent states (slots
[0, num_state_slots) for running sequences, then the snapshot slots), per attention layer a pool of
K/V blocks [num_blocks, block_size, Hkv, D]. The model never sees these tensors: it asks the context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridlm.model import HybridLM


@dataclass(frozen=True)
class CachePlan:
    """How many blocks and slots a memory budget buys."""

    block_size: int
    num_blocks: int
    num_state_slots: int
    num_snapshot_slots: int
    kv_bytes: int
    state_bytes: int
    snapshot_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes + self.snapshot_bytes

    @property
    def max_cached_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_cache(
    model: HybridLM,
    memory_bytes: int,
    max_num_seqs: int,
    block_size: int = 64,
    snapshot_fraction: float = 0.1,
) -> CachePlan:
    """Split `memory_bytes` into state slots for `max_num_seqs` running sequences, snapshot slots
    (`snapshot_fraction` of the budget) and KV blocks (the rest). Only attention layers get KV: a 3:1
    hybrid needs a quarter of what a planner that treats every layer as attention would reserve."""
    layout, dtype = model.cache_layout, model.dtype
    state = layout.state_bytes_per_sequence(dtype)
    block = max(layout.kv_bytes_per_token(dtype) * block_size, 1)
    state_bytes = state * max_num_seqs
    if state_bytes >= memory_bytes:
        raise ValueError(
            f"the cache budget ({memory_bytes / 2**20:.0f} MiB) cannot hold the recurrent state of {max_num_seqs} "
            f"sequences ({state_bytes / 2**20:.0f} MiB): lower max_num_seqs or raise the budget"
        )
    snapshots = int((memory_bytes - state_bytes) * snapshot_fraction) // state if state else 0
    kv_budget = memory_bytes - state_bytes - snapshots * state
    num_blocks = kv_budget // block if layout.attention_layers else 1
    if num_blocks < 1:
        raise ValueError(f"the cache budget leaves no room for a single KV block of {block} bytes")
    return CachePlan(block_size, int(num_blocks), max_num_seqs, int(snapshots),
                     int(num_blocks) * block if layout.attention_layers else 0, state_bytes, snapshots * state)


class EngineCache:
    def __init__(self, model: HybridLM, plan: CachePlan) -> None:
        layout, device, dtype = model.cache_layout, model.device, model.dtype
        self.plan = plan
        slots = plan.num_state_slots + plan.num_snapshot_slots
        # [slots, C, K-1] and [slots, Hv, dk, dv] (fp32) per GDN layer
        self.conv = {i: torch.zeros(slots, *layout.conv_state_shape, dtype=dtype, device=device)
                     for i in layout.recurrent_layers}
        self.recurrent = {i: torch.zeros(slots, *layout.recurrent_state_shape, dtype=torch.float32, device=device)
                          for i in layout.recurrent_layers}
        # [num_blocks, block_size, Hkv, D] per attention layer. Contents need no init (a slot is always
        # written before a query can see it), but on the CPU the pages are touched now: otherwise resident
        # memory creeps up as the cache fills, which looks like a leak to anyone watching the process.
        kv_shape = (plan.num_blocks, plan.block_size, *layout.kv_shape_per_token)
        allocate = torch.zeros if device.type == "cpu" else torch.empty
        self.keys = {i: allocate(kv_shape, dtype=dtype, device=device) for i in layout.attention_layers}
        self.values = {i: allocate(kv_shape, dtype=dtype, device=device) for i in layout.attention_layers}

    def snapshot_index(self, snapshot_slot: int) -> int:
        """Row of a snapshot slot in the state pools (they follow the running-sequence slots)."""
        return self.plan.num_state_slots + snapshot_slot

    def copy_state(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy rows `source` -> `target` [n] of every GDN layer's conv and recurrent pools."""
        for pools in (self.conv, self.recurrent):
            for pool in pools.values():
                pool.index_copy_(0, target, pool.index_select(0, source))

    def zero_state(self, rows: torch.Tensor) -> None:
        for pools in (self.conv, self.recurrent):
            for pool in pools.values():
                pool.index_fill_(0, rows, 0)


class PagedContext:
    """ForwardContext over the engine's pools for one scheduled step.

    Layout: a decode-only step feeds [S, 1] (one row per sequence, the step form of the delta rule); a
    step with any prefill packs every sequence into one row [1, N] with `cu_seqlens`.
    """

    pad_mask = None
    keeps_state = True

    def __init__(
        self,
        cache: EngineCache,
        starts: list[int],
        lengths: list[int],
        state_slots: list[int],
        block_tables: list[list[int]],
        device: torch.device,
    ) -> None:
        self.cache = cache
        self.starts, self.lengths, self.block_tables = starts, lengths, block_tables
        self.decode = all(n == 1 for n in lengths) and all(s > 0 for s in starts)
        self.single_token_decode = self.decode
        self.slots = torch.tensor(state_slots, dtype=torch.long, device=device)
        self.slot_ids = self.slots.to(torch.int32)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(device)
        if self.decode:
            self.positions = positions[:, None]  # [S, 1]
            self.cu_seqlens = None
        else:
            self.positions = positions[None]  # [1, N]
            self.cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device)
        # where each new token's K/V goes: block_table[position // block_size] * block_size + offset
        size = cache.plan.block_size
        slot_mapping = [table[p // size] * size + p % size
                        for s, n, table in zip(starts, lengths, block_tables) for p in range(s, s + n)]
        self.slot_mapping = torch.tensor(slot_mapping, dtype=torch.long, device=device)

    def decode_pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """In a decode-only step: this layer's conv and recurrent pools and the rows' slot ids, for the fused
        step kernel that updates the pools in place."""
        if not self.decode:
            return None
        return self.cache.conv[layer], self.cache.recurrent[layer], self.slot_ids

    def gdn_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.conv[layer].index_select(0, self.slots), self.cache.recurrent[layer].index_select(0, self.slots)

    def store_gdn_states(self, layer: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.cache.conv[layer].index_copy_(0, self.slots, conv_state.to(self.cache.conv[layer].dtype))
        self.cache.recurrent[layer].index_copy_(0, self.slots, recurrent_state)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write this step's K/V into the blocks, then each sequence attends over its whole context.

        q [B, Hq, T, D] and k, v [B, Hkv, T, D] in the step's layout ([S, ., 1, D] or [1, ., N, D]).
        """
        key_pool, value_pool = self.cache.keys[layer], self.cache.values[layer]
        heads, dim = key_pool.shape[2], key_pool.shape[3]
        flat_k = k.transpose(1, 2).reshape(-1, heads, dim)  # [N, Hkv, D] in token order
        flat_v = v.transpose(1, 2).reshape(-1, heads, dim)
        key_pool.view(-1, heads, dim).index_copy_(0, self.slot_mapping, flat_k)
        value_pool.view(-1, heads, dim).index_copy_(0, self.slot_mapping, flat_v)
        flat_q = q.transpose(1, 2).reshape(-1, q.shape[1], dim)  # [N, Hq, D]
        outputs, offset = [], 0
        for start, length, table in zip(self.starts, self.lengths, self.block_tables):
            context = start + length
            blocks = torch.tensor(table[: -(-context // key_pool.shape[1])], device=key_pool.device)
            keys = key_pool.index_select(0, blocks).reshape(-1, heads, dim)[:context].transpose(0, 1)  # [Hkv, ctx, D]
            values = value_pool.index_select(0, blocks).reshape(-1, heads, dim)[:context].transpose(0, 1)
            query = flat_q[offset : offset + length].transpose(0, 1)  # [Hq, len, D]
            # query i (position start + i) sees keys 0 .. start + i
            mask = torch.arange(context, device=q.device)[None, :] <= torch.arange(start, context, device=q.device)[:, None]
            outputs.append(F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask,
                                                          scale=scale, enable_gqa=query.shape[0] != heads)[0])
            offset += length
        o = torch.cat(outputs, dim=1)  # [Hq, N, D]
        if self.decode:
            return o.transpose(0, 1)[:, :, None, :]  # [S, Hq, 1, D]
        return o[None]  # [1, Hq, N, D]

    def finish(self) -> None:
        pass
