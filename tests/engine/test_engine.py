"""The continuous-batching engine against plain model.forward-based generation, token for token."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.engine.generate import BatchGenerator
from tests.checkpoints import VOCAB

GREEDY = hybridlm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return hybridlm.LLM(checkpoint("qwen3_5_text")[0])


def prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def reference(llm, prompt, params=GREEDY):
    generator = BatchGenerator(llm.model, [prompt], [params])
    while not generator.done:
        generator.step()
        generator.drop_finished()
    return generator.outputs[0]


def run(engine, requests, join_every=0):
    """Add requests (all at once, or one every `join_every` steps) and step until all finish."""
    pending, sequences, steps = list(requests), [], 0
    while pending or engine.has_work:
        if pending and (join_every == 0 or steps % join_every == 0):
            batch = pending if join_every == 0 else pending[:1]
            for prompt, params in batch:
                sequences.append(engine.add_request(prompt, params))
            pending = pending[len(batch):]
        engine.step()
        steps += 1
    return sequences


@pytest.mark.parametrize("config", [
    EngineConfig(max_num_batched_tokens=2048),
    EngineConfig(max_num_batched_tokens=64, block_size=16),  # chunked prefill mixed with decode
    EngineConfig(max_num_batched_tokens=32, block_size=16, max_num_seqs=3),  # fewer slots than requests
], ids=["one-shot", "chunked", "queued"])
@pytest.mark.parametrize("join_every", [0, 3])
def test_engine_equals_reference(llm, config, join_every):
    batch = prompts([5, 70, 130, 64, 1, 200, 33])
    expected = [reference(llm, p) for p in batch]
    engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, config)
    sequences = run(engine, [(p, GREEDY) for p in batch], join_every)
    assert [s.output_token_ids for s in sequences] == expected
    assert all(s.finish_reason == "length" for s in sequences)
    assert engine.blocks.num_free_state_slots == config.max_num_seqs  # everything released


def test_preemption_by_recompute_gives_identical_tokens(llm):
    params = hybridlm.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    batch = prompts([50, 90, 70, 20], seed=1)
    expected = [reference(llm, p, params) for p in batch]
    probe = Engine(llm.model, llm.tokenizer, config=EngineConfig(max_num_seqs=4, block_size=16,
                                                                   cache_memory_bytes=1 << 20))
    state, block = probe.plan.state_bytes // 4, probe.plan.kv_bytes // probe.plan.num_blocks
    tiny = EngineConfig(max_num_seqs=4, block_size=16, max_num_batched_tokens=64, snapshot_fraction=0.0,
                        cache_memory_bytes=4 * state + 14 * block)
    engine = Engine(llm.model, llm.tokenizer, config=tiny)
    assert engine.plan.num_blocks == 14  # 224 tokens for 230 prompt + 160 output tokens
    sequences = run(engine, [(p, params) for p in batch])
    assert [s.output_token_ids for s in sequences] == expected
    assert sum(s.num_preemptions for s in sequences) > 0


def test_prefix_cache_hits_give_identical_tokens(llm):
    shared = prompts([150], seed=2)[0]
    tails = prompts([3, 20, 41], seed=3)
    config = EngineConfig(block_size=16, max_num_batched_tokens=256)
    engine = Engine(llm.model, llm.tokenizer, config=config)
    first = run(engine, [(shared + tails[0], GREEDY)])[0]
    assert first.num_cached_prompt_tokens == 0
    later = run(engine, [(shared + t, GREEDY) for t in tails] + [(shared + tails[0] + first.output_token_ids + [7], GREEDY)])
    for sequence, tail in zip(later, tails):
        assert sequence.num_cached_prompt_tokens == 144  # the shared 150 tokens, down to a block boundary
        assert sequence.output_token_ids == reference(llm, shared + tail)
    # a follow-up turn reuses the state snapshotted while the first answer was decoded
    follow_up = later[-1]
    assert follow_up.num_cached_prompt_tokens == 160
    assert follow_up.output_token_ids == reference(llm, shared + tails[0] + first.output_token_ids + [7])
    cold = Engine(llm.model, llm.tokenizer, config=config)
    assert run(cold, [(shared + tails[1], GREEDY)])[0].output_token_ids == later[1].output_token_ids


def test_seeded_sampling_matches_the_reference(llm):
    params = [hybridlm.SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)]
    batch = prompts([10, 80, 30], seed=4)
    engine = Engine(llm.model, llm.tokenizer, config=EngineConfig(block_size=16, max_num_batched_tokens=64))
    sequences = run(engine, list(zip(batch, params)), join_every=2)
    assert [s.output_token_ids for s in sequences] == [reference(llm, p, q) for p, q in zip(batch, params)]


def test_abort_releases_the_cache(llm):
    engine = Engine(llm.model, llm.tokenizer, config=EngineConfig(block_size=16, max_num_seqs=2))
    keep = engine.add_request(prompts([40])[0], GREEDY)
    drop = engine.add_request(prompts([60], seed=5)[0], GREEDY)
    engine.step()
    free_before = engine.blocks.num_free_blocks
    engine.abort(drop.request_id)
    assert drop.finish_reason == "abort" and engine.blocks.num_free_blocks > free_before
    assert engine.blocks.num_free_state_slots == 1
    while engine.has_work:
        engine.step()
    assert keep.output_token_ids == reference(llm, prompts([40])[0])


def test_engine_rejects_bad_requests(llm):
    engine = Engine(llm.model, llm.tokenizer, config=EngineConfig(block_size=16))
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 600, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    engine.add_request([1, 2], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=48)


def test_engine_on_the_triton_kernels_equals_the_reference(llm, monkeypatch):
    """Every kernel forced on (the interpreter runs them on the CPU): fused GDN decode step and paged decode
    attention in decode steps, the paged prefill kernel for every chunk of mixed steps, fused norms, conv and
    chunked GDN; chunked prefill mixed with decode and a prefix-cache hit, token for token as the reference."""
    pytest.importorskip("triton", reason="triton is not installed")
    from hybridlm.ops import dispatch
    from hybridlm.ops import triton as kernel_module

    batch = prompts([5, 66, 24, 1], seed=5)
    batch.append(batch[1][:64] + [3, 1, 4])  # shares 4 blocks of 16 with the second prompt
    params = hybridlm.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = [reference(llm, p, params) for p in batch]
    calls = {}
    for name in ("paged_prefill_attention_fwd", "paged_decode_attention_fwd", "gdn_decode_step"):
        def spy(*args, _name=name, _fn=getattr(kernel_module, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernel_module, name, spy)
    monkeypatch.setattr(dispatch, "use_kernels", lambda *tensors, differentiable=False: True)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    engine = Engine(llm.model, llm.tokenizer, config=EngineConfig(max_num_batched_tokens=48, block_size=16))
    sequences = run(engine, [(p, params) for p in batch[:4]], join_every=2) + run(engine, [(batch[4], params)])
    assert [s.output_token_ids for s in sequences] == expected
    assert sequences[-1].num_cached_prompt_tokens == 64
    assert all(calls.get(name, 0) > 0 for name in ("paged_prefill_attention_fwd", "paged_decode_attention_fwd",
                                                     "gdn_decode_step")), calls


def test_state_copies_and_clears_reach_every_gdn_layer(llm):
    """copy_state / zero_state work on all GDN layers at once (the per-layer pools are views of one tensor per
    kind): the chosen rows change in every layer, the others do not."""
    from hybridlm.engine.cache import EngineCache, plan_cache

    model = llm.model
    cache = EngineCache(model, plan_cache(model.cache_layout, model.dtype, 1 << 22, max_num_seqs=4))
    layers = list(model.cache_layout.recurrent_layers)
    assert len(layers) > 1 and all(p.is_contiguous() for p in (*cache.conv.values(), *cache.recurrent.values()))
    generator = torch.Generator().manual_seed(0)
    for pool in (*cache.conv.values(), *cache.recurrent.values()):
        pool.copy_(torch.randn(pool.shape, generator=generator).to(pool.dtype))
    before = {(kind, layer): pool.clone() for kind, pools in (("conv", cache.conv), ("rec", cache.recurrent))
              for layer, pool in pools.items()}
    cache.copy_state(torch.tensor([0, 2]), torch.tensor([3, 1]))
    cache.zero_state(torch.tensor([2]))
    for (kind, layer), old in before.items():
        pool = (cache.conv if kind == "conv" else cache.recurrent)[layer]
        torch.testing.assert_close(pool[3], old[0], rtol=0, atol=0)
        torch.testing.assert_close(pool[1], old[2], rtol=0, atol=0)
        assert not pool[2].any()
        torch.testing.assert_close(pool[0], old[0], rtol=0, atol=0)
