"""Where one prompt's prefill goes: `model(ids, logits_to_keep=1)` (bench_e2e.py's prefill part) under torch.profiler.

    python3 benchmarks/profile_prefill.py --shape 0.8B --lengths 4096 32768 [--top 25] [--cprofile 30]

For each length: the wall time of a forward (median of 3 after a warm-up) and the device time the profiler sees in
it. Wall well above device time means the GPU waits on the host (launch overhead, syncs); then the ops by device
time, grouped by kernel name. `--cprofile N` also prints the N Python functions with the most own time over 10
forwards (where the host's time goes when it is the bound). `--graph` also times the forward captured whole in a
CUDA graph and replayed (the GPU's time alone: what a prefill per length bucket in a graph would take), or says why
it cannot be captured. `--shape tiny` runs on the CPU (a check of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_engine import shaped_model, tiny_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(model, ids: torch.Tensor, repeats: int = 3) -> float:
    model(ids, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        sync(ids.device)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        sync(ids.device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def host_profile(model, ids: torch.Tensor, top: int, forwards: int = 10) -> None:
    """cProfile of `forwards` forwards queued back to back (one sync at the end): the host's share alone."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    sync(ids.device)
    profiler.enable()
    for _ in range(forwards):
        model(ids, logits_to_keep=1)
    sync(ids.device)
    profiler.disable()
    print(f"host profile, {forwards} forwards of {ids.shape[1]} tokens:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def graph_ms(model, ids: torch.Tensor, repeats: int = 10) -> str:
    """The forward captured in one CUDA graph, median replay time in ms; or why capture failed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(ids, logits_to_keep=1)  # warm-up on a side stream, as capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            model(ids, logits_to_keep=1)
    except Exception as error:  # noqa: BLE001 (a measurement: report why, go on)
        torch.cuda.synchronize()
        return f"not capturable: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return f"{sorted(times[1:])[repeats // 2]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.8B", "9B"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print cProfile's N functions with the most own time over 10 forwards")
    parser.add_argument("--graph", action="store_true", help="also time the forward replayed from a CUDA graph")
    args = parser.parse_args()
    if args.shape == "tiny":
        model, device = tiny_model(1000, "cpu"), torch.device("cpu")
    else:
        device = torch.device("cuda")
        model = shaped_model(args.shape, "cuda")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary = []
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, length), device=device,
                                generator=torch.Generator(device=device).manual_seed(length))
            wall = wall_ms(model, ids)
            with profile(activities=activities) as prof:
                model(ids, logits_to_keep=1)
                sync(device)
            events = prof.key_averages()
            device_ms = sum(getattr(e, sort_key) for e in events) / 1e3
            print(f"\n{args.shape}, {length} tokens: wall {wall:.2f} ms ({length / wall * 1e3:,.0f} tok/s), "
                  f"device time in one profiled forward {device_ms:.2f} ms")
            print(events.table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60))
            if args.cprofile:
                host_profile(model, ids, args.cprofile)
            graph = graph_ms(model, ids) if args.graph and device.type == "cuda" else "-"
            summary.append((length, wall, device_ms, graph))
    print("\n| shape | tokens | wall ms | tok/s | device ms (profiled) | CUDA graph replay ms |")
    print("|---|---|---|---|---|---|")
    for length, wall, device_ms, graph in summary:
        print(f"| {args.shape} | {length} | {wall:.2f} | {length / wall * 1e3:,.0f} | {device_ms:.2f} | {graph} |")


if __name__ == "__main__":
    main()
