"""`hybridlm serve` as a real process: API key from the environment, a bounded load of 30 concurrent
streaming clients (benchmarks/load_test.py, the 200-client test's code), memory back to its baseline, and
SIGTERM while a stream is in flight."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_test", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cli_serve_under_load_then_sigterm(model_dir, tmp_path):
    load_test = load_test_module()
    key = "cli-key"
    # 16 running + 8 waiting admitted: of 30 clients at once, some must get a clean 429
    server = load_test.Server(model_dir, key, ["--max-num-seqs", "16", "--max-waiting", "8", "--shutdown-grace", "1",
                                               "--block-size", "16"], tmp_path / "server.log")
    try:
        server.wait_ready(60)
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert models["data"][0]["id"] == "bench"

        waves = [asyncio.run(load_test.run_wave(server.url, key, clients=30, max_tokens=16, timeout=60))
                 for _ in range(2)]
        load_test.wait_idle(server.url)
        baseline = load_test.rss_bytes(server.process.pid)
        waves.append(asyncio.run(load_test.run_wave(server.url, key, clients=30, max_tokens=16, timeout=60)))
        load_test.wait_idle(server.url)
        after = load_test.rss_bytes(server.process.pid)
        for wave in waves:
            assert wave.failures == []  # no cut stream, no 500, no timeout
            assert wave.completed + wave.rejected.get(429, 0) == 30 and wave.completed >= 24
        assert sum(w.rejected.get(429, 0) for w in waves) > 0
        assert after <= baseline * 1.05 + (16 << 20), (baseline, after)

        # a stream in flight when SIGTERM arrives ends with an error event (grace 1 s), then the server exits 0
        body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            code, seconds = server.stop(timeout=30)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "unavailable"
        assert code == 0 and seconds < 15
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
