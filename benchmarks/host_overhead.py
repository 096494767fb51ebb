"""Host time vs GPU time of the GDN chunked forward (ours), per shape and setting, on a CUDA GPU.

    python benchmarks/host_overhead.py [--shapes 9B:1:4096 0.8B:1:16384 ...] [--set gdn_chunk.STATE_PASS_CP=False]
                                       [--profile 9B:1:16384]

Short prefills are bound by the host, not the GPU: each Triton launch costs tens of microseconds of Python (binding
and specialising its arguments) and the wrapper allocates and computes on the host too. This prints, per shape:
- host: the time to enqueue one call (20 calls back to back, no synchronisation, averaged);
- eager: `triton.testing.do_bench` of the call, as `bench_gdn.py` times it (the larger of host and GPU time, roughly);
- graph: the call replayed from a CUDA graph, i.e. the GPU time alone.
Eager well above graph means the host is the bound. `--profile SHAPE` also prints cProfile's top functions for that
shape (where the host time goes). `--set` takes bench_gdn.py's MODULE.FLAG=VALUE settings.
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
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gdn import HEADS, apply_settings, gdn_inputs  # noqa: E402

from hybridlm.ops.triton import chunk_gdn_fwd  # noqa: E402


def parse_shape(text: str) -> tuple[str, int, int]:
    model, _, rest = text.partition(":")
    batch, _, length = rest.partition(":")
    if model not in HEADS or not batch.isdigit() or not length.isdigit():
        raise SystemExit(f"a shape is MODEL:B:T with MODEL one of {sorted(HEADS)}; got {text!r}")
    return model, int(batch), int(length)


def measure(model: str, batch: int, length: int, profile: bool) -> str:
    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(batch, length, HEADS[model])

    def forward():
        return chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)

    forward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        forward()
    host = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # warm the allocator on a side stream before capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        forward()
    in_graph = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    eager = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            forward()
        profiler.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        print(f"cProfile, 50 calls at {model} B={batch} T={length}:\n" + out.getvalue(), flush=True)
    return f"| {model} | {batch} | {length} | {host:.3f} | {eager:.3f} | {in_graph:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["9B:1:4096", "9B:1:16384", "0.8B:1:4096", "0.8B:1:16384"],
                        help="MODEL:B:T, MODEL one of " + ", ".join(sorted(HEADS)))
    parser.add_argument("--set", nargs="*", default=[], dest="settings", help="MODULE.FLAG=VALUE (bench_gdn.py's)")
    parser.add_argument("--profile", nargs="*", default=[], help="shapes to also profile on the host (cProfile)")
    args = parser.parse_args()
    shapes = [parse_shape(text) for text in args.shapes]
    profiled = {parse_shape(text) for text in args.profile}
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py needs a CUDA GPU (it times the GPU against the host)")
    applied = apply_settings(args.settings)
    if applied:
        print("settings: " + ", ".join(applied))
    rows = [measure(*shape, shape in profiled) for shape in shapes]
    print("| model | B | T | host ms/call | eager ms | graph ms |\n|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
