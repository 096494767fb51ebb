"""Offline probe (no GPU): a Gluon kernel whose loop places its own asynchronous copies, compiled for an H100 (sm_90)
as `compile_check.py` compiles the Triton kernels, printing its registers, spills, shared memory and the loop's
copy / wait / wgmma order from the TTGIR.

Why: Triton's pipeliner issues the copies of step t + 1 at the end of step t and waits for them at the start of
step t + 1, so in the GDN state pass (every product waited at once) each chunk step waits one global load
(benchmarks/NOTES.md, fortieth session). Gluon (`triton.experimental.gluon`, in Triton 3.6) lets a kernel issue the
next chunk's copy at the start of a step into the other of two buffers and wait for it a step later
(`wait_group(1)`), with the same shared memory as two stages. This probe is that loop reduced to one product
(k_t @ h summed over chunks).

    /tmp/t36/bin/python benchmarks/gluon_probe.py   # Triton 3.6, the GPU machine's version (NOTES: "t36")

2026-12-08 (Triton 3.6): 61 registers, no spill, 48 KB of shared memory; in the loop the copy for t + 1, its commit,
`async_wait {num = 1}`, then the wgmma.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_check import TARGET, ptxas_usage, specialise  # noqa: E402


@gluon.jit
def prefetch_probe(k, h, out, NT, BT: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr):
    """out = sum over chunks t of k_t @ h: k [NT, BT, BK] bf16, h [BK, BV] bf16, out [BT, BV] fp32; 4 warps."""
    load_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BV, 16])
    smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BT, BK], smem_l)
    o_r = gl.arange(0, BT, layout=gl.SliceLayout(1, load_l))
    o_c = gl.arange(0, BK, layout=gl.SliceLayout(0, load_l))
    offs = o_r[:, None] * BK + o_c[None, :]
    o_hr = gl.arange(0, BK, layout=gl.SliceLayout(1, load_l))
    o_hc = gl.arange(0, BV, layout=gl.SliceLayout(0, load_l))
    h_smem = gl.allocate_shared_memory(gl.bfloat16, [BK, BV], smem_l, gl.load(h + o_hr[:, None] * BV + o_hc[None, :]))
    cp.async_copy_global_to_shared(k_smem.index(0), k + offs)
    cp.commit_group()
    acc = gl.zeros([BT, BV], gl.float32, layout=mma_l)
    for t in range(NT):
        # the next chunk's copy first, into the other buffer: it lands while this step computes
        cp.async_copy_global_to_shared(k_smem.index((t + 1) % 2), k + (t + 1) * BT * BK + offs,
                                       mask=(o_r[:, None] >= 0) & (t + 1 < NT))
        cp.commit_group()
        cp.wait_group(1)  # this step's copy (issued a step ago) has landed; the next one stays in flight
        fence_async_shared()
        acc = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(t % 2), h_smem, acc, is_async=True)])
    o_mr = gl.arange(0, BT, layout=gl.SliceLayout(1, mma_l))
    o_mc = gl.arange(0, BV, layout=gl.SliceLayout(0, mma_l))
    gl.store(out + o_mr[:, None] * BV + o_mc[None, :], acc)


def main() -> None:
    BT, BK, BV, NT = 64, 128, 64, 4
    k = torch.empty(NT * BT * BK, dtype=torch.bfloat16)  # (CPU tensors: only their dtypes and alignment matter)
    h = torch.empty(BK * BV, dtype=torch.bfloat16)
    out = torch.empty(BT * BV, dtype=torch.float32)
    options, signature, constexprs, attrs = specialise(prefetch_probe, (k, h, out, NT),
                                                       dict(BT=BT, BK=BK, BV=BV, num_warps=4))
    compiled = triton.compile(GluonASTSource(prefetch_probe, signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options=options.__dict__)
    usage = ptxas_usage(compiled.asm["ptx"])
    print(f"triton {triton.__version__}, sm_{TARGET.arch}: registers, spill stores, spill loads {usage}; "
          f"shared memory {compiled.metadata.shared} B")
    loop = compiled.asm["ttgir"].split("scf.for", 1)[-1]
    for line in loop.splitlines():
        match = re.search(r"(ttg\.async_copy_global_to_local|ttg\.async_commit_group|ttg\.async_wait[^:]*|"
                          r"ttng\.warp_group_dot_wait|ttng\.warp_group_dot)", line)
        if match:
            print("  ", match.group(1).strip())
        if "scf.yield" in line:
            break


if __name__ == "__main__":
    main()
