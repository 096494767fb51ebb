"""Host time against GPU time of our chunked GDN forward: where a call is bound by Python and launches, not kernels.

bench_gdn.py times eager calls (triton.testing.do_bench), so where the host takes longer to issue a call's launches
than the GPU takes to run them, its figure is the host's. The context-parallel cut adds launches (gdn_cp), which is
why gdn_cp.CP_MIN_CHUNKS keeps it off below 8k tokens. For each shape and --variant this prints:
- host: ms of host time per call, issuing calls back to back without a sync (the launch queue is far from full);
- graph: ms per call replayed from a CUDA graph (GPU time alone, no host);
- eager: bench_gdn's timing (do_bench median of eager calls);
and then where the host time of the first model and shape under the last variant goes (cProfile, top functions by own time).

    python benchmarks/profile_gdn_host.py [--models 0.8B 9B] [--shapes 1x16384 8x4096]
                                          [--variant NAME:MODULE.FLAG=VALUE[,...] ...] [--profile-top 25]

Needs a CUDA GPU. With $OUT set the table also goes to $OUT/profile_gdn_host.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def host_ms(fn, calls: int = 30) -> float:
    """Host milliseconds per call, calls issued back to back after a sync (the best of three rounds)."""
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
    torch.cuda.synchronize()
    return best


def graph_ms(fn) -> float:
    """GPU milliseconds per call replayed from a CUDA graph (do_bench median)."""
    import triton
    from bench_gdn import graphed

    return triton.testing.do_bench(graphed(fn), warmup=25, rep=100, return_mode="median")


def host_profile(fn, top: int, calls: int = 50) -> str:
    """cProfile of `calls` calls (after warm-up), the `top` functions by own time."""
    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    from bench_gdn import HEADS, gdn_inputs, parse_variants, settings_applied, time_ms

    from hybridlm.ops.triton import chunk_gdn_fwd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["0.8B", "9B"], choices=sorted(HEADS))
    parser.add_argument("--shapes", nargs="+", default=["1x16384", "1x4096", "8x4096"], metavar="BxT")
    parser.add_argument("--variant", nargs="+", default=[], metavar="NAME:MODULE.FLAG=VALUE[,...]")
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gdn_host.py needs a CUDA GPU")
    variants = {"default": [], **parse_variants(args.variant)}
    lines = ["| model | B x T | variant | host ms | graph ms | eager ms |", "|---|---|---|---|---|---|"]
    last = None
    for model in args.models:
        for shape in args.shapes:
            batch, length = (int(x) for x in shape.split("x"))
            q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(batch, length, HEADS[model])
            for name, settings in variants.items():
                def call(settings=settings, inputs=(q, k, v, a, b, A_log, dt_bias), state=state):
                    with settings_applied(settings):
                        return chunk_gdn_fwd(*inputs, initial_state=state, output_final_state=True)
                call()
                torch.cuda.synchronize()
                row = (f"| {model} | {batch} x {length} | {name} | {host_ms(call):.3f} | {graph_ms(call):.3f} "
                       f"| {time_ms(call):.3f} |")
                print(row, flush=True)
                lines.append(row)
                if last is None and name == list(variants)[-1]:
                    last = (f"{model} {shape} {name}", call)
    text = "\n".join(lines)
    print("\n" + text)
    if last is not None and args.profile_top:
        print(f"\nhost profile, {last[0]}:\n" + host_profile(last[1], args.profile_top))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "profile_gdn_host.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
