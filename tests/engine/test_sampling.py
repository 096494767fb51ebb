"""SamplingParams validation and the sampler's filters, against transformers' logits processors."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hybridlm import SamplingParams
from hybridlm.engine.sampler import Sampler, apply_repetition_penalty, filter_logits

VOCAB = 336
CPU = torch.device("cpu")


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale  # [V]


# ---------------------------------------------------------------- SamplingParams validation
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("max_tokens", 0, ValueError),
        ("max_tokens", -3, ValueError),
        ("max_tokens", 1.5, TypeError),
        ("max_tokens", True, TypeError),
        ("temperature", -1, ValueError),
        ("temperature", "0.5", TypeError),
        ("temperature", True, TypeError),
        ("top_p", 0, ValueError),
        ("top_p", 1.5, ValueError),
        ("top_p", -0.1, ValueError),
        ("top_k", -2, ValueError),
        ("top_k", 2.0, TypeError),
        ("top_k", True, TypeError),
        ("min_p", 2, ValueError),
        ("min_p", -0.5, ValueError),
        ("repetition_penalty", 0, ValueError),
        ("repetition_penalty", -1.0, ValueError),
        ("stop", "", ValueError),
        ("stop", [1], ValueError),
        ("stop", ["ok", ""], ValueError),
        ("seed", "x", TypeError),
        ("seed", 1.0, TypeError),
        ("seed", False, TypeError),
        ("stop_token_ids", [True], TypeError),
        ("stop_token_ids", [1, "2"], TypeError),
    ],
)
def test_bad_sampling_params_raise_naming_the_field(field, value, error):
    with pytest.raises(error, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field",
    [
        "temperature",
        "repetition_penalty",
        "top_p",
        "min_p",
    ],
)
def test_nan_sampling_params_raise(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: math.nan})


def test_good_sampling_params():
    params = SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=-1, min_p=1, stop=["a", "bc"], seed=0,
                            stop_token_ids=[3], repetition_penalty=1.3)
    assert params.greedy
    assert params.stop_strings == ("a", "bc")
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams().stop_strings == ()
    assert not SamplingParams(temperature=0.5).greedy


# ---------------------------------------------------------------- filters against transformers
def hf_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' warpers in the order generate() applies them: temperature, top-k, top-p, min-p."""
    scores = logits[None].clone()  # [1, V]
    ids = torch.zeros(1, 0, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return scores[0]


FILTER_CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=VOCAB + 5, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1e-4, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0),
    dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0),  # Qwen3's recommended thinking settings
    dict(temperature=1.3, top_k=50, top_p=0.8, min_p=0.1),
    dict(temperature=0.3, top_k=0, top_p=0.9, min_p=0.2),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", range(4))
def test_filter_matches_transformers(case, seed):
    logits = random_logits(seed, scale=1.0 + seed)
    got = filter_logits(logits, SamplingParams(**case))
    expected = hf_filter(logits, **case)
    kept = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), kept), (
        f"kept {torch.isfinite(got).sum()} tokens, transformers keeps {kept.sum()}")
    assert kept.any()
    torch.testing.assert_close(got[kept], expected[kept], atol=0, rtol=0)
    assert torch.isneginf(got[~kept]).all()


def test_filter_keeps_ties_at_the_top_k_boundary():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 2.0])
    got = filter_logits(logits, SamplingParams(top_k=2))
    expected = hf_filter(logits, temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.isfinite(got).tolist() == [True, False, True, True, False, True]


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(7)
    seen = torch.tensor([3, 17, 17, 100, 5, 3, 250, 0], dtype=torch.long)  # repeats count once
    got = apply_repetition_penalty(logits, seen, penalty)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    unseen = torch.ones(VOCAB, dtype=torch.bool)
    unseen[seen] = False
    assert torch.equal(got[unseen], logits[unseen])


def test_repetition_penalty_with_nothing_seen_is_identity():
    logits = random_logits(8)
    got = apply_repetition_penalty(logits, torch.zeros(0, dtype=torch.long), 1.5)
    assert torch.equal(got, logits)


# ---------------------------------------------------------------- picking tokens
NOTHING_SEEN = torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_picks_argmax(seed):
    logits = random_logits(seed)
    sampler = Sampler(SamplingParams(temperature=0), CPU)
    assert sampler.generator is None
    assert sampler(logits, NOTHING_SEEN) == int(logits.argmax())


def test_greedy_applies_repetition_penalty_first():
    logits = torch.tensor([0.0, 2.0, 1.5, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), CPU)
    assert sampler(logits, NOTHING_SEEN) == 1
    assert sampler(logits, torch.tensor([1])) == 2  # 2.0 / 2 = 1.0 < 1.5


def test_greedy_accepts_half_precision_logits():
    logits = random_logits(11).to(torch.bfloat16)
    assert Sampler(SamplingParams(temperature=0), CPU)(logits, NOTHING_SEEN) == int(logits.float().argmax())


def draw(params: SamplingParams, logits: torch.Tensor, n: int = 64) -> list[int]:
    sampler = Sampler(params, CPU)
    return [sampler(logits, NOTHING_SEEN) for _ in range(n)]


def test_same_seed_same_samples_different_seeds_differ():
    logits = random_logits(0, scale=0.5)  # flat: many tokens likely
    first = draw(SamplingParams(temperature=1.0, seed=1234), logits)
    again = draw(SamplingParams(temperature=1.0, seed=1234), logits)
    other = draw(SamplingParams(temperature=1.0, seed=4321), logits)
    assert first == again
    assert first != other
    assert len(set(first)) > 10


def test_unseeded_samplers_differ():
    logits = random_logits(0, scale=0.5)
    assert draw(SamplingParams(temperature=1.0), logits) != draw(SamplingParams(temperature=1.0), logits)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_equals_greedy(seed):
    logits = random_logits(seed)
    samples = draw(SamplingParams(temperature=1.5, top_k=1, seed=seed), logits, n=16)
    assert samples == [int(logits.argmax())] * 16


@pytest.mark.parametrize("case", FILTER_CASES[1:], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_samples_come_only_from_surviving_tokens(case):
    logits = random_logits(3, scale=2.0)
    kept = set(torch.isfinite(hf_filter(logits, **case)).nonzero().flatten().tolist())
    samples = draw(SamplingParams(seed=0, **case), logits, n=200)
    assert set(samples) <= kept
    if len(kept) > 1 and case["temperature"] >= 1:
        assert len(set(samples)) > 1


def test_sample_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))  # token 3 has probability 0
    samples = draw(SamplingParams(temperature=1.0, seed=0), logits, n=4000)
    counts = torch.bincount(torch.tensor(samples), minlength=4).float() / len(samples)
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
