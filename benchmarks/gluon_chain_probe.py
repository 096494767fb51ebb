"""Does warp specialisation shorten a chunked state chain on Hopper? A probe for the GDN state pass's structure.

The GDN kernels' remaining gap to FlashQLA (benchmarks/NOTES.md, eighteenth and nineteenth sessions) is in the
sequential passes: one program walks a sequence's chunks, and each step's tensor-core products wait on the previous
step's state. FlashQLA (TileLang) runs such passes warp-specialised: producer warps load the next chunks through TMA
while the consumer warpgroup runs the chain. Triton 3.6's automatic warp specialisation does not compile our state
pass for sm_90; Gluon (`triton.experimental.gluon`, in the same Triton) writes the partitions by hand.

This probe times the simplest chain of that shape, per (sequence and head, V block):
    o_t = q_t h,   h <- gamma h + k_t^T v_t          (chunks of 64 tokens, h [dk, BV] in fp32)
three ways on the same inputs: a Gluon kernel with a 1-warp TMA loader partition feeding a ring of STAGES chunk
buffers and the default 4-warp partition running the wgmma chain; the same loop in plain Triton (its software
pipelining); and torch (the reference both are checked against). No intra-chunk term, no delta rule: only the
structure is compared. If the Gluon chain is clearly faster per step, porting the state pass is worth it.

    python benchmarks/gluon_chain_probe.py                 # on a Hopper GPU: check, then time (ms and us/step)
    python benchmarks/gluon_chain_probe.py --compile-only  # no GPU: compile both for sm_90, print registers / smem

Written against Triton 3.6's Gluon (the device's; offline for sm_90 both kernels compile, the Gluon one at 98 KB of
shared memory with 2 stages). Gluon is experimental and its API moves: Triton 3.9's rejects the shared-memory
allocations here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # Gluon ships with Triton from 3.5 (experimental)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as error:  # pragma: no cover - depends on the installed Triton
    raise SystemExit(f"gluon_chain_probe.py needs Triton with Gluon (3.5 or later): {error}")

BT = 64


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, ready, empty, NT, row0, col_v):
    """Worker partition (1 warp): TMA loads of each chunk's q, k and v tiles into the ring."""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    CT: gl.constexpr = q_desc.block_type.shape[0]
    nbytes: gl.constexpr = q_desc.block_type.nbytes + k_desc.block_type.nbytes + v_desc.block_type.nbytes
    for i in range(NT):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(empty.index(s), phase ^ 1)  # (barriers start with phase 1 complete: the first round passes)
        mbarrier.expect(ready.index(s), nbytes)
        row = row0 + i * CT
        tma.async_copy_global_to_shared(q_desc, [row, 0], ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(k_desc, [row, 0], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row, col_v], ready.index(s), v_bufs.index(s))


@gluon.jit
def _chain(q_bufs, k_bufs, v_bufs, ready, empty, h_smem, o, NT, row0, col_v, stride_o, gamma,
           K: gl.constexpr, BV: gl.constexpr, CT: gl.constexpr):
    """Default partition (4 warps): per chunk, o = q h (h staged in shared memory as bf16) and h = gamma h + k^T v,
    both on wgmma; o stored with plain stores."""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    # (one wgmma layout serves h [K, BV] and o [CT, BV]: both are BV wide on four warps)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BV, 16])
    rows = gl.arange(0, CT, layout=gl.SliceLayout(1, mma_layout))
    cols = gl.arange(0, BV, layout=gl.SliceLayout(0, mma_layout))
    h = gl.zeros([K, BV], gl.float32, mma_layout)
    zero_o = gl.zeros([CT, BV], gl.float32, mma_layout)
    for i in range(NT):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(ready.index(s), phase)
        h_smem.store(h.to(gl.bfloat16))
        fence_async_shared()
        b_o = warpgroup_mma(q_bufs.index(s), h_smem, zero_o, use_acc=False, is_async=True)
        h = warpgroup_mma(k_bufs.index(s).permute((1, 0)), v_bufs.index(s), h * gamma, is_async=True)
        b_o, h = warpgroup_mma_wait(num_outstanding=0, deps=(b_o, h))
        mbarrier.arrive(empty.index(s), count=1)
        offsets = (row0 + i * CT + rows)[:, None].to(gl.int64) * stride_o + col_v + cols[None, :]
        gl.store(o + offsets, b_o.to(gl.bfloat16))


@gluon.jit
def chain_ws_kernel(q_desc, k_desc, v_desc, o, T, stride_o, gamma, K: gl.constexpr, BV: gl.constexpr,
                    STAGES: gl.constexpr):
    """One program per (V block, sequence-head): the chunks of rows [nh T, (nh + 1) T) of the [NH T, d] views."""
    CT: gl.constexpr = q_desc.block_type.shape[0]
    i_v, i_nh = gl.program_id(0), gl.program_id(1)
    NT = T // CT
    row0 = i_nh * T
    col_v = i_v * BV
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    h_smem = gl.allocate_shared_memory(gl.bfloat16, [K, BV], gl.NVMMASharedLayout.get_default_for([K, BV],
                                                                                                   gl.bfloat16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize([
        (_chain, (q_bufs, k_bufs, v_bufs, ready, empty, h_smem, o, NT, row0, col_v, stride_o, gamma, K, BV, CT)),
        (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, ready, empty, NT, row0, col_v)),
    ], [1], [24])


@triton.jit
def chain_tl_kernel(q, k, v, o, T, stride_v, gamma, K: tl.constexpr, BV: tl.constexpr, CT: tl.constexpr):
    """The same chain in plain Triton (the loop software-pipelined by num_stages)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    row0 = i_nh.to(tl.int64) * T
    o_t = tl.arange(0, CT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    h = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, T // CT):
        rows = row0 + i * CT + o_t
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :])
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :])
        b_v = tl.load(v + rows[:, None] * stride_v + o_v[None, :])
        b_o = tl.dot(b_q, h.to(b_q.dtype))
        h = h * gamma + tl.dot(tl.trans(b_k), b_v)
        tl.store(o + rows[:, None] * stride_v + o_v[None, :], b_o.to(o.dtype.element_ty))


def reference(q, k, v, gamma):
    """torch, fp32 state, h rounded to bf16 where the kernels round it (the o product's operand)."""
    nh, length, dk = q.shape
    h = torch.zeros(nh, dk, v.shape[-1], dtype=torch.float32, device=q.device)
    out = torch.empty_like(v)
    for i in range(0, length, BT):
        out[:, i:i + BT] = (q[:, i:i + BT].float() @ h.to(torch.bfloat16).float()).to(v.dtype)
        h = h * gamma + k[:, i:i + BT].float().transpose(1, 2) @ v[:, i:i + BT].float()
    return out


def launch_ws(q, k, v, o, gamma, BV, stages, num_warps=4):
    nh, length, dk = q.shape
    dv = v.shape[-1]
    q2, k2, v2 = q.reshape(nh * length, dk), k.reshape(nh * length, dk), v.reshape(nh * length, dv)
    qk_layout = gl.NVMMASharedLayout.get_default_for([BT, dk], gl.bfloat16)
    v_layout = gl.NVMMASharedLayout.get_default_for([BT, BV], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(q2, [BT, dk], qk_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [BT, dk], qk_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [BT, BV], v_layout)
    chain_ws_kernel[(dv // BV, nh)](q_desc, k_desc, v_desc, o, length, dv, gamma, K=dk, BV=BV, STAGES=stages,
                                    num_warps=num_warps)


def launch_tl(q, k, v, o, gamma, BV, stages, num_warps=4):
    nh, length, dk = q.shape
    dv = v.shape[-1]
    chain_tl_kernel[(dv // BV, nh)](q, k, v, o, length, dv, gamma, K=dk, BV=BV, CT=BT, num_warps=num_warps,
                                    num_stages=stages)


def compile_only(args) -> None:
    """Compile both kernels for sm_90 without a GPU (as benchmarks/compile_check.py does) and print their resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", 90, 32)
    dk, dv = args.dk, args.dv
    qk_layout = gl.NVMMASharedLayout.get_default_for([BT, dk], gl.bfloat16)
    v_layout = gl.NVMMASharedLayout.get_default_for([BT, args.bv], gl.bfloat16)
    for stages in args.stages:
        signature = {"q_desc": f"tensordesc<bf16[{BT}, {dk}],{qk_layout!r}>",
                     "k_desc": f"tensordesc<bf16[{BT}, {dk}],{qk_layout!r}>",
                     "v_desc": f"tensordesc<bf16[{BT}, {args.bv}],{v_layout!r}>",
                     "o": "*bf16", "T": "i32", "stride_o": "i32", "gamma": "fp32",
                     "K": "constexpr", "BV": "constexpr", "STAGES": "constexpr"}
        constexprs = {(7,): dk, (8,): args.bv, (9,): stages}
        report(f"gluon ws STAGES={stages}", lambda: triton.compile(
            GluonASTSource(chain_ws_kernel, signature, constexprs=constexprs), target=target,
            options=dict(num_warps=4)))
        signature = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "T": "i32", "stride_v": "i32",
                     "gamma": "fp32", "K": "constexpr", "BV": "constexpr", "CT": "constexpr"}
        constexprs = {(7,): dk, (8,): args.bv, (9,): BT}
        report(f"triton    num_stages={stages}", lambda: triton.compile(
            ASTSource(chain_tl_kernel, signature, constexprs=constexprs), target=target,
            options=dict(num_warps=4, num_stages=stages)))


def report(label, build) -> None:
    try:
        compiled = build()
    except Exception as error:  # noqa: BLE001 - reported per kernel
        print(f"FAIL {label}: {type(error).__name__}: {str(error).strip().splitlines()[:8]}")
        return
    from compile_check import ptxas_usage

    usage = ptxas_usage(compiled.asm["ptx"])
    regs = f"{usage[0]} regs, spill {usage[1]}/{usage[2]} B" if usage else "regs ?"
    print(f"OK   {label}: {regs}, smem {compiled.metadata.shared} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 without a GPU")
    parser.add_argument("--heads", type=int, default=128, help="sequences x heads (programs per V block)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--bv", type=int, default=64)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args()
    if args.length % BT or args.dv % args.bv:
        raise SystemExit(f"--length must be a multiple of {BT} and --dv of --bv")
    if args.compile_only:
        compile_only(args)
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("gluon_chain_probe.py times Hopper's wgmma and TMA: it needs an sm_90 GPU "
                         "(--compile-only compiles without one)")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    nh, length = args.heads, args.length
    q = (torch.randn(nh, length, args.dk, generator=gen, device="cuda") / args.dk ** 0.5).to(torch.bfloat16)
    k = (torch.randn(nh, length, args.dk, generator=gen, device="cuda") / args.dk ** 0.5).to(torch.bfloat16)
    v = torch.randn(nh, length, args.dv, generator=gen, device="cuda").to(torch.bfloat16)
    gamma = 0.9
    expected = reference(q, k, v, gamma).float()
    steps = length // BT
    rows = []
    for name, launch in (("gluon ws", launch_ws), ("triton", launch_tl)):
        for stages in args.stages:
            o = torch.zeros_like(v)
            try:
                launch(q, k, v, o, gamma, args.bv, stages)
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 - a row per failure
                rows.append((name, stages, float("nan"), float("nan"), f"{type(error).__name__}: {error}"[:120]))
                continue
            err = ((o.float() - expected).norm() / expected.norm()).item()
            ms = triton.testing.do_bench(lambda: launch(q, k, v, o, gamma, args.bv, stages), warmup=20, rep=100,
                                         return_mode="median")
            rows.append((name, stages, ms, ms * 1e3 / steps, f"rel err {err:.1e}" + (" FAIL" if err > 1e-2 else "")))
    print(f"\n{torch.cuda.get_device_name()}, {nh} sequence-heads x {length} tokens, dk {args.dk}, dv {args.dv}, "
          f"BV {args.bv} ({args.dv // args.bv * nh} programs, {steps} chunk steps each)")
    print("| kernel | stages | ms | us per chunk step | check |\n|---|---|---|---|---|")
    for name, stages, ms, us, note in rows:
        print(f"| {name} | {stages} | {ms:.4f} | {us:.2f} | {note} |")


if __name__ == "__main__":
    main()
