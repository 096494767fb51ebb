"""The cached launch path's keys (hybridlm/ops/triton/launch.py), on the CPU: a key must change wherever Triton would
specialise or type an argument anew, and the full argument list must follow the kernel's signature. The launches
themselves are checked on a GPU (tests/cuda/test_launch.py)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import _Plan


def _probe_source(x, y, n, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 2, maybe=None):
    pass


# (a JITFunction even where the tests run under TRITON_INTERPRET=1, whose triton.jit returns an interpreted one)
_probe = triton.runtime.jit.JITFunction(_probe_source)


def keyed(*args, **kwargs):
    return _Plan(_probe, len(args), tuple(kwargs)).keyed(args, kwargs)


def test_full_arguments_follow_the_signature():
    x, y = torch.zeros(64), torch.zeros(64)
    full, _ = keyed(x, y, 7, 0.5, True, BLOCK=64, num_warps=4)
    assert full[:6] == (x, y, 7, 0.5, True, 64) and full[6] == 2 and full[7] is None
    full, _ = keyed(x, y, 7, 0.5, flag=False, BLOCK=32, maybe=x, MODE=3)
    assert full[4] is False and full[5:] == (32, 3, x)


def test_keys_change_where_triton_specialises():
    base = torch.zeros(256)
    y = torch.zeros(64)
    _, key = keyed(base, y, 64, 0.5, True, BLOCK=64)
    same = [keyed(base, y, 128, 0.25, True, BLOCK=64)[1],  # another multiple of 16, another float
            keyed(base[4:], y, 64, 0.5, True, BLOCK=64)[1],  # 16 bytes further: still aligned
            keyed(torch.zeros(64), y, 64, 0.5, True, BLOCK=64)[1]]
    assert all(k == key for k in same)
    different = [keyed(base[1:], y, 64, 0.5, True, BLOCK=64)[1],  # misaligned
                 keyed(base.to(torch.bfloat16), y, 64, 0.5, True, BLOCK=64)[1],  # dtype
                 keyed(base, y, 65, 0.5, True, BLOCK=64)[1],  # not a multiple of 16
                 keyed(base, y, 1, 0.5, True, BLOCK=64)[1],  # 1
                 keyed(base, y, 2**33, 0.5, True, BLOCK=64)[1],  # 64 bits
                 keyed(base, y, 64, 0.5, False, BLOCK=64)[1],  # a bool's value
                 keyed(base, y, 64, 0.5, True, BLOCK=32)[1],  # a constexpr
                 keyed(base, y, 64, 0.5, True, BLOCK=64, MODE=3)[1],  # a default constexpr given
                 keyed(base, y, 64, 0.5, True, BLOCK=64, maybe=y)[1],  # None -> a tensor
                 keyed(base, y, 64, 0.5, True, BLOCK=64, num_warps=8)[1]]  # a launch option
    assert all(k != key for k in different)
    assert len(set(different)) == len(different)


def test_unmodelled_arguments_and_bad_calls():
    from hybridlm.ops.triton.launch import _Unmodelled

    with pytest.raises(_Unmodelled):
        keyed(object(), torch.zeros(4), 1, 0.5, True, BLOCK=64)
    with pytest.raises(TypeError, match="missing argument 'BLOCK'"):
        keyed(torch.zeros(4), torch.zeros(4), 1, 0.5, True)
    with pytest.raises(TypeError, match="takes 8 arguments"):
        keyed(*range(9))
