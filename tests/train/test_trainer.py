"""The training loop: the loss falls, the run directory is complete, the model loads everywhere, and a
resumed run is the uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from hybridlm import LLM, SamplingParams, load
from hybridlm.train import TrainConfig, train
from hybridlm.train.report import read_log
from hybridlm.train.trainer import gdn_states_kept_by
from tests.train.conftest import tiny_config


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """One 30-step run that several tests read."""
    config = tiny_config(corpus, tmp_path_factory.mktemp("run") / "out")
    return config, train(config)


def _state(result) -> dict:
    return torch.load(result.out_dir / "checkpoint" / "state.pt", weights_only=True)


def test_loss_falls(run):
    config, result = run
    assert result.steps == 30 and result.start_step == 0 and len(result.losses) == 30
    assert result.tokens_seen == 30 * config.batch_size * config.seq_len
    assert result.losses[0] > 5.0  # about ln(vocab) at initialisation
    assert max(result.losses[-5:]) < 0.6 * result.losses[0]
    heldout = [r["loss"] for r in read_log(result.out_dir / "log.jsonl") if r["event"] == "eval"]
    assert len(heldout) == 3 and heldout[0] > heldout[1] > heldout[2] == result.heldout_loss
    assert result.heldout_loss < 0.6 * result.losses[0]
    assert result.tokens_per_s > 0 and result.wall_time_s > 0


def test_run_directory(run):
    config, result = run
    out = result.out_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (out / "model" / name).is_file(), name
    assert TrainConfig.load(out) == config
    records = read_log(out / "log.jsonl")
    assert [r["event"] for r in records].count("train") == 30
    assert records[0]["event"] == "start" and records[0]["parameters"] > 0 and records[-1]["event"] == "end"
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r) for r in train_records)
    peak = max(r["lr"] for r in train_records)
    assert peak == pytest.approx(config.lr) and train_records[0]["lr"] == pytest.approx(config.lr / config.warmup)
    assert train_records[-1]["lr"] < 0.2 * config.lr  # cosine towards min_lr_ratio * lr
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [10, 20, 30]
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert f"final held-out loss: {result.heldout_loss:.4f}" in card and "tokens seen: 15,360" in card
    assert "cpu" in card and "command:" in card and "pattern `LLLA`" in card
    if pytest.importorskip("matplotlib"):
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = _state(result)
    assert {"model", "optimizer", "scheduler", "rng", "step", "position", "tokens_seen"} <= set(state)
    assert state["step"] == 30 and state["position"] == 30 * config.batch_size


def test_saved_model_loads_in_hybridlm_and_transformers_with_identical_logits(run):
    _, result = run
    model = load(result.model_dir, device="cpu", dtype="float32")
    state = _state(result)["model"]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), state[name]), name
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen3_5ForCausalLM"
    input_ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids), reference(input_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    text = LLM(result.model_dir, device="cpu").generate("alice", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert isinstance(text, str) and text


def test_resume_reproduces_the_uninterrupted_run(run, corpus, tmp_path):
    config, uninterrupted = run
    interrupted = dataclasses.replace(config, out=str(tmp_path / "out"))
    first = train(interrupted, stop_after=13)  # between checkpoints: the stop writes its own
    assert first.steps == 13 and _state(first)["step"] == 13
    second = train(dataclasses.replace(interrupted, resume=True))
    assert second.start_step == 13 and second.steps == 30
    assert first.losses + second.losses == uninterrupted.losses  # exactly
    assert second.heldout_loss == uninterrupted.heldout_loss
    resumed, reference = _state(second), _state(uninterrupted)
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for name, moments in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][name]["exp_avg_sq"], moments["exp_avg_sq"]), name
    # the log reads as one run: the part after the stop's checkpoint is not duplicated
    logged = [r["loss"] for r in read_log(tmp_path / "out" / "log.jsonl") if r["event"] == "train"]
    assert logged == list(uninterrupted.losses)


def test_refuses_to_overwrite_or_to_resume_another_recipe(run):
    config, _ = run
    with pytest.raises(ValueError, match="already holds a training run"):
        train(config)
    with pytest.raises(ValueError, match=r"different recipe: lr: 0.003 -> 0.001"):
        train(dataclasses.replace(config, lr=1e-3, resume=True))


def test_accumulation_and_activation_checkpointing_keep_the_trajectory(run, tmp_path, caplog):
    """(gdn_keep_states too: on the CPU the layers run the references, so it only enters its context here, and says
    it has no effect; the kernels' side is `test_kept_states_under_activation_checkpointing`.)"""
    config, reference = run
    variant = dataclasses.replace(config, out=str(tmp_path / "out"), grad_accum=4, activation_checkpointing=True,
                                  gdn_keep_states=True)
    with caplog.at_level("WARNING", logger="hybridlm.train.trainer"):
        result = train(variant, stop_after=4)
    if not torch.cuda.is_available():
        assert "gdn_keep_states has no effect on cpu" in caplog.text
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(reference.losses[:4]), rtol=1e-5, atol=0)


def test_gdn_states_are_kept_by_default_exactly_with_activation_checkpointing(run):
    config, _ = run
    assert config.gdn_keep_states is None
    assert not gdn_states_kept_by(config)
    assert gdn_states_kept_by(dataclasses.replace(config, activation_checkpointing=True))
    assert not gdn_states_kept_by(dataclasses.replace(config, activation_checkpointing=True, gdn_keep_states=False))
    assert gdn_states_kept_by(dataclasses.replace(config, gdn_keep_states=True))


def test_bf16_autocast_follows_fp32(run, tmp_path):
    config, reference = run
    result = train(dataclasses.replace(config, out=str(tmp_path / "out"), autocast=True), stop_after=4)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(reference.losses[:4]), rtol=3e-2, atol=0)


def test_reuses_a_checkpoint_tokenizer(run, tmp_path):
    config, reference = run
    result = train(dataclasses.replace(config, out=str(tmp_path / "out"), tokenizer=str(reference.model_dir),
                                       vocab_size=100), stop_after=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (result.model_dir / name).read_bytes() == (reference.model_dir / name).read_bytes()
    assert json.loads((result.model_dir / "config.json").read_text())["vocab_size"] == 384
    assert "reused from" in (result.model_dir / "MODEL_CARD.md").read_text()


def test_resume_warns_when_the_data_changed(corpus, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    config = tiny_config(data, tmp_path / "out", steps=2, warmup=1, eval_every=0, save_every=0)
    train(config, stop_after=1)
    (data / "story00.txt").write_text("a different story.\n" * 20)
    with caplog.at_level("WARNING", logger="hybridlm.train.trainer"):
        result = train(dataclasses.replace(config, resume=True))
    assert result.start_step == 1 and result.steps == 2
    assert "training data changed since the checkpoint" in caplog.text
