"""`hybridlm train` end to end on a tiny folder; its output directory is a model hybridlm.LLM runs."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from hybridlm import LLM, SamplingParams
from hybridlm.cli import app
from hybridlm.train.report import read_log
from tests.train.conftest import cli_args


def test_train_command_end_to_end(corpus, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, cli_args(corpus, out, steps=6, warmup=1, eval_every=3, save_every=0))
    assert result.exit_code == 0, result.output
    assert "6 steps" in result.output and f"model: {out / 'model'}" in result.output
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [6]  # save_every 0: at the end only
    config = json.loads((out / "train_config.json").read_text())
    assert config["command"].split()[0] == "hybridlm" and config["ratio"] == 3
    llm = LLM(out / "model", device="cpu")
    generated = llm.generate("alice sees", SamplingParams(max_tokens=6, temperature=0))[0]
    assert generated.token_ids and isinstance(generated.text, str)
    assert llm.config.layer_pattern == "LLLA"


def test_train_command_takes_several_paths_after_data(corpus, tmp_path):
    files = [str(corpus / f"story{i:02d}.txt") for i in range(4)]
    args = ["train", "--data", *files, "--out", str(tmp_path / "run"), "--vocab", "300", "--hidden", "32",
            "--layers", "2", "--pattern", "LA", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
            "--gdn-heads", "2", "--gdn-value-heads", "2", "--gdn-head-dim", "16", "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--warmup", "0", "--no-autocast", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    start = read_log(tmp_path / "run" / "log.jsonl")[0]
    assert start["config"]["data"] == files and start["config"]["pattern"] == "LA"


def test_train_command_reports_bad_recipes(corpus, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / "run"),
                                      "--ratio", "3", "--pattern", "LLLA"])
    assert result.exit_code == 2
    assert "give ratio (3) or pattern ('LLLA'), not both" in result.output
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--data" in result.output
