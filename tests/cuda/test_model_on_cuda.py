"""The model and engine on CUDA with the Triton kernels, against the reference path. Skipped without a GPU
(run on the lent H100: `python3 -m pytest tests/cuda -q`)."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.ops import dispatch
from tests.checkpoints import VOCAB, write_checkpoint
from tests.engine.test_prefill_graphs import record_runs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def models(checkpoint):
    directory, _ = checkpoint("qwen3_5_text")
    return directory, hybridlm.load(directory, device="cpu", dtype="float32"), hybridlm.load(directory, device="cuda", dtype="float32")


def test_kernels_are_used_on_cuda():
    assert dispatch.kernels() is not None


@pytest.mark.parametrize("length", [1, 63, 65, 200])
def test_cuda_logits_match_the_cpu_reference(models, length):
    _, cpu, cuda = models
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = cpu(ids)
        got = cuda(ids.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_inputs_on_the_cpu_follow_the_model(models):
    """ids and attention mask built on the CPU work with a model on CUDA (moved, not refused)."""
    _, _, cuda = models
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = cuda(ids.cuda(), attention_mask=mask.cuda())
        got = cuda(ids, attention_mask=mask)
    assert got.device == expected.device
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_packed_prefill_on_cuda(models):
    _, cpu, cuda = models
    ids = torch.randint(0, VOCAB, (1, 131), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 81, 131])
    with torch.no_grad():
        torch.testing.assert_close(cuda(ids.cuda(), cu_seqlens=cu.cuda()).cpu(), cpu(ids, cu_seqlens=cu),
                                   atol=2e-3, rtol=0)


def test_engine_with_fused_decode_matches_cpu(models):
    directory, cpu, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (5, 70, 130)]
    greedy = hybridlm.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [r.token_ids for r in llm.generate(prompt_token_ids=prompts, sampling=greedy)]
    engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20))
    sequences = [engine.add_request(p, greedy) for p in prompts]
    while engine.has_work:
        engine.step()
    assert [s.output_token_ids for s in sequences] == expected


def joining_requests(seed: int) -> list[tuple[list[int], hybridlm.SamplingParams]]:
    """Seven prompts of 3 to 200 tokens with their sampling: greedy and seeded rows, 12 to 30 new tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 17, 64, 65, 130, 7, 200)]
    return [(p, hybridlm.SamplingParams(max_tokens=12 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i,
                                        ignore_eos=True)) for i, p in enumerate(prompts)]


def run_joining(engine: Engine, requests, per_step: int = 1) -> list[list[int]]:
    """`per_step` new requests a step until all have joined, then steps until all finish; each one's output
    tokens."""
    sequences, pending = [], list(requests)
    while pending or engine.has_work:
        for _ in range(min(per_step, len(pending))):
            sequences.append(engine.add_request(*pending.pop(0)))
        engine.step()
    return [s.output_token_ids for s in sequences]


def test_decode_cuda_graphs_match_eager(models):
    """Requests of different lengths join at different steps; greedy and seeded sampling; a graph bucket larger
    than the batch (padding rows) must change nothing."""
    directory, _, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    requests = joining_requests(3)

    def run(cuda_graphs):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=12, cuda_graphs=cuda_graphs))
        assert (engine.runner.graphs is not None) == cuda_graphs
        return run_joining(engine, requests)

    assert run(True) == run(False)


def test_overlapped_decode_with_graphs_matches_plain(models):
    """Decode run one step ahead (device-side input ids, pinned double buffers, events) inside CUDA graphs, greedy
    and seeded rows: the same tokens as without the overlap, with requests joining, finishing at different lengths
    and across block boundaries."""
    directory, _, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 17, 64, 65, 130, 7)]
    params = [hybridlm.SamplingParams(max_tokens=5 + 9 * i, temperature=0.8 if i % 3 == 1 else 0.0, top_p=0.9,
                                      seed=i, ignore_eos=True) for i in range(6)]

    def run(overlap):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=8, overlap_decode=overlap))
        assert engine.runner.graphs is not None
        sequences, pending, steps = [], list(zip(prompts, params)), 0
        while pending or engine.has_work:
            if pending and steps % 5 == 0:  # a new request every 5 steps: runs ahead in between, not when joining
                sequences.append(engine.add_request(*pending.pop(0)))
            engine.step()
            steps += 1
        return [s.output_token_ids for s in sequences]

    assert run(True) == run(False)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_paged_decode_kernel_full_size(batch):
    from hybridlm.ops.paged_attention import paged_decode_attention_reference
    from hybridlm.ops.triton import paged_decode_attention_fwd

    gen = torch.Generator().manual_seed(batch)
    blocks, block_size, kv_heads, dim = 600, 64, 4, 256
    key_pool = torch.randn(blocks, block_size, kv_heads, dim, generator=gen).bfloat16().cuda()
    value_pool = torch.randn(blocks, block_size, kv_heads, dim, generator=gen).bfloat16().cuda()
    lengths = torch.randint(1, 4000, (batch,), generator=gen)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:63] for _ in range(batch)]).int().cuda()
    rows = torch.arange(batch, dtype=torch.int32).cuda()
    q = torch.randn(batch, 16, dim, generator=gen).bfloat16().cuda()
    expected = paged_decode_attention_reference(q.float(), key_pool.float(), value_pool.float(), tables, rows,
                                                lengths.int().cuda(), 0.0625)
    got = paged_decode_attention_fwd(q, key_pool, value_pool, tables, rows, lengths.int().cuda(), 0.0625)
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_prefill_cuda_graphs_match_eager(models):
    """One request at a time (so that every prefill step holds one sequence): prompts of 1 to 300 tokens (300: a
    288-token chunk, longer than the largest bucket, runs eagerly), and one that shares a 128-token prefix with an
    earlier one (the graph starts from a restored snapshot at start 128). Greedy tokens as the eager engine's; the
    graphs were replayed."""
    directory, _, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (1, 3, 64, 65, 200, 300)]
    prompts.append(prompts[4][:128] + prompts[1])  # prefilled 128 + 3: a snapshot is saved at 128
    prompts.append(prompts[6][:128] + [5, 6])  # restores that snapshot, prefills 2 tokens at start 128
    greedy = hybridlm.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def run(prefill_graphs):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=4, prefill_graphs=prefill_graphs))
        graphs, replays = engine.runner.prefill_graphs, []
        if prefill_graphs:
            assert graphs is not None and graphs.buckets == [64, 128, 256] and graphs.graphs
            replays = record_runs(graphs)
        outputs = []
        for prompt in prompts:
            sequence = engine.add_request(prompt, greedy)
            while engine.has_work:
                engine.step()
            outputs.append(sequence.output_token_ids)
        return outputs, replays

    expected, _ = run(0)
    got, replays = run(256)
    assert got == expected
    # the 288-token chunk ran eagerly (the runner asks `fits` first, so it never reaches `run`); its last 12 replayed
    assert (12, 288, True) in replays and (2, 128, True) in replays and (1, 0, True) in replays
    assert all(padded and n <= 256 for n, _, padded in replays), replays


def test_mixed_steps_split_into_graphs_match_eager(models):
    """`split_mixed_steps`: a request joining a running batch is prefilled by its graph and the batch's decode rows
    take the decode graphs in the same step. Requests join one a step, greedy and seeded rows: the same tokens as
    the eager engine's mixed steps."""
    directory, _, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    requests = joining_requests(8)

    def run(prefill_graphs, split):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=8, prefill_graphs=prefill_graphs,
                                                                 split_mixed_steps=split))
        replays = record_runs(engine.runner.prefill_graphs) if prefill_graphs else []
        return run_joining(engine, requests), replays

    expected, _ = run(0, False)
    got, replays = run(256, True)
    assert got == expected
    assert len(replays) >= len(requests) - 1  # every prompt but the first joined a running batch


def test_steps_of_several_prefills_replay_a_graph_each_and_match_eager(models):
    """`split_mixed_steps` with requests joining two a step: steps of two prefill chunks (beside decode rows after
    the first) replay one prefill graph per chunk, in one step; the same tokens as the eager engine."""
    directory, _, cuda = models
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    requests = joining_requests(9)

    def run(prefill_graphs):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=8, prefill_graphs=prefill_graphs,
                                                                 packed_prefill=False))
        graphs = engine.runner.prefill_graphs
        if prefill_graphs:  # calibrated at capture; a tiny model's replays cost far less than an eager step
            assert set(graphs.replay_ms) == set(graphs.buckets) and graphs.eager_host_ms > 0
        steps, original = [], engine.runner._graph_prefill
        replays = record_runs(graphs) if prefill_graphs else []

        def traced(chunks):
            before = len(replays)
            logits = original(chunks)
            steps.append(len(replays) - before)
            return logits

        engine.runner._graph_prefill = traced
        return run_joining(engine, requests, per_step=2), steps

    expected, _ = run(0)
    got, steps = run(256)
    assert got == expected
    assert steps[:3] == [2, 2, 2], steps  # three steps of two new prompts each (3 + 17, 64 + 65, 130 + 7)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A checkpoint with GDN head dims of 64, which the kernels take on Hopper with any Triton (the packed graphs need
    them; the tiny checkpoint's 16 / 8 run on the reference there before Triton 3.7.1)."""
    directory = tmp_path_factory.mktemp("wide")
    write_checkpoint("qwen3_5_text", directory, linear_key_head_dim=64, linear_value_head_dim=64)
    return directory, hybridlm.load(directory, device="cuda", dtype="float32")


def test_steps_of_several_prefills_replay_one_packed_graph_and_match_eager(wide):
    """Requests joining three a step: their prefill chunks (beside decode rows after the first step) replay one
    packed graph, whose host bounds are the capture's; the same tokens as the eager engine."""
    directory, cuda = wide
    llm = hybridlm.LLM(directory, device="cpu", dtype="float32")
    requests = joining_requests(9)

    def run(prefill_graphs):
        engine = Engine(cuda, llm.tokenizer, config=EngineConfig(block_size=16, cache_memory_bytes=64 << 20,
                                                                 max_num_seqs=8, prefill_graphs=prefill_graphs))
        packed = engine.runner.packed_graphs
        if prefill_graphs:
            assert packed is not None and set(packed.replay_ms) == set(packed.buckets) and packed.buckets[0] == 256
            assert engine.scheduler.prefill_align == 64
            packed.replay_ms = dict.fromkeys(packed.buckets, 0.0)  # taken whenever it fits, whatever it costs
        return run_joining(engine, requests, per_step=3), engine.runner.step_counts

    expected, _ = run(0)
    got, counts = run(256)
    assert got == expected
    assert counts["packed prefill replays"] >= 3, counts
