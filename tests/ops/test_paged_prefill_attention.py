"""Paged prefill attention: the reference against float64 dense causal attention over each sequence's own keys,
and the Triton kernel (CPU: the interpreter) against the reference, with NaN in every pool slot and output
element that should be neither read nor left unwritten."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.ops.paged_attention import paged_prefill_attention_reference  # noqa: E402
from tests.ops.test_triton_gdn_chunk import poisoned, rel_err  # noqa: E402,F401 (a fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
SCALE = 0.2


def kernel():
    pytest.importorskip("triton", reason="triton is not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    from hybridlm.ops.triton.paged_prefill import paged_prefill_attention_fwd

    return paged_prefill_attention_fwd


def worst_row_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of one (token, head) row: one wrong row hides in the global norm."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def make_case(lengths, starts, query_heads=4, kv_heads=1, dim=32, block_size=16, dtype=torch.float32, seed=0):
    """Dense per-sequence contexts (what the cache must hold) scattered into NaN pools through shuffled block
    tables; table rows scrambled, unused table entries -1. Returns the kernel's arguments (CPU) and the dense
    keys / values [C_s, Hkv, D] per sequence."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [start + length for start, length in zip(starts, lengths)]
    needed = [-(-context // block_size) for context in contexts]
    num_blocks = sum(needed) + 3  # spare blocks stay NaN
    key_pool = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    value_pool = torch.full_like(key_pool, float("nan"))
    table_rows = len(lengths) + 2
    block_tables = torch.full((table_rows, max(needed) + 2), -1, dtype=torch.int32)
    rows = torch.randperm(table_rows, generator=gen)[: len(lengths)].to(torch.int32)
    order = torch.randperm(num_blocks, generator=gen)
    keys, values, used = [], [], 0
    for row, context, count in zip(rows.tolist(), contexts, needed):
        blocks = order[used: used + count]
        used += count
        block_tables[row, :count] = blocks.to(torch.int32)
        k = torch.randn(context, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(context, kv_heads, dim, generator=gen).to(dtype)
        positions = torch.arange(context)
        key_pool[blocks[positions // block_size], positions % block_size] = k
        value_pool[blocks[positions // block_size], positions % block_size] = v
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(lengths), query_heads, dim, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    args = (q, key_pool, value_pool, block_tables, rows, cu_seqlens, torch.tensor(starts, dtype=torch.int32))
    return args, keys, values


def dense_attention(q, keys, values, cu_seqlens, starts, scale):
    """float64 causal attention over each sequence's dense context: query i of chunk s is at starts[s] + i."""
    out = []
    for s, (k, v) in enumerate(zip(keys, values)):
        bos, eos = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        qs = q[bos:eos].double()  # [L, Hq, D]
        group = qs.shape[1] // k.shape[1]
        k, v = k.double().repeat_interleave(group, dim=1), v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("lhd,chd->hlc", qs, k) * scale
        position = int(starts[s]) + torch.arange(eos - bos)
        future = torch.arange(k.shape[0])[None, :] > position[:, None]  # [L, C]
        scores = scores.masked_fill(future[None], float("-inf"))
        out.append(torch.einsum("hlc,chd->lhd", scores.softmax(-1), v))
    return torch.cat(out)


def double(args):
    return [t.double() if t.is_floating_point() else t for t in args]


def check_kernel(args, dtype, **kwargs):
    expected = paged_prefill_attention_reference(*double(args), scale=SCALE)
    got = kernel()(*[t.to(DEVICE) for t in args], scale=SCALE, **kwargs)
    assert got.shape == args[0].shape and got.dtype == dtype
    assert rel_err(got, expected) < TOLERANCE[dtype]
    assert worst_row_err(got, expected) < 2 * TOLERANCE[dtype]
    return got


# ragged chunks: decode rows (L = 1), first chunks (start 0), later chunks over several cached blocks
LENGTHS = [1, 63, 70, 2, 1, 17]
STARTS = [0, 0, 130, 300, 77, 64]


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
def test_reference_matches_dense_attention(block_size, heads):
    args, keys, values = make_case(LENGTHS, STARTS, *heads, block_size=block_size)
    expected = dense_attention(args[0], keys, values, args[5], args[6], SCALE)
    assert rel_err(paged_prefill_attention_reference(*double(args), scale=SCALE), expected) < 1e-12
    got = paged_prefill_attention_reference(*args, scale=SCALE)
    assert got.dtype == torch.float32 and rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dim", [64, 80])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(poisoned, dtype, heads, dim):
    args, _, _ = make_case(LENGTHS, STARTS, *heads, dim=dim, dtype=dtype, seed=1)
    check_kernel(args, dtype)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_kernel_every_block_size(poisoned, block_size):
    args, _, _ = make_case([5, 40, 1, 90], [300, 0, 200, 33], 4, 2, block_size=block_size, dtype=torch.bfloat16,
                           seed=2)
    check_kernel(args, torch.bfloat16)


@pytest.mark.parametrize("heads", [(6, 2), (8, 1)])
def test_kernel_odd_and_large_groups(poisoned, heads):
    args, _, _ = make_case([3, 29, 1], [40, 0, 9], *heads, dim=40, dtype=torch.float16, seed=3)
    check_kernel(args, torch.float16)


@pytest.mark.parametrize("dim", [128, 256])
def test_kernel_wide_heads(poisoned, dim):
    args, _, _ = make_case([1, 20], [0, 50], 4, 2, dim=dim, block_size=32, dtype=torch.bfloat16, seed=10)
    check_kernel(args, torch.bfloat16)


def test_kernel_wide_heads_full_tile(poisoned):
    """256-wide heads through the wide tile at its full height (128 score rows = 64 tokens x 2 heads of a group),
    a ragged last tile, keys past several of its 64-key steps and a block size below the step."""
    from hybridlm.ops.triton import paged_prefill

    assert paged_prefill._tiles(256, torch.bfloat16, torch.device("cpu"))[:2] == (128, 64)
    args, _, _ = make_case([150, 3], [70, 0], 4, 2, dim=256, block_size=32, dtype=torch.bfloat16, seed=11)
    check_kernel(args, torch.bfloat16)


def test_tile_rule(monkeypatch):
    """fp32 and GPUs that grant a program less shared memory than the wide tile takes get the 64 x 32 tile;
    16-bit heads up to 128 wide the narrow one."""
    from hybridlm.ops.triton import paged_prefill

    cuda = torch.device("cuda", 0)
    wide = (paged_prefill.BLOCK_M_WIDE, paged_prefill.BLOCK_N_WIDE, paged_prefill.WARPS_WIDE, paged_prefill.STAGES_WIDE)
    small = (paged_prefill.BLOCK_M_FP32, paged_prefill.BLOCK_N_FP32, paged_prefill.WARPS_FP32,
             paged_prefill.STAGES_FP32)
    monkeypatch.setattr(paged_prefill, "_shared_memory", lambda device: 227 * 1024)  # an H100
    assert paged_prefill._tiles(256, torch.bfloat16, cuda) == wide
    assert paged_prefill._tiles(256, torch.float32, cuda) == small
    assert paged_prefill._tiles(128, torch.float16, cuda) == (paged_prefill.BLOCK_M, paged_prefill.BLOCK_N,
                                                              paged_prefill.WARPS, paged_prefill.STAGES)
    monkeypatch.setattr(paged_prefill, "_shared_memory", lambda device: 163 * 1024)  # an A100
    assert paged_prefill._tiles(256, torch.bfloat16, cuda) == small


def test_kernel_long_context(poisoned):
    """A chunk and a decode row behind 2,500 cached tokens, beside a first chunk."""
    args, _, _ = make_case([20, 1, 9], [2500, 2600, 0], 4, 1, block_size=64, dtype=torch.bfloat16, seed=4)
    check_kernel(args, torch.bfloat16)


def test_kernel_many_ragged_sequences(poisoned):
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 40, (24,), generator=gen).tolist()
    starts = [0 if i % 3 == 0 else int(s) for i, s in enumerate(torch.randint(0, 150, (24,), generator=gen))]
    args, _, _ = make_case(lengths, starts, 2, 1, block_size=32, seed=5)
    check_kernel(args, torch.float32)


def test_kernel_max_len_hint_only_sizes_tiles(poisoned):
    args, _, _ = make_case(LENGTHS, STARTS, 4, 2, seed=6)
    default = check_kernel(args, torch.float32)
    for max_len in (70, 1, 500):  # exact, too small (shorter tiles, same grid rule), too large
        torch.testing.assert_close(check_kernel(args, torch.float32, max_len=max_len), default, atol=1e-5, rtol=1e-5)
    decode_rows, _, _ = make_case([1, 1, 1], [5, 0, 40], 4, 1, seed=7)
    check_kernel(decode_rows, torch.float32, max_len=1)


def test_kernel_strided_inputs(poisoned):
    """q as a column slice of a wider projection; pools as views into one [NB, 2, BS, Hkv, D] cache."""
    (q, key_pool, value_pool, *rest), _, _ = make_case(LENGTHS, STARTS, 4, 2, seed=8)
    wide = torch.full((q.shape[0], 3 * q.shape[1], q.shape[2]), float("nan"))
    wide[:, 1: 1 + q.shape[1]] = q
    cache = torch.stack([key_pool, value_pool], dim=1)
    expected = paged_prefill_attention_reference(q.double(), key_pool.double(), value_pool.double(), *rest,
                                                 scale=SCALE)
    wide, cache = wide.to(DEVICE), cache.to(DEVICE)
    got = kernel()(wide[:, 1: 1 + q.shape[1]], cache[:, 0], cache[:, 1], *[t.to(DEVICE) for t in rest], scale=SCALE)
    assert rel_err(got, expected) < TOLERANCE[torch.float32]
    assert worst_row_err(got, expected) < 2 * TOLERANCE[torch.float32]


def test_kernel_rejects_bad_inputs():
    fwd = kernel()
    (q, key_pool, value_pool, tables, rows, cu_seqlens, starts), _, _ = make_case([3, 5], [0, 20], 4, 2, seed=9)
    good = dict(q=q, key_pool=key_pool, value_pool=value_pool, block_tables=tables, rows=rows,
                cu_seqlens=cu_seqlens, starts=starts)
    bad = [
        (dict(key_pool=key_pool[..., :16], value_pool=value_pool[..., :16]), "does not fit"),
        (dict(q=torch.randn(8, 3, 32)), "multiple of Hkv"),
        (dict(q=q.half()), "must share"),
        (dict(key_pool=key_pool.transpose(2, 3).contiguous().transpose(2, 3)), "packed heads"),
        (dict(cu_seqlens=cu_seqlens.long()), "cu_seqlens must be int32"),
        (dict(cu_seqlens=cu_seqlens[:2]), "cu_seqlens \\[S \\+ 1\\]"),
        (dict(rows=rows[:1]), "rows \\[S\\]"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "from 0 to N=8"),
        (dict(cu_seqlens=torch.tensor([0, 0, 8], dtype=torch.int32)), "rise strictly"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            fwd(**{**good, **change}, scale=SCALE)
    empty = fwd(q[:0], key_pool, value_pool, tables, rows[:0], cu_seqlens[:1], starts[:0], scale=SCALE)
    assert empty.shape == (0, 4, 32)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("case", ["wide-full-tile", "grouped-ragged", "block-below-tile"])
def test_kernel_tma_tiles(poisoned, monkeypatch, case, tma):
    """paged_prefill.TMA: K/V tiles through tensor descriptors where a tile sits in one block and D is a power of two
    (NaN in the unwritten slots a diagonal tile loads must not reach the output); elsewhere, or with TMA off, the
    pointer loads."""
    from hybridlm.ops.triton import paged_prefill

    monkeypatch.setattr(paged_prefill, "TMA", tma)
    lengths, starts, heads, dim, block_size = {
        "wide-full-tile": ([150, 3], [70, 0], (4, 2), 256, 64),
        "grouped-ragged": (LENGTHS, STARTS, (8, 2), 64, 128),
        "block-below-tile": ([40, 9], [100, 0], (4, 2), 256, 32),  # BN 64 > BS: pointer loads
    }[case]
    args, _, _ = make_case(lengths, starts, *heads, dim=dim, block_size=block_size, dtype=torch.bfloat16, seed=12)
    used = []
    descriptors = paged_prefill._descriptors
    monkeypatch.setattr(paged_prefill, "_descriptors", lambda *a: used.append(descriptors(*a)) or used[-1])
    check_kernel(args, torch.bfloat16)
    assert bool(used[0]) == (tma and case != "block-below-tile")
