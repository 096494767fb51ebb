"""ModelRunner: the only place where scheduled sequences become tensors."""
from __future__ import annotations

import logging
from collections import Counter

import torch

from hybridlm.engine.cache import DecodeContext, EngineCache, PagedContext, device_tensor
from hybridlm.engine.graphs import DecodeGraphs
from hybridlm.engine.packed_prefill import PackedPrefillGraphs, packed_buckets
from hybridlm.engine.prefill_graphs import PrefillGraphs, length_buckets, table_tokens
from hybridlm.engine.scheduler import Chunk, SchedulerOutput
from hybridlm.model import HybridLM
from hybridlm.ops import dispatch

logger = logging.getLogger(__name__)


def packed_supported(model: HybridLM) -> str | None:
    """Why a packed prefill step cannot be captured, or None if it can: it needs the GDN kernels (the reference's
    packed path reads the sequence bounds on the host)."""
    config = model.config
    if not model.cache_layout.recurrent_layers:
        return None
    return dispatch.kernels().head_dims_fault(model.device, config.linear_key_head_dim, config.linear_value_head_dim)


def graphs_supported(model: HybridLM) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph, or None if it can."""
    if model.device.type != "cuda":
        return "not on CUDA"
    if dispatch.kernels() is None:
        return "the Triton kernels are unavailable"
    if "moe" in model.config.mlp_types:
        return "mixture-of-experts layers route on the host"
    return None


class ModelRunner:
    def __init__(self, model: HybridLM, cache: EngineCache, max_batch: int, cuda_graphs: bool = True,
                 paged_prefill_kernel: bool = True, prefill_graphs: int = 0, split_mixed_steps: bool = False,
                 packed_prefill: int = 0) -> None:
        """`prefill_graphs`: capture one-sequence prefills up to this many tokens per length bucket (0: none).
        `split_mixed_steps`: a step of several chunks runs as one prefill replay per prefill chunk, then the decode
        rows' step; with `packed_prefill` (the largest step's tokens, each chunk aligned: the scheduler's budget; 0:
        off), as replays over the prefill chunks packed together where that costs less (see EngineConfig)."""
        self.model = model
        self.cache = cache
        self.device = model.device
        self.paged_prefill_kernel = paged_prefill_kernel
        self.split_mixed_steps = split_mixed_steps
        self._tables: dict[int, list[int]] = {}  # state slot -> the block table last written to cache.block_tables
        # steps by the path they took ("decode", "prefill graphs", "eager: <why>") and "prefill replays" (chunks)
        self.step_counts: Counter[str] = Counter()
        model.fuse_input_projections()  # one GEMM instead of four per GDN layer (weights shared, not copied)
        self.graphs = None
        if cuda_graphs:
            reason = graphs_supported(model)
            if reason is None:
                self.graphs = DecodeGraphs(model, cache, max_batch)
                self.graphs.capture()
            else:
                logger.info("decode runs without CUDA graphs: %s", reason)
        self.prefill_graphs = self.packed_graphs = None
        if cuda_graphs and prefill_graphs and length_buckets(min(prefill_graphs, table_tokens(cache))):
            reason = graphs_supported(model)
            if reason is None:
                pool = self.graphs.pool if self.graphs is not None else None
                self.prefill_graphs = PrefillGraphs(model, cache, prefill_graphs, pool=pool)
                self.prefill_graphs.capture()
                unpacked = packed_supported(model)
                if unpacked is not None:
                    logger.info("prefill chunks replay one graph each, not packed: %s", unpacked)
                elif split_mixed_steps and packed_prefill and packed_buckets(packed_prefill, table_tokens(cache)):
                    self.packed_graphs = PackedPrefillGraphs(model, cache, packed_prefill,
                                                             pool=self.prefill_graphs.pool)
                    self.packed_graphs.capture()
            else:
                logger.info("prefill runs without CUDA graphs: %s", reason)

    def _prepare_states(self, output: SchedulerOutput) -> None:
        """Fresh sequences start from zero; prefix-cache hits start from their snapshot."""
        reset = [c.sequence.state_slot for c in output.chunks if c.reset_state]
        if reset:
            self.cache.zero_state(device_tensor(reset, self.device, torch.long))
        restores = [(self.cache.snapshot_index(c.restore_from), c.sequence.state_slot)
                    for c in output.chunks if c.restore_from is not None]
        if restores:
            source, target = (device_tensor(x, self.device, torch.long) for x in zip(*restores))
            self.cache.copy_state(source, target)

    def _save_snapshots(self, output: SchedulerOutput) -> None:
        saves = [(c.sequence.state_slot, self.cache.snapshot_index(c.save_to))
                 for c in output.chunks if c.save_to is not None]
        if saves:
            source, target = (device_tensor(x, self.device, torch.long) for x in zip(*saves))
            self.cache.copy_state(source, target)

    def _sync_block_tables(self, chunks: list[Chunk]) -> None:
        """Bring each scheduled sequence's row of cache.block_tables up to date: only blocks added since the last
        write travel (a new block every block_size tokens); a table that changed otherwise (preemption, a new
        owner of the slot) is written whole."""
        rows, columns, blocks = [], [], []
        for chunk in chunks:
            slot, table = chunk.sequence.state_slot, chunk.sequence.block_table
            written = self._tables.get(slot)
            start = len(written) if written is not None and table[: len(written)] == written else 0
            if start < len(table):
                rows += [slot] * (len(table) - start)
                columns += range(start, len(table))
                blocks += table[start:]
                self._tables[slot] = list(table)
        if blocks:
            index = device_tensor([rows, columns], self.device, torch.long)
            self.cache.block_tables[index[0], index[1]] = device_tensor(blocks, self.device, torch.int32)

    def _decode(self, chunks: list[Chunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids` [n] on the device, when the step's input tokens are not on the host yet (overlapped decode)."""
        size = self.cache.plan.block_size
        ids = [0] * len(chunks) if input_ids is not None else [c.sequence.token_at(c.start) for c in chunks]
        positions = [c.start for c in chunks]
        slots = [c.sequence.state_slot for c in chunks]
        mapping = [c.sequence.block_table[p // size] * size + p % size for c, p in zip(chunks, positions)]
        lengths = [p + 1 for p in positions]
        if self.graphs is not None and len(chunks) <= self.graphs.buckets[-1]:
            return self.graphs.run(ids, positions, slots, mapping, lengths, input_ids=input_ids)
        ids_t, positions_t, slots_t, mapping_t, lengths_t = device_tensor(
            [ids, positions, slots, mapping, lengths], self.device, torch.long)
        if input_ids is not None:
            ids_t = input_ids
        context = DecodeContext(self.cache, positions_t, slots_t.to(torch.int32), mapping_t, lengths_t.to(torch.int32))
        return self.model.forward_with_context(ids_t[:, None], context)[:, 0]

    def _graph_prefill(self, chunks: list[Chunk]) -> torch.Tensor | None:
        """A step's prefill chunks through the prefill graphs: a chunk alone, or (`split_mixed_steps`) several
        chunks and decode rows, which then take the decode path (their graphs). The prefill chunks replay the packed
        graphs in groups (`_packed_groups`) where that costs less, else one one-sequence graph each. None when the
        step does not qualify: a chunk fits no bucket, or the replays should cost more than the eager step
        (`PrefillGraphs.worth_replaying`)."""
        graphs = self.prefill_graphs
        prefill = [c for c in chunks if not (c.length == 1 and c.start > 0 and c.samples)]
        if not prefill or (len(chunks) > 1 and not self.split_mixed_steps):
            self.step_counts["eager: several chunks, split off"] += 1
            return None
        buckets = [graphs.fits(c.start, c.length) for c in prefill]
        tokens, decode_rows = sum(c.length for c in chunks), len(prefill) < len(chunks)
        groups = self._packed_groups(prefill, buckets, tokens, decode_rows)
        if groups is None and None in buckets:
            self.step_counts["eager: a chunk fits no bucket"] += 1
            return None
        if groups is None and not graphs.worth_replaying(buckets, tokens, decode_rows):
            self.step_counts["eager: replays would cost more"] += 1
            return None
        self.step_counts["prefill graphs"] += 1
        rows: dict[int, torch.Tensor] = {}
        for group in groups or []:
            self.step_counts["packed prefill replays"] += 1
            logits = self.packed_graphs.run([(c.sequence.token_slice(c.start, c.start + c.length), c.start,
                                              c.sequence.state_slot, c.sequence.block_table) for c in group])
            if decode_rows or len(groups) > 1:  # the graphs share one memory pool: copied out before the next replay
                logits = logits.clone()
            rows.update((id(c), logits[i:i + 1] if c.samples else logits[:0]) for i, c in enumerate(group))
        if groups:
            prefill = []
        self.step_counts["prefill replays"] += len(prefill)
        for chunk in prefill:
            tokens = chunk.sequence.token_slice(chunk.start, chunk.start + chunk.length)
            logits = graphs.run(tokens, chunk.start, chunk.sequence.state_slot, chunk.sequence.block_table)
            if len(chunks) == 1:
                return logits if chunk.samples else logits[:0]
            # the graphs share memory: each replay's logits are copied out before the next graph replays
            rows[id(chunk)] = logits.clone() if chunk.samples else logits[:0]
        decode = [c for c in chunks if id(c) not in rows]
        if decode:
            decoded = self._decode(decode)
            rows.update((id(c), decoded[i:i + 1]) for i, c in enumerate(decode))
        return torch.cat([rows[id(c)] for c in chunks])

    def _packed_groups(self, prefill: list[Chunk], buckets: list[int | None], tokens: int,
                       decode_rows: bool) -> list[list[Chunk]] | None:
        """A step's prefill chunks in groups for the packed graphs (`PackedPrefillGraphs.plan`: consecutive, each
        one replay, at the least summed replay time), where those replays should cost less than the eager step and
        than the chunks' one-sequence replays (`buckets`; None where a chunk fits none: a chunk alone then takes a
        packed replay too); else None."""
        packed = self.packed_graphs
        if packed is None or (len(prefill) < 2 and None not in buckets):
            return None
        plan = packed.plan([c.length for c in prefill])
        if plan is None:
            return None
        group_buckets = [bucket for _, _, bucket in plan]
        if not packed.worth_replaying(group_buckets, tokens, decode_rows):
            return None
        one_by_one = self.prefill_graphs.replay_ms
        if (one_by_one and None not in buckets
                and sum(packed.replay_ms[b] for b in group_buckets) > sum(one_by_one[b] for b in buckets)):
            return None
        return [prefill[begin:end] for begin, end, _ in plan]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; return logits [n, vocab] (model dtype) for the chunks that sample, in chunk order.
        `input_ids` [n] on the device replaces the sequences' own last tokens (a decode step only)."""
        chunks = output.chunks
        self._prepare_states(output)
        self._sync_block_tables(chunks)
        decode = all(c.length == 1 and c.start > 0 and c.samples for c in chunks)
        if input_ids is not None and not decode:
            raise ValueError("input ids on the device are for decode steps only")
        logits = None
        if decode:
            self.step_counts["decode"] += 1
            logits = self._decode(chunks, input_ids)
        elif self.prefill_graphs is not None:
            logits = self._graph_prefill(chunks)
        else:
            self.step_counts["eager: no prefill graphs"] += 1
        if logits is None:
            tokens = [t for c in chunks for t in c.sequence.token_slice(c.start, c.start + c.length)]
            context = PagedContext(
                self.cache,
                starts=[c.start for c in chunks],
                lengths=[c.length for c in chunks],
                state_slots=[c.sequence.state_slot for c in chunks],
                block_tables=[c.sequence.block_table for c in chunks],
                device=self.device,
                one_launch=self.paged_prefill_kernel,
            )
            input_ids = device_tensor(tokens, self.device, torch.long)[None]
            ends, total = [], 0
            for c in chunks:
                total += c.length
                if c.samples:
                    ends.append(total - 1)
            indices = device_tensor(ends, self.device, torch.long)
            logits = self.model.forward_with_context(input_ids, context, logits_indices=indices)
        self._save_snapshots(output)
        return logits
