"""`hybridlm.ops.triton.launch.launch` against Triton's own launch: same results wherever the cached path's key could
go wrong (alignment, dtype, an int of 1 or a multiple of 16, constexprs by keyword and by default, a changed grid),
and a new compiled kernel where Triton would specialise anew. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hybridlm.ops.triton import launch as launch_module
from hybridlm.ops.triton.launch import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@triton.jit
def _scaled_copy(x, y, n, stride, scale, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    value = tl.load(x + offsets * stride, mask=mask).to(tl.float32) * scale
    if SQUARE:
        value = value * value
    tl.store(y + offsets, value.to(y.dtype.element_ty), mask=mask)


def _expected(x, n, stride, scale, square):
    value = x[: n * stride : stride].float() * scale
    return value * value if square else value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_matches_triton_across_kinds(dtype):
    base = torch.randn(4096, device="cuda", dtype=dtype)
    for offset, n, stride, square in [(0, 1000, 1, False), (0, 1000, 1, False), (1, 999, 1, False), (0, 64, 16, True),
                                      (3, 1, 1, True), (0, 1000, 2, False), (0, 1000, 1, True)]:
        x = base[offset:]
        y = torch.empty(n, device="cuda", dtype=dtype)
        grid = (triton.cdiv(n, 128),)
        if square:
            launch(_scaled_copy, grid, x, y, n, stride, 0.5, BLOCK=128, SQUARE=True, num_warps=4)
        else:
            launch(_scaled_copy, grid, x, y, n, stride, 0.5, BLOCK=128, num_warps=4)
        torch.testing.assert_close(y.float(), _expected(x, n, stride, 0.5, square).to(dtype).float())


def test_launch_keys_are_at_least_triton_s():
    """Each new alignment / int class / dtype / constexpr gets its own entry; a repeat of a kind adds none."""
    launch_module._PLANS.pop(id(_scaled_copy), None)
    base = torch.randn(4096, device="cuda")
    y = torch.empty(4096, device="cuda")

    def entries():
        plans = launch_module._PLANS.get(id(_scaled_copy), (None, {}))[1]
        return sum(len(plan.compiled) for plan in plans.values())

    calls = [(base, 1000, 1), (base, 1000, 1), (base[1:], 1000, 1), (base, 1024, 1), (base, 1000, 1), (base, 1, 1)]
    counts = []
    for x, n, stride in calls:
        launch(_scaled_copy, (triton.cdiv(n, 256),), x, y, n, stride, 2.0, BLOCK=256)
        counts.append(entries())
    if launch_module.FAST_LAUNCH:
        assert counts == [1, 1, 2, 3, 3, 4]
    torch.testing.assert_close(y[:1], base[:1] * 2)


def test_launch_in_a_cuda_graph():
    x = torch.randn(1000, device="cuda")
    y = torch.empty(1000, device="cuda")
    launch(_scaled_copy, (8,), x, y, 1000, 1, 3.0, BLOCK=128)  # compiled and cached outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(_scaled_copy, (8,), x, y, 1000, 1, 3.0, BLOCK=128)
    y.zero_()
    x.copy_(torch.randn(1000, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, x * 3.0)


def test_a_launcher_that_refuses_sends_the_process_to_triton(monkeypatch):
    """Where the C launcher refuses what Triton's path takes (a changed launcher), the call still runs, through
    Triton, and later calls go there too."""
    if not launch_module.FAST_LAUNCH:
        pytest.skip("the cached path is off")
    x = torch.randn(1000, device="cuda")
    y = torch.empty(1000, device="cuda")
    launch(_scaled_copy, (8,), x, y, 1000, 1, 2.0, BLOCK=128)
    plans = launch_module._PLANS[id(_scaled_copy)][1]
    for plan in plans.values():
        for key, (compiled, used) in list(plan.compiled.items()):
            class Refusing:
                function, packed_metadata = compiled.function, compiled.packed_metadata

                @staticmethod
                def run(*args):
                    raise TypeError("a launcher of another signature")
            plan.compiled[key] = (Refusing(), used)
    monkeypatch.setattr(launch_module, "FAST_LAUNCH", True)
    y.zero_()
    launch(_scaled_copy, (8,), x, y, 1000, 1, 2.0, BLOCK=128)
    torch.testing.assert_close(y, x * 2.0)
    assert launch_module.FAST_LAUNCH is False
    launch_module._PLANS.pop(id(_scaled_copy), None)  # (the refusing entries go with it)
