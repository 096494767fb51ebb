"""Load test for `hybridlm serve`: many concurrent streaming chat clients on loopback, bounded in time.

Starts the real CLI server as a subprocess on a free 127.0.0.1 port, then runs waves of concurrent
streaming clients (official openai client). Every request must either complete (finish_reason, usage,
the stream closed with [DONE]) or be refused cleanly with 429 / 503; anything else (a cut stream, a 500,
a timeout) counts as a failure. The first wave warms up; the server's resident memory after each later
wave is compared with the memory after the warm-up (no growth means nothing leaks per request). Finally
SIGTERM, and the time the server takes to exit.

    python benchmarks/load_test.py --clients 200            # the tiny random test model if no --model
    python benchmarks/load_test.py --model DIR --clients 200 --max-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("You are a concise assistant that answers questions about Gated DeltaNet hybrid language models, "
          "their recurrent state, their attention layers and how they are served.")
TOPICS = ["the delta rule", "gating", "the conv state", "prefix caching", "chunked prefill", "state snapshots",
          "attention layers", "tool calls", "thinking mode", "quantization"]


@dataclass
class Wave:
    clients: int
    completed: int = 0
    rejected: dict[int, int] = field(default_factory=dict)  # status -> count
    failures: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    rss_after: int = 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tiny_model(directory: Path) -> Path:
    """The random test checkpoint (tests/checkpoints.py), with a 4096-token context."""
    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import write_checkpoint

    write_checkpoint("qwen3_5_text", directory, max_position_embeddings=4096)
    return directory


class Server:
    """`hybridlm serve` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, api_key: str, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "hybridlm.cli", "serve", "--model", str(model), "--port", str(self.port),
                   "--served-model-name", "bench", *extra]
        env = {**os.environ, "HYBRIDLM_API_KEY": api_key, "PYTHONPATH": str(ROOT)}
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s")

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it had to be killed, seconds to exit)."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        self.log.close()
        return code, time.monotonic() - start


async def one_client(client, index: int, max_tokens: int, wave: Wave) -> None:
    import openai

    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Request {index}: explain {TOPICS[index % len(TOPICS)]} briefly."}]
    start = time.monotonic()
    first = None
    finish = usage = None
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=max_tokens, temperature=0.7, seed=index, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for event in stream:
            if first is None and event.choices and (event.choices[0].delta.content or "") != "":
                first = time.monotonic()
            if event.choices and event.choices[0].finish_reason:
                finish = event.choices[0].finish_reason
            if event.usage is not None:
                usage = event.usage
    except (openai.RateLimitError, openai.InternalServerError) as error:
        if error.status_code in (429, 503) and error.response.headers.get("Retry-After"):
            wave.rejected[error.status_code] = wave.rejected.get(error.status_code, 0) + 1
        else:
            wave.failures.append(f"client {index}: {error!r}")
        return
    except Exception as error:  # noqa: BLE001 — a load test reports every failure, whatever its kind
        wave.failures.append(f"client {index}: {type(error).__name__}: {error}")
        return
    if finish != "length" or usage is None or usage.completion_tokens != max_tokens:
        wave.failures.append(f"client {index}: stream ended early (finish={finish}, usage={usage})")
        return
    wave.completed += 1
    wave.tokens += usage.completion_tokens
    wave.prompt_tokens += usage.prompt_tokens
    wave.cached_tokens += usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    wave.latency.append(time.monotonic() - start)
    if first is not None:
        wave.ttft.append(first - start)


async def run_wave(url: str, api_key: str, clients: int, max_tokens: int, timeout: float) -> Wave:
    import httpx
    import openai

    wave = Wave(clients)
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=timeout)) as client:
        start = time.monotonic()
        tasks = [asyncio.create_task(one_client(client, i, max_tokens, wave)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        wave.failures += [f"{len(pending)} clients still running after {timeout} s"] if pending else []
        wave.seconds = time.monotonic() - start
    return wave


def wait_idle(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if re.search(r"^hybridlm_num_sequences_unfinished\{[^}]*\} 0$", text, re.MULTILINE):
            return
        time.sleep(0.1)


def load_test(model: Path | None, clients: int, max_tokens: int, waves: int, timeout: float,
              server_args: list[str], log_dir: Path) -> dict:
    """Run warm-up + `waves` measured waves; return the figures (and raise nothing on request failures)."""
    api_key = "load-test-key"
    if model is None:
        model = tiny_model(log_dir / "model")
    server = Server(model, api_key, server_args, log_dir / "server.log")
    try:
        server.wait_ready(120)
        warm = asyncio.run(run_wave(server.url, api_key, clients, max_tokens, timeout))
        wait_idle(server.url)
        baseline = rss_bytes(server.process.pid)
        measured = []
        for _ in range(waves):
            wave = asyncio.run(run_wave(server.url, api_key, clients, max_tokens, timeout))
            wait_idle(server.url)
            wave.rss_after = rss_bytes(server.process.pid)
            measured.append(wave)
    finally:
        exit_code, exit_seconds = server.stop(timeout=60)
    return {"warmup": warm, "waves": measured, "rss_baseline": baseline, "exit_code": exit_code,
            "exit_seconds": exit_seconds, "model": str(model)}


def report(result: dict, clients: int, max_tokens: int) -> str:
    mib = 1 << 20
    lines = ["| wave | clients | completed | 429 | 503 | failed | wall s | gen tok/s | TTFT p50 / p99 ms | "
             "latency p50 / max s | cached prompt tokens | RSS after (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, wave in [("warm-up", result["warmup"])] + [(str(i + 1), w) for i, w in enumerate(result["waves"])]:
        ttft = sorted(wave.ttft) or [float("nan")]
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        latency = wave.latency or [float("nan")]
        rss = f"{wave.rss_after / mib:.0f}" if wave.rss_after else f"{result['rss_baseline'] / mib:.0f} (baseline)"
        cached = f"{wave.cached_tokens}/{wave.prompt_tokens}"
        lines.append(f"| {name} | {wave.clients} | {wave.completed} | {wave.rejected.get(429, 0)} | "
                     f"{wave.rejected.get(503, 0)} | {len(wave.failures)} | {wave.seconds:.1f} | "
                     f"{wave.tokens / max(wave.seconds, 1e-9):.0f} | {1000 * statistics.median(ttft):.0f} / "
                     f"{1000 * p99:.0f} | {statistics.median(latency):.1f} / {max(latency):.1f} | {cached} | {rss} |")
    lines.append(f"\nmax_tokens {max_tokens} per request; SIGTERM -> exit code {result['exit_code']} in "
                 f"{result['exit_seconds']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the tiny random test model)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--waves", type=int, default=2, help="measured waves after the warm-up")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per wave")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument("--dtype", default=None, help="the server's --dtype (default: the checkpoint's)")
    args = parser.parse_args()
    if args.clients > 1000:
        parser.error("--clients is capped at 1000 (loopback, one machine)")
    with tempfile.TemporaryDirectory() as tmp:
        result = load_test(args.model, args.clients, args.max_tokens, args.waves, args.timeout,
                           ["--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting),
                            "--shutdown-grace", "10"] + (["--dtype", args.dtype] if args.dtype else []), Path(tmp))
        for wave in [result["warmup"], *result["waves"]]:
            for failure in wave.failures[:10]:
                print("FAILURE", failure)
        print(f"model: {result['model']}")
        print(report(result, args.clients, args.max_tokens))
        failed = sum(len(w.failures) for w in [result["warmup"], *result["waves"]])
    sys.exit(1 if failed or result["exit_code"] != 0 else 0)


if __name__ == "__main__":
    main()
