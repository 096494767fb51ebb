"""The packed prefill (several sequences' chunks in one row of a fixed length) against the eager PagedContext step,
on the CPU: same logits, same states and KV left in the pools."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hybridlm.engine.cache import EngineCache, PagedContext
from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.engine.packed_prefill import (ALIGN, PACKED_MAX, PackedLayout, PackedPrefillContext,
                                            PackedPrefillGraphs, capacity, capture_inputs, packed_buckets,
                                            packed_inputs, packed_tokens)
from hybridlm.engine.prefill_graphs import PrefillGraphs
from tests.engine.test_engine import GREEDY, prompts, reference, run
from tests.engine.test_prefill_graphs import BLOCK, llm  # noqa: F401 (a fixture)
from tests.engine.test_prefill_graphs import fresh_cache as one_sequence_cache
from tests.model.test_kernel_path import kernels_forced  # noqa: F401 (a fixture)

TABLES = {0: [5, 1, 7, 3, 9, 0, 8], 1: [2, 4, 6, 10, 11, 12, 13], 3: [14, 15, 16, 17, 18, 19, 20]}


def with_tables_and_states(cache: EngineCache, tables: dict[int, list[int]], seed: int) -> EngineCache:
    """`cache` with these block tables and random states (as sequences restored from snapshots have)."""
    for slot, table in tables.items():
        cache.block_tables[slot, : len(table)] = torch.tensor(table, dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    for pool in (*cache.conv.values(), *cache.recurrent.values()):
        pool.copy_(torch.randn(pool.shape, generator=generator).to(pool.dtype))
    return cache


def fresh_cache(model) -> EngineCache:
    return with_tables_and_states(one_sequence_cache(model), TABLES, 7)  # blocks of BLOCK tokens, 4 state slots


def layout_of(model, length: int) -> PackedLayout:
    return PackedLayout(length, 4, model.cache_layout.conv_state_shape[1])


@torch.inference_mode()
def eager(model, cache, chunks):
    context = PagedContext(cache, [s for _, s, _ in chunks], [len(t) for t, _, _ in chunks],
                           [slot for *_, slot in chunks], [TABLES[slot] for *_, slot in chunks], model.device)
    ends = np.cumsum([len(t) for t, _, _ in chunks]) - 1
    ids = torch.tensor([t for tokens, _, _ in chunks for t in tokens])[None]
    return model.forward_with_context(ids, context, logits_indices=torch.tensor(ends))


@torch.inference_mode()
def packed(model, cache, chunks, length):
    layout = layout_of(model, length)
    flat, bounds = packed_inputs(cache, layout, [(t, s, slot, TABLES[slot]) for t, s, slot in chunks])
    context = PackedPrefillContext(cache, torch.from_numpy(flat), layout, bounds)
    ids = torch.from_numpy(flat[layout.slices["ids"]])[None]
    return model.forward_with_context(ids, context, logits_indices=context.logits_indices())[: len(chunks)]


@pytest.mark.parametrize("counts, starts", [([1], [0]), ([17, 64, 3], [0, 21, 5]), ([63, 65], [40, 0])],
                         ids=["one-token", "three", "two-aligned-edges"])
def test_packed_prefill_equals_the_eager_step(llm, counts, starts):
    model = llm.model
    slots = [0, 1, 3][: len(counts)]
    texts = [prompts([s + n], seed=n)[0] for s, n in zip(starts, counts)]
    caches = [fresh_cache(model) for _ in range(2)]
    for cache in caches:  # the prefixes before each chunk's start, eagerly
        prefixes = [(t[:s], 0, slot) for t, s, slot in zip(texts, starts, slots) if s]
        if prefixes:
            eager(model, cache, prefixes)
    chunks = [(t[s:], s, slot) for t, s, slot in zip(texts, starts, slots)]
    expected = eager(model, caches[0], chunks)
    got = packed(model, caches[1], chunks, 256)
    assert got.shape == expected.shape == (len(counts), model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for layer in caches[0].conv:  # every slot but the scratch row, which the empty rows wrote
        scratch = caches[0].scratch_state
        torch.testing.assert_close(caches[1].conv[layer][:scratch], caches[0].conv[layer][:scratch],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(caches[1].recurrent[layer][:scratch], caches[0].recurrent[layer][:scratch],
                                   rtol=1e-4, atol=1e-4)
    scratch = caches[0].scratch_block
    for layer in caches[0].keys:  # every block but the scratch one, which took the padded rows' K/V
        torch.testing.assert_close(caches[1].keys[layer][:scratch], caches[0].keys[layer][:scratch])
        torch.testing.assert_close(caches[1].values[layer][:scratch], caches[0].values[layer][:scratch])


def test_packed_layout(llm):
    cache = fresh_cache(llm.model)
    layout = layout_of(llm.model, 256)
    flat, bounds = packed_inputs(cache, layout, [([7] * 3, 5, 1, TABLES[1]), ([8] * 64, 0, 3, TABLES[3])])
    v = layout.views(flat)
    assert bounds == [0, 64, 128, 128, 256]  # aligned chunks, an empty row, the rest of the bucket
    assert list(v["attn_cu"]) == [0, 3, 64, 128, 128, 128, 128, 128, 256]  # each chunk's padding its own sequence
    assert list(v["attn_rows"]) == [1, 0, 3, 0, 0, 0, 0, 0] and list(v["attn_starts"][:4]) == [5, 0, 0, 0]
    assert list(v["slots"]) == [1, 3, cache.scratch_state, cache.scratch_state]
    assert list(v["logits"][:2]) == [2, 127]
    assert list(v["valid"][:4]) == [1, 1, 1, 0] and v["valid"].sum() == 67
    assert list(v["positions"][:3]) == [5, 6, 7] and v["positions"][3] == 0
    assert v["mapping"][0] == TABLES[1][0] * BLOCK + 5
    assert all(m // BLOCK == cache.scratch_block for m in v["mapping"][3:64])
    assert list(v["offsets64"]) == [0, 1, 2, 2, 4] and list(v["chunks64"]) == [0, 0, 1, 0, 3, 0, 3, 1]
    assert list(v["offsets32"]) == [0, 2, 4, 4, 8] and len(v["chunks32"]) == 2 * 256 // 32
    assert packed_tokens([3, 64, 65]) == 3 * ALIGN + 64


def test_packed_inputs_name_what_does_not_fit(llm):
    cache = fresh_cache(llm.model)
    layout = layout_of(llm.model, 128)
    chunk = ([1] * 10, 0, 0, TABLES[0])
    with pytest.raises(ValueError, match="takes 1 to 3 chunks, got 4"):
        packed_inputs(cache, layout, [chunk] * 4)
    with pytest.raises(ValueError, match="take 192 once aligned to 64, past the bucket's 128"):
        packed_inputs(cache, layout, [chunk] * 3)
    with pytest.raises(ValueError, match="at least one token"):
        packed_inputs(cache, layout, [([], 0, 0, TABLES[0])])
    with pytest.raises(ValueError, match="run past the block table"):
        packed_inputs(cache, layout, [([1] * 10, cache.block_tables.shape[1] * BLOCK - 5, 0, TABLES[0])])
    with pytest.raises(ValueError, match="multiple of 64"):
        PackedLayout(100, 4, 3)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available(),
                    reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")
def test_packed_prefill_on_the_kernels_reads_only_device_tables(llm, kernels_forced):
    """The Triton kernels (interpreted) over a packed step whose host bounds are the capture's, not the step's,
    as a replayed graph has them: every grid must come from the bucket and every bound from the device tables."""
    model = llm.model
    texts = [prompts([n], seed=n)[0] for n in (17, 70)]
    caches = [fresh_cache(model) for _ in range(2)]
    chunks = [(texts[0], 0, 0), (texts[1][30:], 30, 1)]
    eager(model, caches[0], [(texts[1][:30], 0, 1)])
    with torch.inference_mode():
        expected = torch.stack([eager(model, caches[0], [c])[0] for c in chunks])
    layout = layout_of(model, 256)
    eager(model, caches[1], [(texts[1][:30], 0, 1)])
    flat, _ = packed_inputs(caches[1], layout, [(t, s, slot, TABLES[slot]) for t, s, slot in chunks])
    with torch.inference_mode():
        bounds = capture_inputs(caches[1], layout)[1]  # a replay keeps the capture's host bounds
        context = PackedPrefillContext(caches[1], torch.from_numpy(flat), layout, bounds)
        ids = torch.from_numpy(flat[layout.slices["ids"]])[None]
        got = model.forward_with_context(ids, context, logits_indices=context.logits_indices())[:2]
    assert kernels_forced.get("chunk_gdn") and kernels_forced.get("causal_conv1d_fwd")
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    for layer in caches[0].conv:
        torch.testing.assert_close(caches[1].recurrent[layer][:2], caches[0].recurrent[layer][:2], rtol=2e-3,
                                   atol=2e-3)
        torch.testing.assert_close(caches[1].conv[layer][:2], caches[0].conv[layer][:2], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("lengths, join_every, max_num_seqs, budget, align", [
    ([5, 70, 30, 64, 1], 0, 4, 160, 1), ([5, 70, 130, 64, 1, 200], 2, 4, 160, 1),
    ([9, 3, 20, 1, 14, 7, 2, 11, 5, 30, 8], 0, 12, 160, 1), ([5, 70, 130, 64, 1, 200, 33], 0, 8, 192, ALIGN),
], ids=["at-once", "joining", "eleven-at-once", "aligned"])
def test_engine_with_packed_prefills_equals_reference(llm, lengths, join_every, max_num_seqs, budget, align):
    """The engine sending steps of several prefill chunks through the packed forward (uncaptured on the CPU), the
    decode rows of a mixed step through the decode path: greedy tokens as the plain reference. Eleven prompts at
    once take two packed replays in one step. "aligned": the scheduler charges aligned chunks (as the engine sets it
    where packed graphs run), so every step's chunks fit the one bucket of its budget, chunks longer than any
    one-sequence graph included."""
    batch = prompts(lengths, seed=3)
    expected = [reference(llm, p) for p in batch]
    config = EngineConfig(max_num_batched_tokens=budget, block_size=BLOCK, max_num_seqs=max_num_seqs)
    engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, config)
    engine.scheduler.prefill_align = align
    runner = engine.runner
    runner.prefill_graphs = PrefillGraphs(llm.model, runner.cache, 128)
    packed = runner.packed_graphs = PackedPrefillGraphs(llm.model, runner.cache, 512 if align == 1 else budget)
    assert packed.buckets == ([256, 512] if align == 1 else [budget])
    replays, original = [], packed.run
    packed.run = lambda chunks: replays.append(len(chunks)) or original(chunks)
    sequences = run(engine, [(p, GREEDY) for p in batch], join_every)
    assert [s.output_token_ids for s in sequences] == expected
    assert replays, runner.step_counts
    if len(lengths) > 8:
        assert len(replays) >= 2 and sum(replays[:2]) == 11, replays
    if align > 1:
        assert runner.step_counts["eager: a chunk fits no bucket"] == 0, runner.step_counts


def test_packed_buckets():
    assert packed_buckets(2048, 10**6) == [256, 512, 1024, 1536, 2048]
    assert packed_buckets(8192, 10**6) == [256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    assert packed_buckets(3000, 10**6) == [256, 512, 1024, 1536, 2048, 3008]  # the budget aligned
    assert packed_buckets(32768, 10**6)[-1] == PACKED_MAX
    assert packed_buckets(128, 512) == [128]
    assert packed_buckets(2048, 500) == [256, 448]  # never past the block table
    assert packed_buckets(2048, 100) == []
    assert [capacity(b) for b in (256, 2048, 4096, 6144, 8192)] == [8, 8, 8, 12, 16]


def test_packed_plan_groups_chunks_at_the_least_cost(llm):
    model = llm.model
    cache = fresh_cache(model)
    packed = PackedPrefillGraphs(model, cache, 512)
    assert packed.buckets == [256, 512] and packed.plan([]) is None
    assert packed.plan([600]) is None  # fits no bucket
    assert packed.plan([100, 100]) == [(0, 2, 256)]
    # eleven one-block chunks: eight in the 512 bucket (the capacity), three in 256
    assert [(end - begin, bucket) for begin, end, bucket in packed.plan([5] * 11)] in ([(8, 512), (3, 256)],
                                                                                       [(3, 256), (8, 512)])
    packed.replay_ms = {256: 1.0, 512: 5.0}  # calibrated: two small replays beat one large
    assert packed.plan([100, 100, 100, 100]) == [(0, 2, 256), (2, 4, 256)]
    assert packed.fits([5] * 9) is None and packed.fits([5] * 8) == 512
