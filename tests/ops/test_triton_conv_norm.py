"""Triton causal conv1d (prefill) and gated RMSNorm vs their PyTorch references."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.conv import causal_conv1d  # noqa: E402
from hybridlm.ops.norm import gated_rms_norm  # noqa: E402
from hybridlm.ops.triton import causal_conv1d_fwd, gated_rms_norm_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_matches(x, ref, dtype):
    assert x.dtype == ref.dtype and x.shape == ref.shape and torch.isfinite(x).all()
    if dtype == torch.float32:  # summation order differs from the reference's conv: round-off only
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    else:  # the same fp32 sum rounded once to bf16: bit for bit
        assert torch.equal(x, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 2, 63, 70])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d(dtype, length, with_state):
    gen = torch.Generator().manual_seed(length)
    batch, channels, width = 2, 200, 4
    x = torch.randn(batch, length, channels, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(channels, width, generator=gen).to(dtype).to(DEVICE)
    state = torch.randn(batch, channels, width - 1, generator=gen).to(dtype).to(DEVICE) if with_state else None
    y, final = causal_conv1d_fwd(x, weight, initial_state=state, output_final_state=True)
    y_ref, final_ref = causal_conv1d(x, weight, initial_state=state, output_final_state=True)
    assert_matches(y, y_ref, dtype)
    assert torch.equal(final, final_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_packed(dtype, activation):
    gen = torch.Generator().manual_seed(1)
    channels, width = 96, 4
    cu_seqlens = torch.tensor([0, 2, 40, 100], dtype=torch.int32, device=DEVICE)
    x = torch.randn(1, 100, channels, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(channels, width, generator=gen).to(dtype).to(DEVICE)
    state = torch.randn(3, channels, width - 1, generator=gen).to(dtype).to(DEVICE)
    y, final = causal_conv1d_fwd(x, weight, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                                 activation=activation)
    y_ref, final_ref = causal_conv1d(x, weight, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                                     activation=activation)
    assert_matches(y, y_ref, dtype)
    assert torch.equal(final, final_ref)


def test_causal_conv1d_strided_input_and_no_state():
    x = torch.randn(2, 33, 160, device=DEVICE)[..., :128]  # a column slice, token stride 160
    weight = torch.randn(128, 4, device=DEVICE)
    y, final = causal_conv1d_fwd(x, weight)
    y_ref, _ = causal_conv1d(x, weight)
    assert final is None
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dim", [32, 24])
def test_gated_rms_norm(dtype, weight_dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 5, 4, dim, generator=gen).to(dtype).to(DEVICE)
    gate = torch.randn(3, 5, 4, dim, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(dim, generator=gen).to(weight_dtype).to(DEVICE)
    y = gated_rms_norm_fwd(x, gate, weight, 1e-6)
    y_ref = gated_rms_norm(x, gate, weight, 1e-6)
    assert y.dtype == y_ref.dtype and torch.isfinite(y).all()
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    else:  # bf16 rounding points follow the reference; allow one ulp where fp32 rsqrt differs in its last bit
        torch.testing.assert_close(y, y_ref, rtol=8e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, dim", [(1, 1024), (37, 256), (5, 80), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, dim, with_residual):
    """The zero-centred RMSNorm in one launch, and with the residual add fused: the sum is rounded to the input
    dtype as `x + h` is, so it matches the reference bit for bit; the norm up to reduction order."""
    from hybridlm.ops.norm import rms_norm
    from hybridlm.ops.triton import rms_norm_fwd

    gen = torch.Generator().manual_seed(rows * dim)
    x = (3 * torch.randn(2, rows, dim, generator=gen)).to(dtype).to(DEVICE)
    weight = (0.5 * torch.randn(dim, generator=gen)).to(dtype).to(DEVICE)
    residual = torch.randn(2, rows, dim, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    out = rms_norm_fwd(x, weight, 1e-6, residual=residual)
    if with_residual:
        y, summed = out
        assert torch.equal(summed, x + residual)
        y_ref = rms_norm(x + residual, weight, 1e-6)
    else:
        y, y_ref = out, rms_norm(x, weight, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_ref, **tolerance)


def test_rms_norm_bad_shapes():
    from hybridlm.ops.triton import rms_norm_fwd

    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fwd(x, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        rms_norm_fwd(x, torch.zeros(8, device=DEVICE), residual=torch.zeros(2, 4, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, heads, dim, rotary", [(1, 1, 8, 256, 64), (2, 5, 3, 80, 20), (1, 7, 2, 32, 32)])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_rope(dtype, batch, length, heads, dim, rotary, strided):
    """q/k norm + partial RoPE in one launch vs rms_norm then apply_partial_rope; `strided`: q as the model has
    it, every other head-sized slice of a [B, T, H, 2D] projection (the output gate sits beside it)."""
    from hybridlm.ops.rope import rms_norm_rope, rope_cos_sin
    from hybridlm.ops.triton import rms_norm_rope_fwd

    gen = torch.Generator().manual_seed(dim + length)
    x = (2 * torch.randn(batch, length, heads, 2 * dim if strided else dim, generator=gen)).to(dtype).to(DEVICE)
    if strided:
        x = x[..., :dim]
    weight = (0.3 * torch.randn(dim, generator=gen)).to(dtype).to(DEVICE)
    positions = torch.randint(0, 5000, (batch, length), generator=gen).to(DEVICE)
    inv_freq = 1.0 / (1e7 ** (torch.arange(0, rotary, 2).float() / rotary))
    cos, sin = rope_cos_sin(positions, inv_freq, 1.0, dtype)
    y = rms_norm_rope_fwd(x, weight, cos, sin, 1e-6)
    y_ref = rms_norm_rope(x, weight, cos, sin, 1e-6)
    assert y.shape == y_ref.shape and y.dtype == dtype and torch.isfinite(y).all()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref.contiguous(), **tolerance)
    if dtype == torch.bfloat16:  # the reference's roundings (on the GPU, fused multiply-adds drop a few of them):
        exact = rms_norm_rope(x.double(), weight.double(), cos.double(), sin.double(), 1e-6)  # no worse than it
        assert (y.double() - exact).abs().mean() <= 1.1 * (y_ref.double() - exact).abs().mean()
    with pytest.raises(ValueError, match="rotary_dim"):
        rms_norm_rope_fwd(x, weight, cos[..., :-1], sin[..., :-1], 1e-6)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype, strided):
    """`strided`: gate and up are the two halves of one [B, T, 2C] GEMM output, as the fused MLP hands them over."""
    import torch.nn.functional as F

    from hybridlm.ops.triton import silu_mul_fwd

    gen = torch.Generator().manual_seed(0)
    if strided:
        gate, up = (3 * torch.randn(2, 5, 3000, generator=gen)).to(dtype).to(DEVICE).chunk(2, dim=-1)
        assert not gate.is_contiguous()
    else:
        gate, up = (3 * torch.randn(2, 3, 1500, generator=gen)).to(dtype).to(DEVICE).unbind(0)
    y = silu_mul_fwd(gate, up)
    assert y.is_contiguous()
    assert y.dtype == dtype and y.shape == gate.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-2, atol=1e-2)
        assert (y == F.silu(gate) * up).float().mean() > 0.99
    with pytest.raises(ValueError, match="must match"):
        silu_mul_fwd(gate, up[..., :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, heads, dim", [(1, 1, 8, 256), (2, 5, 3, 80)])
def test_sigmoid_gate(dtype, batch, length, heads, dim):
    """The attention's output gate as the model hands it over: o a transposed [B, H, T, D] attention output, gate
    every other head-sized slice of the q projection [B, T, H, 2D]."""
    from hybridlm.ops.triton import sigmoid_gate_fwd

    gen = torch.Generator().manual_seed(dim + length)
    o = (2 * torch.randn(batch, heads, length, dim, generator=gen)).to(dtype).to(DEVICE).transpose(1, 2)
    gate = (2 * torch.randn(batch, length, heads, 2 * dim, generator=gen)).to(dtype).to(DEVICE)[..., dim:]
    y = sigmoid_gate_fwd(o, gate)
    y_ref = o.reshape(batch, length, -1) * torch.sigmoid(gate.reshape(batch, length, -1))
    assert y.shape == (batch, length, heads * dim) and y.dtype == dtype and y.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    else:  # the reference's two roundings: at least as close to float64 as it is
        torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
        exact = o.double().reshape(batch, length, -1) * torch.sigmoid(gate.double().reshape(batch, length, -1))
        assert (y.double() - exact).abs().mean() <= 1.1 * (y_ref.double() - exact).abs().mean()
    with pytest.raises(ValueError, match="must be"):
        sigmoid_gate_fwd(o, gate[..., :-1])
