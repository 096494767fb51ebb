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


@pytest.mark.parametrize("angles_in_kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", ["default", "yarn"])
@pytest.mark.parametrize("batch, length, q_heads, k_heads, dim, rotary",
                         [(1, 1, 8, 2, 256, 64), (3, 1, 2, 1, 64, 16), (2, 5, 3, 1, 80, 20), (1, 7, 2, 2, 32, 32)])
def test_qk_rms_norm_rope(monkeypatch, angles_in_kernel, dtype, rope_type, batch, length, q_heads, k_heads, dim,
                          rotary):
    """q and k in one launch, cos and sin read from `RopeInputs.cos_sin` or computed in the kernel from the positions
    (up to 262k, where an approximate cos is far off) vs the twin (rope_cos_sin, then rms_norm_rope on each) and vs
    the cos/sin kernel run twice. q and k as the model has them: every other head-sized slice of [B, T, Hq, 2D], and
    a column slice of the fused projection; positions as the engine's decode context has them ([S, 1] int32 views)
    at T = 1."""
    from hybridlm.ops.rope import RopeInputs, qk_rms_norm_rope, rope_inv_freq
    from hybridlm.ops.triton import qk_rms_norm_rope_fwd, rms_norm_rope_fwd
    from hybridlm.ops.triton import rope as triton_rope

    monkeypatch.setattr(triton_rope, "ANGLES_IN_KERNEL", angles_in_kernel)

    gen = torch.Generator().manual_seed(dim + length + batch)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)

    q = randn(batch, length, q_heads, 2 * dim, scale=2.0)[..., :dim]
    k = randn(batch, length, 2 * k_heads * dim, scale=2.0)[..., :k_heads * dim].view(batch, length, k_heads, dim)
    q_weight, k_weight = randn(dim, scale=0.3), randn(dim, scale=0.3)
    positions = torch.randint(0, 262144, (batch, length), generator=gen)
    positions[0, 0] = 262143
    positions[-1, -1] = 0
    if length == 1:
        positions = positions[:, 0].int().to(DEVICE)[:, None]
    params = {"factor": 4.0, "original_max_position_embeddings": 65536} if rope_type == "yarn" else None
    inv_freq, scaling = rope_inv_freq(rotary, 1e7, rope_type, params)
    assert (scaling != 1.0) == (rope_type == "yarn")
    rope = RopeInputs(positions.to(DEVICE), inv_freq.to(DEVICE), scaling, dtype)
    q_out, k_out = qk_rms_norm_rope_fwd(q, q_weight, k, k_weight, rope, 1e-6)
    q_ref, k_ref = qk_rms_norm_rope(q, q_weight, k, k_weight, rope, 1e-6)
    cos, sin = rope.cos_sin()
    q_old, k_old = rms_norm_rope_fwd(q, q_weight, cos, sin, 1e-6), rms_norm_rope_fwd(k, k_weight, cos, sin, 1e-6)
    for y, y_ref, y_old in ((q_out, q_ref, q_old), (k_out, k_ref, k_old)):
        assert y.shape == y_ref.shape and y.dtype == dtype and y.is_contiguous() and torch.isfinite(y).all()
        if DEVICE == "cuda":  # libdevice's cosf/sinf are PyTorch's: the same bits as the cos/sin kernel
            assert torch.equal(y, y_old)
        else:  # numpy's float32 cos and sin in the interpreter differ from PyTorch's by an ulp here and there
            torch.testing.assert_close(y, y_old, rtol=1e-5, atol=1e-5)
            assert (y == y_old).float().mean() > (0.9 if dtype == torch.float32 else 0.999)
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(y, y_ref.contiguous(), **tolerance)
    with pytest.raises(ValueError, match="rotary_dim must be at most"):
        qk_rms_norm_rope_fwd(q, q_weight, k, k_weight, RopeInputs(rope.positions, torch.ones(dim, device=DEVICE),
                                                                  1.0, dtype))
    with pytest.raises(ValueError, match="positions"):
        qk_rms_norm_rope_fwd(q, q_weight, k, k_weight, RopeInputs(rope.positions[:, :0], rope.inv_freq, 1.0, dtype))
    with pytest.raises(ValueError, match=r"k \[B, T, Hk, D\]"):
        qk_rms_norm_rope_fwd(q, q_weight, k[..., :-1], k_weight, rope)


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
