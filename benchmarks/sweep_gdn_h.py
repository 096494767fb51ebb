"""Where the chunked GDN forward spends its time, and launch settings for its sequential state pass (the h kernel).

    python3 benchmarks/sweep_gdn_h.py [--lengths 16384 65536] [--models 9B 0.8B] [--quick]

For each shape (B=1, bf16): the three kernels of `chunk_gdn_fwd` timed one by one (prepare, h, o) with the
wrapper's settings, then the h kernel alone over BV x num_warps x num_stages, with k normalised in the kernel
(as the wrapper runs it) or handed over normalised (NORM_K=False: what moving the norm out of the sequential
loop would save). Every setting's v_new and final state are checked against the wrapper's. The h kernel runs
cdiv(dv, BV) x Hv programs at B=1, each walking all T/64 chunks in order: the column "us/chunk" is its time per
step of that walk. fla's step is ~1.6 us (its whole forward at 9B heads, 64k tokens: 1.66 ms).
With $OUT set the table also goes to $OUT/sweep_gdn_h.md. Runs on the CPU interpreter at a tiny shape (--tiny).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402

from hybridlm.ops.delta_rule import l2norm  # noqa: E402
from hybridlm.ops.triton import gdn_chunk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = {"9B": (16, 32, 128), "0.8B": (16, 16, 128), "tiny": (1, 2, 32)}


def time_ms(fn) -> float:
    if DEVICE == "cpu":
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def inputs(length, heads):
    key_heads, value_heads, d = heads
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(torch.bfloat16)

    q, k, v = randn(1, length, key_heads, d), randn(1, length, key_heads, d), randn(1, length, value_heads, d)
    a, b = randn(1, length, value_heads), randn(1, length, value_heads)
    A_log = torch.empty(value_heads, device=DEVICE).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(value_heads, generator=gen, device=DEVICE) * 0.5
    return q, k, v, a, b, A_log, dt_bias


def kernel_times(args) -> dict[str, float]:
    """Per-kernel device time of one chunk_gdn_fwd call (torch.profiler), ms."""
    if DEVICE == "cpu":
        return {}
    gdn_chunk.chunk_gdn_fwd(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            gdn_chunk.chunk_gdn_fwd(*args)
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.key.startswith("chunk_gdn_fwd_"):
            times[event.key.replace("chunk_gdn_fwd_", "").replace("_kernel", "")] = event.device_time_total / 5e3
    return times


def sweep(model, length, quick, rows):
    heads = MODELS[model]
    key_heads, value_heads, d = heads
    args = inputs(length, heads)
    q, k, v, a, b, A_log, dt_bias = args
    out = gdn_chunk._chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=None, initial_state=None,
                                   output_final_state=True, cu_seqlens=None)
    chunks = triton.cdiv(length, gdn_chunk.CHUNK_SIZE)
    split = kernel_times(args)
    if split:
        total = sum(split.values())
        print(f"{model} T={length}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in split.items())
              + f" (sum {total:.3f} ms)", flush=True)
    k_normed = l2norm(k.float()).to(k.dtype)
    BK = max(16, triton.next_power_of_2(d))
    common = dict(H=key_heads, HV=value_heads, K=d, V=d, BT=gdn_chunk.CHUNK_SIZE, BK=BK, IS_VARLEN=False,
                  DOT_PRECISION="tf32", USE_INITIAL_STATE=False, STORE_FINAL_STATE=True)
    grid_bv = (16, 32, 64) if not quick else (32, 64)
    warps = (2, 4, 8) if not quick else (4, 8)
    stages = (1, 2, 3, 4) if not quick else (2, 3)
    for BV, num_warps, num_stages, norm_k in itertools.product(grid_bv, warps, stages, (True, False)):
        if BV > d:
            continue
        h = torch.empty_like(out["h"])
        v_new = torch.empty_like(out["v_new"])
        final = torch.empty_like(out["final_state"])
        key = k if norm_k else k_normed

        def launch():
            gdn_chunk.chunk_gdn_fwd_h_kernel[(triton.cdiv(d, BV), value_heads)](
                key, out["w"], out["u"], out["g_cumsum"], h, v_new, None, final, None, None, length, key.stride(1),
                BV=BV, NORM_K=norm_k, num_warps=num_warps, num_stages=num_stages, **common)

        try:
            ms = time_ms(launch)
        except Exception as error:  # e.g. OutOfResources for a large BV with many stages
            rows.append((model, length, BV, num_warps, num_stages, norm_k, None, type(error).__name__))
            continue
        error = max((v_new.float() - out["v_new"].float()).abs().max().item() / out["v_new"].float().abs().max().item(),
                    (final - out["final_state"]).abs().max().item() / out["final_state"].abs().max().item())
        rows.append((model, length, BV, num_warps, num_stages, norm_k, ms, f"{error:.1e}"))
        per_chunk = ms * 1e3 / chunks
        print(f"  BV={BV:3d} warps={num_warps} stages={num_stages} norm_k={'in' if norm_k else 'pre'}: "
              f"{ms:.4f} ms  {per_chunk:.2f} us/chunk  max rel diff {error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["9B", "0.8B"], choices=sorted(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape at 200 tokens (CPU check)")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.lengths, args.quick = ["tiny"], [200], True
    rows = []
    for model in args.models:
        for length in args.lengths:
            sweep(model, length, args.quick, rows)
    lines = ["| model | T | BV | warps | stages | k norm | ms | us/chunk | check |", "|---|---|---|---|---|---|---|---|---|"]
    for model, length, BV, num_warps, num_stages, norm_k, ms, check in sorted(
            rows, key=lambda r: (r[0], r[1], float("inf") if r[6] is None or r[6] != r[6] else r[6])):
        per_chunk = "-" if ms is None else f"{ms * 1e3 / triton.cdiv(length, 64):.2f}"
        lines.append(f"| {model} | {length} | {BV} | {num_warps} | {num_stages} | {'in' if norm_k else 'pre'} | "
                     f"{'-' if ms is None else f'{ms:.4f}'} | {per_chunk} | {check} |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_gdn_h.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
