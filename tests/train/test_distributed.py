"""Two processes (torchrun, gloo, FSDP2 on CPU) follow the one-process trajectory for the same global batch."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from hybridlm.train import train
from hybridlm.train.report import read_log
from tests.train.conftest import cli_args, tiny_config

REPO = Path(__file__).resolve().parents[2]
RUN = dict(steps=8, warmup=2, eval_every=4, save_every=4)


def torchrun(args: list[str], timeout: int = 180) -> None:
    """Launch 2 CPU processes; torchrun --standalone picks a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _losses(out: Path, event: str) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_log(out / "log.jsonl") if r["event"] == event], dtype=torch.float64)


def test_two_processes_match_one_process(corpus, tmp_path):
    single = train(tiny_config(corpus, tmp_path / "one", **RUN))
    # the same command, 2 processes, each with half of every micro-batch and 2 micro-steps per step
    torchrun(["-m", "hybridlm.cli", *cli_args(corpus, tmp_path / "two", grad_accum=2, **RUN)])
    start = read_log(tmp_path / "two" / "log.jsonl")[0]
    assert start["world_size"] == 2 and start["fsdp"] is True
    two = _losses(tmp_path / "two", "train")
    assert len(two) == 8
    torch.testing.assert_close(two, torch.tensor(single.losses, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(_losses(tmp_path / "two", "eval"), _losses(tmp_path / "one", "eval"), rtol=1e-5, atol=0)
    # rank 0 gathered the sharded weights into one checkpoint and one HF model directory
    sharded = torch.load(tmp_path / "two" / "checkpoint" / "state.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "one" / "checkpoint" / "state.pt", weights_only=True)["model"]
    assert sharded.keys() == reference.keys()
    for name in reference:  # Adam turns round-off in near-zero gradients into small fractions of a step
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-3, atol=2e-4)
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


def test_an_fsdp_checkpoint_resumes_in_one_process(corpus, tmp_path):
    """Stop a 2-process run after 4 steps; one process resumes it and ends where a 1-process run ends."""
    config = tiny_config(corpus, tmp_path / "two", **RUN)
    script = tmp_path / "stop.py"
    script.write_text(
        "import json, sys\nfrom hybridlm.train import TrainConfig, train\n"
        "train(TrainConfig.from_dict(json.loads(sys.argv[1])), stop_after=4)\n"
    )
    torchrun([str(script), json.dumps(config.to_dict())])
    assert read_log(tmp_path / "two" / "log.jsonl")[-1]["step"] == 4
    resumed = train(dataclasses.replace(config, resume=True))
    single = train(tiny_config(corpus, tmp_path / "one", **RUN))
    assert resumed.start_step == 4
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(single.losses[4:]), rtol=1e-5, atol=0)
