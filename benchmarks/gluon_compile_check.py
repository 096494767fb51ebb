"""Compile the Gluon state pass (`hybridlm/ops/triton/gdn_state_pass_gluon.py`) for an H100 (sm_90) without a GPU,
as `compile_check.py` compiles the Triton kernels (which it cannot reach: the wrappers launch the Gluon pass only on
CUDA tensors). Prints registers, spills and shared memory at 9B heads for each V block, for the cut's main pass and
for uncut rows, and (--loop) the order of the copies, waits and tensor-core products in the chunk loop from the TTGIR.

    /tmp/t36/bin/python benchmarks/gluon_compile_check.py   # Triton 3.6, the GPU machine's (NOTES: "t36")

2026-12-08 (Triton 3.6): V blocks of 32 251 registers, no spill, 96 KB; of 64 255 registers, 368 B spilled, 112 KB.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from compile_check import TARGET, ptxas_usage, specialise  # noqa: E402

LOOP_OPS = re.compile(r"(ttg\.async_copy_global_to_local|ttg\.async_wait[^:]*|ttng\.warp_group_dot_wait|"
                      r"ttng\.warp_group_dot|ttg\.local_store|tt\.store)")


def compile_pass(BV: int, cut: bool, length: int = 4096, key_heads: int = 16, value_heads: int = 32, dk: int = 128,
                 dv: int = 128):
    """The compiled kernel for one V block, its arguments laid out as `gdn_chunk` passes them: the cut's main pass
    (q, k, v slices of one projection; four segments; row norms), or (not `cut`) the uncut pass over eight rows with
    q and k normalised beforehand."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from hybridlm.ops.triton.gdn_state_pass_gluon import gdn_fused_pass_gluon_kernel as kernel

    bf16, f32 = torch.bfloat16, torch.float32  # (CPU tensors: only dtypes, strides and alignment matter)
    width = 2 * key_heads * dk + value_heads * dv
    qkv = torch.empty(1, length, width, dtype=bf16)
    q = qkv[..., :key_heads * dk].view(1, length, key_heads, dk)
    k = qkv[..., key_heads * dk:2 * key_heads * dk].view(1, length, key_heads, dk)
    v = qkv[..., 2 * key_heads * dk:].view(1, length, value_heads, dv)
    per_head = (1, length, value_heads)
    norms = [torch.empty(1, length, key_heads, dtype=f32) for _ in range(2)] if cut else [None, None]
    if not cut:  # (normalised copies, as the w/u kernel writes them)
        q, k = (torch.empty(1, length, key_heads, dk, dtype=bf16) for _ in range(2))
    args = (k, q, v, torch.empty(per_head, dtype=bf16), torch.empty(per_head, dtype=f32),
            torch.empty(*per_head, 64, dtype=bf16), torch.empty(*per_head, 64, dtype=bf16), *norms,
            torch.empty(1, length, value_heads, dv, dtype=bf16), torch.empty(8, value_heads, dk, dv, dtype=f32),
            torch.empty(8, value_heads, dk, dv, dtype=f32), torch.empty(4, dtype=torch.int32) if cut else None,
            torch.empty(5, dtype=torch.int32) if cut else None, length // (1 if cut else 8), k.stride(1), q.stride(1),
            v.stride(1))
    options, signature, constexprs, attrs = specialise(kernel, args, dict(
        H=key_heads, HV=value_heads, K=dk, V=dv, BT=64, BV=BV, STORE_FINAL_STATE=True, IS_VARLEN=cut,
        FINAL_SLOT=cut, ROW_NORMS=cut, num_warps=4))
    return triton.compile(GluonASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                          options=options.__dict__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bv", type=int, nargs="+", default=[32, 64], help="V blocks")
    parser.add_argument("--loop", action="store_true", help="print the chunk loop's copies, waits and products")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{TARGET.arch}")
    for cut, BV in ((cut, BV) for cut in (True, False) for BV in args.bv):
        compiled = compile_pass(BV, cut)
        regs = ptxas_usage(compiled.asm["ptx"])
        print(f"{'cut main pass' if cut else 'uncut rows'}, BV {BV}: registers, spill stores, spill loads {regs}; "
              f"shared memory {compiled.metadata.shared} B")
        if args.loop:
            body = compiled.asm["ttgir"].split("scf.for", 1)[-1].split("scf.yield", 1)[0]
            for line in body.splitlines():
                match = LOOP_OPS.search(line)
                if match:
                    print("   ", match.group(1).strip())


if __name__ == "__main__":
    main()
