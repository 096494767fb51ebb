"""The engine's cache tensors and the ForwardContext that reads and writes them.

Sized once from the model's CacheLayout: per GDN layer a pool of conv and recurrent states (slots
[0, num_state_slots) for running sequences, then the snapshot slots), per attention layer a pool of
K/V blocks [num_blocks, block_size, Hkv, D]. The model never sees these tensors: it asks the context
(DecodeContext for decode-only steps, graph-safe; PagedContext for steps with prefill).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridlm.model import CacheLayout, HybridLM
from hybridlm.ops import dispatch
from hybridlm.ops.varlen import attach_host_bounds


def device_tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor on `device` from host values, without a host sync: on CUDA through pinned memory and an
    asynchronous copy. (`torch.tensor(values, device="cuda")` waits for the stream to drain: a step that builds
    its inputs that way stalls the host on the step before, which undoes overlapped decode.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


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
    layout: CacheLayout,
    dtype: torch.dtype,
    memory_bytes: int,
    max_num_seqs: int,
    block_size: int = 64,
    snapshot_fraction: float = 0.1,
) -> CachePlan:
    """Split `memory_bytes` into state slots for `max_num_seqs` running sequences, snapshot slots
    (`snapshot_fraction` of the budget) and KV blocks (the rest). Only attention layers get KV: a 3:1
    hybrid needs a quarter of what a planner that treats every layer as attention would reserve."""
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
    """The pools. One KV block past the plan's (`scratch_block`) and one state row past the snapshots'
    (`scratch_state`) are never handed out: padding rows of a CUDA graph write there, and what they read there
    reaches no real row. (The decode step's padding rows carry slot id -1 instead, which its kernel skips.)"""

    def __init__(self, model: HybridLM, plan: CachePlan) -> None:
        layout, device, dtype = model.cache_layout, model.device, model.dtype
        self.plan = plan
        self.scratch_state = plan.num_state_slots + plan.num_snapshot_slots
        slots = self.scratch_state + 1
        # [slots, C, K-1] and [slots, Hv, dk, dv] (fp32) per GDN layer: views of one tensor per kind, so that copying
        # or clearing a sequence's state in every layer is one launch per kind, not one per layer and pool (a
        # 256-row decode step that saved snapshots spent 72 launches and ~0.6 ms on it)
        layers = list(layout.recurrent_layers)
        self._conv_all = torch.zeros(len(layers), slots, *layout.conv_state_shape, dtype=dtype, device=device)
        self._recurrent_all = torch.zeros(len(layers), slots, *layout.recurrent_state_shape, dtype=torch.float32,
                                          device=device)
        self.conv = {layer: self._conv_all[i] for i, layer in enumerate(layers)}
        self.recurrent = {layer: self._recurrent_all[i] for i, layer in enumerate(layers)}
        # [num_blocks + 1, block_size, Hkv, D] per attention layer. Contents need no init (a slot is always
        # written before a query can see it), but on the CPU the pages are touched now: otherwise resident
        # memory creeps up as the cache fills, which looks like a leak to anyone watching the process.
        self.scratch_block = plan.num_blocks
        kv_shape = (plan.num_blocks + 1, plan.block_size, *layout.kv_shape_per_token)
        allocate = torch.zeros if device.type == "cpu" else torch.empty
        self.keys = {i: allocate(kv_shape, dtype=dtype, device=device) for i in layout.attention_layers}
        self.values = {i: allocate(kv_shape, dtype=dtype, device=device) for i in layout.attention_layers}
        # each running sequence's block table, indexed by its state slot: written when a block is added, read
        # by the decode attention kernel (so a decode step sends no table to the GPU)
        max_blocks = -(-model.config.max_position_embeddings // plan.block_size)
        self.block_tables = torch.zeros(plan.num_state_slots, max_blocks, dtype=torch.int32, device=device)

    def snapshot_index(self, snapshot_slot: int) -> int:
        """Row of a snapshot slot in the state pools (they follow the running-sequence slots)."""
        return self.plan.num_state_slots + snapshot_slot

    def copy_state(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy rows `source` -> `target` [n] of every GDN layer's conv and recurrent pools."""
        for stacked in (self._conv_all, self._recurrent_all):
            stacked.index_copy_(1, target, stacked.index_select(1, source))

    def zero_state(self, rows: torch.Tensor) -> None:
        for stacked in (self._conv_all, self._recurrent_all):
            stacked.index_fill_(1, rows, 0)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v [N, Hkv, D] in token order go to flat KV slots `slot_mapping` [N] (one launch on CUDA)."""
        dispatch.write_kv(self.keys[layer], self.values[layer], k, v, slot_mapping)

    def decode_attention(self, layer: int, q: torch.Tensor, slot_ids: torch.Tensor, context_lens: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """q [S, Hq, D], one token per sequence, over its blocks (table row = its state slot) -> [S, Hq, D]."""
        return dispatch.paged_decode_attention(q, self.keys[layer], self.values[layer], self.block_tables, slot_ids,
                                               context_lens, scale)


class _StateRows:
    """The GDN states of a step's sequences: rows `slots` of the engine's pools (for the reference ops; the
    fused decode kernel updates the pools in place instead)."""

    cache: EngineCache
    slots: torch.Tensor

    def gdn_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.conv[layer].index_select(0, self.slots), self.cache.recurrent[layer].index_select(0, self.slots)

    def store_gdn_states(self, layer: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.cache.conv[layer].index_copy_(0, self.slots, conv_state.to(self.cache.conv[layer].dtype))
        self.cache.recurrent[layer].index_copy_(0, self.slots, recurrent_state)


class DecodeContext(_StateRows):
    """ForwardContext of a decode-only step: one token per sequence, rows [S, 1], all inputs as device tensors.

    Nothing here reads a tensor on the host or sizes anything by data, so a forward over it can be captured
    in a CUDA graph and replayed with new contents in the same tensors. Padding rows carry slot id -1,
    context length 0 and a KV slot in the scratch block.
    """

    pad_mask = None
    padding = None
    keeps_state = True
    decode = True
    single_token_decode = True
    cu_seqlens = None

    def __init__(self, cache: EngineCache, positions: torch.Tensor, slot_ids: torch.Tensor,
                 slot_mapping: torch.Tensor, context_lens: torch.Tensor) -> None:
        self.cache = cache
        self.positions = positions[:, None]  # [S, 1]
        self.slot_ids = slot_ids  # [S] int32
        self.slot_mapping = slot_mapping  # [S] int32 or int64
        self.context_lens = context_lens  # [S] int32

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """The slot ids as int64, for the reference ops' index_select / index_copy_ (the fused step never asks)."""
        return self.slot_ids.long()

    def decode_pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This layer's conv and recurrent pools and the rows' slot ids, for the fused step kernel that updates
        the pools in place."""
        return self.cache.conv[layer], self.cache.recurrent[layer], self.slot_ids

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [S, Hq, 1, D], k, v [S, Hkv, 1, D] -> [S, Hq, 1, D]."""
        self.cache.write_kv(layer, k[:, :, 0], v[:, :, 0], self.slot_mapping)
        return self.cache.decode_attention(layer, q[:, :, 0], self.slot_ids, self.context_lens, scale)[:, :, None]

    def finish(self) -> None:
        pass


class PagedContext(_StateRows):
    """ForwardContext of a step with prefill: every sequence packed into one row [1, N] with `cu_seqlens`.

    Attention on CUDA: every chunk, decode rows included, reads the paged pools in one launch of the paged
    prefill kernel. Elsewhere (the references): decode rows go through paged decode attention together, and
    each prefill chunk attends over its gathered blocks with SDPA.
    """

    pad_mask = None
    padding = None
    keeps_state = True
    decode = False
    single_token_decode = False

    def __init__(
        self,
        cache: EngineCache,
        starts: list[int],
        lengths: list[int],
        state_slots: list[int],
        block_tables: list[list[int]],
        device: torch.device,
        one_launch: bool = True,
    ) -> None:
        self.cache = cache
        self.starts, self.lengths, self.block_tables = starts, lengths, block_tables
        self.slots = device_tensor(state_slots, device, torch.long)
        positions = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
        self.positions = device_tensor(positions, device, torch.long)[None]  # [1, N]
        # where each new token's K/V goes: block_table[position // block_size] * block_size + offset
        size = cache.plan.block_size
        slot_mapping = [table[p // size] * size + p % size
                        for s, n, table in zip(starts, lengths, block_tables) for p in range(s, s + n)]
        self.slot_mapping = device_tensor(slot_mapping, device, torch.long)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        # the kernels' varlen tables come from these host values: no layer reads cu_seqlens back (a sync each)
        self.cu_seqlens = attach_host_bounds(device_tensor(offsets, device, torch.long), offsets)
        # on CUDA every chunk, decode rows included, attends in one launch of the paged prefill kernel
        self.one_launch = one_launch and dispatch.use_kernels(self.slots)
        if self.one_launch:
            self.max_len = max(lengths)
            self.rows = self.slots.to(torch.int32)
            self.cu_seqlens32 = attach_host_bounds(self.cu_seqlens.to(torch.int32), offsets)
            self.starts = device_tensor(starts, device, torch.int32)
            return
        decode_rows = [i for i, (s, n) in enumerate(zip(starts, lengths)) if n == 1 and s > 0]
        self.prefill_rows = [i for i, (s, n) in enumerate(zip(starts, lengths)) if not (n == 1 and s > 0)]
        self.decode_tokens = None
        if decode_rows:
            self.decode_tokens = device_tensor([offsets[i] for i in decode_rows], device, torch.long)
            self.decode_slots = device_tensor([state_slots[i] for i in decode_rows], device, torch.int32)
            self.decode_lens = device_tensor([starts[i] + 1 for i in decode_rows], device, torch.int32)

    def decode_pools(self, layer: int) -> None:
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write this step's K/V into the blocks, then each sequence attends over its whole context.

        q [1, Hq, N, D] and k, v [1, Hkv, N, D] -> [1, Hq, N, D].
        """
        self.cache.write_kv(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), self.slot_mapping)
        key_pool, value_pool = self.cache.keys[layer], self.cache.values[layer]
        block_size, heads, dim = key_pool.shape[1], key_pool.shape[2], key_pool.shape[3]
        flat_q = q[0].transpose(0, 1)  # [N, Hq, D]
        if self.one_launch:
            o = dispatch.kernels().paged_prefill_attention_fwd(
                flat_q, key_pool, value_pool, self.cache.block_tables, self.rows, self.cu_seqlens32, self.starts,
                scale, max_len=self.max_len)
            return o.transpose(0, 1)[None]
        o = torch.empty_like(flat_q)
        if self.decode_tokens is not None:
            rows = self.cache.decode_attention(layer, flat_q.index_select(0, self.decode_tokens), self.decode_slots,
                                               self.decode_lens, scale)
            o.index_copy_(0, self.decode_tokens, rows)
        for i in self.prefill_rows:
            start, length, table, offset = self.starts[i], self.lengths[i], self.block_tables[i], self.offsets[i]
            context = start + length
            blocks = torch.tensor(table[: -(-context // block_size)], device=key_pool.device)
            keys = key_pool.index_select(0, blocks).reshape(-1, heads, dim)[:context].transpose(0, 1)  # [Hkv, ctx, D]
            values = value_pool.index_select(0, blocks).reshape(-1, heads, dim)[:context].transpose(0, 1)
            query = flat_q[offset : offset + length].transpose(0, 1)  # [Hq, len, D]
            if start == 0:  # a first chunk: plain causal attention, no mask tensor (the flash path)
                out = F.scaled_dot_product_attention(query[None], keys[None], values[None], is_causal=True,
                                                     scale=scale, enable_gqa=query.shape[0] != heads)[0]
            else:  # query i (position start + i) sees keys 0 .. start + i
                mask = (torch.arange(context, device=q.device)[None, :]
                        <= torch.arange(start, context, device=q.device)[:, None])
                out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask,
                                                     scale=scale, enable_gqa=query.shape[0] != heads)[0]
            o[offset : offset + length] = out.transpose(0, 1)
        return o.transpose(0, 1)[None]  # [1, Hq, N, D]

    def finish(self) -> None:
        pass
