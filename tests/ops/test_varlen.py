"""Host copies of cu_seqlens: attached by the caller or read once, kept with the tensor, dropped when it changes."""
from __future__ import annotations

import pytest
import torch

from hybridlm.ops.varlen import attach_host_bounds, host_bounds, host_memo


def test_attached_bounds_are_used_without_reading_the_tensor():
    cu = torch.tensor([0, 3, 7])
    attach_host_bounds(cu, [0, 3, 7])
    assert host_bounds(cu) == [0, 3, 7]
    # what was attached is what the kernels see: proof that the tensor itself is not read again
    attach_host_bounds(cu, [0, 2, 7])
    assert host_bounds(cu) == [0, 2, 7]


def test_bounds_are_read_once_and_reread_after_an_in_place_change():
    cu = torch.tensor([0, 4, 9])
    assert host_bounds(cu) == [0, 4, 9]
    memo = host_memo(cu)
    memo["table"] = "kept"
    assert host_memo(cu)["table"] == "kept"  # same tensor, unchanged: the same memo
    cu[1] = 5
    assert host_bounds(cu) == [0, 5, 9]
    assert "table" not in host_memo(cu)  # tables derived from the old values are gone with them


def test_inference_tensors_keep_their_bounds():
    with torch.inference_mode():
        cu = torch.tensor([0, 1, 2])
    assert cu.is_inference()
    assert host_bounds(cu) == [0, 1, 2]
    assert host_memo(cu) is host_memo(cu)


def test_chunk_tables_are_built_once_per_tensor_and_chunk_size():
    pytest.importorskip("triton")
    from hybridlm.ops.triton.utils import prepare_chunks

    cu = attach_host_bounds(torch.tensor([0, 5, 69, 130]), [0, 5, 69, 130])
    first = prepare_chunks(cu, 64)
    assert prepare_chunks(cu, 64) is first
    cu32, indices, offsets, count = first
    assert cu32.dtype == torch.int32 and cu32.tolist() == [0, 5, 69, 130]
    assert indices.tolist() == [[0, 0], [1, 0], [2, 0]] and offsets.tolist() == [0, 1, 2, 3] and count == 3
    _, indices16, offsets16, count16 = prepare_chunks(cu, 16)
    assert count16 == 1 + 4 + 4 and offsets16.tolist() == [0, 1, 5, 9] and indices16[-1].tolist() == [2, 3]


def test_bad_bounds_are_named():
    pytest.importorskip("triton")
    from hybridlm.ops.triton.utils import check_cu_seqlens

    with pytest.raises(ValueError, match="without falling"):
        check_cu_seqlens(torch.tensor([0, 6, 4, 10]), 1, 10)
    with pytest.raises(ValueError, match="from 0 to T=10"):
        check_cu_seqlens(torch.tensor([0, 4, 9]), 1, 10)
