"""The padded prefill of the engine's prefill graphs against the eager PagedContext step, on the CPU: same logits,
same states and KV left in the pools, for every real length up to the bucket and with a prefix already cached."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.engine.cache import EngineCache, PagedContext, plan_cache
from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.engine.prefill_graphs import (IDS, PaddedPrefillContext, PrefillGraphs, length_buckets,
                                            padded_inputs)
from tests.engine.test_engine import GREEDY, prompts, reference, run

BLOCK = 16
SLOT = 2
TABLE = [5, 1, 7, 3, 9, 0, 8]  # 112 tokens, out of order on purpose


@pytest.fixture(scope="module")
def llm(checkpoint):
    return hybridlm.LLM(checkpoint("qwen3_5_text")[0])


def fresh_cache(model) -> EngineCache:
    plan = plan_cache(model.cache_layout, model.dtype, 32 << 20, max_num_seqs=4, block_size=BLOCK)
    cache = EngineCache(model, plan)
    cache.block_tables[SLOT, : len(TABLE)] = torch.tensor(TABLE, dtype=torch.int32)
    return cache


@torch.inference_mode()
def eager(model, cache, tokens, start):
    context = PagedContext(cache, [start], [len(tokens)], [SLOT], [TABLE], model.device)
    return model.forward_with_context(torch.tensor(tokens)[None], context,
                                      logits_indices=torch.tensor([len(tokens) - 1]))


@torch.inference_mode()
def padded(model, cache, tokens, start, length):
    inputs = torch.tensor(padded_inputs(cache, tokens, start, SLOT, TABLE, length))
    context = PaddedPrefillContext(cache, inputs, length)
    return model.forward_with_context(inputs[IDS, :length][None], context, logits_indices=context.logits_indices())


@pytest.mark.parametrize("start", [0, 21])
@pytest.mark.parametrize("count", [1, 2, 17, 63, 64])
def test_padded_prefill_equals_the_eager_step(llm, start, count):
    model = llm.model
    tokens = prompts([start + count], seed=count)[0]
    caches = [fresh_cache(model) for _ in range(2)]
    for cache in caches:  # random states in the slot, as a sequence restored from a snapshot would have
        generator = torch.Generator().manual_seed(7)
        for pool in (*cache.conv.values(), *cache.recurrent.values()):
            pool[SLOT] = torch.randn(pool[SLOT].shape, generator=generator).to(pool.dtype)
        if start:
            eager(model, cache, tokens[:start], 0)
    expected = eager(model, caches[0], tokens[start:], start)
    got = padded(model, caches[1], tokens[start:], start, 64)
    assert got.shape == expected.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    scratch = caches[0].scratch_block
    for layer in caches[0].conv:
        torch.testing.assert_close(caches[1].conv[layer], caches[0].conv[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(caches[1].recurrent[layer], caches[0].recurrent[layer], rtol=1e-4, atol=1e-4)
    for layer in caches[0].keys:  # every block but the scratch one, which took the padded rows' K/V
        torch.testing.assert_close(caches[1].keys[layer][:scratch], caches[0].keys[layer][:scratch])
        torch.testing.assert_close(caches[1].values[layer][:scratch], caches[0].values[layer][:scratch])


def test_padded_inputs_name_what_does_not_fit(llm):
    cache = fresh_cache(llm.model)
    with pytest.raises(ValueError, match="takes 1 to 64 tokens, got 65"):
        padded_inputs(cache, [1] * 65, 0, SLOT, TABLE, 64)
    with pytest.raises(ValueError, match="takes 1 to 64 tokens, got 0"):
        padded_inputs(cache, [], 0, SLOT, TABLE, 64)
    limit = cache.block_tables.shape[1] * BLOCK
    with pytest.raises(ValueError, match="run past the block table"):
        padded_inputs(cache, [1], limit - 10, SLOT, TABLE, 64)


def test_buckets_and_fit(llm):
    assert length_buckets(63) == []
    assert length_buckets(300) == [64, 128, 256]
    assert length_buckets(10**6)[-1] == 2048
    graphs = PrefillGraphs(llm.model, fresh_cache(llm.model), 128)
    assert graphs.fits(0, 1) == 64 and graphs.fits(0, 65) == 128 and graphs.fits(0, 129) is None
    assert graphs.fits(graphs.table_tokens - 64, 10) == 64 and graphs.fits(graphs.table_tokens - 63, 10) is None
    with pytest.raises(ValueError, match="no prefill bucket fits 32 tokens"):
        PrefillGraphs(llm.model, fresh_cache(llm.model), 32)
    # no bucket reaches past the block table (the model's 512 positions): a padded query reads the table row
    assert PrefillGraphs(llm.model, fresh_cache(llm.model), 2048).buckets == [64, 128, 256, 384, 512]


def test_replays_are_taken_where_they_should_cost_less_than_the_eager_step(llm):
    graphs = PrefillGraphs(llm.model, fresh_cache(llm.model), 512)
    assert graphs.worth_replaying([512, 512], 600, decode_rows=True)  # uncalibrated (CPU): always
    graphs.replay_ms = {64: 1.0, 128: 1.5, 256: 2.0, 384: 3.0, 512: 4.0}
    graphs.eager_host_ms = 4.5
    assert [graphs.device_ms(n) for n in (1, 64, 192, 448, 512, 1024)] == [1.0, 1.0, 1.75, 3.5, 4.0, 8.0]
    assert graphs.worth_replaying([512], 300, decode_rows=False)  # 4 ms against the host's 4.5
    assert not graphs.worth_replaying([512], 300, decode_rows=True)  # + a decode step's 1 ms
    assert graphs.worth_replaying([64, 128, 256], 300, decode_rows=False)  # 4.5 ms
    assert not graphs.worth_replaying([512, 512], 600, decode_rows=False)  # 8 ms against the device's 4.7 for 600
    assert graphs.worth_replaying([512, 512], 1024, decode_rows=False)  # 8 ms against the device's 8 for 1024
    # eager forwards timed at the smallest and largest bucket: a large step's eager cost where host and device
    # do not overlap (4.5 ms at 64, 9 ms at 512: 6.75 for 288 tokens, proportional past 512)
    graphs.eager_ms = {64: 4.5, 512: 9.0}
    assert graphs.eager_step_ms(288) == pytest.approx(6.75)
    assert graphs.eager_step_ms(600) == pytest.approx(9 * 600 / 512)
    assert graphs.worth_replaying([512], 288, decode_rows=True)  # 5 ms against 6.75
    assert graphs.worth_replaying([512, 512], 600, decode_rows=False)  # 8 ms against 10.55


def record_runs(graphs: PrefillGraphs) -> list[tuple[int, int, bool]]:
    """Wrap `graphs.run`; the list it returns fills with (chunk tokens, start, whether the padded forward ran)."""
    calls, original = [], graphs.run

    def recorded(tokens, start, *rest):
        logits = original(tokens, start, *rest)
        calls.append((len(tokens), start, logits is not None))
        return logits

    graphs.run = recorded
    return calls


@pytest.mark.parametrize("lengths, join_every, split", [
    ([5, 70, 130, 64, 1, 200], 4, False), ([5, 70, 130, 64, 1, 200], 4, True), ([200], 0, False),
    ([5, 70, 30, 64, 1], 0, True),
], ids=["mixed", "mixed-split", "alone", "at-once-split"])
def test_engine_with_padded_prefills_equals_reference(llm, lengths, join_every, split):
    """The engine routing prefill steps through the padded forward (uncaptured on the CPU): greedy tokens as the plain
    reference, with chunked prompts (a 200-token prompt alone: 160 tokens eagerly, since no bucket holds them, then
    the rest padded from start 160) and decode steps between; with `split_mixed_steps`, requests joining a running
    batch take the padded forward and the decode rows the decode path in the same step, and prompts added at once
    are prefilled one padded forward each in the same step."""
    batch = prompts(lengths, seed=3)
    expected = [reference(llm, p) for p in batch]
    config = EngineConfig(max_num_batched_tokens=160, block_size=BLOCK, max_num_seqs=4, split_mixed_steps=split)
    engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, config)
    runner = engine.runner
    assert runner.split_mixed_steps == split
    graphs = runner.prefill_graphs = PrefillGraphs(llm.model, runner.cache, 128)
    calls, steps, original = record_runs(graphs), [], runner._graph_prefill

    def traced(chunks):  # steps: (chunks in the step, padded forwards it ran)
        before = len(calls)
        logits = original(chunks)
        steps.append((len(chunks), len(calls) - before))
        return logits

    runner._graph_prefill = traced
    sequences = run(engine, [(p, GREEDY) for p in batch], join_every)
    assert [s.output_token_ids for s in sequences] == expected
    if lengths == [200]:  # 160 tokens eagerly (no bucket holds them), the rest padded from 160
        assert calls and all(padded for *_, padded in calls) and calls[0][1] == 160
        assert sum(n for n, *_ in calls) == 40
    elif join_every == 0:  # the first step holds chunks of four prompts (160 tokens a step), each one replay
        assert steps[0] == (4, 4) and all(padded for *_, padded in calls), steps
    else:
        assert any(ran for n, ran in steps if n == 1)
        assert any(n > 1 for n, _ in steps)  # requests joined running batches
        assert any(ran for n, ran in steps if n > 1) == split, steps
