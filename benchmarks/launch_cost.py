"""Host cost of one Triton launch, by path, on a CUDA GPU: where the microseconds of a launch go.

    python benchmarks/launch_cost.py [--args 8 24 40] [--launches 2000]

For a do-nothing kernel with N tensor/int arguments and a few constexprs it prints host microseconds per launch:
- jit: `kernel[grid](...)` (Triton's JITFunction.run: binding, specialisation key, cache look-up, launch);
- compiled: the CompiledKernel that call returned, launched as `compiled[grid](*args)` (no binding or key);
- raw: `compiled.run(...)` with the stream, function and metadata looked up once (the C launcher alone);
- hybridlm: `hybridlm.ops.triton.launch.launch` (the cached path every hybridlm kernel takes);
then cProfile's top functions of the jit path.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_kernel(n_args: int):
    """A kernel taking n_args pointer/int arguments (alternating) and two constexprs, storing one value."""
    names = [f"x{i}" for i in range(n_args)]
    src = (f"def probe_{n_args}({', '.join(names)}, BLOCK: tl.constexpr, FLAG: tl.constexpr):\n"
           f"    if FLAG:\n        tl.store(x0 + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))\n")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hybridlm_probe_{n_args}.py")
    with open(path, "w") as f:
        f.write("import triton.language as tl\n" + src)
    namespace = {"tl": tl}
    exec(compile(src, path, "exec"), namespace)
    return triton.jit(namespace[f"probe_{n_args}"])


def main() -> None:
    from triton import knobs
    from triton.runtime import driver

    from profile_gdn_host import host_ms

    from hybridlm.ops.triton.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--args", nargs="+", type=int, default=[8, 24, 40])
    parser.add_argument("--launches", type=int, default=2000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_cost.py needs a CUDA GPU")
    buf = torch.zeros(1024, device="cuda")
    rows = ["| args | jit us | compiled us | raw us | hybridlm us |", "|---|---|---|---|---|"]
    profile_text = ""
    for n in args.args:
        kernel = make_kernel(n)
        values = [buf if i % 2 == 0 else 64 * i for i in range(n)]
        compiled = kernel[(1,)](*values, BLOCK=128, FLAG=True, num_warps=4)
        torch.cuda.synchronize()
        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        full = values + [128, True]
        raw_run, function, packed = compiled.run, compiled.function, compiled.packed_metadata

        def jit():
            kernel[(1,)](*values, BLOCK=128, FLAG=True, num_warps=4)

        def via_compiled():
            compiled[(1, 1, 1)](*full, stream=stream)

        def raw():
            raw_run(1, 1, 1, stream, function, packed, None, None, None, *full)

        def ours():
            launch(kernel, (1,), *values, BLOCK=128, FLAG=True, num_warps=4)

        ours()
        timings = [1e3 * host_ms(f, args.launches) for f in (jit, via_compiled, raw, ours)]
        rows.append(f"| {n} | " + " | ".join(f"{t:.1f}" for t in timings) + " |")
        print(rows[-1], flush=True)
        if n == max(args.args):
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(500):
                jit()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
            profile_text = text.getvalue()
    print(f"triton {triton.__version__}, launch_enter_hook {knobs.runtime.launch_enter_hook}")
    print("\n".join(rows))
    print(f"\ncProfile of the jit path, {max(args.args)} args, 500 launches:\n{profile_text}")


if __name__ == "__main__":
    main()
