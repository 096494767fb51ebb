"""hybridlm's model against transformers, the reference, on tiny random checkpoints of every family."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from tests.checkpoints import VOCAB, hf_model_class

LENGTHS = (1, 63, 64, 65, 200)


def hf_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(checkpoint, family, length):
    directory, reference = checkpoint(family)
    ours = hybridlm.load(directory)
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == (2, length, VOCAB)
    torch.testing.assert_close(got, hf_logits(reference, ids), atol=1e-4, rtol=0)


def test_left_padded_batch_equals_each_sequence_alone(checkpoint, family):
    directory, reference = checkpoint(family)
    ours = hybridlm.load(directory)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (70, 9, 64)]
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = hf_logits(reference, prompt[None])[0]
        torch.testing.assert_close(batched[row, longest - len(prompt):], alone, atol=1e-4, rtol=0)


def test_prefill_in_pieces_equals_one_forward(checkpoint, family):
    directory, _ = checkpoint(family)
    ours = hybridlm.load(directory)
    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2)
        pieces = [ours(ids[:, :70], cache=cache), ours(ids[:, 70:141], cache=cache)]
        pieces += [ours(ids[:, t : t + 1], cache=cache) for t in range(141, 150)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    assert cache.seq_len == 150 and cache.lengths.tolist() == [150, 150]


def test_greedy_generation_matches_transformers(checkpoint, family):
    directory, reference = checkpoint(family)
    llm = hybridlm.LLM(directory)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (20, 67)]
    greedy = hybridlm.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    results = llm.generate(prompt_token_ids=prompts, sampling=greedy)  # one left-padded batch
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            # an explicit mask: otherwise transformers treats every prompt token equal to pad_token_id as padding
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                          min_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == expected
        assert result.finish_reason == "length"


def test_saved_checkpoint_loads_in_transformers(checkpoint, family, tmp_path):
    directory, reference = checkpoint(family)
    ours = hybridlm.load(directory)
    hybridlm.save(ours, tmp_path / "saved", max_shard_bytes=40_000)  # force several shards
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    _, model_class = hf_model_class(family)
    reloaded = model_class.from_pretrained(tmp_path / "saved").eval()
    # every tensor comes back bit for bit; the logits only closely: transformers (5.25) may pick other kernels for a
    # model it loads than for one built from a config (differences of ~1e-7 on the MoE families)
    loaded = reloaded.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)
    again = hybridlm.load(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


def test_packed_documents_equal_separate_forwards(checkpoint, family):
    directory, _ = checkpoint(family)
    ours = hybridlm.load(directory)
    lengths = [17, 64, 50]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    cu_seqlens = torch.tensor([0, 17, 81, 131])
    with torch.no_grad():
        packed = ours(ids, cu_seqlens=cu_seqlens)
        for i in range(3):
            start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            torch.testing.assert_close(packed[:, start:end], ours(ids[:, start:end]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0"):
        ours(ids, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="batch size 1"):
        ours(ids.expand(2, -1), cu_seqlens=cu_seqlens)
