"""CUDA graphs of a prefill step that packs several sequences' chunks into one row, one graph per token bucket.

A step of several prompts' chunks (the scheduler fills a step with up to `max_num_batched_tokens` tokens of
several prompts) runs eagerly in ~30 ms of host time whatever its size at 0.8B, or as one one-sequence replay per
chunk, each ~2 ms at least (`docs/prefill_graphs.md`). Here the whole step is one replay: the chunks are packed one
after another in a row of L tokens, as the eager step packs them, with three changes that make every grid a
function of L alone, so that one captured graph serves any set of chunks whose tokens fit:

- each chunk is right-padded to a multiple of 64 tokens (`ALIGN`), so the row holds exactly L / 64 GDN chunks
  (L / 32 conv blocks) and the chunk tables the kernels read (`ops.varlen.attach_chunk_tables`) keep their shapes;
- a bucket has a fixed number of sequence rows (`capacity` + 1: 9 up to 4096 tokens): the real chunks, then empty
  rows, then one row that takes the rest of the L tokens; empty and last rows use the scratch state row and write
  their K/V to the scratch block;
- attention sees each chunk's padding as a sequence of its own (start 0, block-table row 0), so a real query never
  reads its own padded positions' (unwritten) K/V slots; padded rows' attention outputs are zeroed.

Padded tokens carry gates of -inf (decay 1, beta 0: the GDN state passes them unchanged) and each sequence's conv
state is gathered at its last real inputs, as in the one-sequence graphs (`prefill_graphs.py`).
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from hybridlm.engine.cache import EngineCache, _StateRows
from hybridlm.engine.prefill_graphs import PrefillGraphs, attend_padded
from hybridlm.ops.varlen import attach_chunk_tables, attach_host_bounds

ALIGN = 64  # the GDN chunk; a multiple of the conv kernel's 32-token blocks
CONV_BLOCK = 32
SEQUENCES = 8  # real chunks a packed bucket holds at least; one more per ROW_TOKENS past 8 x ROW_TOKENS
ROW_TOKENS = 512
# token buckets below the step's (the engine's scheduler charges each prefill chunk its aligned length, so a step's
# chunks fit a bucket of its token budget, `Scheduler.prefill_align`); the step's own budget is the largest bucket
PACKED_BUCKETS = (256, 512, 1024, 1536, 2048, 3072, 4096, 6144)
PACKED_MAX = 8192  # the largest bucket: a step past it takes several replays (or runs eagerly)
# cost of a replay in tokens, for grouping before calibration (`PackedPrefillGraphs.plan`)
UNCALIBRATED_REPLAY_TOKENS = 512


class PackedLayout:
    """Where everything sits in the flat int64 input of a packed step of `length` tokens and `rows` sequence rows
    (`capacity(length)` + 1); `conv_width` = the conv kernel's width - 1."""

    def __init__(self, length: int, rows: int, conv_width: int) -> None:
        if length % ALIGN:
            raise ValueError(f"a packed bucket must be a multiple of {ALIGN} tokens, got {length}")
        self.length, self.rows, self.conv_width = length, rows, conv_width
        sizes = dict(ids=length, positions=length, mapping=length, valid=length, cu=rows + 1,
                     attn_cu=2 * rows + 1, attn_rows=2 * rows, attn_starts=2 * rows,
                     chunks64=2 * (length // ALIGN), offsets64=rows + 1,
                     chunks32=2 * (length // CONV_BLOCK), offsets32=rows + 1,
                     slots=rows, logits=rows, conv=rows * conv_width)
        self.slices, at = {}, 0
        for name, size in sizes.items():
            self.slices[name] = slice(at, at + size)
            at += size
        self.size = at

    def views(self, flat) -> dict:
        return {name: flat[s] for name, s in self.slices.items()}


def packed_buckets(largest: int, table_tokens: int) -> list[int]:
    """The buckets for steps of up to `largest` tokens, each chunk aligned to ALIGN: PACKED_BUCKETS below the
    largest, which is `largest` aligned, at most PACKED_MAX and never past the block table (a padded row's query reads
    a table row up to its position); none below two aligned chunks."""
    top = min(aligned(largest), table_tokens // ALIGN * ALIGN, PACKED_MAX)
    if top < 2 * ALIGN:
        return []
    return [b for b in PACKED_BUCKETS if b < top] + [top]


def capacity(bucket: int) -> int:
    """The real chunks a packed step of `bucket` tokens holds at most (its layout has one row more)."""
    return max(SEQUENCES, bucket // ROW_TOKENS)


def aligned(count: int) -> int:
    return -(-count // ALIGN) * ALIGN


def packed_tokens(counts: list[int]) -> int:
    """The row length the chunks take once each is padded to ALIGN tokens."""
    return sum(aligned(n) for n in counts)


def packed_inputs(cache: EngineCache, layout: PackedLayout, chunks: list[tuple[list[int], int, int, list[int]]]
                  ) -> tuple[np.ndarray, list[int]]:
    """The flat input of a packed step over `chunks` (tokens, start position, state slot, block table), and the
    GDN sequence bounds (the host copy of its cu_seqlens)."""
    if not 0 < len(chunks) < layout.rows:
        raise ValueError(f"a packed prefill takes 1 to {layout.rows - 1} chunks, got {len(chunks)}")
    return _packed(cache, layout, chunks)


def capture_inputs(cache: EngineCache, layout: PackedLayout) -> tuple[np.ndarray, list[int]]:
    """The input a graph is warmed up and captured with: no chunk; every row writes to the scratch state and block."""
    return _packed(cache, layout, [])


def _packed(cache, layout, chunks):
    L, R, W, size = layout.length, layout.rows, layout.conv_width, cache.plan.block_size
    counts = [len(tokens) for tokens, *_ in chunks]
    if counts and min(counts) < 1:
        raise ValueError("a packed prefill chunk needs at least one token")
    if packed_tokens(counts) > L:
        raise ValueError(f"chunks of {counts} tokens take {packed_tokens(counts)} once aligned to {ALIGN}, past the "
                         f"bucket's {L}")
    flat = np.zeros(layout.size, dtype=np.int64)
    v = layout.views(flat)
    v["mapping"][:] = cache.scratch_block * size + np.arange(L) % size
    v["slots"][:] = cache.scratch_state
    bounds, attn, attn_rows, attn_starts = [0], [0], [], []
    for i, (tokens, start, slot, table) in enumerate(chunks):
        bos, n = bounds[-1], counts[i]
        if start + n > cache.block_tables.shape[1] * size:
            raise ValueError(f"positions {start} .. {start + n - 1} run past the block table")
        positions = np.arange(start, start + n)
        v["ids"][bos:bos + n] = tokens
        v["positions"][bos:bos + n] = positions
        v["mapping"][bos:bos + n] = np.asarray(table, dtype=np.int64)[positions // size] * size + positions % size
        v["valid"][bos:bos + n] = 1
        v["slots"][i] = slot
        v["logits"][i] = bos + n - 1
        for j in range(W):  # the conv state after the chunk: the last W inputs of [initial state; tokens]
            p = n + j
            v["conv"][i * W + j] = i * W + p if p < W else R * W + bos + p - W
        bounds.append(bos + aligned(n))
        attn += [bos + n, bounds[-1]]
        attn_rows += [slot, 0]
        attn_starts += [start, 0]
    for i in range(len(chunks), R):  # empty rows, then the last row with what is left of the bucket
        bounds.append(bounds[-1] if i < R - 1 else L)
        attn += [attn[-1], bounds[-1]]
        attn_rows += [0, 0]
        attn_starts += [0, 0]
        v["conv"][i * W:(i + 1) * W] = i * W + np.arange(W)  # its own state, unchanged
    v["cu"][:] = bounds
    v["attn_cu"][:], v["attn_rows"][:], v["attn_starts"][:] = attn, attn_rows, attn_starts
    for block, name in ((ALIGN, "64"), (CONV_BLOCK, "32")):
        per_row = [(b - a) // block for a, b in zip(bounds[:-1], bounds[1:])]
        v["offsets" + name][:] = np.concatenate([[0], np.cumsum(per_row)])
        v["chunks" + name][:] = np.array([(i, t) for i, n in enumerate(per_row) for t in range(n)]).reshape(-1)
    return flat, bounds


class PackedPrefillContext(_StateRows):
    """ForwardContext of a packed prefill step read from the flat input `flat` (device, int64) laid out by
    `layout`; `bounds` are its GDN sequence bounds on the host (at capture: the capture's; a replay keeps the
    grids they gave, which depend on the bucket alone)."""

    pad_mask = None
    keeps_state = True
    decode = False
    single_token_decode = False

    def __init__(self, cache: EngineCache, flat: torch.Tensor, layout: PackedLayout, bounds: list[int]) -> None:
        self.cache, self.layout = cache, layout
        v = layout.views(flat)
        L = self.length = layout.length
        self.positions = v["positions"][None]  # [1, L]
        self.slot_mapping = v["mapping"]
        self.valid = v["valid"].bool()  # [L]
        self.padding = (~self.valid)[None, :, None]  # [1, L, 1]
        self.slots = v["slots"]
        self.logits_rows = v["logits"]
        self.conv_rows = v["conv"]
        tables = {name: v[name].to(torch.int32) for name in ("cu", "attn_cu", "attn_rows", "attn_starts", "chunks64",
                                                            "offsets64", "chunks32", "offsets32")}
        self.cu_seqlens = attach_host_bounds(tables["cu"], bounds)
        attach_chunk_tables(self.cu_seqlens, ALIGN, tables["cu"], tables["chunks64"].view(-1, 2),
                            tables["offsets64"], L // ALIGN)
        attach_chunk_tables(self.cu_seqlens, CONV_BLOCK, tables["cu"], tables["chunks32"].view(-1, 2),
                            tables["offsets32"], L // CONV_BLOCK)
        self.attn_cu, self.attn_rows, self.attn_starts = tables["attn_cu"], tables["attn_rows"], tables["attn_starts"]

    def decode_pools(self, layer: int) -> None:
        return None

    def logits_indices(self) -> torch.Tensor:
        return self.logits_rows

    def last_conv_inputs(self, x: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """Each row's conv state after its real tokens: x [1, L, C], initial [R, C, W] -> [R, C, W]."""
        rows, channels, width = initial.shape
        stream = torch.cat([initial.to(x.dtype).transpose(1, 2).reshape(rows * width, channels), x[0]])
        return stream.index_select(0, self.conv_rows).view(rows, width, channels).transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, Hq, L, D], k, v [1, Hkv, L, D] -> [1, Hq, L, D]; padded rows (each chunk's padding a sequence of
        its own, reading table row 0) come out zero."""
        return attend_padded(self, layer, q, k, v, scale, self.attn_rows, self.attn_cu, self.attn_starts)

    def finish(self) -> None:
        pass


class PackedPrefillGraphs(PrefillGraphs):
    """Captured packed prefill forwards, one per token bucket (`packed_buckets`: up to `largest` tokens of aligned
    chunks, never past the block table). `run` returns the logits of each chunk's last token [chunks, vocab] (a view
    of graph memory, valid until the next replay), or None when the chunks fit no bucket; `plan` groups a step's
    chunks into replays. Before `capture` (the CPU, in tests) `run` takes the same packed forward eagerly. Capture,
    calibration and `worth_replaying` are PrefillGraphs'."""

    kind = "packed prefill"

    def __init__(self, model, cache: EngineCache, largest: int, pool=None) -> None:
        self.conv_width = model.cache_layout.conv_state_shape[1]
        super().__init__(model, cache, largest, pool)
        self.layouts = {b: PackedLayout(b, capacity(b) + 1, self.conv_width) for b in self.buckets}
        self._bounds: list[int] = []
        # _first_holding[n]: the index of the first bucket that holds n chunks (capacity grows with the bucket)
        self._first_holding = [next(i for i, b in enumerate(self.buckets) if capacity(b) >= n)
                               for n in range(capacity(self.buckets[-1]) + 1)]

    @staticmethod
    def bucket_lengths(largest: int, table_tokens: int) -> list[int]:
        return packed_buckets(largest, table_tokens)

    def input_shape(self, length: int) -> tuple[int, ...]:
        return (PackedLayout(length, capacity(length) + 1, self.conv_width).size,)

    def _forward(self, length: int) -> torch.Tensor:
        layout = self.layouts[length]
        flat = self.inputs[:layout.size]
        context = PackedPrefillContext(self.cache, flat, layout, self._bounds)
        ids = flat[layout.slices["ids"]][None]
        return self.model.forward_with_context(ids, context, logits_indices=context.logits_indices())

    def _fill(self, length: int) -> None:
        values, self._bounds = capture_inputs(self.cache, self.layouts[length])
        self.inputs[:values.size].copy_(torch.from_numpy(values))

    def _bucket(self, tokens: int, chunks: int) -> int | None:
        """The smallest bucket of at least `tokens` tokens that holds `chunks` chunks, or None."""
        if chunks >= len(self._first_holding):
            return None
        i = max(bisect.bisect_left(self.buckets, tokens), self._first_holding[chunks])
        return self.buckets[i] if i < len(self.buckets) else None

    def fits(self, counts: list[int]) -> int | None:
        """The bucket for chunks of `counts` tokens, or None."""
        return self._bucket(packed_tokens(counts), len(counts)) if counts else None

    def plan(self, counts: list[int]) -> list[tuple[int, int, int]] | None:
        """Chunks of `counts` tokens, in order, as consecutive groups (begin, end, bucket), one replay each, at the
        least summed replay time (calibrated; before calibration a bucket's tokens plus UNCALIBRATED_REPLAY_TOKENS);
        None if a chunk fits no bucket."""
        def cost(bucket: int) -> float:
            return self.replay_ms[bucket] if self.replay_ms else bucket + UNCALIBRATED_REPLAY_TOKENS

        ends = np.concatenate([[0], np.cumsum([aligned(n) for n in counts])]).tolist()
        # best[i]: (the least cost of the first i chunks, their last group's begin, its bucket)
        best: list[tuple[float, int, int]] = [(0.0, 0, 0)]
        for end in range(1, len(counts) + 1):
            best.append((float("inf"), 0, 0))
            for begin in range(end - 1, -1, -1):
                bucket = self._bucket(ends[end] - ends[begin], end - begin)
                if bucket is None:  # a longer group fits no better
                    break
                total = best[begin][0] + cost(bucket)
                if total < best[end][0]:
                    best[end] = (total, begin, bucket)
        if not counts or best[-1][0] == float("inf"):
            return None
        groups, end = [], len(counts)
        while end:
            _, begin, bucket = best[end]
            groups.append((begin, end, bucket))
            end = begin
        return groups[::-1]

    def run(self, chunks: list[tuple[list[int], int, int, list[int]]]) -> torch.Tensor | None:
        """`chunks`: (tokens, start position, state slot, block table) of each."""
        bucket = self.fits([len(tokens) for tokens, *_ in chunks])
        if bucket is None:
            return None
        values, bounds = packed_inputs(self.cache, self.layouts[bucket], chunks)
        self._stage(values, (slice(0, values.size),))
        if not self.graphs:
            self._bounds = bounds
            return self._forward(bucket)[: len(chunks)]
        self.graphs[bucket].replay()
        return self.outputs[bucket][: len(chunks)]
