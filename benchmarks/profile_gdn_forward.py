"""Where each implementation of the chunked GDN forward (or forward + backward) spends its time, kernel by kernel.

bench_gdn.py times whole calls: ours 0.676 ms against FlashQLA's 0.582 at 9B heads and 16k tokens (H100, 2026-12-06).
This script runs the same calls (same inputs as bench_gdn.py: ours from raw a, b; fla with g, beta given and q/k
normalised in its kernel; FlashQLA with g, beta given and q, k normalised beforehand) under torch.profiler and prints
each CUDA kernel's mean device time per call, so the kernels can be set side by side (which of FlashQLA's beats which
of ours, and by how much).

    python benchmarks/profile_gdn_forward.py [--models 9B] [--lengths 16384] [--batch 1] [--calls 10] [--no-peers]
                                             [--launches] [--train] [--variant NAME:MODULE.FLAG=VALUE[,...] ...]

`--variant` profiles ours again under other kernel options (bench_gdn.py's syntax); `--train` profiles forward +
backward instead (bench_gdn.py's train calls: ours, fla with the gates in its kernels, fla and FlashQLA given g and
beta). fla runs its own kernels (bench_gdn.load_peers sets FLA_FLASH_QLA=0 unless it is set: fla 0.6.0 otherwise
hands these calls to FlashQLA, as the twenty-first session's first profile showed).

Peers load as in bench_gdn.py (fla 0.6.0, FlashQLA 0.1.3 on PYTHONPATH; benchmarks/NOTES.md says how); a peer that
does not load is skipped. Needs a CUDA GPU. With $OUT set the tables also go to $OUT/profile_gdn_forward.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def kernel_table(fn, calls: int, launches: bool = False) -> tuple[list[tuple[str, float, int]], float]:
    """(kernel name, mean ms per call, launches per call) for each CUDA kernel `fn` launches, longest first, and the
    summed device time per call; with `launches`, one row per launch instead, in launch order (name #i: the i-th
    launch of that kernel in a call), so e.g. the state pass's pre-passes and main pass show apart."""
    fn()  # compile and warm up outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    if launches:
        kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                          and e.device_time_total > 0), key=lambda e: e.time_range.start)
        per_call = len(kernels) // calls
        if per_call * calls != len(kernels):
            raise RuntimeError(f"{len(kernels)} kernels in {calls} calls: the calls launch different kernels")
        rows, seen = [], {}
        for i, event in enumerate(kernels[:per_call]):
            seen[event.name] = seen.get(event.name, 0) + 1
            us = sum(kernels[c * per_call + i].device_time_total for c in range(calls)) / calls
            rows.append((f"{event.name} #{seen[event.name]}", us / 1e3, 1))
    else:
        rows = [(event.key, event.device_time_total / 1e3 / calls, event.count // calls)  # (us -> ms)
                for event in prof.key_averages() if event.device_time_total > 0]
        rows.sort(key=lambda row: -row[1])
    return rows, sum(ms for _, ms, _ in rows)


def implementations(model: str, batch: int, length: int, peers: dict, variants: dict) -> dict:
    """The forward calls bench_gdn.bench_forward times, by name (ours under each of `variants` too)."""
    from bench_gdn import HEADS, forward_peer_calls, gdn_inputs, settings_applied

    from hybridlm.ops.delta_rule import gdn_gates
    from hybridlm.ops.triton import chunk_gdn_fwd

    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(batch, length, HEADS[model])
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    calls = {"ours": lambda: chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state,
                                           output_final_state=True)}
    for name, settings in variants.items():
        def variant(settings=settings):
            with settings_applied(settings):
                return calls["ours"]()
        calls[f"ours[{name}]"] = variant
    calls.update(forward_peer_calls(peers, q, k, v, g, beta, state))
    return calls


def train_implementations(model: str, batch: int, length: int, peers: dict, variants: dict) -> dict:
    """The forward + backward calls bench_gdn.bench_train times (ours from raw a, b; the peers' from
    bench_gdn.train_peer_calls), by name."""
    from bench_gdn import DEVICE, HEADS, gdn_inputs, settings_applied, train_peer_calls

    from hybridlm.ops.triton import chunk_gdn

    q, k, v, a, b, A_log, dt_bias, _ = gdn_inputs(batch, length, HEADS[model])
    do = torch.randn(v.shape, generator=torch.Generator(device=DEVICE).manual_seed(6), device=DEVICE).to(v.dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, a, b, A_log, dt_bias)]

    def ours():
        o, _ = chunk_gdn(*leaves)
        return torch.autograd.grad(o, leaves, do)
    calls = {"ours": ours}
    for name, settings in variants.items():
        def variant(settings=settings):
            with settings_applied(settings):
                return ours()
        calls[f"ours[{name}]"] = variant
    for name, (forward, peer_leaves, _) in train_peer_calls(peers, *leaves).items():
        calls[name] = lambda forward=forward, peer_leaves=peer_leaves: torch.autograd.grad(forward(), peer_leaves, do)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["9B"], choices=["9B", "0.8B", "Hv48", "Hv64"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10, help="profiled calls per implementation")
    parser.add_argument("--no-peers", action="store_true", help="profile hybridlm's kernels only")
    parser.add_argument("--launches", action="store_true", help="one row per launch, in launch order")
    parser.add_argument("--train", action="store_true", help="forward + backward (bench_gdn.py's train calls)")
    parser.add_argument("--variant", nargs="+", default=[], metavar="NAME:MODULE.FLAG=VALUE[,...]",
                        help="ours again under these kernel options (bench_gdn.py's --variant)")
    args = parser.parse_args()
    from bench_gdn import load_peers, parse_variants

    variants = parse_variants(args.variant)
    if not torch.cuda.is_available():
        raise SystemExit("profile_gdn_forward.py profiles CUDA kernels: it needs a CUDA GPU")
    peers = load_peers(not args.no_peers)
    out = open(os.path.join(os.environ["OUT"], "profile_gdn_forward.md"), "w") if os.environ.get("OUT") else None

    def emit(*lines):  # each table as soon as it is made: a call cut off by its time limit keeps what ran
        text = "\n".join(lines)
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()

    emit(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for model in args.models:
        for length in args.lengths:
            make = train_implementations if args.train else implementations
            for name, fn in make(model, args.batch, length, peers, variants).items():
                try:
                    rows, total = kernel_table(fn, args.calls, args.launches)
                except Exception as error:  # noqa: BLE001 - one line per failing implementation
                    emit(f"\n{name} {model} {args.batch} x {length}: failed ({type(error).__name__}: "
                         f"{str(error)[:160]})")
                    continue
                kind = "forward + backward" if args.train else "forward"
                emit(f"\n{name}, {model} heads, {args.batch} x {length}, {kind}: {total:.4f} ms of kernels per call",
                     "| kernel | ms per call | launches |\n|---|---|---|",
                     *[f"| {kernel[:90]} | {ms:.4f} | {n} |" for kernel, ms, n in rows])
    if out:
        out.close()


if __name__ == "__main__":
    main()
