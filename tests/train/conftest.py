"""A tiny learnable corpus and a tiny recipe, shared by the training tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hybridlm.train import TrainConfig

# Small enough to train in a few seconds on 2 CPU cores: hidden 64, 4 layers (LLLA), seq_len 64.
TINY = dict(
    vocab_size=400, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, gdn_heads=2,
    gdn_value_heads=4, gdn_head_dim=16, intermediate_size=128, ratio=3, seq_len=64, batch_size=8, steps=30,
    lr=3e-3, warmup=5, eval_every=10, eval_rows=8, save_every=10, heldout_fraction=0.2, autocast=False,
    progress=False, seed=0,
)


def write_corpus(root: Path, seed: int = 0) -> Path:
    """Twelve stories from a tiny grammar, a Python file, a JSONL file, a hidden file and a binary one."""
    rng = random.Random(seed)
    names, verbs, things = ["alice", "bob", "carol", "dave"], ["sees", "likes", "helps", "calls"], [
        "the cat", "a dog", "the tree", "my friend"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        lines = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(30)]
        (root / f"story{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (root / "code").mkdir(exist_ok=True)
    (root / "code" / "add.py").write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 3)
    with open(root / "counts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"{rng.choice(names)} counts {i} {i + 1} {i + 2}."}) + "\n")
        f.write(json.dumps("a plain string line is a document too.") + "\n")
    (root / ".hidden.txt").write_text("never read")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread gains little, and on a busy 2-core machine
    OpenMP threads that wait on each other make a step up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=(str(corpus),), out=str(out), **{**TINY, **overrides})


# TrainConfig field -> `hybridlm train` option, for the recipe above.
CLI_OPTIONS = dict(
    vocab_size="--vocab", hidden_size="--hidden", num_layers="--layers", num_heads="--heads",
    num_kv_heads="--kv-heads", head_dim="--head-dim", gdn_heads="--gdn-heads", gdn_value_heads="--gdn-value-heads",
    gdn_head_dim="--gdn-head-dim", intermediate_size="--intermediate", ratio="--ratio", seq_len="--seq-len",
    batch_size="--batch-size", steps="--steps", lr="--lr", warmup="--warmup", eval_every="--eval-every",
    eval_rows="--eval-rows", save_every="--save-every", heldout_fraction="--heldout-fraction", seed="--seed",
)


def cli_args(corpus: Path, out: Path, **overrides) -> list[str]:
    """`hybridlm train` arguments for tiny_config(corpus, out, **overrides)."""
    values = {**TINY, **overrides}
    args = ["train", "--data", str(corpus), "--out", str(out)]
    for field, option in CLI_OPTIONS.items():
        args += [option, str(values[field])]
    args += ["--autocast" if values["autocast"] else "--no-autocast", "--no-progress"]
    if values.get("grad_accum"):
        args += ["--grad-accum", str(values["grad_accum"])]
    return args
