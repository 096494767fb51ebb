"""Checkpoint layouts and the errors of a checkpoint that does not match its config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from tests.checkpoints import VOCAB


def copy_checkpoint(source, target, transform):
    """Rewrite a single-file checkpoint's tensors through `transform(dict) -> dict`."""
    target.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            (target / item.name).write_bytes(item.read_bytes())
    save_file(transform(load_file(source / "model.safetensors")), target / "model.safetensors")


def logits(model, seed=0):
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("family", ["qwen3_5_moe_text", "qwen3_5_moe"])
def test_fused_expert_layout_loads_and_saves_back_fused(checkpoint, family, tmp_path):
    directory, _ = checkpoint(family)

    def fuse(tensors):
        out, experts = {}, {}
        for key, value in tensors.items():
            if ".mlp.experts." in key:
                base, expert, proj = key.rsplit(".", 3)[0], int(key.split(".")[-3]), key.split(".")[-2]
                experts.setdefault(base, {}).setdefault(proj, {})[expert] = value
            else:
                out[key] = value
        for base, projections in experts.items():
            count = len(projections["gate_proj"])
            gate_up = [torch.cat([projections["gate_proj"][e], projections["up_proj"][e]]) for e in range(count)]
            out[base + ".gate_up_proj"] = torch.stack(gate_up)
            out[base + ".down_proj"] = torch.stack([projections["down_proj"][e] for e in range(count)])
        return out

    fused = tmp_path / "fused"
    copy_checkpoint(directory, fused, fuse)
    model = hybridlm.load(fused)
    torch.testing.assert_close(logits(model), logits(hybridlm.load(directory)), atol=0, rtol=0)
    hybridlm.save(model, tmp_path / "saved")
    keys = load_file(tmp_path / "saved" / "model.safetensors").keys()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    torch.testing.assert_close(logits(hybridlm.load(tmp_path / "saved")), logits(model), atol=0, rtol=0)


def test_qwen3_next_saves_interleaved_projections(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen3_next")
    hybridlm.save(hybridlm.load(directory), tmp_path)
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(directory / "model.safetensors")
    assert saved.keys() == original.keys()
    for key in original:
        assert torch.equal(saved[key], original[key]), key


def test_every_problem_is_listed_in_one_error(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen3_5_text")

    def damage(tensors):
        del tensors["model.layers.0.linear_attn.A_log"]
        del tensors["model.norm.weight"]
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        tensors["model.layers.1.linear_attn.in_proj_qkv.weight"] = torch.zeros(3, 64)
        return tensors

    copy_checkpoint(directory, tmp_path / "bad", damage)
    with pytest.raises(ValueError) as error:
        hybridlm.load(tmp_path / "bad")
    message = str(error.value)
    for needle in ("missing 3 tensor(s)", "model.layers.0.linear_attn.A_log", "model.norm.weight",
                   "unexpected 1 tensor(s): model.layers.9.mlp.up_proj.weight",
                   "model.layers.1.linear_attn.in_proj_qkv.weight: expected (96, 64), got (3, 64)"):
        assert needle in message


def test_directory_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hybridlm.load(tmp_path / "nowhere")
    directory, _ = checkpoint("qwen3_5_text")
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        hybridlm.load(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        hybridlm.load(tmp_path)


def test_sharded_checkpoint_and_dtype(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen3_5_text")
    model = hybridlm.load(directory)
    hybridlm.save(model, tmp_path, max_shard_bytes=30_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    half = hybridlm.load(tmp_path, dtype="bfloat16")
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    assert half.layers[0].linear_attn.A_log.dtype == torch.float32  # decay math stays fp32
    error = (logits(half).float() - logits(model)).abs()
    assert error.mean() < 0.03 and error.max() < 0.3  # bf16 rounding, not a different model
    with pytest.raises(ValueError, match="unsupported dtype"):
        hybridlm.load(tmp_path, dtype="int3")
    with pytest.raises(ValueError, match="refusing to save over"):
        hybridlm.save(model, directory)


def test_tied_embeddings(tmp_path):
    from tests.checkpoints import make_hf_model

    reference = make_hf_model("qwen3_5_text", tie_word_embeddings=True)
    reference.save_pretrained(tmp_path)
    ours = hybridlm.load(tmp_path)
    assert ours.lm_head is None
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)
