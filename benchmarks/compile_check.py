"""Compile every Triton kernel of hybridlm/ops/triton for an H100 (sm_90) without a GPU.

Usage:
    python benchmarks/compile_check.py            # prints the table; exit 1 if any FAIL (or a kernel no config reaches)
    python benchmarks/compile_check.py -k 9B      # only the configurations whose label contains "9B"
    python benchmarks/compile_check.py -k prepare # every way of running the GDN prepare step (gdn_chunk's flags)
    python benchmarks/compile_check.py -v         # also each launch's signature and constexprs
    python benchmarks/compile_check.py --set gdn_chunk_bwd.BWD_WY_KB_MAXNREG=168 -k "gdn_bwd Hv=32 9B"  # options

Run it with the Triton of the GPU machine (e.g. a venv holding triton==3.6.0): kernels that the CPU interpreter
accepts can still be rejected by the compiler (a variable re-bound with another shape inside an `if`), and an
older Triton rejects more. TRITON_INTERPRET must be unset (the script refuses otherwise).

How: each configuration calls the real host wrapper (`chunk_gdn_fwd`, `gdn_decode_step`, ...) on small CPU
tensors of the model's shapes, with `JITFunction.run` replaced by a recorder, so the launches (constexprs,
pointer dtypes, None arguments, num_warps/num_stages) are exactly the ones the wrapper makes. Each recorded
launch is specialised by Triton's own binder, as the JIT would do it on the GPU (16-byte alignment of pointers,
integers divisible by 16 or equal to 1), and compiled ahead of time with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`. Registers and spills come from running the bundled ptxas -v on the PTX;
shared memory is the compiled kernel's metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter would replace the compiler being checked)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 is the old default

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import hybridlm.ops.triton as kernels  # noqa: E402
from hybridlm.ops.triton import conv, gdn_chunk, gdn_chunk_bwd, gdn_step, norm, paged_attention, paged_prefill, rope  # noqa: E402,E501
from hybridlm.ops.triton import gdn_cp, gemv  # noqa: E402

# the chunked GDN launchers' rules count SMs (V blocks, FUSED_OUTPUT): an H100's / H200's 132, as on the GPU (off it
# they count 1, which would fuse every 16-bit forward here)
gdn_chunk._multiprocessors = gdn_chunk_bwd._multiprocessors = lambda device: 132

# programmatic dependent launch is off on the GPU unless HYBRIDLM_PDL=1: compile the variants the GPU would launch
# (pdl_enabled cannot tell on CPU tensors, which it never enables)
for _module in (gdn_step, gemv, paged_attention, rope):
    if hasattr(_module, "pdl_enabled"):
        _module.pdl_enabled = lambda device: os.environ.get("HYBRIDLM_PDL", "0") == "1"

TARGET = GPUTarget("cuda", 90, 32)  # H100
H100_SMS = 132  # the wrappers size some grids from the SM count, which a CPU tensor cannot report
H100_MAX_SHARED = 232448  # bytes of shared memory per block (opt-in): more fails at the first launch
bf16, fp32 = torch.bfloat16, torch.float32

# Qwen3.5 shapes (benchmarks/bench_e2e.py SHAPES + COMMON)
MODELS = {
    "0.8B": dict(hidden=1024, mlp=3584, hq=8, hkv=2, hk=16, hv=16),
    "9B": dict(hidden=4096, mlp=12288, hq=16, hkv=4, hk=16, hv=32),
}
HEAD_DIM, ROTARY_DIM, GDN_DIM, CONV_WIDTH, BLOCK_SIZE = 256, 64, 128, 4, 64


# --------------------------------------------------------------------------------------------------------------
# One function per host wrapper: builds CPU inputs laid out as the model lays them out and calls the wrapper.

def randn(*shape, dtype=bf16):
    return torch.randn(*shape).to(dtype)


def cu_seqlens_for(length, pieces=3):
    """Packed sequences covering `length` tokens: (cu_seqlens int32 [N + 1], N)."""
    cuts = sorted({0, length, *[length * i // pieces for i in range(1, pieces)]})
    return torch.tensor(cuts, dtype=torch.int32), len(cuts) - 1


def run_conv(channels, length, dtype=bf16, varlen=False, state=False, final=True, batch=1):
    x = randn(batch, length, channels, dtype=dtype)  # in_proj_qkv output
    weight = randn(channels, 1, CONV_WIDTH, dtype=dtype)[:, 0]  # conv1d.weight[:, 0]
    cu, n = cu_seqlens_for(length) if varlen else (None, batch)
    init = randn(n, channels, CONV_WIDTH - 1, dtype=dtype) if state else None
    conv.causal_conv1d_fwd(x, weight, initial_state=init, output_final_state=final, cu_seqlens=cu)


def gdn_inputs(batch, length, hk, hv, dk, dv, dtype, varlen, state):
    """q, k, v as column slices of one conv output [B, T, C] (as GatedDeltaNet.forward makes them)."""
    qkv = randn(batch, length, 2 * hk * dk + hv * dv, dtype=dtype)
    q = qkv[..., :hk * dk].unflatten(-1, (hk, dk))
    k = qkv[..., hk * dk:2 * hk * dk].unflatten(-1, (hk, dk))
    v = qkv[..., 2 * hk * dk:].unflatten(-1, (hv, dv))
    a, b = randn(batch, length, hv, dtype=dtype), randn(batch, length, hv, dtype=dtype)
    A_log, dt_bias = randn(hv, dtype=fp32), randn(hv, dtype=fp32)
    cu, n = cu_seqlens_for(length) if varlen else (None, batch)
    init = randn(n, hv, dk, dv, dtype=fp32) if state else None
    return q, k, v, a, b, A_log, dt_bias, init, cu, n


PREPARE_VARIANTS = {  # gdn_chunk's module flags for each way of running the prepare step
    "kkt": dict(KKT_PREPARE=True, KKT_RECURSIVE=False, KKT_INTERLEAVE=False, FOLD_WU_INTO_H=False),
    "kkt-interleaved": dict(KKT_PREPARE=True, KKT_RECURSIVE=False, KKT_INTERLEAVE=True, FOLD_WU_INTO_H=False),
    "kkt-recursive": dict(KKT_PREPARE=True, KKT_RECURSIVE=True, FOLD_WU_INTO_H=False),
    "kkt-fold": dict(KKT_PREPARE=True, KKT_RECURSIVE=True, FOLD_WU_INTO_H=True),
    "fused": dict(KKT_PREPARE=False, FOLD_WU_INTO_H=False),
}


def run_gdn_fwd(hk, hv, dk, dv, dtype=bf16, length=256, varlen=False, state=False, batch=1, prepare=None,
                warps=None, output=None, cp=False, fused=False):
    """`prepare`: a key of PREPARE_VARIANTS, forced for this launch (None: the module's defaults); `warps`: the KKT
    Gram/inverse kernel's num_warps (gdn_chunk.KKT_WARPS) if not None; `output`: gdn_chunk's flags for the output
    kernel (LOOPED_O, LOOPED_O_BV, LOOPED_O_WARPS) if not None; `cp`: the context-parallel state pass
    (STATE_PASS_CP, segments of 4 chunks); `fused`: the output made in the state pass (FUSED_OUTPUT; a dict: more
    of gdn_chunk's flags with it)."""
    q, k, v, a, b, A_log, dt_bias, init, cu, _ = gdn_inputs(batch, length, hk, hv, dk, dv, dtype, varlen, state)
    flags = dict(PREPARE_VARIANTS[prepare]) if prepare else {}
    flags.update({"KKT_WARPS": warps} if warps else {})
    flags.update(output or {})
    flags.update(dict(STATE_PASS_CP=True, CP_SEGMENT_CHUNKS=4) if cp else {})
    flags.update(dict(FUSED_OUTPUT=True, **({} if fused is True else fused)) if fused else {})
    saved = {name: getattr(gdn_chunk, name) for name in flags}
    saved_min = gdn_cp.CP_MIN_HEAD_CHUNKS, gdn_cp.CP_MIN_CHUNKS
    for name, value in flags.items():
        setattr(gdn_chunk, name, value)
    gdn_cp.CP_MIN_HEAD_CHUNKS, gdn_cp.CP_MIN_CHUNKS = (0, 0) if cp else saved_min
    try:
        gdn_chunk.chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=init, output_final_state=True,
                                cu_seqlens=cu)
    finally:
        for name, value in saved.items():
            setattr(gdn_chunk, name, value)
        gdn_cp.CP_MIN_HEAD_CHUNKS, gdn_cp.CP_MIN_CHUNKS = saved_min


def run_gdn_bwd(hk, hv, dk, dv, dtype=bf16, length=256, varlen=False, state=False, dht=False, batch=1, cp=False,
                wy_bk=None, dqk_bk=None, dh_tma=None):
    """`cp`: the context-parallel recomputation (STATE_PASS_CP, segments of 4 chunks, cut however short); `wy_bk`,
    `dqk_bk`: gdn_chunk_bwd.BWD_WY_BK / BWD_DQK_BK for this launch (the key-blocked WY and dq/dk kernels) if not
    None; `dh_tma`: gdn_chunk_bwd.BWD_DH_TMA if not None."""
    q, k, v, a, b, A_log, dt_bias, init, cu, n = gdn_inputs(batch, length, hk, hv, dk, dv, dtype, varlen, state)
    g_cumsum = randn(batch, length, hv, dtype=fp32)  # what _chunk_gdn_fwd(..., store_x=True) saves
    x_inv = randn(batch, length, hv, gdn_chunk.CHUNK_SIZE, dtype=dtype)
    do = randn(batch, length, hv, dv, dtype=dtype)
    d_final = randn(n, hv, dk, dv, dtype=fp32) if dht else None
    saved = gdn_chunk.STATE_PASS_CP, gdn_chunk.CP_SEGMENT_CHUNKS, gdn_cp.CP_MIN_HEAD_CHUNKS, gdn_cp.CP_MIN_CHUNKS
    saved_wy, saved_dqk, saved_tma = gdn_chunk_bwd.BWD_WY_BK, gdn_chunk_bwd.BWD_DQK_BK, gdn_chunk_bwd.BWD_DH_TMA
    gdn_chunk_bwd.BWD_DH_TMA = saved_tma if dh_tma is None else dh_tma
    if cp:
        (gdn_chunk.STATE_PASS_CP, gdn_chunk.CP_SEGMENT_CHUNKS, gdn_cp.CP_MIN_HEAD_CHUNKS,
         gdn_cp.CP_MIN_CHUNKS) = True, 4, 0, 0
    gdn_chunk_bwd.BWD_WY_BK = saved_wy if wy_bk is None else wy_bk
    gdn_chunk_bwd.BWD_DQK_BK = saved_dqk if dqk_bk is None else dqk_bk
    try:
        # (the forward's aqk where gdn_chunk_bwd.BWD_AQK_FROM_FORWARD would keep it: compiles the A_GIVEN kernels)
        aqk = (randn(batch, length, hv, gdn_chunk.CHUNK_SIZE, dtype=dtype) if gdn_chunk_bwd.BWD_AQK_FROM_FORWARD
               else None)
        gdn_chunk_bwd.chunk_gdn_bwd(q, k, v, a, b, A_log, dt_bias, g_cumsum, x_inv, do, d_final,
                                    initial_state=init, cu_seqlens=cu, aqk=aqk)
    finally:
        gdn_chunk.STATE_PASS_CP, gdn_chunk.CP_SEGMENT_CHUNKS, gdn_cp.CP_MIN_HEAD_CHUNKS, gdn_cp.CP_MIN_CHUNKS = saved
        gdn_chunk_bwd.BWD_WY_BK, gdn_chunk_bwd.BWD_DQK_BK, gdn_chunk_bwd.BWD_DH_TMA = saved_wy, saved_dqk, saved_tma


def run_gdn_decode(hk, hv, dk, dv, batch, dtype=bf16, fuse_norm=True, norm_dtype=None, pool=8, prefetch=False):
    """`prefetch`: gdn_step.STEP_PREFETCH for this launch."""
    saved, gdn_step.STEP_PREFETCH = gdn_step.STEP_PREFETCH, prefetch
    try:
        _gdn_decode(hk, hv, dk, dv, batch, dtype, fuse_norm, norm_dtype, pool)
    finally:
        gdn_step.STEP_PREFETCH = saved


def _gdn_decode(hk, hv, dk, dv, batch, dtype, fuse_norm, norm_dtype, pool):
    channels = 2 * hk * dk + hv * dv
    z = randn(batch, hv, dv, dtype=dtype) if fuse_norm else None
    norm_weight = randn(dv, dtype=norm_dtype or dtype) if fuse_norm else None
    slots = torch.arange(batch, dtype=torch.int32) % pool
    gdn_step.gdn_decode_step(
        randn(batch, channels, dtype=dtype), z, randn(batch, hv, dtype=dtype), randn(batch, hv, dtype=dtype),
        randn(channels, 1, CONV_WIDTH, dtype=dtype)[:, 0], randn(hv, dtype=fp32), randn(hv, dtype=fp32),
        randn(pool, channels, CONV_WIDTH - 1, dtype=dtype), randn(pool, hv, dk, dv, dtype=fp32), slots,
        num_key_heads=hk, key_head_dim=dk, value_head_dim=dv, norm_weight=norm_weight,
        split=batch * hk < gdn_step.SPLIT_PROGRAMS_PER_SM * H100_SMS)  # the wrapper's rule on an H100


def run_rms_norm(dim, rows, dtype=bf16, residual=False, weight_dtype=None):
    res = randn(rows, dim, dtype=dtype) if residual else None
    norm.rms_norm_fwd(randn(rows, dim, dtype=dtype), randn(dim, dtype=weight_dtype or dtype), residual=res)


def run_gated_norm(dim, rows, dtype=bf16, weight_dtype=None):
    norm.gated_rms_norm_fwd(randn(rows, dim, dtype=dtype), randn(rows, dim, dtype=dtype),
                            randn(dim, dtype=weight_dtype or dtype))


def run_silu_mul(width, tokens, dtype=bf16):
    """MLP: silu_mul on the two halves of the fused gate/up GEMM's [B, T, 2 * intermediate] output."""
    norm.silu_mul_fwd(*randn(1, tokens, 2 * width, dtype=dtype).chunk(2, dim=-1))


def run_sigmoid_gate(heads, tokens, dim=HEAD_DIM, dtype=bf16):
    """Attention output gate: o a transposed [B, Hq, T, D] output, gate half of the q projection per head."""
    o = randn(1, heads, tokens, dim, dtype=dtype).transpose(1, 2)
    norm.sigmoid_gate_fwd(o, randn(1, tokens, heads, 2 * dim, dtype=dtype)[..., dim:])


def run_write_kv(hkv, tokens, dim=HEAD_DIM, block_size=64, dtype=bf16):
    """The step's K/V into the pools: k a transposed norm output, v a slice of the fused q/k/v output."""
    key_pool, value_pool = kv_pools(hkv, dim, block_size, dtype)
    k = randn(hkv, tokens, dim, dtype=dtype).transpose(0, 1)
    v = randn(tokens, 3 * hkv * dim, dtype=dtype)[:, hkv * dim : 2 * hkv * dim].view(tokens, hkv, dim)
    slots = torch.arange(tokens, device=k.device) * 3
    paged_attention.write_kv_fwd(key_pool, value_pool, k, v, slots)


def run_rope(heads, length, dim=HEAD_DIM, rotary=ROTARY_DIM, dtype=bf16, query=True, batch=1):
    """query: the strided view q_proj(x).view(B, T, H, 2D).chunk(2)[0]; else k_proj(x).view(B, T, H, D)."""
    if query:
        x = randn(batch, length, heads, 2 * dim, dtype=dtype).chunk(2, dim=-1)[0]
    else:
        x = randn(batch, length, heads, dim, dtype=dtype)
    cos, sin = randn(batch, length, rotary, dtype=dtype), randn(batch, length, rotary, dtype=dtype)
    rope.rms_norm_rope_fwd(x, randn(dim, dtype=dtype), cos, sin)


def kv_pools(hkv, dim, block_size, dtype, blocks=64):
    return randn(blocks, block_size, hkv, dim, dtype=dtype), randn(blocks, block_size, hkv, dim, dtype=dtype)


def h100_partitions(queries, hkv):
    """paged_attention.num_partitions as it comes out on an H100."""
    wanted = -(-2 * H100_SMS // max(queries * hkv, 1))
    return min(32, triton.next_power_of_2(wanted)) if wanted > 1 else 1


def run_paged_decode(hq, hkv, queries, dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=bf16):
    keys, values = kv_pools(hkv, dim, block_size, dtype)
    tables = torch.zeros(queries, 16, dtype=torch.int32)
    rows = torch.arange(queries, dtype=torch.int32)
    lens = torch.full((queries,), 100, dtype=torch.int32)
    paged_attention.paged_decode_attention_fwd(randn(queries, hq, dim, dtype=dtype), keys, values, tables, rows, lens,
                                               dim ** -0.5, partitions=h100_partitions(queries, hkv))


def run_paged_prefill(hq, hkv, max_len, sequences, dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=bf16, tma=True):
    """`sequences` chunks; the first is max_len tokens long, the others 1 (decode rows of a mixed step); tma: K/V
    through tensor descriptors (paged_prefill.TMA) where they apply, else pointer loads."""
    lengths = [max_len] + [1] * (sequences - 1)
    keys, values = kv_pools(hkv, dim, block_size, dtype)
    q = randn(sum(lengths), hq, dim, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    rows = torch.arange(sequences, dtype=torch.int32)
    starts = torch.full((sequences,), 10, dtype=torch.int32)
    tables = torch.zeros(sequences, 160, dtype=torch.int32)
    saved, paged_prefill.TMA = paged_prefill.TMA, tma
    try:
        paged_prefill.paged_prefill_attention_fwd(q, keys, values, tables, rows, cu, starts, dim ** -0.5,
                                                  max_len=max_len)
    finally:
        paged_prefill.TMA = saved


def run_qk_rope(hq, hkv, length, dim=HEAD_DIM, rotary=ROTARY_DIM, dtype=bf16, batch=1):
    """The attention's q (a strided view of the q projection) and k through the one-launch norm + RoPE, the angles
    made in the kernel."""
    from hybridlm.ops.rope import RopeInputs

    q = randn(batch, length, hq, 2 * dim, dtype=dtype).chunk(2, dim=-1)[0]
    k = randn(batch, length, hkv, dim, dtype=dtype)
    positions = torch.arange(batch * length, dtype=torch.int32).view(batch, length)
    inputs = RopeInputs(positions, torch.rand(rotary // 2), 1.0, dtype)
    rope.qk_rms_norm_rope_fwd(q, randn(dim, dtype=dtype), k, randn(dim, dtype=dtype), inputs)


def run_gemv(kind, n, k, rows, dtype=bf16, residual=True, config=None):
    """A decode GEMV (gemv.py) on one projection's shape: "rms" (the residual add + RMSNorm prologue: in-proj, q/k/v,
    gate/up, lm_head), "silu" (MLP down, from the gate/up GEMM's [M, 2I] output), "gate" (o_proj after the
    attention's output gate, o and gate as strided heads of 256) or "linear" (out_proj, o_proj)."""
    weight = torch.empty(n, k, dtype=dtype)  # never read here: only the launch is recorded
    if kind == "gate":
        heads = k // HEAD_DIM
        o = randn(rows, heads, HEAD_DIM, dtype=dtype)
        gate = randn(rows, heads, 2 * HEAD_DIM, dtype=dtype)[..., HEAD_DIM:]
        gemv.sigmoid_gate_linear_fwd(o, gate, weight, config=config)
    elif kind == "rms":
        res = randn(rows, k, dtype=dtype) if residual else None
        gemv.rms_norm_linear_fwd(randn(rows, k, dtype=dtype), randn(k, dtype=dtype), 1e-6, weight, res, config=config)
    elif kind == "silu":
        gemv.silu_mul_linear_fwd(randn(rows, 2 * k, dtype=dtype), weight, config=config)
    else:
        gemv.linear_fwd(randn(rows, k, dtype=dtype), weight, config=config)

# --------------------------------------------------------------------------------------------------------------
# The configurations: (label, call). A call may launch several kernels (the GDN forward launches 3).

def configurations():
    configs = []
    add = lambda label, fn, **kw: configs.append((label, lambda: fn(**kw)))  # noqa: E731
    for name, m in MODELS.items():
        hk, hv, hq, hkv = m["hk"], m["hv"], m["hq"], m["hkv"]
        channels = 2 * hk * GDN_DIM + hv * GDN_DIM  # 6144 (0.8B), 8192 (9B)
        for varlen in (False, True):
            for state in (False, True):
                tag = f"{name} bf16 {'varlen' if varlen else 'batch'}{' +state' if state else ''}"
                add(f"conv C={channels} {tag}", run_conv, channels=channels, length=256, varlen=varlen, state=state)
                add(f"gdn_fwd Hv={hv} {tag}", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen,
                    state=state)
                add(f"gdn_bwd Hv={hv} {tag}", run_gdn_bwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen,
                    state=state, dht=state)
        # a 1-token prefill chunk: T == 1 is specialised to a constant by the JIT
        add(f"conv C={channels} {name} bf16 varlen T=1", run_conv, channels=channels, length=1, varlen=True,
            state=True)
        add(f"gdn_fwd Hv={hv} {name} bf16 varlen T=1", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM,
            length=1, varlen=True, state=True)
        add(f"conv C={channels} {name} bf16 batch B=2 T=1", run_conv, channels=channels, length=1, batch=2)
        add(f"gdn_fwd Hv={hv} {name} bf16 batch B=2 T=1", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM,
            length=1, batch=2)
        add(f"gdn_fwd Hv={hv} {name} bf16 batch T=100", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM,
            length=100, state=True)
        for prepare in ("kkt-recursive", "kkt-fold"):  # the context-parallel state pass, 16 chunks in 4 segments
            add(f"gdn_fwd cp prepare={prepare} Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM,
                dv=GDN_DIM, length=1024, state=True, prepare=prepare, cp=True)
        for prepare in ("kkt-recursive", "kkt-fold"):  # the output made in the state pass, cut and uncut
            add(f"gdn_fwd fused_o cp prepare={prepare} Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
                dk=GDN_DIM, dv=GDN_DIM, length=1024, state=True, prepare=prepare, cp=True, fused=True)
            for varlen in (False, True):
                add(f"gdn_fwd fused_o prepare={prepare} Hv={hv} {name} bf16 {'varlen' if varlen else 'batch'}",
                    run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen, state=True,
                    batch=1 if varlen else 4, prepare=prepare, fused=True)
            add(f"gdn_fwd fused_o qk-in-pass prepare={prepare} Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
                dk=GDN_DIM, dv=GDN_DIM, state=True, batch=4, prepare=prepare,
                fused=dict(FUSED_OUTPUT_QK_GIVEN=False))
        # raw q, k and their rows' inverse norms into the folded, fused pass (gdn_chunk.ROW_NORMS_IN_PASS), cut and not
        add(f"gdn_fwd fused_o rownorm cp prepare=kkt-fold Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
            dk=GDN_DIM, dv=GDN_DIM, length=1024, state=True, prepare="kkt-fold", cp=True,
            fused=dict(ROW_NORMS_IN_PASS=True))
        add(f"gdn_fwd fused_o rownorm prepare=kkt-fold Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
            dk=GDN_DIM, dv=GDN_DIM, state=True, batch=4, prepare="kkt-fold", fused=dict(ROW_NORMS_IN_PASS=True))
        for warps in (4, 8):  # the fused pass over whole 128-wide value rows (half the q / k reads of BV 64)
            add(f"gdn_fwd fused_o bv128 w{warps} prepare=kkt-fold Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk,
                hv=hv, dk=GDN_DIM, dv=GDN_DIM, state=True, batch=4, prepare="kkt-fold",
                fused=dict(FUSED_OUTPUT_BV=128, FUSED_OUTPUT_WARPS=warps))
        # the w/u kernel one program per key head (gdn_chunk.WU_KEY_HEAD_PROGRAMS, with the fold), unfused and fused
        add(f"gdn_fwd wu-per-key-head prepare=kkt-fold Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
            dk=GDN_DIM, dv=GDN_DIM, state=True, batch=4, prepare="kkt-fold",
            output=dict(WU_KEY_HEAD_PROGRAMS=True, FUSED_OUTPUT=False))
        add(f"gdn_fwd fused_o wu-per-key-head prepare=kkt-fold Hv={hv} {name} bf16 varlen", run_gdn_fwd, hk=hk,
            hv=hv, dk=GDN_DIM, dv=GDN_DIM, state=True, varlen=True, prepare="kkt-fold",
            fused=dict(WU_KEY_HEAD_PROGRAMS=True))
        add(f"gdn_bwd cp Hv={hv} {name} bf16 batch", run_gdn_bwd, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, length=1024,
            state=True, dht=True, cp=True)
        for varlen in (False, True):  # the dH pass's loads through tensor descriptors (gdn_chunk_bwd.BWD_DH_TMA)
            add(f"gdn_bwd dh_tma Hv={hv} {name} bf16 {'varlen' if varlen else 'batch'}", run_gdn_bwd, hk=hk, hv=hv,
                dk=GDN_DIM, dv=GDN_DIM, varlen=varlen, batch=1 if varlen else 4, state=True, dht=True, dh_tma=True)
        for wy_bk in (32, 64):  # the key-blocked WY kernel (gdn_chunk_bwd.BWD_WY_BK)
            for varlen in (False, True):
                add(f"gdn_bwd wy_bk={wy_bk} Hv={hv} {name} bf16 {'varlen' if varlen else 'batch'}", run_gdn_bwd,
                    hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen, state=True, dht=True, wy_bk=wy_bk)
        for dqk_bk in (32, 64):  # the key-blocked dq/dk kernel (gdn_chunk_bwd.BWD_DQK_BK), with dw for the WY kernel
            for varlen in (False, True):
                add(f"gdn_bwd dqk_bk={dqk_bk} Hv={hv} {name} bf16 {'varlen' if varlen else 'batch'}", run_gdn_bwd,
                    hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen, state=True, dht=True, dqk_bk=dqk_bk)
        for prepare in PREPARE_VARIANTS:  # each way of running the prepare step (`-k prepare` lists them all)
            for varlen in (False, True):
                add(f"gdn_fwd prepare={prepare} Hv={hv} {name} bf16 {'varlen' if varlen else 'batch'}", run_gdn_fwd,
                    hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, varlen=varlen, prepare=prepare)
        for cap in (128, 168):  # register caps of kkt_solve and the w/u kernel (gdn_chunk.KKT_MAXNREG, KKT_WU_MAXNREG)
            add(f"gdn_fwd maxnreg={cap} prepare=kkt-fold Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv,
                dk=GDN_DIM, dv=GDN_DIM, state=True, batch=4, prepare="kkt-fold",
                output=dict(KKT_MAXNREG=cap, KKT_WU_MAXNREG=cap))
        for warps in (2, 4):  # the KKT kernel's other settings that sweep_kernels.py times
            add(f"gdn_fwd prepare=kkt w={warps} Hv={hv} {name} bf16 batch", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM,
                dv=GDN_DIM, prepare="kkt", warps=warps)
        # the output kernels (`-k o=`): the per-V-block one, the looped one at the settings sweep_kernels.py times
        # (bf16), and both at fp32 (the looped one at its fp32 settings, LOOPED_O_BV_FP32 / LOOPED_O_WARPS_FP32)
        for dtype, dtype_tag, settings in ((bf16, "bf16", ((32, 4), (64, 4), (64, 8), (128, 8))), (fp32, "fp32", ())):
            add(f"gdn_fwd o=per-block Hv={hv} {name} {dtype_tag} varlen", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM,
                dv=GDN_DIM, dtype=dtype, varlen=True, output=dict(LOOPED_O=False))
            add(f"gdn_fwd o=looped Hv={hv} {name} {dtype_tag} varlen", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM,
                dv=GDN_DIM, dtype=dtype, varlen=True, output=dict(LOOPED_O=True))
            for bv, warps in settings:
                add(f"gdn_fwd o=looped BV={bv} w={warps} Hv={hv} {name} {dtype_tag} varlen", run_gdn_fwd, hk=hk,
                    hv=hv, dk=GDN_DIM, dv=GDN_DIM, dtype=dtype, varlen=True,
                    output=dict(LOOPED_O=True, LOOPED_O_BV=bv, LOOPED_O_WARPS=warps))
        add(f"gdn_fwd prepare=fused Hv={hv} {name} bf16 varlen T=1", run_gdn_fwd, hk=hk, hv=hv, dk=GDN_DIM,
            dv=GDN_DIM, length=1, varlen=True, state=True, prepare="fused")
        for batch in (1, 64):  # the split kernel at B=1, the per-key-head one at B=64
            for norm_dtype, norm_tag in ((bf16, ""), (fp32, " fp32 norm weight")):
                add(f"gdn_decode {name} bf16 B={batch}{norm_tag}", run_gdn_decode, hk=hk, hv=hv, dk=GDN_DIM,
                    dv=GDN_DIM, batch=batch, norm_dtype=norm_dtype)
        add(f"gdn_decode {name} bf16 B=64 prefetch", run_gdn_decode, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, batch=64,
            prefetch=True)  # gdn_step.STEP_PREFETCH
        add(f"gdn_decode {name} bf16 B=1 no norm", run_gdn_decode, hk=hk, hv=hv, dk=GDN_DIM, dv=GDN_DIM, batch=1,
            fuse_norm=False)
        for rows in (1, 64):  # one row (decode at B=1) is specialised to a constant
            add(f"rms_norm D={m['hidden']} {name} bf16 rows={rows}", run_rms_norm, dim=m["hidden"], rows=rows)
            add(f"rms_norm D={m['hidden']} {name} bf16 rows={rows} +residual", run_rms_norm, dim=m["hidden"],
                rows=rows, residual=True)
        for tokens in (1, 100):
            add(f"silu_mul I={m['mlp']} {name} bf16 T={tokens}", run_silu_mul, width=m["mlp"], tokens=tokens)
        add(f"rope q Hq={hq} {name} bf16 T=100", run_rope, heads=hq, length=100)
        for tokens in (1, 100):
            add(f"sigmoid_gate Hq={hq} {name} bf16 T={tokens}", run_sigmoid_gate, heads=hq, tokens=tokens)
            add(f"write_kv Hkv={hkv} {name} bf16 T={tokens}", run_write_kv, hkv=hkv, tokens=tokens)
        add(f"rope k Hkv={hkv} {name} bf16 T=1", run_rope, heads=hkv, length=1, query=False)
        for tokens in (1, 100):
            add(f"rope qk Hq={hq}/Hkv={hkv} {name} bf16 T={tokens}", run_qk_rope, hq=hq, hkv=hkv, length=tokens)
        for queries in (1, 64, 256):
            add(f"paged_decode Hq={hq}/Hkv={hkv} {name} bf16 S={queries}", run_paged_decode, hq=hq, hkv=hkv,
                queries=queries)
        for max_len in (1, 8192):
            for sequences in (1, 8):
                add(f"paged_prefill Hq={hq}/Hkv={hkv} {name} bf16 max_len={max_len} S={sequences}",
                    run_paged_prefill, hq=hq, hkv=hkv, max_len=max_len, sequences=sequences)
        add(f"paged_prefill pointers Hq={hq}/Hkv={hkv} {name} bf16 max_len=8192 S=8", run_paged_prefill, hq=hq,
            hkv=hkv, max_len=8192, sequences=8, tma=False)
        add(f"paged_decode Hq={hq}/Hkv={hkv} {name} fp32 S=1", run_paged_decode, hq=hq, hkv=hkv, queries=1,
            dtype=fp32)
        add(f"paged_prefill Hq={hq}/Hkv={hkv} {name} fp32 max_len=8192 S=8", run_paged_prefill, hq=hq, hkv=hkv,
            max_len=8192, sequences=8, dtype=fp32)
        add(f"paged_prefill Hq={hq}/Hkv={hkv} {name} fp32 max_len=1 S=8", run_paged_prefill, hq=hq, hkv=hkv,
            max_len=1, sequences=8, dtype=fp32)

    for residual in (False, True):  # q/k head norm width, and the fp32 test path
        add(f"rms_norm D=256 bf16{' +residual' if residual else ''}", run_rms_norm, dim=256, rows=64,
            residual=residual)
        add(f"rms_norm D=1024 fp32{' +residual' if residual else ''}", run_rms_norm, dim=1024, rows=1,
            dtype=fp32, residual=residual)
    add("gated_norm D=128 bf16", run_gated_norm, dim=128, rows=64 * 16)
    add("gated_norm D=128 bf16 fp32 weight", run_gated_norm, dim=128, rows=64 * 16, weight_dtype=fp32)
    add("gated_norm D=128 fp32", run_gated_norm, dim=128, rows=100, dtype=fp32)
    add("silu_mul I=100 fp32 T=3", run_silu_mul, width=100, tokens=3, dtype=fp32)
    add("gdn_fwd prepare=fused Hv=16 0.8B fp32", run_gdn_fwd, hk=16, hv=16, dk=GDN_DIM, dv=GDN_DIM, dtype=fp32,
        prepare="fused")
    add("sigmoid_gate Hq=8 fp32 T=3", run_sigmoid_gate, heads=8, tokens=3, dtype=fp32)
    add("write_kv Hkv=2 fp32 T=3", run_write_kv, hkv=2, tokens=3, dtype=fp32)
    # a whole model in fp32 on the GPU (0.8B shapes)
    add("conv C=6144 0.8B fp32 varlen +state", run_conv, channels=6144, length=256, dtype=fp32, varlen=True,
        state=True)
    add("gdn_fwd Hv=16 0.8B fp32 varlen +state", run_gdn_fwd, hk=16, hv=16, dk=GDN_DIM, dv=GDN_DIM, dtype=fp32,
        varlen=True, state=True)
    for batch in (1, 64):
        add(f"gdn_decode 0.8B fp32 B={batch}", run_gdn_decode, hk=16, hv=16, dk=GDN_DIM, dv=GDN_DIM, batch=batch,
            dtype=fp32)

    # the tests' shapes (tests/ops): small heads in fp32 and bf16
    for dtype, tname in ((fp32, "fp32"), (bf16, "bf16")):
        for d in (16, 32):
            for varlen in (False, True):
                tag = f"tests H=2/4 d={d} {tname} {'varlen' if varlen else 'batch'}"
                add(f"gdn_fwd {tag}", run_gdn_fwd, hk=2, hv=4, dk=d, dv=d, dtype=dtype, length=130, varlen=varlen,
                    state=True, batch=1 if varlen else 2)
                add(f"gdn_bwd {tag}", run_gdn_bwd, hk=2, hv=4, dk=d, dv=d, dtype=dtype, length=130, varlen=varlen,
                    state=True, dht=True, batch=1 if varlen else 2)
        add(f"gdn_fwd tests H=1/4 dk=24 dv=40 {tname}", run_gdn_fwd, hk=1, hv=4, dk=24, dv=40, dtype=dtype, length=70)
        for d in (16, 32):  # the other prepare variants at the tests' small heads
            for prepare in ("fused", "kkt", "kkt-fold"):
                add(f"gdn_fwd prepare={prepare} tests H=2/4 d={d} {tname} varlen", run_gdn_fwd, hk=2, hv=4, dk=d,
                    dv=d, dtype=dtype, length=130, varlen=True, state=True, prepare=prepare)
        add(f"gdn_fwd prepare=fused tests H=1/4 dk=24 dv=40 {tname}", run_gdn_fwd, hk=1, hv=4, dk=24, dv=40,
            dtype=dtype, length=70, prepare="fused")
        add(f"gdn_bwd tests H=1/4 dk=24 dv=40 {tname}", run_gdn_bwd, hk=1, hv=4, dk=24, dv=40, dtype=dtype,
            length=70)
        add(f"gdn_bwd wy_bk=32 tests H=1/4 dk=24 dv=40 {tname}", run_gdn_bwd, hk=1, hv=4, dk=24, dv=40, dtype=dtype,
            length=70, wy_bk=32)
        add(f"gdn_bwd dqk_bk=32 tests H=1/4 dk=96 dv=40 {tname}", run_gdn_bwd, hk=1, hv=4, dk=96, dv=40,
            dtype=dtype, length=70, dqk_bk=32)
        add(f"gdn_decode tests H=2/4 d=32 {tname} B=3 split", run_gdn_decode, hk=2, hv=4, dk=32, dv=32, batch=3,
            dtype=dtype)
        add(f"conv tests C=96 {tname} T=70 +state", run_conv, channels=96, length=70, dtype=dtype, state=True,
            batch=2)
        add(f"paged_prefill tests Hq=4/Hkv=1 D=80 {tname} BS=16", run_paged_prefill, hq=4, hkv=1, max_len=90,
            sequences=4, dim=80, block_size=16, dtype=dtype)
    add("gdn_fwd tests H=2/4 d=64 fp32", run_gdn_fwd, hk=2, hv=4, dk=64, dv=64, dtype=fp32, length=130)
    add("gdn_bwd tests H=2/4 d=64 fp32", run_gdn_bwd, hk=2, hv=4, dk=64, dv=64, dtype=fp32, length=130, state=True)
    # 64-wide key rows in 16-bit: dS^T by its own product (gdn_chunk_bwd.BWD_DQK_DST_PRODUCT_BKS)
    add("gdn_bwd tests H=2/4 d=64 bf16", run_gdn_bwd, hk=2, hv=4, dk=64, dv=64, dtype=bf16, length=200, state=True)
    add("gdn_bwd tests H=2/4 d=128 fp32", run_gdn_bwd, hk=2, hv=4, dk=128, dv=128, dtype=fp32, length=130,
        state=True)
    add("paged_decode tests Hq=6/Hkv=2 D=64 bf16 BS=16 P=4", run_paged_decode, hq=6, hkv=2, queries=33, dim=64,
        block_size=16)
    add("paged_prefill tests Hq=4/Hkv=2 D=128 bf16 BS=256", run_paged_prefill, hq=4, hkv=2, max_len=90,
        sequences=4, dim=128, block_size=256)
    add("paged_prefill tests Hq=8/Hkv=1 D=40 bf16 BS=32", run_paged_prefill, hq=8, hkv=1, max_len=29, sequences=3,
        dim=40, block_size=32)
    add("rope tests H=3 D=80 rd=20 fp32", run_rope, heads=3, length=5, dim=80, rotary=20, dtype=fp32, batch=2)
    # decode GEMVs (gemv.py): every projection of both models at the rule's launch, 1 / 8 / 16 rows
    for name, m in MODELS.items():
        hidden, value_dim = m["hidden"], m["hv"] * GDN_DIM
        projections = [("rms", "in_proj", 2 * m["hk"] * GDN_DIM + 2 * value_dim + 2 * m["hv"], hidden),
                       ("rms", "qkv", (2 * m["hq"] + 2 * m["hkv"]) * HEAD_DIM, hidden),
                       ("rms", "gate_up", 2 * m["mlp"], hidden), ("rms", "lm_head", 248320, hidden),
                       ("silu", "down", hidden, m["mlp"]), ("linear", "out_proj", hidden, value_dim),
                       ("gate", "o_proj", hidden, m["hq"] * HEAD_DIM)]
        for rows in (1, 8, 16):
            for kind, what, n, k in projections:
                add(f"gemv {kind} {what} N={n} K={k} {name} bf16 M={rows}", run_gemv, kind=kind, n=n, k=k, rows=rows)
        add(f"gemv rms in_proj {name} bf16 M=1 no residual", run_gemv, kind="rms", n=projections[0][2], k=hidden,
            rows=1, residual=False)
        if name == "0.8B":  # the model in fp32 (CUDA cores at every row count)
            for rows, (kind, what, n, k) in itertools.product((1, 8, 16), projections):
                add(f"gemv {kind} {what} N={n} K={k} {name} fp32 M={rows}", run_gemv, kind=kind, n=n, k=k, rows=rows,
                    dtype=fp32)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_gemv  # the settings its --quick sweep tries (0.8B in_proj and down)
    for (block_n, block_k, warps), stages, rows in itertools.product(bench_gemv.sweep_grid(quick=True), (1, 3), (1, 8)):
        for dot in (False, True) if rows > 1 and block_n >= 16 else (False,):
            config = gemv.GemvConfig(block_n, block_k, warps, stages, dot)
            for kind, n, k in (("rms", 8224, 1024), ("silu", 1024, 3584)):
                add(f"gemv sweep {kind} 0.8B bf16 M={rows} bn={block_n} bk={block_k} w={warps} s={stages} dot={dot:d}",
                    run_gemv, kind=kind, n=n, k=k, rows=rows, config=config)
    # the tests' launches (tests/ops/test_triton_gemv.py): K = 200, N = 70, the rule's and the swept setting
    for dtype, tname in ((fp32, "fp32"), (bf16, "bf16")):
        for rows, kind in itertools.product((1, 3, 16), ("rms", "silu", "linear")):
            for swept in (False, True):
                dot = not gemv.gemv_config(rows, 70, 200, element_size=dtype.itemsize).use_dot  # the other path
                config = gemv.GemvConfig(16 if dot else 8, 64, num_stages=1, use_dot=dot) if swept else None
                add(f"gemv tests {kind} {tname} M={rows}{' swept' if swept else ''}", run_gemv, kind=kind, n=70,
                    k=200, rows=rows, dtype=dtype, config=config)

    return configs


# --------------------------------------------------------------------------------------------------------------
# Recording launches and compiling them ahead of time.

@contextlib.contextmanager
def recorded_launches(into):
    """Within the block, `kernel[grid](*args, **kwargs)` records (kernel, args, kwargs) instead of launching; the
    cached launch path (`launch.FAST_LAUNCH`, which asks the driver for the device) is off, so every launch comes
    here."""
    from hybridlm.ops.triton import launch

    original, fast = JITFunction.run, launch.FAST_LAUNCH

    def record(self, *args, grid, warmup, **kwargs):
        into.append((self, args, kwargs))

    JITFunction.run, launch.FAST_LAUNCH = record, False
    try:
        yield into
    finally:
        JITFunction.run, launch.FAST_LAUNCH = original, fast


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as JITFunction.run derives them on an sm_90 device."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def ptxas_usage(ptx):
    """(registers, spill stores, spill loads) from the bundled ptxas -v, or None if it cannot be run."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        ptxas = get_ptxas(TARGET.arch).path
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            log = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(TARGET.arch)}",
                                  str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True).stderr
    except Exception:  # noqa: BLE001 - optional numbers only
        return None
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs:
        return None
    return int(regs.group(1)), int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0


def compile_launch(fn, args, kwargs):
    """Compile one recorded launch; returns a dict with ok, note (registers, spills, shared memory) or error."""
    signature, constexprs, attrs, options = None, None, None, None
    try:
        options, signature, constexprs, attrs = specialise(fn, args, kwargs)
        src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        # the compiler also prints ptxas failures to stdout; the exception carries the same text
        with contextlib.redirect_stdout(sys.stderr if VERBOSE else io.StringIO()):
            compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - reported per launch
        causes = [error]
        while causes[-1].__cause__ is not None and len(causes) < 8:  # an error in a called @jit function is nested
            causes.append(causes[-1].__cause__)
        lines = [line for line in str(causes[-1]).strip().splitlines() if line.strip()]
        shown = lines if len(lines) <= 12 else lines[:4] + ["..."] + lines[-8:]  # the message is at the end
        return dict(ok=False, error=f"{type(error).__name__}: " + "\n".join(shown), signature=signature,
                    constexprs=constexprs)
    if DUMP:  # the kernel's TTGIR and PTX, for reading where its registers go
        os.makedirs(DUMP, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            Path(DUMP, f"{fn.__name__}.{kind}").write_text(compiled.asm[kind])
    usage = ptxas_usage(compiled.asm["ptx"])
    regs = f"{usage[0]:3d} regs, spill {usage[1]}/{usage[2]} B" if usage else "regs ?"
    note = f"{regs}, smem {compiled.metadata.shared:6d} B"
    if compiled.metadata.shared > H100_MAX_SHARED:  # CompiledKernel._init_handles raises this at the first launch
        return dict(ok=False, note=note, signature=signature, constexprs=constexprs,
                    error=f"OutOfResources at launch: out of resource: shared memory, Required: "
                          f"{compiled.metadata.shared}, Hardware limit: {H100_MAX_SHARED}")
    return dict(ok=True, note=note, signature=signature, constexprs=constexprs)


def describe(fn, kwargs):
    """The launch's constexprs and options, compactly."""
    names = {p.name for p in fn.params if p.is_constexpr}
    values = []
    for key, value in kwargs.items():
        if key in names:
            value = int(value) if isinstance(value, bool) else value
            values.append(f"{key}={value}")
    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    return f"w{warps} s{stages} " + " ".join(values)


SHARED_HELPERS = {"utils.pdl_wait"}  # jit helpers without an underscore: other modules import them


def defined_kernels():
    """Every kernel of hybridlm/ops/triton/*.py (helpers start with an underscore, or sit in SHARED_HELPERS, and are
    inlined into them)."""
    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        names |= {f"{info.name}.{name}" for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and not name.startswith("_") and obj.__module__ == module.__name__}
    return names - SHARED_HELPERS


VERBOSE = False
DUMP = None


def main():
    global VERBOSE, DUMP
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", "--filter", default="", help="only configurations whose label contains this")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--set", nargs="+", default=[], metavar="MODULE.FLAG=VALUE",
                        help="kernel options first, as bench_gdn.py --set (e.g. gdn_chunk_bwd.BWD_WY_KB_MAXNREG=168)")
    parser.add_argument("--dump", metavar="DIR", help="write each kernel's TTGIR and PTX to DIR/<kernel>.ttgir, .ptx "
                        "(the last configuration's where several compile the same kernel)")
    cli = parser.parse_args()
    VERBOSE, DUMP = cli.verbose, cli.dump
    if cli.set:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_gdn import apply_settings

        print("set:", ", ".join(apply_settings(cli.set)))
    torch.manual_seed(0)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET.backend} sm_{TARGET.arch}")

    results, failures, seen = {}, 0, set()
    started = time.time()
    for label, call in configurations():
        if cli.filter not in label:
            continue
        launches = []
        try:
            with recorded_launches(launches):
                call()
        except Exception as error:  # noqa: BLE001 - a wrong configuration, not a kernel failure
            failures += 1
            print(f"ERROR {label}: the host wrapper raised {type(error).__name__}: {error}")
            continue
        for fn, args, kwargs in launches:
            name = f"{fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}"
            seen.add(name)
            try:
                key = (name, repr(specialise(fn, args, kwargs)[1:]), repr(sorted(kwargs.items())))
            except Exception:  # noqa: BLE001 - compile_launch reports it
                key = (name, label, repr(sorted(kwargs.items())))
            t0 = time.time()
            fresh = key not in results
            if fresh:
                results[key] = compile_launch(fn, args, kwargs)
            result = results[key]
            seconds = f"{time.time() - t0:5.1f}s" if fresh else "  (dup)"
            status = "OK  " if result["ok"] else "FAIL"
            print(f"{status} {seconds} {name:45s} {result.get('note', ''):38s} [{label}] {describe(fn, kwargs)}",
                  flush=True)
            if VERBOSE:
                print(f"       signature {result['signature']}\n       constexprs {result['constexprs']}")
            if not result["ok"]:
                failures += fresh
                print("       " + result["error"].replace("\n", "\n       "))
    if not cli.filter:
        for name in sorted(defined_kernels() - seen):
            failures += 1
            print(f"MISSING {name}: no configuration launches it")
    unique = len(results)
    bad = sum(not r["ok"] for r in results.values())
    print(f"{unique} distinct compiles, {unique - bad} OK, {bad} FAIL; {time.time() - started:.0f}s "
          f"(triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
