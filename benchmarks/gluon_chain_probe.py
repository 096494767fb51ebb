"""Does warp specialisation shorten a chunked state chain on Hopper? A probe for the GDN state pass's structure.

The GDN kernels' remaining gap to FlashQLA (benchmarks/NOTES.md, eighteenth and nineteenth sessions) is in the
sequential passes: one program walks a sequence's chunks, and each step's tensor-core products wait on the previous
step's state. FlashQLA (TileLang) runs such passes warp-specialised: producer warps load the next chunks through TMA
while the consumer warpgroup runs the chain. Triton 3.6's automatic warp specialisation does not compile our state
pass for sm_90; Gluon (`triton.experimental.gluon`, in the same Triton) writes the partitions by hand.

This probe times two chains per (sequence and head, V block), chunks of 64 tokens, h [dk, BV] in fp32:
    simple: o_t = q_t h,   h <- gamma h + k_t^T v_t
    delta:  the fused state pass's products (gdn_chunk.chunk_gdn_fwd_h_kernel with FUSED_O): v_new = u - w h;
            o = (q h) exp(G) + A v_new;   h <- exp(G_last) h + k^T (v_new exp(G_last - G))
as a Gluon kernel (a 1-warp TMA loader partition feeding a ring of STAGES chunk buffers, and one 4-warp wgmma
consumer; for delta also two consumer warpgroups that share each chunk's q, k, w, A tiles, V halves of BV), as the same
loop in plain Triton (its software pipelining; for delta also 2 BV wide at 8 warps), and in torch (the reference all
are checked against).

Measured (H100, 2026-12-06, benchmarks/RESULTS.md): plain Triton at 3 stages won the delta chain at 128 heads x 4k
(0.256 ms; Gluon 0.280, two warpgroups 0.288) and at 32 x 16k (0.398; Gluon 0.459, two warpgroups 0.770).

    python benchmarks/gluon_chain_probe.py [--chain delta]  # on a Hopper GPU: check, then time (ms and us/step)
    python benchmarks/gluon_chain_probe.py --compile-only   # no GPU: compile all for sm_90, print registers / smem

Written against Triton 3.6's Gluon (the device's; offline for sm_90 all kernels compile: the simple Gluon one at 98 KB
of shared memory with 2 stages, the delta one at 164 KB, with two warpgroups 213 KB). Gluon is experimental and its API moves: Triton 3.9's rejects the shared-memory
allocations here.
"""
from __future__ import annotations

import argparse
import functools
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
CONSUMER_REGS = 232  # registers per thread of the second consumer warpgroup (delta_ws_kernel with HALVES = 2)


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


@gluon.jit
def _delta_loader(q_desc, k_desc, w_desc, u_desc, a_desc, q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, NT,
                  row0, col_v):
    """Worker partition (1 warp): TMA loads of each chunk's q, k, w, A and u tiles into the ring, u as one BV-wide
    tile per consumer warpgroup."""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    HALVES: gl.constexpr = u_bufs.type.shape[0] // STAGES
    CT: gl.constexpr = q_desc.block_type.shape[0]
    BV: gl.constexpr = u_desc.block_type.shape[1]
    nbytes: gl.constexpr = (q_desc.block_type.nbytes + k_desc.block_type.nbytes + w_desc.block_type.nbytes
                            + HALVES * u_desc.block_type.nbytes + a_desc.block_type.nbytes)
    for i in range(NT):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(empty.index(s), phase ^ 1)
        mbarrier.expect(ready.index(s), nbytes)
        row = row0 + i * CT
        tma.async_copy_global_to_shared(q_desc, [row, 0], ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(k_desc, [row, 0], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(w_desc, [row, 0], ready.index(s), w_bufs.index(s))
        for half in gl.static_range(HALVES):
            tma.async_copy_global_to_shared(u_desc, [row, col_v + half * BV], ready.index(s),
                                            u_bufs.index(HALVES * s + half))
        tma.async_copy_global_to_shared(a_desc, [row, 0], ready.index(s), a_bufs.index(s))


@gluon.jit
def _delta_consumer(q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all, g, o, NT, row0,
                    col_v, stride_o, HALF: gl.constexpr):
    """One consumer warpgroup (4 warps): the fused state pass's chain per chunk (gdn_chunk.chunk_gdn_fwd_h_kernel
    with FUSED_O, A_GIVEN, Q_NORMED) for V half HALF of the program's block: v_new = u - w h; o = (q h) exp(G) +
    A v_new; h = exp(G_last) h + k^T (v_new exp(G_last - G)); the products on wgmma, h and both roundings of v_new
    staged in shared memory. The halves share each chunk's q, k, w and A tiles. (Tile sizes come from the buffers'
    shapes: constexpr arguments do not reach a worker partition as constexprs in Triton 3.6.)"""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    CT: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    HALVES: gl.constexpr = h_all.type.shape[0]
    BV: gl.constexpr = h_all.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BV, 16])
    h_smem = h_all.index(HALF)
    vn_smem = vn_all.index(HALF)
    vd_smem = vd_all.index(HALF)
    rows = gl.arange(0, CT, layout=gl.SliceLayout(1, mma_layout))
    cols = gl.arange(0, BV, layout=gl.SliceLayout(0, mma_layout))
    h = gl.zeros([K, BV], gl.float32, mma_layout)
    zero_o = gl.zeros([CT, BV], gl.float32, mma_layout)
    b_g = gl.load(g + row0 + rows)  # the gates one chunk ahead, in registers (their loads off the chain)
    b_g_last = gl.load(g + row0 + CT - 1)
    for i in range(NT):
        s = i % STAGES
        phase = (i // STAGES) & 1
        row = row0 + i * CT
        row_next = row0 + gl.minimum(i + 1, NT - 1) * CT
        g_next = gl.load(g + row_next + rows)
        g_last_next = gl.load(g + row_next + CT - 1)
        mbarrier.wait(ready.index(s), phase)
        h_smem.store(h.to(gl.bfloat16))
        fence_async_shared()
        b_wh = warpgroup_mma(w_bufs.index(s), h_smem, zero_o, use_acc=False, is_async=True)  # (on the chain: first)
        b_o = warpgroup_mma(q_bufs.index(s), h_smem, zero_o, use_acc=False, is_async=True)
        b_wh = warpgroup_mma_wait(num_outstanding=1, deps=(b_wh,))
        b_v = u_bufs.index(HALVES * s + HALF).load(mma_layout).to(gl.float32) - b_wh
        vn_smem.store(b_v.to(gl.bfloat16))
        vd_smem.store((b_v * gl.exp(b_g_last - b_g)[:, None]).to(gl.bfloat16))
        fence_async_shared()
        h = warpgroup_mma(k_bufs.index(s).permute((1, 0)), vd_smem, h * gl.exp(b_g_last), is_async=True)
        b_o = warpgroup_mma_wait(num_outstanding=1, deps=(b_o,))
        b_o = warpgroup_mma(a_bufs.index(s), vn_smem, b_o * gl.exp(b_g)[:, None], is_async=True)
        h, b_o = warpgroup_mma_wait(num_outstanding=0, deps=(h, b_o))
        mbarrier.arrive(empty.index(s), count=1)
        offsets = (row + rows)[:, None].to(gl.int64) * stride_o + col_v + HALF * BV + cols[None, :]
        gl.store(o + offsets, b_o.to(gl.bfloat16))
        b_g, b_g_last = g_next, g_last_next


@gluon.jit
def _delta_low(q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all, g, o, NT, row0, col_v,
               stride_o):
    _delta_consumer(q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all, g, o, NT, row0,
                    col_v, stride_o, 0)


@gluon.jit
def _delta_high(q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all, g, o, NT, row0, col_v,
                stride_o):
    _delta_consumer(q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all, g, o, NT, row0,
                    col_v, stride_o, 1)


@gluon.jit
def _delta_buffers(q_desc, k_desc, w_desc, u_desc, a_desc, STAGES: gl.constexpr, HALVES: gl.constexpr):
    """The delta kernels' shared memory: the load ring, h and the two v_new tiles per consumer, the barriers (a stage
    is released once every consumer has read it)."""
    CT: gl.constexpr = q_desc.block_type.shape[0]
    K: gl.constexpr = q_desc.block_type.shape[1]
    BV: gl.constexpr = u_desc.block_type.shape[1]
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    u_bufs = gl.allocate_shared_memory(u_desc.dtype, [HALVES * STAGES] + u_desc.block_type.shape, u_desc.layout)
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    h_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K, BV], gl.bfloat16)
    v_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CT, BV], gl.bfloat16)
    h_all = gl.allocate_shared_memory(gl.bfloat16, [HALVES, K, BV], h_layout)
    vn_all = gl.allocate_shared_memory(gl.bfloat16, [HALVES, CT, BV], v_layout)
    vd_all = gl.allocate_shared_memory(gl.bfloat16, [HALVES, CT, BV], v_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=HALVES)
    return q_bufs, k_bufs, w_bufs, u_bufs, a_bufs, ready, empty, h_all, vn_all, vd_all


@gluon.jit
def delta_ws_kernel(q_desc, k_desc, w_desc, u_desc, a_desc, g, o, T, stride_o, K: gl.constexpr, BV: gl.constexpr,
                    STAGES: gl.constexpr, HALVES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """One program per (HALVES x BV-wide V block, sequence-head): HALVES consumer warpgroups of 4 warps (V blocks of
    BV) and a 1-warp loader. With two, q, k, w and A are read once per chunk for both halves, whose states one 4-warp
    Triton program cannot hold in registers (benchmarks/NOTES.md, nineteenth session: FUSED_OUTPUT_BV=128 spills);
    CONSUMER_REGS: registers per thread of the second warpgroup."""
    CT: gl.constexpr = q_desc.block_type.shape[0]
    i_v, i_nh = gl.program_id(0), gl.program_id(1)
    NT = T // CT
    row0 = i_nh * T
    col_v = i_v * HALVES * BV
    bufs = _delta_buffers(q_desc, k_desc, w_desc, u_desc, a_desc, STAGES, HALVES)
    consumer_args = bufs + (g, o, NT, row0, col_v, stride_o)
    loader_args = (q_desc, k_desc, w_desc, u_desc, a_desc) + bufs[:7] + (NT, row0, col_v)
    if HALVES == 2:
        gl.warp_specialize([(_delta_low, consumer_args), (_delta_high, consumer_args), (_delta_loader, loader_args)],
                           [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_delta_low, consumer_args), (_delta_loader, loader_args)], [1], [24])


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


@triton.jit
def delta_tl_kernel(q, k, w, u, a, g, o, T, stride_v, K: tl.constexpr, BV: tl.constexpr, CT: tl.constexpr):
    """The delta chain in plain Triton: the same products in the order of gdn_chunk's fused state pass."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    row0 = i_nh.to(tl.int64) * T
    o_t = tl.arange(0, CT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    h = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, T // CT):
        rows = row0 + i * CT + o_t
        b_g = tl.load(g + rows)
        b_g_last = tl.load(g + row0 + i * CT + CT - 1)
        b_hd = h.to(q.dtype.element_ty)
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :])
        b_o = tl.dot(b_q, b_hd) * tl.exp(b_g)[:, None]
        b_a = tl.load(a + rows[:, None] * CT + o_t[None, :])
        b_w = tl.load(w + rows[:, None] * K + o_k[None, :])
        b_v = tl.load(u + rows[:, None] * stride_v + o_v[None, :]).to(tl.float32) - tl.dot(b_w, b_hd)
        b_o += tl.dot(b_a, b_v.to(b_hd.dtype))
        tl.store(o + rows[:, None] * stride_v + o_v[None, :], b_o.to(o.dtype.element_ty))
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :])
        b_vd = (b_v * tl.exp(b_g_last - b_g)[:, None]).to(b_hd.dtype)
        h = h * tl.exp(b_g_last) + tl.dot(tl.trans(b_k), b_vd)


def reference(q, k, v, gamma):
    """torch, fp32 state, h rounded to bf16 where the kernels round it (the o product's operand)."""
    nh, length, dk = q.shape
    h = torch.zeros(nh, dk, v.shape[-1], dtype=torch.float32, device=q.device)
    out = torch.empty_like(v)
    for i in range(0, length, BT):
        out[:, i:i + BT] = (q[:, i:i + BT].float() @ h.to(torch.bfloat16).float()).to(v.dtype)
        h = h * gamma + k[:, i:i + BT].float().transpose(1, 2) @ v[:, i:i + BT].float()
    return out


def delta_reference(q, k, w, u, a, g):
    """torch, fp32 state, with the kernels' bf16 roundings (h, v_new and its decayed copy as dot operands)."""
    nh, length, dk = q.shape
    h = torch.zeros(nh, dk, u.shape[-1], dtype=torch.float32, device=q.device)
    out = torch.empty_like(u)
    bf = torch.bfloat16
    for i in range(0, length, BT):
        sl = slice(i, i + BT)
        b_g, b_g_last = g[:, sl, None], g[:, i + BT - 1, None, None]
        hd = h.to(bf).float()
        b_v = u[:, sl].float() - w[:, sl].float() @ hd
        out[:, sl] = ((q[:, sl].float() @ hd) * b_g.exp() + a[:, sl].float() @ b_v.to(bf).float()).to(u.dtype)
        h = h * b_g_last.exp() + k[:, sl].float().transpose(1, 2) @ (b_v * (b_g_last - b_g).exp()).to(bf).float()
    return out


def delta_inputs(nh, length, dk, dv, gen):
    """Inputs on the scale of the real pass's: unit-norm-ish keys and queries, a small w (so the state stays
    bounded), a lower-triangular A, and per-chunk cumulative log decays."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)
    q, k = rand(nh, length, dk, scale=dk ** -0.5), rand(nh, length, dk, scale=dk ** -0.5)
    w = rand(nh, length, dk, scale=0.1 * dk ** -0.5)
    u = rand(nh, length, dv)
    a = (torch.randn(nh, length // BT, BT, BT, generator=gen, device="cuda") * 0.1).tril().reshape(nh, length, BT)
    a = a.to(torch.bfloat16)
    g = -(torch.rand(nh, length // BT, BT, generator=gen, device="cuda") * 0.02).cumsum(-1).reshape(nh, length)
    return q, k, w, u, a, g.contiguous()


def launch_delta_ws(q, k, w, u, a, g, o, BV, stages, halves=1, consumer_regs=CONSUMER_REGS):
    nh, length, dk = q.shape
    dv = u.shape[-1]
    qk_layout = gl.NVMMASharedLayout.get_default_for([BT, dk], gl.bfloat16)
    v_layout = gl.NVMMASharedLayout.get_default_for([BT, BV], gl.bfloat16)
    a_layout = gl.NVMMASharedLayout.get_default_for([BT, BT], gl.bfloat16)
    descs = [TensorDescriptor.from_tensor(t.reshape(nh * length, dk), [BT, dk], qk_layout) for t in (q, k, w)]
    descs.append(TensorDescriptor.from_tensor(u.reshape(nh * length, dv), [BT, BV], v_layout))
    descs.append(TensorDescriptor.from_tensor(a.reshape(nh * length, BT), [BT, BT], a_layout))
    delta_ws_kernel[(dv // (halves * BV), nh)](*descs, g, o, length, dv, K=dk, BV=BV, STAGES=stages, HALVES=halves,
                                               CONSUMER_REGS=consumer_regs, num_warps=4)


def launch_delta_tl(q, k, w, u, a, g, o, BV, stages, num_warps=4):
    nh, length, dk = q.shape
    dv = u.shape[-1]
    delta_tl_kernel[(dv // BV, nh)](q, k, w, u, a, g, o, length, dv, K=dk, BV=BV, CT=BT, num_warps=num_warps,
                                    num_stages=stages)


def launch_ws(q, k, v, gamma, o, BV, stages, num_warps=4):
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


def launch_tl(q, k, v, gamma, o, BV, stages, num_warps=4):
    nh, length, dk = q.shape
    dv = v.shape[-1]
    chain_tl_kernel[(dv // BV, nh)](q, k, v, o, length, dv, gamma, K=dk, BV=BV, CT=BT, num_warps=num_warps,
                                    num_stages=stages)


def compile_only(args) -> None:
    """Compile the kernels for sm_90 without a GPU (as benchmarks/compile_check.py does) and print their resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", 90, 32)
    dk = args.dk
    qk_layout = gl.NVMMASharedLayout.get_default_for([BT, dk], gl.bfloat16)
    v_layout = gl.NVMMASharedLayout.get_default_for([BT, args.bv], gl.bfloat16)
    a_layout = gl.NVMMASharedLayout.get_default_for([BT, BT], gl.bfloat16)
    qk_desc = f"tensordesc<bf16[{BT}, {dk}],{qk_layout!r}>"
    v_desc = f"tensordesc<bf16[{BT}, {args.bv}],{v_layout!r}>"
    a_desc = f"tensordesc<bf16[{BT}, {BT}],{a_layout!r}>"
    for chain in args.chain:
        for stages in args.stages:
            if chain == "simple":
                signature = {"q_desc": qk_desc, "k_desc": qk_desc, "v_desc": v_desc, "o": "*bf16", "T": "i32",
                             "stride_o": "i32", "gamma": "fp32", "K": "constexpr", "BV": "constexpr",
                             "STAGES": "constexpr"}
                ws_kernel, tl_kernel, first = chain_ws_kernel, chain_tl_kernel, 7
                tl_signature = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "T": "i32",
                                "stride_v": "i32", "gamma": "fp32", "K": "constexpr", "BV": "constexpr",
                                "CT": "constexpr"}
            else:
                signature = {"q_desc": qk_desc, "k_desc": qk_desc, "w_desc": qk_desc, "u_desc": v_desc,
                             "a_desc": a_desc, "g": "*fp32", "o": "*bf16", "T": "i32", "stride_o": "i32",
                             "K": "constexpr", "BV": "constexpr", "STAGES": "constexpr", "HALVES": "constexpr",
                             "CONSUMER_REGS": "constexpr"}
                ws_kernel, tl_kernel, first = delta_ws_kernel, delta_tl_kernel, 9
                tl_signature = {"q": "*bf16", "k": "*bf16", "w": "*bf16", "u": "*bf16", "a": "*bf16", "g": "*fp32",
                                "o": "*bf16", "T": "i32", "stride_v": "i32", "K": "constexpr", "BV": "constexpr",
                                "CT": "constexpr"}
            constexprs = {(first,): dk, (first + 1,): args.bv, (first + 2,): stages}
            if chain == "delta":
                constexprs.update({(first + 3,): 1, (first + 4,): CONSUMER_REGS})
            report(f"{chain} gluon ws STAGES={stages}", lambda: triton.compile(
                GluonASTSource(ws_kernel, signature, constexprs=constexprs), target=target,
                options=dict(num_warps=4)))
            constexprs = {(first,): dk, (first + 1,): args.bv, (first + 2,): BT}
            report(f"{chain} triton    num_stages={stages}", lambda: triton.compile(
                ASTSource(tl_kernel, tl_signature, constexprs=constexprs), target=target,
                options=dict(num_warps=4, num_stages=stages)))
            if chain == "delta":
                constexprs = {(first,): dk, (first + 1,): args.bv, (first + 2,): stages, (first + 3,): 2,
                              (first + 4,): CONSUMER_REGS}
                report(f"{chain} gluon ws 2 WG STAGES={stages}", lambda: triton.compile(
                    GluonASTSource(delta_ws_kernel, signature, constexprs=constexprs), target=target,
                    options=dict(num_warps=4)))
                constexprs = {(first,): dk, (first + 1,): 2 * args.bv, (first + 2,): BT}
                report(f"{chain} triton 2BV w8 num_stages={stages}", lambda: triton.compile(
                    ASTSource(tl_kernel, tl_signature, constexprs=constexprs), target=target,
                    options=dict(num_warps=8, num_stages=stages)))


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
    parser.add_argument("--chain", nargs="+", choices=("simple", "delta"), default=["simple", "delta"],
                        help="simple: o = q h, h = gamma h + k^T v; delta: the fused state pass's products")
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
    steps = length // BT
    rows = []
    for chain in args.chain:
        if chain == "simple":
            q = (torch.randn(nh, length, args.dk, generator=gen, device="cuda") / args.dk ** 0.5).to(torch.bfloat16)
            k = (torch.randn(nh, length, args.dk, generator=gen, device="cuda") / args.dk ** 0.5).to(torch.bfloat16)
            v = torch.randn(nh, length, args.dv, generator=gen, device="cuda").to(torch.bfloat16)
            inputs, expected = (q, k, v, 0.9), reference(q, k, v, 0.9).float()
            launches = (("gluon ws", launch_ws), ("triton", launch_tl))
        else:
            inputs = delta_inputs(nh, length, args.dk, args.dv, gen)
            expected = delta_reference(*inputs).float()
            launches = (("gluon ws", launch_delta_ws), ("gluon ws 2 WG", functools.partial(launch_delta_ws, halves=2)), ("triton", launch_delta_tl),
                        ("triton 2BV w8", lambda *a_: launch_delta_tl(*a_[:-2], 2 * a_[-2], a_[-1], num_warps=8)))
        out_like = inputs[2] if chain == "simple" else inputs[3]
        for name, launch in launches:
            for stages in args.stages:
                o = torch.zeros_like(out_like)
                try:
                    launch(*inputs, o, args.bv, stages)
                    torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001 - a row per failure
                    rows.append((chain, name, stages, float("nan"), float("nan"),
                                 f"{type(error).__name__}: {error}"[:120]))
                    continue
                err = ((o.float() - expected).norm() / expected.norm()).item()
                ms = triton.testing.do_bench(functools.partial(launch, *inputs, o, args.bv, stages), warmup=20,
                                             rep=100, return_mode="median")
                rows.append((chain, name, stages, ms, ms * 1e3 / steps,
                             f"rel err {err:.1e}" + (" FAIL" if err > 1e-2 else "")))
        del inputs, expected  # (the next chain's tensors in their place)
    print(f"\n{torch.cuda.get_device_name()}, {nh} sequence-heads x {length} tokens, dk {args.dk}, dv {args.dv}, "
          f"BV {args.bv} ({args.dv // args.bv * nh} programs, {steps} chunk steps each)")
    print("| chain | kernel | stages | ms | us per chunk step | check |\n|---|---|---|---|---|---|")
    for chain, name, stages, ms, us, note in rows:
        print(f"| {chain} | {name} | {stages} | {ms:.4f} | {us:.2f} | {note} |")

if __name__ == "__main__":
    main()
