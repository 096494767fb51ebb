"""Profile the engine's step loop: where host time goes (cProfile), how long each step takes by its make-up, and
(optionally) which GPU kernels and ops a window of prefill-heavy steps spends its time in (torch.profiler).

    python benchmarks/profile_engine.py --requests 256 --new-tokens 32 [--device cpu] [--top 20]
    python3 benchmarks/profile_engine.py --shape 0.8B --device cuda --requests 256 --new-tokens 16 --steps-table \
        --torch-profile 4 [--chunk 8192]

Requests have seeded prompt lengths uniform in 128-2048, greedy, ignore_eos, all submitted at t=0 (the
throughput part of bench_e2e.py). `--shape tiny` (the default) is a small random 3:1 model whose cost is Python,
scheduling and the reference ops' shapes; `--shape 0.8B` / `9B` are bench_e2e.py's random-weight Qwen3.5 shapes
in bf16 (a GPU's work). `--steps-table` synchronises after every step and prints step times grouped by make-up
(decode-only, or mixed with N prefill tokens). `--torch-profile N` records N steps of `--profile-kind` (mixed or
decode) after the first few (compiles) with torch.profiler and prints the ops by self time on the device and on the host; with $OUT set
the Chrome trace goes there too. cProfile runs only without --torch-profile.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hybridlm.bundled import bundled_model_dir  # noqa: E402
from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.engine.engine import Engine, EngineConfig  # noqa: E402
from hybridlm.engine.params import SamplingParams  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402


def tiny_model(vocab_size: int, device: str) -> HybridLM:
    config = ModelConfig.from_dict(dict(
        model_type="qwen3_5_text", vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, intermediate_size=128,
        max_position_embeddings=4096, layer_types=["linear_attention"] * 3 + ["full_attention"]))
    model = HybridLM(config)
    model.init_weights(seed=0)
    return model.to(device).eval()


def shaped_model(shape: str, device: str) -> HybridLM:
    """bench_e2e.py's random-weight Qwen3.5 shape in bf16 (its DEVICE must be this device)."""
    import bench_e2e

    if str(bench_e2e.DEVICE) != torch.device(device).type:
        raise SystemExit(f"--shape {shape} builds on {bench_e2e.DEVICE}, not {device}")
    return bench_e2e.build_ours(shape)


class StepTimer:
    """Wraps the runner's execute: the make-up of every step, and its wall time when `sync` (a device sync after
    the step, so the time is the step's own; it also takes away the overlap of host and GPU between decode steps)."""

    def __init__(self, engine: Engine, sync: bool) -> None:
        self.rows: list[tuple[int, int, int, float]] = []  # (prefill chunks, prefill tokens, decode rows, ms)
        self.sync = sync and torch.cuda.is_available()
        self._execute = engine.runner.execute
        engine.runner.execute = self._timed

    def _timed(self, output, **kwargs):
        decode = [c for c in output.chunks if c.length == 1 and c.start > 0]
        prefill = [c for c in output.chunks if not (c.length == 1 and c.start > 0)]
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = self._execute(output, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        self.rows.append((len(prefill), sum(c.length for c in prefill), len(decode),
                          (time.perf_counter() - start) * 1e3))
        return logits

    def report(self) -> None:
        groups: dict[str, list[tuple[int, int, int, float]]] = {}
        for row in self.rows:
            tokens = row[1]
            key = "decode only" if tokens == 0 else f"prefill {1 << max(tokens - 1, 0).bit_length():>5} tok or fewer"
            groups.setdefault(key, []).append(row)
        print("\n| step kind | steps | prefill chunks (mean) | decode rows (mean) | ms median | ms max | prefill tok/s |")
        print("|---|---|---|---|---|---|---|")
        for key in sorted(groups):
            rows = groups[key]
            ms = [r[3] for r in rows]
            tokens = sum(r[1] for r in rows)
            rate = f"{tokens / (sum(ms) / 1e3):,.0f}" if tokens else "-"
            print(f"| {key} | {len(rows)} | {statistics.mean(r[0] for r in rows):.1f} | "
                  f"{statistics.mean(r[2] for r in rows):.1f} | {statistics.median(ms):.1f} | {max(ms):.1f} | {rate} |")
        slowest = sorted(range(len(self.rows)), key=lambda i: -self.rows[i][3])[:8]
        print("slowest steps (index: prefill chunks / prefill tokens / decode rows / ms): " + ", ".join(
            f"{i}: {self.rows[i][0]}/{self.rows[i][1]}/{self.rows[i][2]}/{self.rows[i][3]:.0f}" for i in slowest))


def run_profiled(engine: Engine, timer: StepTimer, steps: int, top: int, kind: str) -> int:
    """Step until `steps` steps of `kind` ("mixed": prefill tokens in them; "decode": decode rows only) have run
    under torch.profiler, after three warm-up steps of that kind; then finish the run unprofiled. Returns the
    number of steps."""
    def counted(rows):
        return sum(1 for r in rows if (r[1] > 0) == (kind == "mixed"))

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    count, seen = 0, 0
    while engine.has_work and seen < 3:
        engine.step()
        count += 1
        seen = counted(timer.rows)
    with profile(activities=activities) as prof:
        recorded = 0
        while engine.has_work and recorded < steps:
            before = len(timer.rows)
            engine.step()
            count += 1
            recorded += counted(timer.rows[before:])
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=device_key, row_limit=top))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, "engine_trace.json"))
    while engine.has_work:
        engine.step()
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.8B", "9B"])
    parser.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (the engine's default if unset)")
    parser.add_argument("--cache-gib", type=float, default=2.0, help="cache memory budget")
    parser.add_argument("--engine-option", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="more EngineConfig fields (int, float or bool values)")
    parser.add_argument("--steps-table", action="store_true", help="time every step (device sync) by its make-up")
    parser.add_argument("--torch-profile", type=int, default=0, metavar="N", help="torch.profiler over N steps")
    parser.add_argument("--profile-kind", default="mixed", choices=["mixed", "decode"],
                        help="which steps --torch-profile records")
    parser.add_argument("--top", type=int, default=20, help="functions / ops to list")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(bundled_model_dir())
    model = tiny_model(tokenizer.vocab_size, args.device) if args.shape == "tiny" else shaped_model(args.shape, args.device)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(128, 2048))] for _ in range(args.requests)]
    options = dict(max_num_seqs=256, cache_memory_bytes=int(args.cache_gib * (1 << 30)))
    if args.chunk:
        options["max_num_batched_tokens"] = args.chunk
    for item in args.engine_option:
        field, _, value = item.partition("=")
        options[field] = value == "True" if value in ("True", "False") else float(value) if "." in value else int(value)
    engine = Engine(model, tokenizer, config=EngineConfig(**options))
    timer = StepTimer(engine, sync=args.steps_table or bool(args.torch_profile))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    start = time.perf_counter()
    if args.torch_profile:
        steps = run_profiled(engine, timer, args.torch_profile, args.top, args.profile_kind)
    else:
        profile, steps = cProfile.Profile(), 0
        profile.enable()
        while engine.has_work:
            engine.step()
            steps += 1
        profile.disable()
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(args.top)
        # the host side of a step: what runs around the model (scheduling, inputs, sampling, detokenising)
        stats.sort_stats("cumtime").print_stats(r"engine/|tokenizer", args.top)
    seconds = time.perf_counter() - start
    if args.steps_table or args.torch_profile:
        timer.report()
    print(f"{args.shape}: {args.requests} requests x {args.new_tokens} new tokens ({sum(map(len, prompts)):,} prompt "
          f"tokens): {steps} steps in {seconds:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
