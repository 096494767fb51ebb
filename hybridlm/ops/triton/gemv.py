"""Decode GEMVs that fuse their neighbours, for M = 1..16 rows (reference twins: `hybridlm.ops.linear`).

At batch 1 a decode step is bound by its ~230 launches and by cuBLAS's small GEMMs, not by bytes (NOTES.md,
fourth session). Four kernels of the step read one row and feed one GEMM, so they can live in that GEMM's
prologue:
- `rms_norm_linear_fwd`: the zero-centred RMSNorm (and the deferred residual add) before in-proj / qkv / gate-up;
  every program recomputes the rstd of its rows (at most 16 rows of ~8k), then streams its block of weight rows;
- `silu_mul_linear_fwd`: SwiGLU's silu(gate) * up before the down projection;
- `sigmoid_gate_linear_fwd`: the attention's output gate o * sigmoid(gate) before o_proj, o and the gate read per
  head through their own strides (the gate is every other head-sized slice of the q projection);
- `linear_fwd`: the plain GEMV, no prologue (for out_proj, o_proj where its gate runs apart, and to compare with
  cuBLAS).

One kernel, a constexpr PROLOGUE switch. Programs own BLOCK_N rows of the weight [N, K] and loop over K in
BLOCK_K tiles, the weight tiles pipelined through cp.async; one or two rows multiply-add on CUDA cores, more go
through tl.dot with the rows padded to 16 (`gemv_config` says why). The activations' rounding follows the unfused
kernels (`norm.rms_norm_fwd`, `norm.silu_mul_fwd`, `norm.sigmoid_gate_fwd`) step by step, so the GEMV's input is the
tensor the unfused path hands to cuBLAS, up to the rstd's rounding; accumulation is fp32, y is rounded once to x's
dtype.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, dot_precision, next_power_of_2, pdl_enabled, pdl_wait

MAX_ROWS = 16  # more rows: the weight is read once either way and the tensor-core GEMM (F.linear) wins
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# PROLOGUE values (the kernel's constexpr switch)
NONE = tl.constexpr(0)  # x
RMS_NORM = tl.constexpr(1)  # rms_norm(x)
ADD_RMS_NORM = tl.constexpr(2)  # rms_norm(x + residual), and x + residual stored
SILU_MUL = tl.constexpr(3)  # silu(x) * x2
SIGMOID_GATE = tl.constexpr(4)  # x * sigmoid(x2), both [M, K / HD, HD] with head strides


@triton.jit
def _gemv_input(x, x2, o_m, o_k, m_mk, stride_x, stride_x2, stride_xh, stride_x2h, PROLOGUE: tl.constexpr,
                HD: tl.constexpr):
    """The GEMV's input tile [BM, BK] before the norm, in x's dtype: x, x + residual, silu(gate) * up or
    o * sigmoid(gate), each rounded where PyTorch rounds (the sum once; silu's or sigmoid's result, then the
    product)."""
    if PROLOGUE == SIGMOID_GATE:  # column k is channel k % HD of head k // HD
        o_h, o_d = o_k // HD, o_k % HD
        b_o = tl.load(x + o_m[:, None] * stride_x + (o_h * stride_xh + o_d)[None, :], mask=m_mk, other=0.)
        b_g = tl.load(x2 + o_m[:, None] * stride_x2 + (o_h * stride_x2h + o_d)[None, :], mask=m_mk, other=0.)
        b_s = tl.sigmoid(b_g.to(tl.float32)).to(x.dtype.element_ty).to(tl.float32)
        b_x = (b_o.to(tl.float32) * b_s).to(x.dtype.element_ty)
    else:
        b_x = tl.load(x + o_m[:, None] * stride_x + o_k[None, :], mask=m_mk, other=0.)
    if PROLOGUE == ADD_RMS_NORM or PROLOGUE == SILU_MUL:
        b_x2 = tl.load(x2 + o_m[:, None] * stride_x2 + o_k[None, :], mask=m_mk, other=0.).to(tl.float32)
        b_xf = b_x.to(tl.float32)
        if PROLOGUE == SILU_MUL:
            b_xf = (b_xf * tl.sigmoid(b_xf)).to(x.dtype.element_ty).to(tl.float32)
            b_x = (b_xf * b_x2).to(x.dtype.element_ty)
        else:
            b_x = (b_xf + b_x2).to(x.dtype.element_ty)
    return b_x


PREFETCH_MAX_BYTES = 24 << 20  # weights up to this size are sent toward L2 ahead of the wait (the L2 holds 50-60 MB)
PREFETCH = os.environ.get("HYBRIDLM_GEMV_PREFETCH", "1") != "0"  # only with PDL; =0 for comparison
# "block_n for N < 4096, block_n above, largest block_k, stages, warps": replaces `gemv_config`'s CUDA-core tiles, to
# time other rules end to end (HYBRIDLM_GEMV_TILES=2,4,1024,3,4 python benchmarks/bench_e2e.py ...)
TILES = tuple(int(v) for v in os.environ["HYBRIDLM_GEMV_TILES"].split(",")) if os.environ.get(
    "HYBRIDLM_GEMV_TILES") else None


@triton.jit
def _prefetch_l2(p):
    """Ask for the 128-byte lines at pointers p to be brought into L2; nothing waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def gemv_kernel(
    x,  # [M, K] (SILU_MUL: gate; SIGMOID_GATE: o [M, K / HD, HD])
    x2,  # [M, K]: residual (ADD_RMS_NORM) or up (SILU_MUL); SIGMOID_GATE: the gate [M, K / HD, HD]
    norm_weight,  # [K]: applied as 1 + w (RMS_NORM, ADD_RMS_NORM)
    w,  # [N, K]
    y,  # out [M, N]
    summed,  # out [M, K]: x + residual (ADD_RMS_NORM), written by program 0
    eps,
    M,
    N,
    K,
    stride_x,
    stride_x2,
    stride_xh,  # SIGMOID_GATE: the head strides of x and x2
    stride_x2h,
    stride_w,
    stride_y,
    PROLOGUE: tl.constexpr,
    HD: tl.constexpr,  # SIGMOID_GATE: the head dim
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # L2 lines per weight row per prefetch step; 0: no prefetch
    LINE: tl.constexpr,  # weight elements per 128-byte line
):
    i_n = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    p_w = w + o_n.to(tl.int64)[:, None] * stride_w
    if PREFETCH > 0:  # the weights need nothing from earlier kernels: send them toward L2 while those finish
        p_wc = w + tl.minimum(o_n, N - 1).to(tl.int64)[:, None] * stride_w
        for k0 in range(0, K, LINE * PREFETCH):
            _prefetch_l2(p_wc + tl.minimum(k0 + tl.arange(0, PREFETCH) * LINE, K - 1)[None, :])
    pdl_wait(USE_PDL)  # from here on, activations written by the kernels before
    NORM: tl.constexpr = PROLOGUE == RMS_NORM or PROLOGUE == ADD_RMS_NORM
    if NORM:  # pass 1: the rows' mean square (the rows are a few kB: L2 serves every program after the first)
        b_ss = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_mk = m_m[:, None] & (o_k < K)[None, :]
            b_x = _gemv_input(x, x2, o_m, o_k, m_mk, stride_x, stride_x2, stride_xh, stride_x2h, PROLOGUE, HD)
            if PROLOGUE == ADD_RMS_NORM:
                if i_n == 0:
                    tl.store(summed + o_m[:, None] * K + o_k[None, :], b_x, mask=m_mk)
            b_xf = b_x.to(tl.float32)
            b_ss += tl.sum(b_xf * b_xf, axis=1)
        b_rstd = tl.rsqrt(b_ss / K + eps)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):  # STAGES > 1: the weight tiles come ahead through cp.async
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_x = _gemv_input(x, x2, o_m, o_k, m_m[:, None] & m_k[None, :], stride_x, stride_x2, stride_xh, stride_x2h,
                          PROLOGUE, HD)
        if NORM:  # as rms_norm_fwd: (x * rstd) * (1 + w) in fp32, rounded once to x's dtype
            b_nw = 1. + tl.load(norm_weight + o_k, mask=m_k, other=0.).to(tl.float32)
            b_x = (b_x.to(tl.float32) * b_rstd[:, None] * b_nw[None, :]).to(x.dtype.element_ty)
        m_nk = m_n[:, None] & m_k[None, :]
        if USE_DOT:
            b_w = tl.load(p_w + o_k[None, :], mask=m_nk, other=0.)  # [BN, BK]
            b_acc = tl.dot(b_x, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
        else:  # CUDA cores. Loaded as [1, BN, BK], the weight keeps its coalesced layout through the product and
            # only the small x tile is rearranged; a [BN, BK] load broadcast later went through shared memory whole
            b_w3 = tl.load(p_w[None, :, :] + o_k[None, None, :], mask=m_nk[None, :, :], other=0.)  # [1, BN, BK]
            b_acc += tl.sum(b_x.to(tl.float32)[:, None, :] * b_w3.to(tl.float32), axis=2)
    p_y = y + o_m[:, None] * stride_y + o_n[None, :]
    tl.store(p_y, b_acc.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@dataclass(frozen=True)
class GemvConfig:
    """One launch's shape: `block_n` weight rows per program, `block_k` columns per loop step, `num_warps`,
    `num_stages` weight tiles in flight (cp.async; 1: plain loads), and `use_dot` (tl.dot on the rows padded to
    16, else CUDA-core multiply-adds; None: the rule's choice)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool | None = None


def gemv_preferred(kind: str, rows: int, n: int, k: int) -> bool:
    """Whether this GEMV beats the unfused path (its neighbour's launch, then cuBLAS) for weight [n, k] and `rows`
    rows; `kind` is "norm" (rms_norm_linear_fwd), "silu" (silu_mul_linear_fwd), "gate" (sigmoid_gate_linear_fwd) or
    "linear" (linear_fwd).

    From `bench_gemv.py --models 0.8B 9B --rows 1 2 4` on an H100, bf16, in CUDA graphs over cold weights
    (benchmarks/RESULTS.md, 2026-11-23, fifth session), fused vs unfused:
    - plain products (out_proj, o_proj; N 1024-4096): 1.15-1.26x at 1 and 2 rows, 0.92-1.07x at 4;
    - norm prologue: 0.8B projections (K = 1024) 1.06-1.10x at 1 row, 1.02-1.03x at 2; the LM heads (N = 248k)
      1.06-1.09x at 1-2 rows; but the 9B projections (K = 4096, N 10k-25k) 0.83-0.90x;
    - SwiGLU prologue: 0.8B down (K = 3584) 1.17x at 1 row, 0.87x at 2; 9B down (K = 12288) 1.00x at 1 row;
    - everything at 4 rows or more loses (0.19-0.75x for the prologue kernels: too few programs, no split over K).
    The sigmoid-gate prologue (o_proj) is not yet measured on an H100. One run on an H200 (same graphs, bf16; vs
    sigmoid_gate_fwd + linear_fwd): 0.8B (K = 2048, N = 1024) 1.28x at 1 row, 1.19x at 2; 9B (K = 4096, N = 4096)
    1.01x at 1 row, 0.74x at 2 (every program recomputes the gate of its rows). So SwiGLU's rule, and 2 rows at
    K <= 2048.
    """
    if rows > 2:
        return False
    if kind == "linear":
        return True
    if kind == "norm":
        return k <= 2048 or n >= 65536
    if kind == "silu":
        return rows == 1 and k <= 4096
    if kind == "gate":  # measured on an H200 only (see above)
        return k <= 2048 or (rows == 1 and k <= 4096)
    raise ValueError(f"kind must be 'norm', 'silu', 'gate' or 'linear', got {kind!r}")


def gemv_config(rows: int, n: int, k: int, multiprocessors: int = 132, element_size: int = 2) -> GemvConfig:
    """The default launch, by a rule rather than a tuning table (benchmarks/bench_gemv.py sweeps around it):
    - tl.dot from 3 rows on in bf16/fp16. On CUDA cores every weight element costs `rows` multiply-adds, and the K
      reduction shuffles per row: at 8 rows that is about as many instructions as the SM can issue while the bytes
      stream in. The mma costs nothing, and padding the rows to 16 costs no bytes. fp32 stays on CUDA cores: its
      full-precision ("ieee") dot runs on them anyway, with more registers.
    - BLOCK_K = one warp's 32 lanes x 16 bytes: 256 bf16 or 128 fp32 (K's power of two if smaller).
    - BLOCK_N = the largest power of two that still gives 2 programs per SM, within 16..32 with tl.dot (its tile
      minimum; 32 keeps the activations, which every program re-reads from L2, below the weight's bytes at 8 rows)
      and 4..16 on CUDA cores (one row per warp at least; rows x BLOCK_N <= 64 bounds the registers). The 0.8B
      shapes at M = 1: in-proj N = 8224 -> 16 (514 programs), N = 1024 -> 4 (256 programs).
    - 4 warps; 3 stages (two weight tiles in flight while one is used).
    - One row and N < 4096 (out_proj, o_proj, mlp down of 0.8B): BLOCK_N 4 and BLOCK_K up to 4 kB of a row, so that
      each program has whole rows in flight. `bench_gemv.py --wide-sweep` on an H200: mlp down (1024 x 3584) 8.3 ->
      5.3 us, out_proj (1024 x 2048) ~4.5 -> 3.5 us; for the large-N products the 256-wide tiles stayed best.
    N = 1024 at M > 2 thus gets only 64 programs: a split over K is the next step if that shape loses."""
    use_dot = rows > 2 and element_size < 4
    if TILES and not use_dot:  # a trial rule for the CUDA-core path, from the environment (bench runs only)
        block_n_small, block_n_large, max_block_k, stages, warps = TILES
        return GemvConfig(block_n_large if n >= 4096 else block_n_small,
                          max(16, min(max_block_k, next_power_of_2(k))), warps, stages, False)
    if rows == 1 and n < 4096:  # the small-N products (out_proj, o_proj, mlp down): whole rows of up to 4 kB a step
        block_k = max(16, min(4096 // element_size, next_power_of_2(k)))
        return GemvConfig(block_n=4, block_k=block_k, use_dot=False)
    block_k = max(16, min(512 // element_size, next_power_of_2(k)))
    floor, block_n = (16, 32) if use_dot else (4, max(4, min(16, 64 // next_power_of_2(rows))))
    while block_n > floor and cdiv(n, block_n) < 2 * multiprocessors:
        block_n //= 2
    return GemvConfig(block_n=block_n, block_k=block_k, use_dot=use_dot)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs to fill: the device's own, or an H100's 132 off the GPU (so offline compiles see the H100 launches)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """t [..., K] as [M, K] with a unit last stride: a view where the leading axes merge, else a copy."""
    t = t.reshape(-1, k)
    return t if t.stride(1) == 1 or k == 1 else t.contiguous()


def _heads(t: torch.Tensor) -> torch.Tensor:
    """t [..., H, D] as [M, H, D] with a unit last stride, any row and head strides: a view where the leading axes
    merge, else a copy."""
    t = t.reshape(-1, *t.shape[-2:])
    return t if t.stride(2) == 1 or t.shape[2] == 1 else t.contiguous()


def _gemv(prologue: tl.constexpr, x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None,
          eps: float, weight: torch.Tensor, config: GemvConfig | None, names: tuple[str, str] = ("x", "residual")
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks the inputs, then one launch; returns (y [M, N], x + x2 [M, K] for ADD_RMS_NORM else None). With
    SIGMOID_GATE, x and x2 are [..., H, D] (K = H * D), read through their head strides."""
    per_head = prologue is SIGMOID_GATE
    if x.dtype not in DTYPES:
        raise ValueError(f"{names[0]} must be float32, bfloat16 or float16, got {x.dtype}")
    if per_head:
        width, axes = (x.shape[-2] * x.shape[-1] if x.ndim >= 2 else None), "last two axes (heads x head dim)"
    else:
        width, axes = (x.shape[-1] if x.ndim else None), "last axis"
    if weight.ndim != 2 or width is None or weight.shape[1] != width:
        raise ValueError(f"weight must be [N, K] with K = {names[0]}'s {axes}, got weight {tuple(weight.shape)} "
                         f"and {names[0]} {tuple(x.shape)}")
    for name, t in (("weight", weight), (names[1], x2)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have {names[0]}'s dtype {x.dtype}, got {t.dtype}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous in its last axis, got strides {weight.stride()}")
    n, k = weight.shape
    x2d = _heads(x) if per_head else _rows(x, k)
    rows = x2d.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"the decode GEMV takes at most {MAX_ROWS} rows, got {rows} ({names[0]} {tuple(x.shape)}): "
                         "use the GEMM path (F.linear) for more")
    x2d2 = x2d if x2 is None else _heads(x2) if per_head else _rows(x2, k)
    head_dim, head_strides = (x2d.shape[2], (x2d.stride(1), x2d2.stride(1))) if per_head else (1, (0, 0))
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)  # [M, N]
    summed = torch.empty_like(x2d) if prologue is ADD_RMS_NORM else None  # [M, K]
    if rows == 0 or n == 0:
        return y, summed
    default = gemv_config(rows, n, k, _multiprocessors(x.device), x.element_size())
    config = default if config is None else config
    use_dot = default.use_dot if config.use_dot is None else config.use_dot
    if use_dot and min(config.block_n, config.block_k) < 16:
        raise ValueError(f"tl.dot needs block_n and block_k >= 16, got {config}")
    pdl = pdl_enabled(x.device)
    # with PDL, each program prefetches its weight rows (about one line per thread and step) before it waits
    small = n * k * weight.element_size() <= PREFETCH_MAX_BYTES
    prefetch = max(1, 128 // config.block_n) if pdl and PREFETCH and small else 0
    launch(gemv_kernel, (cdiv(n, config.block_n),),
        x2d, x2d2, x2d if norm_weight is None else norm_weight, weight, y, y if summed is None else summed, eps,
        rows, n, k, x2d.stride(0), x2d2.stride(0), *head_strides, weight.stride(0), y.stride(0),
        PROLOGUE=prologue.value, HD=head_dim,
        BM=16 if use_dot else next_power_of_2(rows), BN=config.block_n, BK=config.block_k, USE_DOT=use_dot,
        DOT_PRECISION=dot_precision(x.dtype), STAGES=config.num_stages, USE_PDL=pdl, PREFETCH=prefetch,
        LINE=128 // weight.element_size(), num_warps=config.num_warps, launch_pdl=pdl)
    return y, summed


def rms_norm_linear_fwd(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        residual: torch.Tensor | None = None, *, config: GemvConfig | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x) @ weight.T in one launch: x [..., K] (at most 16 rows), norm_weight [K] (zero-centred: applied as
    1 + w), weight [N, K] -> y [..., N] in x's dtype. With `residual` [..., K] it normalises s = x + residual and
    returns (y, s), as `rms_norm_fwd(x, norm_weight, eps, residual)` would before the GEMM."""
    if x.ndim == 0 or norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"norm_weight must be [K] with K = x's last axis, got norm_weight {tuple(norm_weight.shape)} "
                         f"and x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be shaped like x {tuple(x.shape)}, got {tuple(residual.shape)}")
    prologue = RMS_NORM if residual is None else ADD_RMS_NORM
    y, summed = _gemv(prologue, x, residual, norm_weight, eps, weight, config)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if residual is None else (y, summed.view(x.shape))


def silu_mul_linear_fwd(gate_up: torch.Tensor, weight: torch.Tensor, *, config: GemvConfig | None = None
                        ) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T in one launch. gate_up [..., 2I] is the fused gate/up GEMM's output, the gate
    columns then the up columns, with any row stride (the MLP's two views are `gate_up.chunk(2, -1)`: pass the
    tensor they are slices of); weight [N, I] -> [..., N]."""
    if gate_up.ndim == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] (the gate columns, then up), got {tuple(gate_up.shape)}")
    gate, up = gate_up.chunk(2, dim=-1)
    y, _ = _gemv(SILU_MUL, gate, up, None, 0., weight, config, names=("gate_up's gate half", "up"))
    return y.view(*gate_up.shape[:-1], weight.shape[0])


def sigmoid_gate_linear_fwd(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *,
                            config: GemvConfig | None = None) -> torch.Tensor:
    """(o * sigmoid(gate)) @ weight.T in one launch, the gate rounded as `sigmoid_gate_fwd` rounds it: o and gate
    [..., H, D] with any strides but a unit last one (the attention output transposed; every other head-sized slice
    of the q projection), weight [N, H * D] -> [..., N]."""
    if o.shape != gate.shape or o.ndim < 2:
        raise ValueError(f"o and gate must be [..., H, D] of one shape, got {tuple(o.shape)} and {tuple(gate.shape)}")
    y, _ = _gemv(SIGMOID_GATE, o, gate, None, 0., weight, config, names=("o", "gate"))
    return y.view(*o.shape[:-2], weight.shape[0])


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, *, config: GemvConfig | None = None) -> torch.Tensor:
    """x @ weight.T for x [..., K] of at most 16 rows and weight [N, K]: the same GEMV without a prologue."""
    y, _ = _gemv(NONE, x, None, None, 0., weight, config)
    return y.view(*x.shape[:-1], weight.shape[0])
