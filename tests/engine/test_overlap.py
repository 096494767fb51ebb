"""Overlapped decode: the next decode step is launched on the device's argmax before this step's tokens are read.

Outputs must equal the engine without the overlap (itself checked against plain generation) in every situation
that ends or changes a batch: token limits, stop tokens, aborts, requests joining, block boundaries, and prefix-
cache blocks registered while steps ran ahead (their hashes must be of the real tokens, not of placeholders).
"""
from __future__ import annotations

import pytest

import hybridlm
from hybridlm.engine.engine import PLACEHOLDER, Engine, EngineConfig
from tests.engine.test_engine import prompts, reference, run

CONFIG = dict(block_size=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return hybridlm.LLM(checkpoint("qwen3_5_text")[0])


def engine_pair(llm, **config):
    """The same engine with and without the overlap, a count of steps scheduled ahead on device ids, and of those
    that save a state snapshot (a block completed by a token still on the device)."""
    engines = {}
    for overlap in (True, False):
        engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(overlap_decode=overlap, **config))
        engine.ahead = engine.ahead_snapshots = 0
        execute = engine.runner.execute

        def counted(output, input_ids=None, _engine=engine, _execute=execute):
            _engine.ahead += input_ids is not None
            _engine.ahead_snapshots += input_ids is not None and any(c.save_to is not None for c in output.chunks)
            return _execute(output, input_ids=input_ids)

        engine.runner.execute = counted
        engines[overlap] = engine
    return engines[True], engines[False]


def test_mixed_limits_and_stop_tokens_match_the_plain_engine(llm):
    batch = prompts([5, 40, 17, 64, 1, 90], seed=3)
    plain_ref = reference(llm, batch[1], hybridlm.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    params = [
        hybridlm.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        hybridlm.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        hybridlm.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        hybridlm.SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True, stop_token_ids=[plain_ref[7]]),
        hybridlm.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),  # crosses block boundaries
        hybridlm.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
    ]
    overlapped, plain = engine_pair(llm, **CONFIG)
    for join_every in (0, 2):
        got = run(overlapped, list(zip(batch, params)), join_every)
        expected = run(plain, list(zip(batch, params)), join_every)
        assert [s.output_token_ids for s in got] == [s.output_token_ids for s in expected]
        assert [s.finish_reason for s in got] == [s.finish_reason for s in expected]
        assert all(PLACEHOLDER not in s.output_token_ids for s in got)
    assert got[1].output_token_ids == plain_ref
    assert overlapped.ahead > 20 and plain.ahead == 0
    assert overlapped.blocks.num_free_state_slots == overlapped.config.max_num_seqs  # everything released


def test_abort_while_a_step_is_in_flight(llm):
    params = hybridlm.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    batch = prompts([12, 30], seed=4)
    expected = reference(llm, batch[1], params)
    overlapped, _ = engine_pair(llm, **CONFIG)
    first, second = (overlapped.add_request(p, params) for p in batch)
    for _ in range(6):
        overlapped.step()
    assert overlapped._inflight is not None  # the next decode step is on the device
    tokens_at_abort = list(first.output_token_ids)
    overlapped.abort(first.request_id)
    while overlapped.has_work:
        for sequence, _ in overlapped.step():
            assert sequence is not first
    assert first.finish_reason == "abort" and first.output_token_ids == tokens_at_abort
    assert second.output_token_ids == expected


def test_blocks_registered_while_ahead_hash_the_real_tokens(llm):
    """A request decodes past two block boundaries with steps run ahead; a later request whose prompt is the first
    one's prompt + output must find those blocks in the prefix cache and continue exactly as without it."""
    params = hybridlm.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = prompts([20], seed=5)[0]
    overlapped, _ = engine_pair(llm, **CONFIG)
    first = run(overlapped, [(prompt, params)])[0]
    follow = prompt + first.output_token_ids[:36]  # 56 tokens: three full blocks of 16, the last from decoding
    short = hybridlm.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert overlapped.ahead_snapshots == 2  # the snapshots at 32 and 48 were taken by steps run ahead
    assert overlapped.scheduler.pending_snapshots == {}
    second = run(overlapped, [(follow, short)])[0]
    assert second.num_cached_prompt_tokens == 48
    assert second.output_token_ids == reference(llm, follow, short)


def test_snapshots_taken_ahead_free_their_slots(llm):
    """Many requests crossing block boundaries while running ahead (the usual case at large batches, where some row
    is at a boundary in nearly every step): outputs equal the plain engine's, one decode snapshot per request is
    kept until it ends, and every slot taken ahead is indexed or given back."""
    batch = prompts([3, 14, 29, 47, 60, 8, 21, 36], seed=7)
    params = [hybridlm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 33, 50, 21,
                                                                                                 45, 38, 27, 52)]
    overlapped, plain = engine_pair(llm, **CONFIG)
    got = run(overlapped, list(zip(batch, params)))
    expected = run(plain, list(zip(batch, params)))
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in expected]
    assert overlapped.ahead_snapshots >= 8
    blocks, scheduler = overlapped.blocks, overlapped.scheduler
    assert scheduler.pending_snapshots == {} and scheduler.decode_snapshots == {}
    slots = list(blocks.snapshots.values()) + blocks.free_snapshot_slots
    assert sorted(slots) == sorted(set(slots))  # no slot indexed twice or both indexed and free
    assert sorted(blocks.snapshots) == sorted(plain.blocks.snapshots)  # the same prefixes were saved


def test_seeded_sampling_runs_ahead_and_matches_the_plain_engine(llm):
    """Rows sampled by the engine's samplers (temperature, top-k, top-p, each with its seed) run ahead too and draw
    the same tokens; a row with a repetition penalty (it needs the history on the host) keeps the batch from
    running ahead, and its tokens are the same as well."""
    batch = prompts([9, 33, 20], seed=6)
    sampled = [
        hybridlm.SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=1, ignore_eos=True),
        hybridlm.SamplingParams(max_tokens=30, temperature=0.7, top_p=0.8, seed=2, ignore_eos=True),
        hybridlm.SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True),
    ]
    penalised = hybridlm.SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    overlapped, plain = engine_pair(llm, **CONFIG)
    got = run(overlapped, list(zip(batch, sampled)))
    expected = run(plain, list(zip(batch, sampled)))
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in expected]
    assert overlapped.ahead > 10
    before = overlapped.ahead
    got = run(overlapped, list(zip(batch, [*sampled[:2], penalised])))
    expected = run(plain, list(zip(batch, [*sampled[:2], penalised])))
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in expected]
    assert overlapped.ahead == before  # the penalised row is in every decode step: none ran ahead
