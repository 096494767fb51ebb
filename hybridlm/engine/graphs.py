"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step of a 9B model launches hundreds of small kernels; at batch 1 launching them costs more than
running them. Each bucket's forward (DecodeContext over the engine's pools, logits of every row) is captured
once with static input tensors; a step copies its inputs into them in one transfer and replays the graph.
Rows past the real batch are padding: slot id -1 (the GDN step kernel skips it), context length 0 (attention
reads nothing) and a KV slot in the cache's scratch block.
"""
from __future__ import annotations

import logging

import torch

from hybridlm.engine.cache import DecodeContext, EngineCache
from hybridlm.model import HybridLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in BATCH_BUCKETS if b < max_batch} | {max_batch})


class DecodeGraphs:
    """Captured decode forwards; `run` returns logits [S, vocab] (a view of graph memory, valid until the
    next replay)."""

    def __init__(self, model: HybridLM, cache: EngineCache, max_batch: int) -> None:
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_batch)
        largest = self.buckets[-1]
        device = model.device
        if cache.plan.max_cached_tokens >= 2**31:
            raise ValueError(f"the KV cache holds {cache.plan.max_cached_tokens} token slots; the decode graphs index "
                             "them as int32: lower gpu_memory_utilization or turn cuda_graphs off")
        # rows: input ids, positions, slot ids, KV slots, context lengths; int32, the kernels' index type, so that
        # no conversion is launched inside the graph (every value fits: KV slots count tokens of one GPU's cache)
        self.inputs = torch.zeros(5, largest, dtype=torch.int32, device=device)
        # two pinned staging buffers, used in turn: with overlapped decode the previous step's copy may be pending
        self._hosts = [torch.zeros(5, largest, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.padding = (0, 0, -1, cache.scratch_block * cache.plan.block_size, 0)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, mapping, lengths = (row[:size] for row in self.inputs)
        context = DecodeContext(self.cache, positions, slots, mapping, lengths)
        return self.model.forward_with_context(ids[:, None], context)[:, 0]  # [size, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that smaller graphs reuse its memory pool."""
        for row, value in enumerate(self.padding):
            self.inputs[row].fill_(value)
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: every bucket's kernel variants compile here
            for size in reversed(self.buckets):
                self._forward(size)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        for size in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.model.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def run(self, ids: list[int], positions: list[int], slots: list[int], mapping: list[int], lengths: list[int],
            input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One replay; `input_ids` [S] on the device, when given, replace `ids` (overlapped decode)."""
        size = len(ids)
        bucket = next(b for b in self.buckets if b >= size)
        rows = [list(values) + [pad] * (bucket - size)
                for values, pad in zip((ids, positions, slots, mapping, lengths), self.padding)]
        self._hosts.reverse()  # the other buffer's copy was enqueued one step ago and may not have run yet
        host = self._hosts[0][:, :bucket]
        host.copy_(torch.tensor(rows, dtype=torch.int32))
        self.inputs[:, :bucket].copy_(host, non_blocking=True)
        if input_ids is not None:
            self.inputs[0, :size].copy_(input_ids)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:size]
