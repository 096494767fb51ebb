"""Host helpers of hybridlm.ops.triton.utils that replace Triton's own on the launch path."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.triton.utils import cdiv, next_power_of_2  # noqa: E402


def test_cdiv_and_next_power_of_2_match_triton():
    """Plain-Python twins of triton.cdiv and triton.next_power_of_2 (which cost ~2 us a call through Triton's
    constexpr machinery), equal on every value the wrappers pass."""
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(1 << 40) == 1 << 40 and next_power_of_2((1 << 40) + 1) == 1 << 41
