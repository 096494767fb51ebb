"""CUDA graphs of a one-sequence prefill step, one per length bucket.

A short prompt's prefill is bound by the host: a forward launches a few hundred kernels and does a thousand small
tensor calls around them, which on an H100 took longer than the GPU's work up to ~4k tokens (0.8B: 13.5 ms of wall
time against 2.5 ms of GPU time at 512 tokens; `benchmarks/RESULTS.md`, thirty-third session). Each bucket's forward
is captured once over static input tensors; a chunk of n <= L tokens runs padded on the right to its bucket L.

The padding is exact (`docs/prefill_graphs.md`): a padded row's GDN gates are -inf (decay 1, beta 0: the state
passes unchanged), the conv's final state is gathered at the last real inputs, the conv and attention are causal so
real rows never see padded ones, padded rows' attention outputs are zeroed (their queries may read stale blocks),
their K/V go to the cache's scratch block, and the logits come from row n - 1. Everything that depends on n is read
on the device, so one graph serves every n <= L.
"""
from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from hybridlm.engine.cache import EngineCache, _StateRows
from hybridlm.model import HybridLM
from hybridlm.ops import dispatch
from hybridlm.ops.paged_attention import paged_prefill_attention_reference

logger = logging.getLogger(__name__)

# steps of 1.5x and 2x past 256, so that no chunk pads to more than 1.5x its length there
LENGTH_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
STAGING_BUFFERS = 4  # pinned host copies of the inputs, used in turn (a step may replay several graphs)
# rows of the static input: token ids, positions, KV slots, then the scalars [n, state slot, start, 0, L]
IDS, POSITIONS, MAPPING, SCALARS = range(4)


def length_buckets(largest: int) -> list[int]:
    """The buckets up to `largest` tokens (at most the largest of LENGTH_BUCKETS; longer chunks run eagerly)."""
    return [b for b in LENGTH_BUCKETS if b <= largest]


def table_tokens(cache: EngineCache) -> int:
    """The positions a block table reaches: a padded query reads its row of the table, so no bucket goes past it."""
    return cache.block_tables.shape[1] * cache.plan.block_size


class PaddedPrefillContext(_StateRows):
    """ForwardContext of one sequence's prefill chunk padded to a fixed length L: every input is a device tensor
    (rows of `inputs` [4, >= L], int64), so that the forward can be captured in a CUDA graph and replayed for any
    real length n <= L. The engine's pools are read and written as PagedContext does."""

    pad_mask = None
    keeps_state = True
    decode = False
    single_token_decode = False
    cu_seqlens = None  # one sequence: the GDN ops take their batch form, with the slot's state as initial state

    def __init__(self, cache: EngineCache, inputs: torch.Tensor, length: int) -> None:
        self.cache, self.length = cache, length
        scalars = inputs[SCALARS]
        self.count = scalars[0:1]  # n, the real tokens
        self.slots = scalars[1:2]
        self.positions = inputs[POSITIONS, :length][None]  # [1, L]
        self.slot_mapping = inputs[MAPPING, :length]
        self.valid = torch.arange(length, device=inputs.device) < self.count  # [L]
        self.padding = (~self.valid)[None, :, None]  # [1, L, 1]
        self.rows = scalars[1:2].to(torch.int32)
        self.starts = scalars[2:3].to(torch.int32)
        self.cu_seqlens32 = scalars[3:5].to(torch.int32)  # [0, L]

    def decode_pools(self, layer: int) -> None:
        return None

    def logits_indices(self) -> torch.Tensor:
        return self.count - 1

    def last_conv_inputs(self, x: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The conv state after the real tokens: the last K-1 pre-conv inputs before row n of the carried inputs
        followed by x. x [1, L, C]; initial [1, C, K-1] -> [1, C, K-1]."""
        width = initial.shape[-1]
        stream = torch.cat([initial.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [1, C, K-1+L]
        return stream.index_select(2, self.count + torch.arange(width, device=x.device))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, Hq, L, D], k, v [1, Hkv, L, D] -> [1, Hq, L, D]; padded rows come out zero."""
        return attend_padded(self, layer, q, k, v, scale, self.rows, self.cu_seqlens32, self.starts)

    def finish(self) -> None:
        pass


def attend_padded(context, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  rows: torch.Tensor, cu_seqlens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """A padded context's attention (`context`: cache, slot_mapping, length, valid): write K/V (padded rows' to the
    scratch block), attend over the paged pools with these int32 tables (a grid for `context.length` tokens), and
    zero the padded rows' outputs: a padded query may read blocks that are stale or were never written, and
    `torch.where` keeps a NaN read there out of the result. q [1, Hq, L, D], k, v [1, Hkv, L, D] -> [1, Hq, L, D]."""
    cache = context.cache
    cache.write_kv(layer, k[0].transpose(0, 1), v[0].transpose(0, 1), context.slot_mapping)
    flat_q = q[0].transpose(0, 1)  # [L, Hq, D]
    arguments = (flat_q, cache.keys[layer], cache.values[layer], cache.block_tables, rows, cu_seqlens, starts, scale)
    if dispatch.use_kernels(flat_q, cache.keys[layer]):
        o = dispatch.kernels().paged_prefill_attention_fwd(*arguments, max_len=context.length)
    else:
        o = paged_prefill_attention_reference(*arguments)
    o = torch.where(context.valid[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.transpose(0, 1)[None]


def padded_inputs(cache: EngineCache, tokens: list[int], start: int, slot: int, block_table: list[int],
                  length: int) -> np.ndarray:
    """The rows [4, length] (int64) of a PaddedPrefillContext's input for a chunk of `tokens` at positions start,
    start + 1, ... of the sequence in state slot `slot`, padded to `length`."""
    count, size = len(tokens), cache.plan.block_size
    if not 0 < count <= length:
        raise ValueError(f"a padded prefill of length {length} takes 1 to {length} tokens, got {count}")
    if start + length > table_tokens(cache):
        raise ValueError(f"positions {start} .. {start + length - 1} run past the block table "
                         f"({table_tokens(cache)} tokens)")
    rows = np.zeros((4, length), dtype=np.int64)
    rows[IDS, :count] = tokens
    rows[POSITIONS] = np.arange(start, start + length)
    real = rows[POSITIONS, :count]
    rows[MAPPING, :count] = np.asarray(block_table, dtype=np.int64)[real // size] * size + real % size
    rows[MAPPING, count:] = cache.scratch_block * size + np.arange(length - count) % size
    rows[SCALARS, :5] = (count, slot, start, 0, length)
    return rows


class PrefillGraphs:
    """Captured one-sequence prefill forwards; `run` returns the logits of the chunk's last token [1, vocab] (a view
    of graph memory, valid until the next replay), or None when the chunk fits no bucket. Before `capture` (as on
    the CPU, in tests) `run` takes the same padded forward eagerly."""

    kind = "prefill"

    def __init__(self, model: HybridLM, cache: EngineCache, largest: int, pool=None) -> None:
        self.model, self.cache = model, cache
        self.table_tokens = table_tokens(cache)
        self.buckets = self.bucket_lengths(largest, self.table_tokens)
        if not self.buckets:
            raise ValueError(f"no prefill bucket fits {min(largest, self.table_tokens)} tokens (the smallest is "
                             f"{LENGTH_BUCKETS[0]})")
        self.inputs = torch.zeros(self.input_shape(self.buckets[-1]), dtype=torch.long, device=model.device)
        # pinned staging buffers used in turn; a buffer is refilled only once the device has copied it out
        pinned = model.device.type == "cuda"
        self._hosts = [torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=pinned)
                       for _ in range(STAGING_BUFFERS)]
        self._copied: list[torch.cuda.Event | None] = [None] * STAGING_BUFFERS
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = pool
        # measured after capture (`calibrate`): each bucket's replay and an eager forward's wall time, in ms
        self.replay_ms: dict[int, float] = {}
        self.eager_ms: dict[int, float] = {}  # an eager forward's wall time at the smallest and largest bucket
        self.eager_host_ms = 0.0  # the smallest's
        self.capture_s = 0.0  # warm-up, capture and calibration, seconds

    @staticmethod
    def bucket_lengths(largest: int, table_tokens: int) -> list[int]:
        return length_buckets(min(largest, table_tokens))

    def input_shape(self, length: int) -> tuple[int, ...]:
        return (4, length)

    def _stage(self, values: np.ndarray, index: tuple[slice, ...]) -> None:
        """Copy `values` into inputs[index] through the next pinned staging buffer (no host sync: the buffer's
        last copy is waited for only if it has not run yet)."""
        turn = self._turn = (self._turn + 1) % STAGING_BUFFERS
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy that last read this buffer is done
        host = self._hosts[turn][index]
        host.copy_(torch.from_numpy(values))
        self.inputs[index].copy_(host, non_blocking=True)
        if host.is_pinned():
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()

    def _forward(self, length: int) -> torch.Tensor:
        context = PaddedPrefillContext(self.cache, self.inputs, length)
        ids = self.inputs[IDS, :length][None]
        return self.model.forward_with_context(ids, context, logits_indices=context.logits_indices())

    def _fill(self, length: int) -> None:
        """Inputs for the warm-up and capture: one token at position 0 of the last state slot (no sequence holds a
        slot while the engine starts; a sequence's first step resets its slot), every K/V write to the scratch
        block."""
        rows = padded_inputs(self.cache, [0], 0, self.cache.plan.num_state_slots - 1, [self.cache.scratch_block],
                             length)
        self.inputs[:, :length].copy_(torch.from_numpy(rows))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        device = self.model.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture: every bucket's kernel variants compile here
            for length in reversed(self.buckets):
                self._fill(length)
                self._forward(length)
        torch.cuda.current_stream(device).wait_stream(stream)
        for length in reversed(self.buckets):
            self._fill(length)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[length] = self._forward(length)
            self.pool = graph.pool()
            self.graphs[length] = graph
        torch.cuda.synchronize(device)
        self.calibrate()
        self.capture_s = time.perf_counter() - started
        logger.info("captured %s CUDA graphs for lengths %s in %.1f s (replays %s ms; eager forwards %s ms)",
                    self.kind, self.buckets, self.capture_s,
                    [round(self.replay_ms[b], 2) for b in self.buckets],
                    {b: round(ms, 1) for b, ms in self.eager_ms.items()})

    @torch.inference_mode()
    def calibrate(self, repeats: int = 3) -> None:
        """Time each bucket's replay on the device, and the wall time of an eager forward of the smallest and of the
        largest bucket (the first bound by the host wherever graphs pay, the second by the device or by both where
        they do not overlap), for `worth_replaying`. Inputs as at capture."""
        device = self.model.device
        for length in dict.fromkeys((self.buckets[0], self.buckets[-1])):
            self._fill(length)
            walls = []
            for _ in range(repeats):
                torch.cuda.synchronize(device)
                begin = time.perf_counter()
                self._forward(length)
                torch.cuda.synchronize(device)
                walls.append(time.perf_counter() - begin)
            self.eager_ms[length] = 1e3 * sorted(walls)[repeats // 2]
        self.eager_host_ms = self.eager_ms[self.buckets[0]]
        for length in self.buckets:
            self._fill(length)
            graph = self.graphs[length]
            graph.replay()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(repeats):
                graph.replay()
            end.record()
            end.synchronize()
            self.replay_ms[length] = begin.elapsed_time(end) / repeats

    @staticmethod
    def _interpolate(times: dict[int, float], tokens: int) -> float:
        """Linear between the lengths timed, the smallest's below them, proportional past the largest."""
        lengths = sorted(times)
        if tokens <= lengths[0]:
            return times[lengths[0]]
        if tokens >= lengths[-1]:
            return times[lengths[-1]] * tokens / lengths[-1]
        i = bisect.bisect_left(lengths, tokens)
        low, high = lengths[i - 1], lengths[i]
        share = (tokens - low) / (high - low)
        return times[low] + share * (times[high] - times[low])

    def device_ms(self, tokens: int) -> float:
        """The device time of a forward over `tokens` tokens, from the replays' times."""
        return self._interpolate(self.replay_ms, tokens)

    def eager_step_ms(self, tokens: int) -> float:
        """What an eager step over `tokens` tokens should take: at least the host's time for an eager forward, the
        device time of its tokens, and the eager forwards' wall times timed at calibration, interpolated."""
        timed = self._interpolate(self.eager_ms, tokens) if self.eager_ms else 0.0
        return max(self.eager_host_ms, self.device_ms(tokens), timed)

    def worth_replaying(self, buckets: list[int], tokens: int, decode_rows: bool) -> bool:
        """Whether replaying the graphs of `buckets` (and then a decode step, costed as the smallest bucket's
        replay) should take no longer than one eager step over the same `tokens` (`eager_step_ms`). Before
        calibration (on the CPU, in tests): always."""
        if not self.replay_ms:
            return True
        replays = sum(self.replay_ms[b] for b in buckets)
        if decode_rows:
            replays += self.replay_ms[self.buckets[0]]
        return replays <= self.eager_step_ms(tokens)

    def fits(self, start: int, count: int) -> int | None:
        """The bucket for a chunk of `count` tokens from position `start`, or None."""
        bucket = next((b for b in self.buckets if b >= count), None)
        if bucket is None or start + bucket > self.table_tokens:
            return None
        return bucket

    def run(self, tokens: list[int], start: int, slot: int, block_table: list[int]) -> torch.Tensor | None:
        bucket = self.fits(start, len(tokens))
        if bucket is None:
            return None
        self._stage(padded_inputs(self.cache, tokens, start, slot, block_table, bucket),
                    (slice(None), slice(0, bucket)))
        if not self.graphs:
            return self._forward(bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket]
