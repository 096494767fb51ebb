"""The model and engine on CUDA with the Triton kernels, against the reference path. Skipped without a GPU
(run on the lent H100: `python3 -m pytest tests/cuda -q`)."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.ops import dispatch
from tests.checkpoints import VOCAB

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
