"""The GPU's device-to-device copy rate, measured in the benchmark's own process: the memory floor every script
divides by. A number typed in holds for one machine only (the H100 here copied 3.02 TB/s, an H200 ~4.3 TB/s)."""
from __future__ import annotations

import functools

import torch


@functools.cache
def copy_bandwidth(device: int = 0, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second read plus written by a copy of `nbytes` (well past the L2), median of `repeats`; NaN
    without a GPU (the CPU smoke runs print no floor)."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]
