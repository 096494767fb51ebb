"""The `hybridlm` command through typer's CliRunner, on a tiny random checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hybridlm
from hybridlm.cli import app

# click >= 8.2 keeps stdout and stderr apart (result.stdout / result.stderr) and has no mix_stderr
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    directory, _ = checkpoint("qwen3_5_text")
    return str(directory)


@pytest.fixture(scope="module")
def llm(model_dir):
    return hybridlm.LLM(model_dir, device="cpu")


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def flat(text: str) -> str:
    """Error text with rich's box drawing and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def greedy(max_tokens: int) -> hybridlm.SamplingParams:
    return hybridlm.SamplingParams(max_tokens=max_tokens, temperature=0)


# ---------------------------------------------------------------- info
def test_info_prints_pattern_and_parameters(model_dir, llm):
    result = invoke("info", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "LLLA" in result.stdout
    assert f"{llm.model.num_parameters():,}" in result.stdout
    assert "3 Gated DeltaNet, 1 full attention" in result.stdout
    assert "512" in result.stdout  # the context


def test_info_at_a_context_length(model_dir):
    default = invoke("info", "--model", model_dir)
    result = invoke("info", "--model", model_dir, "--context", "1000")
    assert result.exit_code == 0, result.output
    assert "1,000 tokens" in result.stdout
    assert "512 tokens" in default.stdout
    assert result.stdout != default.stdout


def test_info_cache_capacity_matches_the_engine_plan(model_dir, llm):
    from hybridlm.engine.cache import plan_cache

    model = llm.model
    plan = plan_cache(model.cache_layout, torch.bfloat16, 1 << 20, 2)
    result = invoke("info", "--model", model_dir, "--cache-memory", str(1 / 1024), "--max-num-seqs", "2",
                    "--context", "100")
    assert result.exit_code == 0, result.output
    assert f"{plan.max_cached_tokens:,} tokens ({plan.num_blocks:,} blocks of 64)" in result.stdout
    assert "sequences of 100 tokens at once" in result.stdout
    bad = invoke("info", "--model", model_dir, "--cache-memory", "-1")
    assert bad.exit_code == 2 and "--cache-memory" in bad.stderr


def test_info_dtype_changes_the_weight_size(model_dir):
    bf16 = invoke("info", "--model", model_dir, "--dtype", "bfloat16")
    fp32 = invoke("info", "--model", model_dir, "--dtype", "float32")
    assert bf16.exit_code == fp32.exit_code == 0
    assert "weights (float32)" in fp32.stdout and "weights (bfloat16)" in bf16.stdout


# ---------------------------------------------------------------- generate
def test_generate_with_prompt_option(model_dir):
    result = invoke("generate", "--model", model_dir, "--prompt", "hello", "--max-tokens", "5", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("hello")
    assert "finish=length" in result.stderr and "5 tokens" in result.stderr


def test_generate_with_positional_prompt(model_dir):
    option = invoke("generate", "--model", model_dir, "--prompt", "hello", "--max-tokens", "5", "--temperature", "0")
    positional = invoke("generate", "hello", "--model", model_dir, "--max-tokens", "5", "--temperature", "0")
    assert positional.exit_code == 0, positional.output
    assert positional.stdout == option.stdout


@pytest.mark.parametrize("prompt", ["hello", "def add(a, b):"])
def test_generate_greedy_equals_the_library(model_dir, llm, prompt):
    result = invoke("generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", "8", "--temperature", "0")
    assert result.exit_code == 0, result.output
    expected = llm.generate(prompt, greedy(8))[0]
    assert result.stdout == prompt + expected.text + "\n"
    assert f"finish={expected.finish_reason}" in result.stderr


def test_generate_with_seed_is_reproducible(model_dir):
    args = ("generate", "hello", "--model", model_dir, "--max-tokens", "8", "--temperature", "1.0", "--seed", "3")
    first, again = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout


def test_generate_stop_string(model_dir, llm):
    text = llm.generate("hello", greedy(16))[0].text
    stop = next(c for c in text[3:] if " " < c <= "~")
    result = invoke("generate", "hello", "--model", model_dir, "--max-tokens", "16", "--temperature", "0",
                    "--stop", stop)
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello" + text[: text.find(stop)] + "\n"
    assert "finish=stop" in result.stderr


# ---------------------------------------------------------------- chat
def test_chat_replies_and_exits(model_dir, llm):
    result = invoke("chat", "--model", model_dir, "--max-tokens", "6", "--temperature", "0", input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    expected = llm.chat([{"role": "user", "content": "hi"}], sampling=greedy(6))
    assert expected.token_ids  # the model said something
    assert result.stdout == expected.text + "\n"


def test_chat_keeps_the_conversation(model_dir, llm):
    result = invoke("chat", "--model", model_dir, "--max-tokens", "5", "--temperature", "0", "--system", "Be brief.",
                    "--no-think", input="hi\n\nhow are you\n")  # a blank line is skipped; EOF quits
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    first = llm.chat(messages, sampling=greedy(5), enable_thinking=False).text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "how are you"}]
    second = llm.chat(messages, sampling=greedy(5), enable_thinking=False).text
    assert result.stdout == first + "\n" + second + "\n"


def test_chat_reset_forgets_the_conversation(model_dir, llm):
    result = invoke("chat", "--model", model_dir, "--max-tokens", "5", "--temperature", "0",
                    input="hi\n/reset\nhi\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    reply = llm.chat([{"role": "user", "content": "hi"}], sampling=greedy(5)).text
    assert result.stdout == reply + "\n" + reply + "\n"


# ---------------------------------------------------------------- errors
def test_nonexistent_model_dir(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for command in (["generate", "hello"], ["chat"], ["info"]):
        result = invoke(*command, "--model", missing)
        assert result.exit_code == 2, (command, result.output)
        assert "no-such-model" in result.stderr
        assert result.stdout == ""


def test_missing_prompt(model_dir):
    result = invoke("generate", "--model", model_dir, "--max-tokens", "5")
    assert result.exit_code == 2
    assert "prompt" in flat(result.stderr)


@pytest.mark.parametrize(("option", "value", "name"), [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "1.5", "top_p"),
    ("--max-tokens", "0", "max_tokens"),
])
def test_invalid_sampling_option(model_dir, option, value, name):
    result = invoke("generate", "hello", "--model", model_dir, option, value)
    assert result.exit_code == 2, result.output
    assert name in result.stderr
    assert result.stdout == ""  # nothing generated, not even the prompt echo


def test_chat_invalid_temperature(model_dir):
    result = invoke("chat", "--model", model_dir, "--temperature", "-1", input="hi\n")
    assert result.exit_code == 2
    assert "temperature" in result.stderr


def test_info_bogus_dtype(model_dir):
    result = invoke("info", "--model", model_dir, "--dtype", "bogus")
    assert result.exit_code == 2
    assert "bogus" in result.stderr and "dtype" in result.stderr


def test_info_bad_context(model_dir):
    result = invoke("info", "--model", model_dir, "--context", "0")
    assert result.exit_code == 2
    assert "context" in result.stderr


def test_prompt_past_the_context(model_dir):
    result = invoke("generate", "a " * 600, "--model", model_dir, "--max-tokens", "2")
    assert result.exit_code == 2
    assert "context" in result.stderr


def test_refused_prompt_writes_nothing_to_stdout(model_dir):
    result = invoke("generate", "a " * 600, "--model", model_dir, "--max-tokens", "2")
    assert result.exit_code == 2
    assert result.stdout == ""


def test_serve_defaults_to_float32_on_the_cpu(model_dir, monkeypatch):
    from hybridlm.cli import _cpu_serving_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cpu_serving_dtype(Path(model_dir), None, True) == "float32"  # a tiny model fits
    assert _cpu_serving_dtype(Path(model_dir), "cuda", True) is None  # the GPU keeps the checkpoint's dtype


def test_serve_passes_its_engine_options(model_dir, monkeypatch):
    """The engine's limits and graph switches reach the server's EngineConfig; bad values are named, nothing starts."""
    import hybridlm.serve

    calls = []
    monkeypatch.setattr(hybridlm.serve, "run", lambda directory, **kwargs: calls.append(kwargs))
    result = invoke("serve", "--model", model_dir, "--max-num-batched-tokens", "512", "--cache-memory", "0.25",
                    "--gpu-memory-utilization", "0.5", "--no-cuda-graphs", "--prefill-graphs", "0")
    assert result.exit_code == 0, result.stderr
    config = calls[0]["engine_config"]
    assert (config.max_num_batched_tokens, config.cache_memory_bytes, config.gpu_memory_utilization,
            config.cuda_graphs, config.prefill_graphs) == (512, 2**28, 0.5, False, 0)
    defaults = invoke("serve", "--model", model_dir)
    assert defaults.exit_code == 0 and calls[1]["engine_config"].cuda_graphs and calls[1]["engine_config"].prefill_graphs
    for option, value, message in (("--gpu-memory-utilization", "1.5", "gpu_memory_utilization must be in (0, 1]"),
                                   ("--prefill-graphs", "-1", "prefill_graphs must be >= 0"),
                                   ("--cache-memory", "0", "--cache-memory must be a positive number of GiB")):
        refused = invoke("serve", "--model", model_dir, option, value)
        assert refused.exit_code == 2 and message in refused.stderr, refused.stderr
    assert len(calls) == 2
