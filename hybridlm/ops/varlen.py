"""Packed variable-length batches: the host copy of `cu_seqlens`.

Kernel wrappers size their grids from the sequence bounds, so they need them on the host. Reading a CUDA tensor
back is a sync; a forward over packed sequences would do it in every layer. The engine and the data loaders
build cu_seqlens from host lists anyway, and attach them here; otherwise the first reader pays one sync and the
values stay with the tensor for every later layer. Kept free of Triton so CPU processes can use it.
"""
from __future__ import annotations

import torch

_HOST = "_hybridlm_host_bounds"  # attribute a cu_seqlens tensor carries: (its version, bounds, memo of tables)


def attach_host_bounds(cu_seqlens: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Tell the kernels the values of `cu_seqlens` that the caller built it from, so that no kernel wrapper reads
    it back from the GPU (each read is a host sync: the engine's mixed step had ~190 of them, 4 per GDN layer).
    The values stay attached to this tensor object only while it is not modified in place (which inference-mode
    tensors cannot tell: do not modify one that carries bounds)."""
    setattr(cu_seqlens, _HOST, (_version(cu_seqlens), [int(b) for b in bounds], {}))
    return cu_seqlens


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place modification counter; inference-mode tensors keep none (those are taken as unchanged)."""
    return None if tensor.is_inference() else tensor._version


def _host_view(cu_seqlens: torch.Tensor) -> tuple[int | None, list[int], dict]:
    cached = getattr(cu_seqlens, _HOST, None)
    if cached is None or cached[0] != _version(cu_seqlens):
        attach_host_bounds(cu_seqlens, cu_seqlens.tolist())  # one sync per tensor, then every layer reuses it
        cached = getattr(cu_seqlens, _HOST)
    return cached


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a host list: attached by the caller, or read once per tensor and kept on it."""
    return _host_view(cu_seqlens)[1]


def host_memo(cu_seqlens: torch.Tensor) -> dict:
    """A dict that lives with this tensor's host bounds (tables derived from them: chunk indices and so on)."""
    return _host_view(cu_seqlens)[2]


def chunk_tables_key(chunk_size: int, device: torch.device) -> tuple:
    """Where `host_memo` keeps the chunk tables of one chunk size on one device (`ops.triton.utils.prepare_chunks`)."""
    return "chunks", chunk_size, torch.device(device)


def attach_chunk_tables(cu_seqlens: torch.Tensor, chunk_size: int, cu_seqlens32: torch.Tensor,
                        chunk_indices: torch.Tensor, chunk_offsets: torch.Tensor, num_chunks: int) -> None:
    """Give a cu_seqlens that carries host bounds its chunk tables as device tensors the caller owns (int32:
    cu_seqlens, chunk_indices [num_chunks, 2] of (sequence, chunk within it), chunk_offsets [N + 1]), so that the
    kernels read those instead of building their own from the bounds. A CUDA graph captured over such tensors
    replays with whatever tables the caller writes into them later, provided their shapes (the grids) stay."""
    if chunk_indices.shape != (num_chunks, 2) or chunk_offsets.shape != cu_seqlens32.shape:
        raise ValueError(f"chunk tables of {num_chunks} chunks need indices [{num_chunks}, 2] and offsets shaped as "
                         f"cu_seqlens {tuple(cu_seqlens32.shape)}, got {tuple(chunk_indices.shape)} and "
                         f"{tuple(chunk_offsets.shape)}")
    host_memo(cu_seqlens)[chunk_tables_key(chunk_size, cu_seqlens32.device)] = (
        cu_seqlens32, chunk_indices, chunk_offsets, num_chunks)
