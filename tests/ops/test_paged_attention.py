"""Paged decode attention: the reference against plain attention over each sequence's gathered keys, and the
Triton kernel (CPU: the interpreter) against the reference."""
from __future__ import annotations

import os

import pytest
import torch

from hybridlm.ops import attention_reference
from hybridlm.ops.paged_attention import paged_decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(context_lens, query_heads=4, kv_heads=2, dim=32, block_size=16, num_blocks=40, dtype=torch.float32,
              seed=0):
    """Pools filled with noise; each query's table lists random distinct blocks; rows in scrambled order."""
    gen = torch.Generator().manual_seed(seed)
    key_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    value_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(context_lens), query_heads, dim, generator=gen).to(dtype)
    max_blocks = 8
    table_rows = len(context_lens) + 2
    block_tables = torch.full((table_rows, max_blocks), -1, dtype=torch.int32)
    rows = torch.randperm(table_rows, generator=gen)[: len(context_lens)].to(torch.int32)
    for row, length in zip(rows.tolist(), context_lens):
        needed = -(-length // block_size)
        block_tables[row, :needed] = torch.randperm(num_blocks, generator=gen)[:needed].to(torch.int32)
    return q, key_pool, value_pool, block_tables, rows, torch.tensor(context_lens, dtype=torch.int32)


def gathered_attention(q, key_pool, value_pool, block_tables, rows, context_lens, scale):
    out = []
    for s, (row, length) in enumerate(zip(rows.tolist(), context_lens.tolist())):
        if length == 0:
            out.append(torch.zeros_like(q[s]))
            continue
        blocks = block_tables[row, : -(-length // key_pool.shape[1])].long()
        keys = key_pool[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]  # [1, Hkv, L, D]
        values = value_pool[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]
        mask = torch.ones(1, 1, 1, length, dtype=torch.bool)
        out.append(attention_reference(q[s][None, :, None], keys, values, mask, scale)[0, :, 0])
    return torch.stack(out)


def test_reference_matches_attention_over_gathered_blocks():
    case = make_case([1, 15, 16, 17, 100, 0])
    expected = gathered_attention(*case, scale=0.3)
    got = paged_decode_attention_reference(*case, scale=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[-1] == 0).all()


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])
def test_triton_kernel_matches_reference(partitions, dtype, tol, heads):
    if DEVICE == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    from hybridlm.ops.triton.paged_attention import paged_decode_attention_fwd

    q, key_pool, value_pool, tables, rows, lens = make_case([1, 16, 17, 70, 128, 0], *heads, dtype=dtype, seed=1)
    expected = paged_decode_attention_reference(q.double(), key_pool.double(), value_pool.double(), tables, rows, lens,
                                                scale=0.2)
    args = [t.to(DEVICE) for t in (q, key_pool, value_pool, tables, rows, lens)]
    got = paged_decode_attention_fwd(*args, scale=0.2, partitions=partitions).cpu()
    assert torch.isfinite(got).all()
    assert ((got.double() - expected).norm() / expected.norm()).item() < tol
    assert (got[-1] == 0).all()  # the padding row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_matches_index_copy(dtype):
    """K/V of a step into the pools in one launch, from strided views as the model hands them over (k a transposed
    norm output, v a column slice of the fused q/k/v GEMM); slots scattered over blocks, the rest untouched."""
    if DEVICE == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    from hybridlm.ops.paged_attention import write_kv_reference
    from hybridlm.ops.triton.paged_attention import write_kv_fwd

    gen = torch.Generator().manual_seed(3)
    tokens, heads, dim, blocks, block_size = 7, 2, 48, 6, 16
    key_pool = torch.randn(blocks, block_size, heads, dim, generator=gen).to(dtype).to(DEVICE)
    value_pool = torch.randn(blocks, block_size, heads, dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(heads, tokens, dim, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)  # [N, Hkv, D] strided
    v = torch.randn(tokens, 3 * heads * dim, generator=gen).to(dtype).to(DEVICE)[:, heads * dim : 2 * heads * dim]
    v = v.view(tokens, heads, dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    expected_k, expected_v = key_pool.clone(), value_pool.clone()
    write_kv_reference(expected_k, expected_v, k, v, slots)
    write_kv_fwd(key_pool, value_pool, k, v, slots)
    assert torch.equal(key_pool, expected_k) and torch.equal(value_pool, expected_v)
    with pytest.raises(ValueError, match="must be"):
        write_kv_fwd(key_pool, value_pool, k[:, :1], v[:, :1], slots)
