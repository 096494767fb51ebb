"""Triton chunked gated delta rule forward vs the float64 reference (CPU: the Triton interpreter)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.delta_rule import chunk_gated_delta_rule, gdn_gates  # noqa: E402
from hybridlm.ops.triton import chunk_gdn_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer the kernels' host code allocates starts as NaN, so an unwritten element fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(x):  # (not what asks for gradients: torch's own code on CUDA, e.g. checkpoint's recompute)
        return x.fill_(float("nan")) if x.is_floating_point() and not x.requires_grad else x

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: nan_fill(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: nan_fill(empty_like(*args, **kwargs)))


def skip_where_triton_faults(dk: int, dv: int) -> None:
    """Skip a test that calls the kernels directly at head dims the dispatch keeps from them on this GPU and Triton
    (`gdn_chunk_bwd.head_dims_fault`: Triton before 3.7.1 miscompiles them on Hopper; the model runs the reference)."""
    if DEVICE == "cuda":
        from hybridlm.ops.triton.gdn_chunk_bwd import head_dims_fault

        reason = head_dims_fault(torch.device(DEVICE), dk, dv)
        if reason:
            pytest.skip(reason)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    x, ref = x.double().cpu(), ref.double().cpu()  # either side may be the CPU reference
    return ((x - ref).norm() / ref.norm()).item()


def make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, num_states, seed=0):
    """Raw inputs rounded to `dtype` (the reference sees exactly what the kernel sees)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(DEVICE)

    q, k = randn(batch, length, key_heads, dk), randn(batch, length, key_heads, dk)
    v = randn(batch, length, value_heads, dv)
    a, b = randn(batch, length, value_heads), randn(batch, length, value_heads, std=2.0)
    A_log = torch.empty(value_heads).uniform_(-2.0, 0.5, generator=gen).to(DEVICE)
    dt_bias = (torch.randn(value_heads, generator=gen) * 0.5).to(DEVICE)
    state = torch.randn(num_states, value_heads, dk, dv, generator=gen).to(DEVICE)
    return q, k, v, a, b, A_log, dt_bias, state


def reference(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens=None, scale=None):
    g, beta = gdn_gates(a.double(), b.double(), A_log.double(), dt_bias.double())
    return chunk_gated_delta_rule(q.double(), k.double(), v.double(), g, beta, scale=scale,
                                  initial_state=None if state is None else state.double(),
                                  output_final_state=True, cu_seqlens=cu_seqlens)


def check(q, k, v, a, b, A_log, dt_bias, state, dtype, cu_seqlens=None):
    o, final = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True,
                             cu_seqlens=cu_seqlens)
    check_outputs({"o": o, "final_state": final}, q, k, v, a, b, A_log, dt_bias, state, dtype, cu_seqlens)


def check_outputs(out, q, k, v, a, b, A_log, dt_bias, state, dtype, cu_seqlens=None, scale=None):
    """A forward's out["o"] and out["final_state"] against the float64 reference (`check` without the run, for tests
    that have just made them with an option set)."""
    o, final = out["o"], out["final_state"]
    o_ref, final_ref = reference(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, scale)
    assert o.shape == o_ref.shape and o.dtype == v.dtype
    assert final.shape == final_ref.shape and final.dtype == torch.float32
    assert rel_err(o, o_ref) <= TOLERANCE[dtype]
    assert rel_err(final, final_ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("length", [1, 63, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_fp32(poisoned, length, with_state):
    inputs = make_inputs(2, length, 2, 4, 16, 16, torch.float32, num_states=2)
    state = inputs[-1] if with_state else None
    check(*inputs[:-1], state, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_half_precision(poisoned, dtype):
    inputs = make_inputs(2, 130, 2, 4, 32, 32, dtype, num_states=2)
    check(*inputs, dtype)


@pytest.mark.parametrize("key_heads, value_heads, dk, dv", [(2, 2, 16, 32), (1, 4, 24, 40)])
def test_chunk_head_layouts(poisoned, key_heads, value_heads, dk, dv):
    """Hv == Hk, a group of 4 value heads per key head, and head dims that are not powers of two."""
    inputs = make_inputs(1, 70, key_heads, value_heads, dk, dv, torch.float32, num_states=1)
    check(*inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_packed_sequences(poisoned, dtype, with_state):
    lengths = [5, 64, 61]  # a sub-chunk sequence, an exact chunk, and one ending mid-chunk
    cu_seqlens = torch.tensor([0, 5, 69, 130], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, sum(lengths), 2, 4, 16, 16, dtype, num_states=3)
    state = inputs[-1] if with_state else None
    check(*inputs[:-1], state, dtype, cu_seqlens=cu_seqlens)


def test_chunk_strided_qkv(poisoned):
    """q, k, v as column slices of one [B, T, C] conv output: read in place, same result as contiguous copies."""
    batch, length, key_heads, value_heads, d = 2, 65, 2, 4, 16
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(batch, length, key_heads, value_heads, d, d, torch.float32, 2)
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # [B, T, C]
    key_dim = key_heads * d
    views = (mixed[..., :key_dim].unflatten(-1, (key_heads, d)), mixed[..., key_dim:2 * key_dim].unflatten(-1, (key_heads, d)),
             mixed[..., 2 * key_dim:].unflatten(-1, (value_heads, d)))
    assert not views[0].is_contiguous()
    o_views, s_views = chunk_gdn_fwd(*views, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    o, s = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    torch.testing.assert_close(o_views, o, rtol=0, atol=0)
    torch.testing.assert_close(s_views, s, rtol=0, atol=0)


def test_chunk_no_final_state_and_bad_input():
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, 3, 2, 4, 16, 16, torch.float32, 1)
    o, final = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias)
    assert final is None and o.shape == v.shape
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gdn_fwd(q, k, v[:, :, :3], a[..., :3], b[..., :3], A_log[:3], dt_bias[:3])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=torch.zeros(2, 4, 16, 16, device=DEVICE))


PREPARE_VARIANTS = {  # gdn_chunk's module flags for each way of running the prepare step
    "fused": dict(KKT_PREPARE=False),
    "kkt": dict(KKT_PREPARE=True, KKT_RECURSIVE=False, KKT_INTERLEAVE=False),
    "kkt-interleaved": dict(KKT_PREPARE=True, KKT_RECURSIVE=False, KKT_INTERLEAVE=True),
    "kkt-recursive": dict(KKT_PREPARE=True, KKT_RECURSIVE=True),
}


def prepare_case(case):
    """(inputs, cu_seqlens, dtype) of one prepare-variant case: fp32, bf16, grouped heads with odd dims, packed."""
    cu_seqlens, dtype = None, torch.bfloat16 if case in ("bf16", "packed") else torch.float32
    if case == "heads":
        inputs = make_inputs(1, 70, 1, 4, 24, 40, dtype, num_states=1)
    elif case == "packed":
        cu_seqlens = torch.tensor([0, 5, 69, 130], dtype=torch.int32, device=DEVICE)
        inputs = make_inputs(1, 130, 2, 4, 16, 16, dtype, num_states=3)
    else:
        inputs = make_inputs(2, 65 if case == "fp32" else 130, 2, 4, 32, 32, dtype, num_states=2)
    return inputs, cu_seqlens, dtype


def use_prepare(monkeypatch, variant):
    from hybridlm.ops.triton import gdn_chunk

    for name, value in PREPARE_VARIANTS[variant].items():
        monkeypatch.setattr(gdn_chunk, name, value)


def x_written(x_inv, cu_seqlens):
    """[B, T, Hv, 64] mask of X's lower block triangle, the part of x_inv the prepare kernels write."""
    from hybridlm.ops.triton.gdn_chunk import CHUNK_SIZE, SUB_CHUNK

    length = x_inv.shape[1]
    starts = torch.zeros(length, dtype=torch.long) if cu_seqlens is None else cu_seqlens.cpu().long()[
        torch.searchsorted(cu_seqlens.cpu().long(), torch.arange(length), right=True) - 1]
    row = (torch.arange(length) - starts) % CHUNK_SIZE  # each token's row inside its chunk
    column = torch.arange(CHUNK_SIZE)
    lower = (row[:, None] // SUB_CHUNK >= column[None, :] // SUB_CHUNK).to(x_inv.device)  # [T, 64]
    return lower[None, :, None, :].expand_as(x_inv)


# the default (recursive) in every case; the interleaved inverse loop in two, the plain one in one (the suite's time)
@pytest.mark.parametrize("variant, case", [("kkt-recursive", case) for case in ("fp32", "bf16", "heads", "packed")]
                         + [("kkt-interleaved", "bf16"), ("kkt-interleaved", "packed"), ("kkt", "packed")])
def test_kkt_prepare_matches_the_fused_one(poisoned, monkeypatch, variant, case):
    """KKT_PREPARE (the Gram matrix over key slices with the norms from its diagonal, the inverse, then w, u from
    the stored X) gives the fused prepare kernel's outputs and intermediates (g_cumsum, w, u, h, v_new, and X in the
    lower block triangle of x_inv, which the backward reads; the rest of x_inv stays unwritten, NaN here) and
    passes the float64 check. In bf16 the two round differently (KKT takes A from the raw keys, the fused kernel
    from the keys normalised and stored in bf16); both sit at bf16 round-off from the reference."""
    from hybridlm.ops.triton import gdn_chunk
    from hybridlm.ops.triton.gdn_chunk import _chunk_gdn_fwd

    inputs, cu_seqlens, dtype = prepare_case(case)
    args = dict(scale=None, initial_state=inputs[-1], output_final_state=True, cu_seqlens=cu_seqlens, store_x=True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)  # h and v_new are compared (1 SM off the GPU: the rule fuses)
    use_prepare(monkeypatch, "fused")
    fused = _chunk_gdn_fwd(*inputs[:-1], **args)
    use_prepare(monkeypatch, variant)
    ours = _chunk_gdn_fwd(*inputs[:-1], **args)
    tolerance = 1e-6 if dtype == torch.float32 else 5e-3
    for name in ("o", "final_state", "g_cumsum", "w", "u", "h", "v_new"):
        assert rel_err(ours[name], fused[name]) <= tolerance, name
    lower = x_written(fused["x_inv"], cu_seqlens)
    assert rel_err(ours["x_inv"][lower], fused["x_inv"][lower]) <= tolerance
    assert ours["x_inv"][~lower].isnan().all()
    check_outputs(ours, *inputs, dtype, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("variant", ["kkt-interleaved", "kkt-recursive"])
def test_kkt_inverse_of_repeated_keys(variant, monkeypatch):
    """X = (I + A)^-1 where its power series grows most: one key repeated, beta ~ 1 and no decay, so A is beta times
    the strictly lower ones and (-A)^n reaches C(15, 7) = 6435 inside a 16-row block while X itself stays small
    (1 on the diagonal, -beta (1 - beta)^(i - j - 1) below). Each inverse, in bf16, against float64."""
    from hybridlm.ops.triton.gdn_chunk import CHUNK_SIZE, _chunk_gdn_fwd

    use_prepare(monkeypatch, variant)
    length, heads, dim = 130, 2, 32
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, length, 1, heads, dim, dim, torch.bfloat16, num_states=1)
    k = k[:, :1].expand_as(k).contiguous()  # one key for every token
    b = torch.full_like(b, 6.0)  # beta = sigmoid(6) = 0.9975
    a = torch.full_like(a, -30.0)  # softplus(-30) ~ 1e-13: no decay
    out = _chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, store_x=True)
    kn = torch.nn.functional.normalize(k[0, :, 0].double(), dim=-1)
    beta = torch.sigmoid(b[0].double())  # [T, Hv]
    for start in range(0, length, CHUNK_SIZE):
        rows = slice(start, min(start + CHUNK_SIZE, length))
        n = rows.stop - start
        gram = kn[rows] @ kn[rows].T
        for head in range(heads):
            A = (beta[rows, head, None] * gram).tril(-1)
            X = torch.linalg.inv(torch.eye(n, dtype=torch.float64, device=A.device) + A)
            ours = out["x_inv"][0, rows, head, :n].double().tril()
            assert rel_err(ours, X) <= 1e-2, (start, head)


def test_backward_after_either_prepare(poisoned, monkeypatch):
    """The backward reads the forward's X (x_inv): after the KKT prepare every gradient is the fused one's (which
    tests/ops/test_triton_gdn_chunk_bwd.py checks against float64 autograd, under the default)."""
    from hybridlm.ops.triton import chunk_gdn

    *inputs, state = make_inputs(1, 130, 1, 2, 16, 16, torch.float32, num_states=1)
    do = torch.randn(1, 130, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def grads():
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
        o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True)
        ((o * do).sum() + final.sum()).backward()
        return [leaf.grad for leaf in leaves]

    use_prepare(monkeypatch, "fused")
    fused = grads()
    use_prepare(monkeypatch, "kkt")
    for x, y in zip(grads(), fused):
        assert rel_err(x, y) <= 1e-5


@pytest.mark.parametrize("variant", ["fused", "kkt"])
def test_prepare_equal_heads_full_dims(poisoned, variant, monkeypatch):
    """Hv == Hk, the 0.8B layout (every value head also writes its key head's normalised keys, which the state pass
    reads), at d = 128 in bf16: each prepare path against the float64 reference."""
    use_prepare(monkeypatch, variant)
    inputs = make_inputs(1, 100, 2, 2, 128, 128, torch.bfloat16, num_states=1)
    check(*inputs, torch.bfloat16)


OUTPUT_VARIANTS = {  # gdn_chunk's flags for the output kernel: the per-V-block one, the looped one at two widths
    "per-block": dict(LOOPED_O=False),
    "looped BV=32": dict(LOOPED_O=True, LOOPED_O_BV=32, LOOPED_O_BV_FP32=32),
    "looped BV=64": dict(LOOPED_O=True, LOOPED_O_BV=64, LOOPED_O_BV_FP32=64),
}


@pytest.mark.parametrize("case", ["fp32", "bf16", "packed-fp32", "packed-bf16", "odd-dims"])
def test_output_kernels(poisoned, monkeypatch, case):
    """Both output kernels (LOOPED_O off and on; the looped one walking 2-4 V blocks, the last one ragged for the odd
    dims) against the float64 reference and each other: a ragged last chunk (T = 100), packed sequences, Hv = 2 Hk,
    an initial state so the inter-chunk term counts from the first chunk."""
    from hybridlm.ops.triton import gdn_chunk

    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    cu_seqlens = torch.tensor([0, 5, 69, 130], dtype=torch.int32, device=DEVICE) if "packed" in case else None
    if case == "odd-dims":
        inputs = make_inputs(1, 100, 1, 2, 24, 40, dtype, num_states=1)
    elif cu_seqlens is not None:
        inputs = make_inputs(1, 130, 2, 4, 32, 128, dtype, num_states=3)
    else:
        inputs = make_inputs(2, 100, 2, 4, 32, 128, dtype, num_states=2)
    o_ref, _ = reference(*inputs, cu_seqlens)
    outputs = {}
    for variant, flags in OUTPUT_VARIANTS.items():
        for name, value in flags.items():
            monkeypatch.setattr(gdn_chunk, name, value)
        outputs[variant], _ = chunk_gdn_fwd(*inputs[:-1], initial_state=inputs[-1], cu_seqlens=cu_seqlens)
        assert outputs[variant].dtype == dtype
        assert rel_err(outputs[variant], o_ref) <= TOLERANCE[dtype], variant
        assert rel_err(outputs[variant], outputs["per-block"]) <= (1e-6 if dtype == torch.float32 else 5e-3), variant


def test_state_pass_block_rule(monkeypatch):
    """The state pass's V block by its traffic model (gdn_chunk.state_pass_block) on 132 SMs: B = 1 keeps the
    blocks measured best (9B heads 32, 0.8B 16), B = 4 takes 64 (measured on an H200), fp32 stays at 32, a block
    never exceeds the padded value width, and `narrowest` holds it at 32 or more."""
    from hybridlm.ops.triton import gdn_chunk

    monkeypatch.setattr(gdn_chunk, "_multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    assert gdn_chunk.state_pass_block(128, 128, 1 * 32, 2, cpu, False) == 32
    assert gdn_chunk.state_pass_block(128, 128, 1 * 16, 2, cpu, False) == 16
    assert gdn_chunk.state_pass_block(128, 128, 4 * 32, 2, cpu, False) == 64
    assert gdn_chunk.state_pass_block(128, 128, 4 * 16, 2, cpu, False) == 64
    assert gdn_chunk.state_pass_block(128, 128, 4 * 32, 4, cpu, True) == 32
    assert gdn_chunk.state_pass_block(16, 16, 64, 2, cpu, False) == 16
    assert gdn_chunk.state_pass_block(24, 40, 4, 2, cpu, False) in gdn_chunk.STATE_PASS_BVS
    assert gdn_chunk.state_pass_block(128, 128, 1 * 16, 2, cpu, False, narrowest=32) == 32  # backward, fold
    assert gdn_chunk.state_pass_block(16, 16, 64, 2, cpu, False, narrowest=32) == 32  # padded past dv
    assert gdn_chunk.state_pass_block(16, 16, 64, 4, cpu, True, narrowest=32) == 32


FOLD_CASES = {  # (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens)
    "bf16": (2, 130, 2, 4, 32, 32, torch.bfloat16, None),
    "fp16-heads": (1, 70, 1, 4, 24, 40, torch.float16, None),
    "bf16-one-token": (2, 1, 2, 4, 32, 32, torch.bfloat16, None),
    "bf16-packed-d16": (1, 130, 2, 4, 16, 16, torch.bfloat16, [0, 5, 69, 130]),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
@pytest.mark.parametrize("with_state", [False, True])
def test_fold_wu_into_the_state_pass(poisoned, monkeypatch, case, with_state):
    """FOLD_WU_INTO_H (no w, u stored; the state pass takes v_new = X (beta (v - exp(G) k h))) gives the default
    path's o, final state, h and v_new up to the regrouped products' rounding, and passes the float64 check."""
    from hybridlm.ops.triton import gdn_chunk

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = FOLD_CASES[case]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype,
                                 batch if offsets is None else len(offsets) - 1)
    state = state if with_state else None
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)  # h and v_new are compared (1 SM off the GPU: the rule fuses)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", False)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    folded = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert folded["w"] is None and folded["u"] is None and plain["w"] is not None
    for name in ("o", "final_state", "h", "v_new"):  # (h is all zeros at one token without a state)
        x, ref = folded[name].double().cpu(), plain[name].double().cpu()
        assert torch.isfinite(x).all() and (x - ref).norm() <= 1e-2 * ref.norm(), name
    check_outputs(folded, *inputs, state, dtype, cu_seqlens=cu_seqlens)


def record_launches(monkeypatch, module, name, record, launched):
    """`module`'s kernel `name` still launches, and appends record(its launch's keyword arguments) to `launched`
    first."""
    kernel = getattr(module, name)
    monkeypatch.setattr(module, name, type("Recorder", (), {"__getitem__": lambda self, grid: (
        lambda *args, **kwargs: launched.append(record(kwargs)) or kernel[grid](*args, **kwargs))})())


@pytest.mark.parametrize("fused", [False, True])
def test_one_token_rows_take_the_state_pass_that_reads_T_at_run_time(poisoned, monkeypatch, fused):
    """gdn_chunk.state_pass_kernel: rows of one token (not packed) run the state pass compiled with T as a plain
    integer (Triton's T == 1 variant faulted on Hopper with Triton 3.6); packed batches and longer rows run the usual
    one; the outputs pass float64, fused into the pass or not."""
    from hybridlm.ops.triton import gdn_chunk

    assert gdn_chunk.state_pass_kernel(1, packed=False) is gdn_chunk._chunk_gdn_fwd_h_kernel_any_length
    assert gdn_chunk.state_pass_kernel(1, packed=True) is gdn_chunk.chunk_gdn_fwd_h_kernel
    assert gdn_chunk.state_pass_kernel(2, packed=False) is gdn_chunk.chunk_gdn_fwd_h_kernel
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", fused)
    launches = []
    record_launches(monkeypatch, gdn_chunk, "_chunk_gdn_fwd_h_kernel_any_length", lambda kwargs: kwargs, launches)
    *inputs, state = make_inputs(2, 1, 1, 2, 32, 64, torch.bfloat16, num_states=2)
    check(*inputs, state, torch.bfloat16)
    (launch,) = launches
    assert launch.get("FUSED_O", False) == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_given", [False, True])
def test_output_fused_with_qk_given_or_made_in_the_pass(poisoned, monkeypatch, dtype, qk_given):
    """FUSED_OUTPUT_QK_GIVEN: the decayed causal q k^T made by the w/u kernel (and read by the pass) or inside the
    pass's loop; either way the unfused path's o, and the pass gets what the flag says."""
    from hybridlm.ops.triton import gdn_chunk

    *inputs, state = make_inputs(2, 100, 1, 2, 32, 64, dtype, num_states=2)
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=None)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_QK_GIVEN", qk_given)
    launches = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_fwd_h_kernel", lambda kwargs: kwargs, launches)
    fused = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    (launch,) = launches
    assert launch["FUSED_O"] and launch["Q_NORMED"] and launch["A_GIVEN"] == qk_given
    assert (launch["aqk"] is not None) == qk_given
    for name in ("o", "final_state"):
        assert rel_err(fused[name], plain[name].double()) <= (1e-6 if dtype == torch.float32 else 1e-3), name


@pytest.mark.parametrize("fused", [False, True])
def test_wu_kernel_per_key_head(poisoned, monkeypatch, fused):
    """gdn_chunk.WU_KEY_HEAD_PROGRAMS (with the fold): one w/u program per key head stores the normalised keys (and
    queries, and each value head's decayed q k^T) that the per-value-head programs store, so the forward gives the
    same bits; grouped heads, packed sequences, with and without the output fused."""
    from hybridlm.ops.triton import gdn_chunk

    cu_seqlens = torch.tensor([0, 5, 69, 130], dtype=torch.int32, device=DEVICE)
    # (heads of 64: at 32/32 Hopper GPUs with Triton before 3.7.1 do not fold, see test_no_fold_where_it_faulted)
    *inputs, state = make_inputs(1, 130, 2, 4, 64, 64, torch.bfloat16, num_states=3)
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", fused)
    monkeypatch.setattr(gdn_chunk, "WU_KEY_HEAD_PROGRAMS", False)
    launched = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_wu_kernel", lambda kwargs: kwargs["KEY_HEAD_PROGRAMS"],
                    launched)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "WU_KEY_HEAD_PROGRAMS", True)
    per_key_head = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert launched == [False, True]
    for name in ("o", "final_state") if fused else ("o", "final_state", "h", "v_new"):
        assert torch.equal(per_key_head[name], plain[name]), name


@pytest.mark.parametrize("dk, dv, fused, folds", [(32, 32, True, False), (32, 32, False, True), (64, 32, True, True),
                                                 (32, 64, True, True)])
def test_no_fold_where_it_faulted(poisoned, monkeypatch, dk, dv, fused, folds):
    """Where Triton miscompiles on Hopper (`hopper_miscompiles`), heads narrower than 64 in both dims keep w and u
    when the output is fused, even when the fold is asked for (folded and fused there, the state pass faulted on an
    H100); the output is right either way."""
    from hybridlm.ops.triton import gdn_chunk

    skip_where_triton_faults(dk, dv)  # (64/32 and 32/64: the dispatcher keeps them from the kernels on Hopper)
    *inputs, state = make_inputs(1, 70, 1, 2, dk, dv, torch.bfloat16, num_states=1)
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=None)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", fused)
    monkeypatch.setattr(gdn_chunk, "hopper_miscompiles", lambda device: True)
    out = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert (out["w"] is None) == folds and (out["h"] is None) == fused
    check_outputs(out, *inputs, state, torch.bfloat16)


def test_output_fused_after_the_one_launch_prepare(poisoned, monkeypatch):
    """FUSED_OUTPUT after the one-launch prepare kernel (KKT_PREPARE off): no normalised queries are stored, so the
    state pass normalises and scales q itself; the same o as the unfused path."""
    from hybridlm.ops.triton import gdn_chunk

    *inputs, state = make_inputs(1, 100, 1, 2, 32, 64, torch.bfloat16, num_states=1)
    monkeypatch.setattr(gdn_chunk, "KKT_PREPARE", False)
    args = dict(scale=0.3, initial_state=state, output_final_state=True, cu_seqlens=None)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    launches = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_fwd_h_kernel", lambda kwargs: kwargs, launches)
    fused = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    (launch,) = launches
    assert launch["FUSED_O"] and not launch["Q_NORMED"] and not launch["A_GIVEN"]
    assert fused["h"] is None
    for name in ("o", "final_state"):
        assert rel_err(fused[name], plain[name].double()) <= 1e-3, name


def test_fused_output_rule(monkeypatch):
    """FUSED_OUTPUT = None fuses where the state pass runs at least FUSED_MIN_PROGRAMS_PER_SM programs per SM, in
    16-bit, at inference and (TRAIN_FORWARD_AS_INFERENCE) in training's forward; True fuses fp32 and training's forward
    too, but never a forward whose h and v_new are kept for the backward."""
    from hybridlm.ops.triton import gdn_chunk

    *inputs, _ = make_inputs(2, 65, 1, 4, 32, 64, torch.bfloat16, num_states=2)
    fp32_inputs = [x.float() if x.is_floating_point() else x for x in inputs]
    no_launch = type("NoLaunch", (), {"__getitem__": lambda self, grid: (lambda *args, **kwargs: None)})()
    for name in ("chunk_gdn_fwd_kkt_solve_kernel", "chunk_gdn_wu_kernel", "chunk_gdn_fwd_prepare_kernel",
                 "chunk_gdn_fwd_h_kernel", "chunk_gdn_fwd_o_looped_kernel", "chunk_gdn_fwd_o_kernel"):
        monkeypatch.setattr(gdn_chunk, name, no_launch)  # only the host's choice is tested here

    def fused(sms, rule, inputs=inputs, store_x=False, keep_states=False):
        monkeypatch.setattr(gdn_chunk, "_multiprocessors", lambda device: sms)
        monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", rule)
        out = gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=None, output_final_state=False,
                                       cu_seqlens=None, store_x=store_x, keep_states=keep_states)
        return out["h"] is None

    # 2 sequences x 4 value heads x the V blocks of FUSED_OUTPUT_BV (64: one at dv = 64) per 2 SMs
    monkeypatch.setattr(gdn_chunk, "FUSED_MIN_PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_BV", 64)
    assert fused(4, None) and not fused(5, None)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_BV", 32)
    assert fused(8, None) and not fused(9, None)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_BV", None)  # state_pass_block's pick (64 on 4 SMs)
    assert fused(4, None) and not fused(5, None)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_BV", 64)
    monkeypatch.setattr(gdn_chunk, "FUSED_MIN_PROGRAMS_PER_SM", 1.5)  # the default: 8 programs on up to 5 SMs
    assert fused(5, None) and not fused(6, None)
    assert fused(5, None, store_x=True) and not fused(6, None, store_x=True)  # training's forward: by the same rule
    monkeypatch.setattr(gdn_chunk, "TRAIN_FORWARD_AS_INFERENCE", False)
    assert not fused(1, None, store_x=True) and fused(1, True, store_x=True)  # ... or when asked
    monkeypatch.setattr(gdn_chunk, "TRAIN_FORWARD_AS_INFERENCE", True)
    assert not fused(1, None, store_x=True, keep_states=True) and not fused(1, True, store_x=True, keep_states=True)
    assert not fused(1, None, inputs=fp32_inputs) and fused(1, True, inputs=fp32_inputs)
    assert not fused(1, False)


def test_fold_wu_leaves_fp32_alone(poisoned, monkeypatch):
    """fp32 keeps w and u (the fold is for 16-bit inputs): FOLD_WU_INTO_H changes nothing there."""
    from hybridlm.ops.triton import gdn_chunk

    *inputs, state = make_inputs(1, 65, 2, 4, 16, 16, torch.float32, num_states=1)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    out = gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=state, output_final_state=True,
                                   cu_seqlens=None)
    assert out["w"] is not None
    check_outputs(out, *inputs, state, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_with_minus_inf_gates_leave_the_state_alone(dtype):
    """A token whose raw gates are a = b = -inf has decay exp(0) = 1 and beta = 0: the state passes it unchanged, so a
    prompt padded on the right to a fixed length (a prefill captured per length bucket) ends in the state of its real
    tokens and gives them the same outputs, in the reference and in the kernels, across chunk boundaries."""
    generator = torch.Generator().manual_seed(11)
    length, real, heads, value_heads, dim = 160, 70, 2, 4, 64
    q, k = (torch.randn(1, length, heads, dim, generator=generator) for _ in range(2))
    v = torch.randn(1, length, value_heads, dim, generator=generator)
    a, b = (torch.randn(1, length, value_heads, generator=generator) for _ in range(2))
    A_log, dt_bias = torch.rand(value_heads, generator=generator), torch.rand(value_heads, generator=generator)
    state = torch.randn(1, value_heads, dim, dim, generator=generator)
    padded_a, padded_b = a.clone(), b.clone()
    padded_a[:, real:], padded_b[:, real:] = float("-inf"), float("-inf")
    # the reference, in float64
    g, beta = gdn_gates(padded_a.double(), padded_b.double(), A_log.double(), dt_bias.double())
    o_pad, s_pad = chunk_gated_delta_rule(q.double(), k.double(), v.double(), g, beta, initial_state=state.double(),
                                          output_final_state=True)
    g, beta = gdn_gates(a[:, :real].double(), b[:, :real].double(), A_log.double(), dt_bias.double())
    o_ref, s_ref = chunk_gated_delta_rule(q[:, :real].double(), k[:, :real].double(), v[:, :real].double(), g, beta,
                                          initial_state=state.double(), output_final_state=True)
    assert not o_pad.isnan().any() and rel_err(o_pad[:, :real], o_ref) <= 1e-8 and rel_err(s_pad, s_ref) <= 1e-8
    # the kernels
    moved = [x.to(DEVICE, dtype) for x in (q, k, v, padded_a, padded_b)]
    o, final = chunk_gdn_fwd(*moved, A_log.to(DEVICE), dt_bias.to(DEVICE), initial_state=state.to(DEVICE),
                             output_final_state=True)
    assert not o.isnan().any() and not final.isnan().any()
    assert rel_err(o[:, :real], o_ref) <= TOLERANCE[dtype] and rel_err(final, s_ref) <= TOLERANCE[dtype]
