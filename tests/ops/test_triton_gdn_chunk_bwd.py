"""Triton chunked gated delta rule backward: every gradient vs float64 autograd through the reference
(CPU: the Triton interpreter; mostly small heads, and six full-size shapes at ~10 s each)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops import dispatch  # noqa: E402
from hybridlm.ops.delta_rule import chunk_gated_delta_rule, gdn_gates  # noqa: E402
from hybridlm.ops.triton import chunk_gdn  # noqa: E402
from tests.ops.test_triton_gdn_chunk import DEVICE, make_inputs, poisoned, rel_err  # noqa: E402,F401 (a fixture)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "initial_state")


def output_grads(v, num_states, dk, with_dht, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(v.shape, generator=gen).to(dtype).to(DEVICE)  # [B, T, Hv, dv]
    dht = torch.randn(num_states, v.shape[2], dk, v.shape[3], generator=gen).to(DEVICE) if with_dht else None
    return do, dht


def loss_of(o, final, do, dht):
    loss = (o.double() * do.double()).sum()
    return loss if dht is None else loss + (final.double() * dht.double()).sum()


def reference_grads(inputs, do, dht, cu_seqlens):
    """Float64 autograd through gdn_gates + chunk_gated_delta_rule; returns (o, final, grads)."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    q, k, v, a, b, A_log, dt_bias, state = leaves
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                      cu_seqlens=cu_seqlens)
    loss_of(o, final, do, dht).backward()
    return o, final, [None if x is None else x.grad for x in leaves]


def summed_terms(inputs, grads_ref):
    """dA_log and ddt_bias sum per-token terms that can cancel (by 30x in bf16 packed cases): the sums of the
    terms' magnitudes, da_t for dt_bias and dg_t g_t = da_t softplus(x_t) / sigmoid(x_t) for A_log (x = a + dt_bias),
    are their error scale."""
    x = inputs[3].double() + inputs[6].double()
    da = grads_ref[3]
    return {"A_log": (da * F.softplus(x) / torch.sigmoid(x)).abs().sum((0, 1)), "dt_bias": da.abs().sum((0, 1))}


def check(batch, length, key_heads, value_heads, dk, dv, dtype, *, with_state, with_dht, cu_seqlens=None, seed=0,
          strong_decay=False):
    num_states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, num_states, seed)
    if strong_decay:  # exp(A_log) = 3: g ~ -2 a row, so G falls past -88 inside a chunk
        inputs[5] = torch.full_like(inputs[5], 3.0).log()
    inputs = [*inputs, state if with_state else None]
    do, dht = output_grads(inputs[2], num_states, dk, with_dht, dtype)

    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=with_dht, cu_seqlens=cu_seqlens)
    loss_of(o, final, do, dht).backward()
    check_results(inputs, do, dht, cu_seqlens, o, final if with_dht else None,
                  [None if leaf is None else leaf.grad for leaf in leaves], dtype)


def check_results(inputs, do, dht, cu_seqlens, o, final, grads, dtype):
    """o, the final state (unless None) and the inputs' gradients (None where an input is) of a kernel run against
    float64 autograd through the reference."""
    o_ref, final_ref, grads_ref = reference_grads(inputs, do, dht, cu_seqlens)
    tolerance = TOLERANCE[dtype]
    assert o.dtype == dtype and rel_err(o, o_ref) <= tolerance
    if final is not None:
        assert rel_err(final, final_ref) <= tolerance
    scales = summed_terms(inputs, grads_ref)
    for name, x, grad, grad_ref in zip(NAMES, inputs, grads, grads_ref):
        if x is None:
            continue
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        err = rel_err(grad, grad_ref)
        if name in scales:
            err *= (grad_ref.norm() / scales[name].norm()).item()
        assert err <= tolerance, f"d{name}: rel err {err:.2e}"


@pytest.mark.parametrize("length, with_state, with_dht", [
    (1, True, True),  # one token: a chunk of one row
    (63, False, False),  # one partial chunk, no states at all
    (65, True, False),  # a full chunk and one row
    (130, True, True),  # three chunks, the last partial
    (500, False, True),  # eight chunks: the reverse state pass runs long
])
def test_bwd_fp32(poisoned, length, with_state, with_dht):
    check(2 if length < 100 else 1, length, 1, 2, 16, 32, torch.float32, with_state=with_state, with_dht=with_dht)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bwd_half_precision(poisoned, dtype):
    check(1, 130, 1, 2, 32, 32, dtype, with_state=True, with_dht=True)


# the forward's o kernel computes (and drops) inf and 0 * inf on the padded rows: numpy warns in the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bwd_strong_decay(poisoned, dtype):
    """G of the last, partial chunk (50 rows) falls past -88, where exp(-G) overflows fp32: the padded rows must
    never pair with the real ones in an exp (the forward's o kernel only drops such rows; the backward sums them)."""
    check(1, 114, 1, 2, 16, 16, dtype, with_state=True, with_dht=True, strong_decay=True)


@pytest.mark.parametrize("key_heads, value_heads, dk, dv", [(2, 2, 16, 16), (1, 4, 24, 40)])
def test_bwd_head_layouts(poisoned, key_heads, value_heads, dk, dv):
    """Hv == Hk, and four value heads per key head with head dims that are not powers of two."""
    check(1, 70, key_heads, value_heads, dk, dv, torch.float32, with_state=True, with_dht=True)


@pytest.mark.parametrize("dtype, dk, dv", [
    (torch.float32, 128, 128),  # the dh kernel's shared memory (2 stages since 2026-11-23)
    (torch.bfloat16, 16, 32), (torch.bfloat16, 32, 16),  # 16-wide dims: wrong before tiles were padded to 32
    (torch.float16, 16, 16), (torch.bfloat16, 128, 128), (torch.float32, 64, 128),
    (torch.bfloat16, 64, 64),  # 64-wide key rows: dS^T by its own product (BWD_DQK_DST_PRODUCT_BKS)
])
def test_bwd_full_size_heads(poisoned, dtype, dk, dv):
    """The shapes `backward_verified` trusts (or is asked to): grouped heads, two sequences of three chunks (the last
    partial), states (6-20 s each under the interpreter)."""
    check(2, 130, 2, 4, dk, dv, dtype, with_state=True, with_dht=True)


@pytest.mark.parametrize("dtype, with_state", [(torch.float32, True), (torch.bfloat16, False)])
def test_bwd_packed_sequences(poisoned, dtype, with_state):
    cu_seqlens = torch.tensor([0, 5, 69, 130], dtype=torch.int32, device=DEVICE)  # 5, 64 and 61 tokens
    check(1, 130, 1, 2, 16, 16, dtype, with_state=with_state, with_dht=True, cu_seqlens=cu_seqlens)


def test_bwd_through_dispatch_with_strided_qkv(monkeypatch):
    """The model's call: q, k, v column slices of one conv output, through dispatch.gated_delta_rule with the
    kernel path forced on (on CPU the interpreter runs it); gradients land in the shared tensor."""
    from hybridlm.ops import triton as kernel_module

    monkeypatch.setattr(dispatch, "use_kernels", lambda *tensors, **kwargs: True)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    batch, length, key_heads, value_heads, d = 1, 40, 1, 2, 16
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(batch, length, key_heads, value_heads, d, d, torch.float32, 1)
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # [B, T, C]
    do, dht = output_grads(v, 1, d, True, torch.float32)

    def run(gdn, mixed, A_log):
        key_dim = key_heads * d
        q, k, v = mixed.split([key_dim, key_dim, value_heads * d], dim=-1)
        o, final = gdn(q.unflatten(-1, (key_heads, d)), k.unflatten(-1, (key_heads, d)),
                       v.unflatten(-1, (value_heads, d)), a, b, A_log, dt_bias, initial_state=state,
                       output_final_state=True)
        loss_of(o, final, do, dht).backward()

    ours = [mixed.clone().requires_grad_(), A_log.clone().requires_grad_()]
    run(dispatch.gated_delta_rule, *ours)
    ref = [mixed.double().requires_grad_(), A_log.double().requires_grad_()]

    def reference(q, k, v, a, b, A_log, dt_bias, **kwargs):
        g, beta = gdn_gates(a.double(), b.double(), A_log, dt_bias.double())
        return chunk_gated_delta_rule(q, k, v, g, beta, **{**kwargs, "initial_state": state.double()})

    run(reference, *ref)
    for leaf, leaf_ref in zip(ours, ref):
        assert rel_err(leaf.grad, leaf_ref.grad) <= TOLERANCE[torch.float32]


def test_no_grad_path_matches_forward():
    """Without gradients chunk_gdn is chunk_gdn_fwd: same numbers, no saved tensors."""
    from hybridlm.ops.triton import chunk_gdn_fwd

    q, k, v, a, b, A_log, dt_bias, state = make_inputs(1, 20, 1, 2, 16, 16, torch.float32, 1)
    o, final = chunk_gdn(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    o_fwd, final_fwd = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    assert o.grad_fn is None
    torch.testing.assert_close(o, o_fwd, rtol=0, atol=0)
    torch.testing.assert_close(final, final_fwd, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, dk, dv, trusted", [
    (torch.bfloat16, 128, 128, True), (torch.float16, 32, 64, True), (torch.float32, 64, 64, True),
    (torch.bfloat16, 16, 16, True), (torch.bfloat16, 32, 16, True), (torch.float32, 128, 128, True),
    (torch.bfloat16, 256, 256, False), (torch.float16, 8, 8, False), (torch.float32, 8, 16, False),
])
def test_backward_verified_shapes(dtype, dk, dv, trusted):
    from hybridlm.ops.triton import backward_verified

    reason = backward_verified(dtype, dk, dv)
    assert (reason is None) == trusted
    if reason is not None:
        assert f"{dk}/{dv}" in reason


def test_untrusted_backward_takes_the_reference(monkeypatch):
    """Training at shapes whose backward has not passed on a GPU goes through the differentiable reference; the
    same shapes without gradients still take the kernel."""
    from hybridlm.ops import triton as kernel_module

    calls = []
    monkeypatch.setattr(dispatch, "use_kernels", lambda *tensors, **kwargs: True)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    monkeypatch.setattr(kernel_module, "chunk_gdn", lambda *args, **kwargs: calls.append(1) or chunk_gdn(*args, **kwargs))
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, 20, 1, 2, 8, 8, torch.bfloat16, 1)  # 8-wide: untrusted
    q.requires_grad_()
    o, _ = dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    o.float().sum().backward()
    assert not calls and q.grad is not None
    with torch.no_grad():
        dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    assert calls == [1]


@pytest.mark.parametrize("dk, dv, capability, version, unsafe", [
    (32, 64, (9, 0), "3.6.0", True), (128, 32, (9, 0), "3.7.0+gitabc", True), (24, 40, (9, 0), "3.4.0", True),
    (128, 128, (9, 0), "3.6.0", False), (64, 128, (9, 0), "3.6.0", False), (96, 64, (9, 0), "3.6.0", True),
    (96, 96, (9, 0), "3.6.0", False), (128, 96, (9, 0), "3.6.0", True),
    (128, 32, (9, 0), "3.7.1", False), (128, 32, (9, 0), "3.10.0", False), (128, 32, (8, 0), "3.6.0", False),
])
def test_hopper_head_dims_fault(dk, dv, capability, version, unsafe):
    """Unequal head dims below 64 or not powers of two on sm_90 with Triton before 3.7.1 are refused (they faulted
    on an H200)."""
    from hybridlm.ops.triton.gdn_chunk_bwd import hopper_head_dims_fault

    reason = hopper_head_dims_fault(dk, dv, capability, version)
    assert (reason is not None) == unsafe
    if unsafe:
        assert f"{dk}/{dv}" in reason and version in reason and "3.7.1" in reason


def test_unsafe_head_dims_take_the_reference(monkeypatch, caplog):
    """Where `head_dims_fault` names a reason, inference and training both run the reference, with a warning."""
    from hybridlm.ops import triton as kernel_module

    calls = []
    monkeypatch.setattr(dispatch, "use_kernels", lambda *tensors, **kwargs: True)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    monkeypatch.setattr(kernel_module, "chunk_gdn",
                        lambda *args, **kwargs: calls.append(1) or chunk_gdn(*args, **kwargs))
    monkeypatch.setattr(kernel_module, "head_dims_fault", lambda device, dk, dv: f"head dims {dk}/{dv} (test)")
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, 20, 1, 2, 32, 64, torch.bfloat16, 1)
    with caplog.at_level("WARNING", logger="hybridlm.ops.dispatch"):
        with torch.no_grad():
            o, _ = dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    assert not calls and o.shape == v.shape
    assert "head dims 32/64 (test)" in caplog.text
    q.requires_grad_()
    o, _ = dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    o.float().sum().backward()
    assert not calls and q.grad is not None
    monkeypatch.setattr(kernel_module, "head_dims_fault", lambda device, dk, dv: None)
    with torch.no_grad():
        dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    assert calls == [1]
