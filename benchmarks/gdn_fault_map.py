"""Which GDN head dims the chunked kernels run without faulting on this GPU and Triton (the inference forward, then
forward + backward twice).

    python benchmarks/gdn_fault_map.py [--dims 32 64 96 128] [--layouts B2T1 B1T70 packed] [-j 14]
                                       [--set gdn_chunk_bwd.BWD_DQK_BK=32 ...]   # kernel options (as bench_gdn.py)

Each (dk, dv, layout) runs in its own process with CUDA_LAUNCH_BLOCKING=1 (a fault poisons a process, and blocking
launches make the faulting launch raise at its own line), calling `chunk_gdn` directly, so the dispatcher's guard
(`gdn_chunk_bwd.hopper_head_dims_fault`) is not in the way. One line per shape: ok with the worst relative
error against the float64 reference, WRONG with the outputs or gradients more than 1e-2 off it, or FAULT with the
hybridlm line whose launch raised. On an H200 with Triton 3.6 (2026-12-04, value dims 32, 64, 128) dk == dv, the
pairs with both dims >= 64 and 32/128 passed; 32/64, 64/32, 96/32 and 128/32 faulted (benchmarks/NOTES.md, eleventh
session). Layouts: B2T1 = two sequences of one token, B1T70 = one of 70, packed = sequences of 5, 64 and 61 tokens in
one row; step / step-split = the decode step's main / split kernel on three rows (not mapped before 2026-12-04's
twelfth session).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"B2T1": (2, 1, None), "B1T70": (1, 70, None), "packed": (1, 130, [0, 5, 69, 130]),
           "step": (3, 1, None), "step-split": (3, 1, None)}  # the decode step's main and split kernels, 3 rows


def run_step(dk: int, dv: int, split: bool, device: str = "cuda") -> torch.Tensor:
    """The fused decode step twice (bf16, gated norm fused), one key head, two value heads, 3 rows of a pool of 5;
    returns the second step's output."""
    import torch

    from hybridlm.ops.triton import gdn_decode_step

    gen = torch.Generator(device=device).manual_seed(0)
    rows, heads, width = 3, 2, 4
    channels = 2 * dk + heads * dv

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    conv_pool, state_pool = randn(5, channels, width - 1), randn(5, heads, dk, dv, dtype=torch.float32)
    for _ in range(2):
        o = gdn_decode_step(randn(rows, channels), randn(rows, heads, dv), randn(rows, heads), randn(rows, heads),
                            randn(channels, width), randn(heads, dtype=torch.float32),
                            randn(heads, dtype=torch.float32),
                            conv_pool, state_pool, torch.tensor([4, 0, 2], dtype=torch.int32, device=device),
                            num_key_heads=1, key_head_dim=dk, value_head_dim=dv, norm_weight=randn(dv), split=split)
        if device == "cuda":
            torch.cuda.synchronize()
    return o


def run_shape(dk: int, dv: int, layout: str, device: str = "cuda") -> str:
    """In this process: the inference forward, then forward + backward twice at bf16, one key head, two value heads
    (or the decode step, layouts "step*"); 'ok (worst relative error)', 'WRONG ...' (an output or gradient more
    than 1e-2 off the float64 reference: miscompiles need not fault) or 'FAULT at ...'."""
    import torch

    from hybridlm.ops.triton import chunk_gdn
    from tests.ops.test_triton_gdn_chunk import make_inputs
    from tests.ops.test_triton_gdn_chunk_bwd import loss_of, output_grads, reference_grads

    batch, length, offsets = LAYOUTS[layout]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    states = batch if offsets is None else len(offsets) - 1
    *inputs, state = make_inputs(batch, length, 1, 2, dk, dv, torch.bfloat16, states)
    do, dht = output_grads(inputs[2], states, dk, True, torch.bfloat16)
    errors: dict[str, float] = {}

    def compare(name, x, ref):
        if x is not None and ref is not None:
            x, ref = x.double(), ref.double()
            errors[name] = max(errors.get(name, 0.0), ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item())

    try:
        if layout.startswith("step"):
            run_step(dk, dv, split=layout == "step-split", device=device)
            return "ok"
        o_ref, final_ref, grads_ref = reference_grads([*inputs, state], do, dht, cu_seqlens)
        with torch.no_grad():  # the inference forward first: it differs (no X kept; the fold, FUSED_OUTPUT by rule)
            o, final = chunk_gdn(*inputs, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
            synchronize()
        compare("o (inference)", o, o_ref)
        compare("final (inference)", final, final_ref)
        for _ in range(2):
            leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
            o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True, cu_seqlens=cu_seqlens)
            loss_of(o, final, do, dht).backward()
            synchronize()
            compare("o", o, o_ref)
            for name, leaf, ref in zip(("dq", "dk", "dv", "da", "db"), leaves[:5], grads_ref[:5]):
                compare(name, leaf.grad, ref)
            compare("dstate", leaves[7].grad, grads_ref[7])
    except RuntimeError as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "hybridlm" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line[:60]}" if frames else "?"
        return f"FAULT at {where}"
    wrong = {name: err for name, err in errors.items() if not err <= 1e-2}  # (NaN is wrong too)
    if wrong:
        return "WRONG " + " ".join(f"{name} {err:.1e}" for name, err in wrong.items())
    return f"ok ({max(errors.values()):.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 96, 128], help="head dims to pair (dk x dv)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("-j", "--jobs", type=int, default=14)
    parser.add_argument("--set", nargs="+", default=[], metavar="MODULE.FLAG=VALUE",
                        help="kernel options for every shape (hybridlm.ops.triton modules' flags)")
    parser.add_argument("--one", nargs=3, metavar=("DK", "DV", "LAYOUT"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench_gdn import apply_settings

    applied = apply_settings(args.set)  # refused by name before any child starts
    if args.one:
        print("RESULT", run_shape(int(args.one[0]), int(args.one[1]), args.one[2]), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gdn_fault_map.py needs a CUDA GPU (it maps where the kernels fault on one)")
    import triton

    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}"
          + (f"  options {' '.join(applied)}" if applied else ""), flush=True)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")

    def child(shape):
        dk, dv, layout = shape
        command = [sys.executable, __file__, "--one", str(dk), str(dv), layout]
        command += ["--set", *args.set] if args.set else []
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        return shape, lines[0][7:] if lines else f"no result (exit {result.returncode}): {result.stderr[-160:]}"

    shapes = list(itertools.product(args.dims, args.dims, args.layouts))
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for (dk, dv, layout), outcome in pool.map(child, shapes):
            print(f"dk={dk:3d} dv={dv:3d} {layout:6s} {outcome}", flush=True)


if __name__ == "__main__":
    main()
