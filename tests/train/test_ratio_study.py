"""benchmarks/ratio_study.py end to end at --tiny size: two patterns trained (LM through the library's
trainer, MQAR), their JSON records, then --report into a copy of docs/ratio_study.md."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("ratio_study", REPO / "benchmarks" / "ratio_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_patterns_and_mqar_batches(study):
    assert [study.pattern_of(n) for n in study.MODELS] == ["A", "LA", "LLLA", "LLLLLLLA", "L"]
    assert study.pattern_of("5:1") == "LLLLLA" and study.slug("3:1") == "3to1"
    with pytest.raises(ValueError, match="unknown model"):
        study.pattern_of("3:2")
    s = study.TINY
    inputs, targets = study.mqar_batch(s, 3, 64, 4, torch.Generator().manual_seed(0))
    answers = targets != study.IGNORE_INDEX
    assert inputs.shape == targets.shape == (3, 64) and answers.sum(1).tolist() == [4, 4, 4]
    for row in range(3):
        pairs = dict(zip(inputs[row, 0:8:2].tolist(), inputs[row, 1:8:2].tolist()))
        assert len(pairs) == 4 and all(k < s.mqar_keys <= v < 2 * s.mqar_keys for k, v in pairs.items())
        # each query is a key of this row, its target that key's value; fillers never collide with either
        assert {inputs[row, i].item(): targets[row, i].item() for i in answers[row].nonzero().flatten()} == pairs
        assert bool((inputs[row, 8:][~answers[row, 8:]] >= 2 * s.mqar_keys).all())


def test_matched_parameters_and_cache_memory(study):
    sizes = {n: study.describe(study.FULL, study.pattern_of(n), 4096) for n in study.MODELS}
    counts = [d["parameters"] for d in sizes.values()]
    assert 20e6 < min(counts) and max(counts) < 30e6 and max(counts) / min(counts) - 1 < 0.05
    attention, hybrid, gdn = sizes["all-attn"]["memory"], sizes["3:1"]["memory"], sizes["all-gdn"]["memory"]
    kv_per_layer = 2 * 4 * 64 * 32768 * 2  # K and V, 4 heads x 64, bf16
    assert attention == dict(tokens=32768, state_bytes=0, kv_bytes=8 * kv_per_layer, total_bytes=8 * kv_per_layer,
                             total_mib=8 * kv_per_layer / 2**20)
    state_per_layer = 8 * 64 * 64 * 4 + (2 * 4 * 64 + 8 * 64) * 3 * 2  # fp32 recurrent + bf16 conv (kernel 4)
    assert hybrid["kv_bytes"] == 2 * kv_per_layer and hybrid["state_bytes"] == 6 * state_per_layer
    assert gdn["kv_bytes"] == 0 and gdn["state_bytes"] == 8 * state_per_layer


def test_tiny_study_then_report(study, tmp_path):
    out = tmp_path / "results"
    study.main(["--tiny", "--models", "all-attn,3:1", "--out", str(out), "--work", str(tmp_path / "work")])
    for name, layers in (("all-attn", "AAAAAAAA"), ("3to1", "LLLALLLA")):
        result = json.loads((out / f"{name}.json").read_text())
        assert "error" not in result and result["study"] == "ratio_study" and result["layers"] == layers
        assert result["parameters"] == result["lm"]["parameters"] > 0
        lm = result["lm"]
        assert lm["tokens"] == study.TINY.lm_tokens and lm["steps"] == 6 and lm["tokens_per_s"] > 0
        assert 0 < lm["heldout_loss"] < 10 and lm["heldout_ppl"] == pytest.approx(2.718281828 ** lm["heldout_loss"])
        tasks = result["mqar"]["tasks"]
        assert [(t["seq_len"], t["kv_pairs"]) for t in tasks] == [(64, 4), (128, 8)]
        assert all(0 <= t["accuracy"] <= 1 and t["answers"] >= 64 for t in tasks)
        assert result["memory"]["tokens"] == 32768 and result["memory"]["total_bytes"] > 0
        assert result["wall_time_s"] > 0 and result["tokenizer_sha1"] and result["settings_sha1"]
        assert (out / f"{name}.lm_log.jsonl").is_file() and (out / f"{name}.mqar_log.jsonl").is_file()
    assert "3:1" in (out / "ratio_study.log").read_text()

    # the repo's page with its results section emptied again (the real run's results are in it now)
    begin, end = "<!-- ratio-study-results:begin -->", "<!-- ratio-study-results:end -->"
    head, rest = (REPO / "docs" / "ratio_study.md").read_text().split(begin)
    tail = rest.split(end)[1]
    doc = tmp_path / "ratio_study.md"
    doc.write_text(f"{head}{begin}\n## Results\n\n**Not yet run.**\n{end}{tail}")
    study.main(["--report", str(out), "--doc", str(doc)])
    text = doc.read_text()
    assert "Not yet run" not in text and "## Method" in text  # only the results section is replaced
    assert text.endswith(tail)  # what follows the section (the written conclusion) stays
    assert "| all-attn | `AAAAAAAA` |" in text and "| 3:1 | `LLLALLLA` |" in text
    assert "**Not run:** 1:1, 7:1, all-gdn." in text and "Verdict" in text
    assert (tmp_path / "ratio_study.png").stat().st_size > 10_000
    merged = json.loads((tmp_path / "ratio_study_results.json").read_text())
    assert [r["model"] for r in merged] == ["all-attn", "3:1"]
    study.main(["--report", str(out), "--doc", str(doc)])  # a second report replaces the first
    assert doc.read_text().count("<!-- ratio-study-results:begin -->") == 1
