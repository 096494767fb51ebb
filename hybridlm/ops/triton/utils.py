"""Host-side helpers shared by the Triton kernels: chunk tables for packed sequences, dtype maps, and a fix for
the CPU interpreter so the kernels can be tested without a GPU."""
from __future__ import annotations

import functools
import os
import re

import torch
import triton
import triton.language as tl

from hybridlm.ops.varlen import chunk_tables_key, host_bounds, host_memo


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: `triton.cdiv` does the same through Triton's constexpr machinery at ~2 us a call,
    and a model's forward makes hundreds of these calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as `triton.next_power_of_2` for host code (see `cdiv`)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def chunk_launch(chunks: int, num_bh: int, heads_fastest_from: int | None) -> tuple[tuple[int, int], dict]:
    """The grid and launch arguments of a kernel with one program per chunk and (batch, head) pair: (chunks, num_bh),
    or, where there are at least `heads_fastest_from` chunks (None: never), (num_bh, chunks), whose neighbouring
    programs are the heads of one chunk (`gdn_common._chunk_program`), if the chunks fit a grid's second dimension
    (65535)."""
    if heads_fastest_from is not None and heads_fastest_from <= chunks <= 65535:
        return (num_bh, chunks), dict(HEADS_FASTEST=True)
    return (chunks, num_bh), {}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots ("ieee"); bf16/fp16 operands run on tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


# fla-org/flash-linear-attention#640, #983: Triton 3.4 to 3.7.0 miscompile some tiles on Hopper (sm_90): a transposed
# tensor in the tensor-core output layout feeding a product. Fixed in 3.7.1.
HOPPER_FIXED_TRITON = (3, 7, 1)


def triton_release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a Triton version string ("3.6.0+git..." -> (3, 6, 0))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@functools.cache
def hopper_miscompiles(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU and the installed Triton is one that miscompiles there (HOPPER_FIXED_TRITON):
    the launchers then keep to the tiles that were checked on one (an H200, Triton 3.6)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and triton_release(triton.__version__) < HOPPER_FIXED_TRITON)


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def tma_capable(device: torch.device) -> bool:
    """Whether kernels may take tensor descriptors (TMA) on `device`: Hopper and later, or the CPU interpreter
    (which runs them as plain loads, so the tests cover the descriptor paths)."""
    return device.type != "cuda" or _pdl_capable(device)


def descriptor(x: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    """A tensor descriptor over `x`'s memory viewed as `shape` with `strides` (last 1) and boxes of `block`, or None
    where TMA cannot take it (a start or a stride not a multiple of 16 bytes)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    size = x.element_size()
    if x.data_ptr() % 16 or any(stride * size % 16 for stride in strides[:-1]) or strides[-1] != 1:
        return None
    return TensorDescriptor(x, shape, strides, block)


def pdl_enabled(device: torch.device) -> bool:
    """Whether the decode kernels launch with programmatic dependent launch (PDL, Hopper and later): each kernel of
    the chain is let onto the GPU while its predecessor is still finishing, waits (`pdl_wait`) before touching any
    memory an earlier kernel wrote or reads, and meanwhile does what needs no such memory (the GEMVs send their
    weights toward L2). Off unless `HYBRIDLM_PDL=1`: on an H200 it made the 0.8B batch-1 decode step slower, 751
    against 774 tok/s, weight prefetch or not (benchmarks/RESULTS.md, sixth session)."""
    return device.type == "cuda" and os.environ.get("HYBRIDLM_PDL", "0") == "1" and _pdl_capable(device)


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the kernel before has finished and its memory is visible, then let the next kernel launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def prepare_chunks(cu_seqlens: torch.Tensor, chunk_size: int, device: torch.device | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tables for packed sequences, chunks never straddling a sequence boundary; computed once per cu_seqlens
    tensor and chunk size (every layer of a forward shares them).

    Returns cu_seqlens as int32 on `device` (default: its own), chunk_indices [NT, 2] int32 (sequence id, chunk
    id within it) for the chunk-parallel kernels, chunk_offsets [N + 1] int32 (first global chunk of each
    sequence) for the sequential state pass, and NT.
    """
    bounds, memo = host_bounds(cu_seqlens), host_memo(cu_seqlens)
    device = cu_seqlens.device if device is None else torch.device(device)
    key = chunk_tables_key(chunk_size, device)
    if key not in memo:
        per_sequence = [cdiv(b - a, chunk_size) for a, b in zip(bounds[:-1], bounds[1:])]
        indices = [(i, t) for i, n in enumerate(per_sequence) for t in range(n)]
        offsets = [0]
        for n in per_sequence:
            offsets.append(offsets[-1] + n)
        tables = torch.tensor([*bounds, *offsets, *(x for pair in indices for x in pair)], dtype=torch.int32)
        tables = tables.to(device, non_blocking=True)  # one copy for all three
        count = len(bounds)
        memo[key] = (tables[:count], tables[2 * count:].reshape(-1, 2), tables[count:2 * count], offsets[-1])
    return memo[key]


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> None:
    if cu_seqlens is None:
        return
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1], got shape {tuple(cu_seqlens.shape)}")
    bounds = host_bounds(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must run from 0 to T={length} without falling, got {bounds}")


def rows_packed(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] with D and H packed (strides D, 1) and B, T mergeable into one token axis; the token stride
    itself may be anything (q and k are usually column slices of the conv output). Copies otherwise."""
    batch, length, heads, dim = x.shape
    packed = x.stride(3) == 1 and (heads == 1 or x.stride(2) == dim)
    mergeable = batch == 1 or x.stride(0) == length * x.stride(1)
    return x if packed and mergeable else x.contiguous()


def _patch_interpreter_bf16() -> None:
    """Make triton's CPU interpreter treat bf16 as the GPU does (triton 3.9): it keeps bf16 as raw uint16 and
    (1) multiplies the bit patterns in tl.dot, (2) truncates fp32 -> bf16 instead of rounding to nearest even.
    Only ever applied under TRITON_INTERPRET=1: compiled kernels are untouched."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a triton without the interpreter module
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_hybridlm_bf16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def as_float32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x.data.astype(np.float32)
        return (x.data.astype(np.uint32) << 16).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            product = np.matmul(as_float32(a), as_float32(b), dtype=d.data.dtype)
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._hybridlm_bf16 = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16()
