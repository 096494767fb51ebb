"""A captured packed prefill graph in bf16 against the eager engine step on CUDA: the path a served bf16 model takes
for a step of several prefill chunks (the CPU tests check it in fp32 and interpreted). Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.engine.cache import EngineCache, PagedContext, plan_cache
from hybridlm.engine.packed_prefill import PackedPrefillGraphs
from hybridlm.engine.runner import packed_supported
from tests.checkpoints import VOCAB, write_checkpoint
from tests.engine.test_packed_prefill import with_tables_and_states

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCK = 16
TABLES = {0: [5, 1, 7, 3, 9, 0, 8, 21, 22, 23], 1: [2, 4, 6, 10, 11, 12, 13, 24, 25, 26],
          2: [14, 15, 16, 17, 18, 19, 20, 27, 28, 29]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """GDN heads of 64 (the kernels take them on Hopper with any Triton), eight value heads on four key heads."""
    directory = tmp_path_factory.mktemp("packed_bf16")
    write_checkpoint("qwen3_5_text", directory, linear_key_head_dim=64, linear_value_head_dim=64,
                     linear_num_key_heads=4, linear_num_value_heads=8)
    return hybridlm.load(directory, device="cuda", dtype="bfloat16")


def cache_of(model) -> EngineCache:
    plan = plan_cache(model.cache_layout, model.dtype, 64 << 20, max_num_seqs=4, block_size=BLOCK)
    return with_tables_and_states(EngineCache(model, plan), TABLES, 11)


@torch.inference_mode()
def eager(model, cache, chunks):
    context = PagedContext(cache, [s for _, s, _ in chunks], [len(t) for t, _, _ in chunks],
                           [slot for *_, slot in chunks], [TABLES[slot] for *_, slot in chunks], model.device)
    ends = torch.tensor([len(t) for t, _, _ in chunks]).cumsum(0) - 1
    ids = torch.tensor([t for tokens, _, _ in chunks for t in tokens], device=model.device)[None]
    return model.forward_with_context(ids, context, logits_indices=ends.to(model.device))


def assert_near(got: torch.Tensor, expected: torch.Tensor, share: float) -> None:
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= share * expected.float().abs().max().item(), (error, expected.float().abs().max().item())


def test_bf16_packed_prefill_graph_matches_the_eager_step(model):
    assert packed_supported(model) is None
    generator = torch.Generator().manual_seed(3)
    texts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (40, 130, 1)]
    starts = [0, 30, 0]
    caches = [cache_of(model) for _ in range(2)]
    for cache in caches:  # the second prompt's first 30 tokens, eagerly, before the step
        eager(model, cache, [(texts[1][:30], 0, 1)])
    chunks = [(t[s:], s, slot) for slot, (t, s) in enumerate(zip(texts, starts))]
    expected = eager(model, caches[0], chunks)
    graphs = PackedPrefillGraphs(model, caches[1], 512)
    graphs.capture()
    with torch.inference_mode():
        got = graphs.run([(t, s, slot, TABLES[slot]) for t, s, slot in chunks]).clone()
    assert got.shape == expected.shape == (3, model.config.vocab_size)
    assert_near(got, expected, 2e-2)
    for layer in caches[0].conv:  # the three slots (the scratch row took the empty rows')
        assert_near(caches[1].recurrent[layer][:3], caches[0].recurrent[layer][:3], 1e-2)
        assert_near(caches[1].conv[layer][:3], caches[0].conv[layer][:3], 2e-2)
    written = [TABLES[slot][p // BLOCK] * BLOCK + p % BLOCK for t, s, slot in chunks for p in range(s + len(t))]
    for layer in caches[0].keys:  # the K/V slots the prompts wrote (the pools start uninitialised on CUDA)
        for name in ("keys", "values"):
            ours, theirs = (getattr(c, name)[layer].flatten(0, 1)[written] for c in (caches[1], caches[0]))
            assert_near(ours, theirs, 2e-2)
