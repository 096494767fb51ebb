"""Triton decode GEMVs with fused prologues (RMSNorm, residual add + RMSNorm, SwiGLU, sigmoid gate) vs their
PyTorch twins (`hybridlm.ops.linear`) and float64."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.linear import linear, rms_norm_linear, sigmoid_gate_linear, silu_mul_linear  # noqa: E402
from hybridlm.ops.triton.gemv import (  # noqa: E402
    GemvConfig,
    gemv_config,
    linear_fwd,
    rms_norm_linear_fwd,
    sigmoid_gate_linear_fwd,
    silu_mul_linear_fwd,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N, EPS = 200, 70, 1e-6  # neither a multiple of any block: every tile edge is masked
HEADS = 8  # sigmoid_gate: K = 8 heads of 25 channels (a head dim no power of two)
OPS = ["rms_norm", "add_rms_norm", "silu_mul", "sigmoid_gate", "linear"]


def inputs(op, rows, dtype, seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)

    width = 2 * K if op == "silu_mul" else K
    x = randn(*lead, rows, width, scale=2.0)
    weight = randn(N, K, scale=K ** -0.5)
    extra = {}
    if op == "sigmoid_gate":  # as the attention hands them over: o [.., H, T, D] transposed, the gate every other
        head_dim = K // HEADS  # head-sized slice of the q projection [.., T, H, 2D]
        x = randn(*lead, HEADS, rows, head_dim, scale=2.0).transpose(-3, -2)
        extra["gate"] = randn(*lead, rows, HEADS, 2 * head_dim, scale=2.0)[..., head_dim:]
    if op in ("rms_norm", "add_rms_norm"):
        extra["norm_weight"] = randn(K, scale=0.5)
    if op == "add_rms_norm":
        extra["residual"] = randn(*lead, rows, K)
    return x, weight, extra


def run(op, x, weight, extra, config=None, reference=False):
    """(y, s or None) from the kernel, or from its twin with `reference`."""
    kw = {} if reference else {"config": config}
    if op in ("rms_norm", "add_rms_norm"):
        fn = rms_norm_linear if reference else rms_norm_linear_fwd
        out = fn(x, extra["norm_weight"], EPS, weight, extra.get("residual"), **kw)
        return out if op == "add_rms_norm" else (out, None)
    if op == "silu_mul":
        return (silu_mul_linear if reference else silu_mul_linear_fwd)(x, weight, **kw), None
    if op == "sigmoid_gate":
        return (sigmoid_gate_linear if reference else sigmoid_gate_linear_fwd)(x, extra["gate"], weight, **kw), None
    return (linear if reference else linear_fwd)(x, weight, **kw), None


def exact(op, x, weight, extra):
    """float64 from the same inputs, no intermediate rounding."""
    x, weight = x.double(), weight.double()
    if op == "silu_mul":
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    elif op == "sigmoid_gate":
        x = (x * torch.sigmoid(extra["gate"].double())).flatten(-2)
    elif op != "linear":
        if op == "add_rms_norm":
            x = x + extra["residual"].double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (1 + extra["norm_weight"].double())
    return x @ weight.T


def mean_error(y, truth):
    assert torch.isfinite(y).all()
    return (y.double() - truth).abs().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("swept", [False, True])
def test_gemv_matches_reference(op, rows, dtype, swept):
    """Against the twin and float64. `swept`: small tiles (several K steps, a ragged last one), plain loads, and
    the other of the two paths (CUDA cores / tl.dot) than the rule picks for these rows."""
    x, weight, extra = inputs(op, rows, dtype, seed=rows)
    config = None
    if swept:
        dot = not gemv_config(rows, N, K, element_size=x.element_size()).use_dot
        config = GemvConfig(block_n=16 if dot else 8, block_k=64, num_stages=1, use_dot=dot)
    y, summed = run(op, x, weight, extra, config)
    y_ref, summed_ref = run(op, x, weight, extra, reference=True)
    assert y.shape == (rows, N) and y.dtype == dtype
    if op == "add_rms_norm":  # x + residual rounds once, exactly as `x + residual` does
        assert summed.dtype == dtype and torch.equal(summed, summed_ref)
    truth = exact(op, x, weight, extra)
    if dtype == torch.float32:  # summation order only
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert mean_error(y, truth) < 1e-5
    else:  # the GEMV's input is the twin's bit for bit (up to the rstd): the fp32 sums differ in order only
        torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)
        assert (y == y_ref).float().mean() > 0.9
        assert mean_error(y, truth) <= 1.1 * mean_error(y_ref, truth)


@pytest.mark.parametrize("op", OPS)
def test_gemv_leading_axes_and_row_strides(op):
    """[B, T, K] inputs that are column slices of wider tensors (row stride > K): y [B, T, N], no copies needed
    (sigmoid_gate: [B, T, H, D], o and gate strided as `inputs` makes them)."""
    x, weight, extra = inputs(op, 3, torch.float32, seed=7, lead=(2,))
    if op != "sigmoid_gate":
        x = torch.cat([x, torch.ones_like(x[..., :5])], dim=-1)[..., :-5]  # row stride K + 5
    assert not x.is_contiguous()
    if "residual" in extra:
        residual = extra["residual"]
        extra["residual"] = torch.cat([residual, residual], dim=-1)[..., K:]
    y, summed = run(op, x, weight, extra)
    y_ref, summed_ref = run(op, x, weight, extra, reference=True)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if summed is not None:
        assert summed.shape == x.shape and torch.equal(summed, summed_ref)


def test_gemv_bad_inputs():
    x, weight, extra = inputs("add_rms_norm", 2, torch.float32)
    norm_weight, residual = extra["norm_weight"], extra["residual"]
    with pytest.raises(ValueError, match=r"at most 16 rows, got 17 .* GEMM path"):
        linear_fwd(torch.zeros(17, K, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] .* got weight \(70, 199\)"):
        linear_fwd(x, weight[:, 1:])
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        linear_fwd(x, weight[0])
    with pytest.raises(ValueError, match=r"norm_weight must be \[K\] .* got norm_weight \(199,\)"):
        rms_norm_linear_fwd(x, norm_weight[1:], EPS, weight)
    with pytest.raises(ValueError, match=r"residual must be shaped like x \(2, 200\), got \(1, 200\)"):
        rms_norm_linear_fwd(x, norm_weight, EPS, weight, residual[:1])
    with pytest.raises(ValueError, match="weight must have x's dtype torch.float32, got torch.bfloat16"):
        linear_fwd(x, weight.bfloat16())
    with pytest.raises(ValueError, match="residual must have x's dtype"):
        rms_norm_linear_fwd(x, norm_weight, EPS, weight, residual.bfloat16())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        linear_fwd(x.double(), weight.double())
    with pytest.raises(ValueError, match=r"gate_up must be \[..., 2I\]"):
        silu_mul_linear_fwd(torch.zeros(1, 2 * K - 1, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = gate_up's gate half"):
        silu_mul_linear_fwd(torch.zeros(1, K, device=DEVICE), weight)
    o, gate = torch.zeros(2, 1, HEADS, K // HEADS, device=DEVICE), torch.zeros(2, 1, HEADS, K // HEADS, device=DEVICE)
    with pytest.raises(ValueError, match="o and gate must be"):
        sigmoid_gate_linear_fwd(o, gate[..., :-1], weight)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = o's last two axes"):
        sigmoid_gate_linear_fwd(o[..., :-1], gate[..., :-1], weight)
    with pytest.raises(ValueError, match="gate must have o's dtype"):
        sigmoid_gate_linear_fwd(o, gate.bfloat16(), weight)
    with pytest.raises(ValueError, match="contiguous in its last axis"):
        linear_fwd(x, torch.zeros(K, N, device=DEVICE).T)
    with pytest.raises(ValueError, match="tl.dot needs block_n and block_k >= 16"):
        linear_fwd(x, weight, config=GemvConfig(block_n=4, block_k=64, use_dot=True))


def test_gemv_config_rule():
    """The documented rule on the 0.8B decode shapes (H100: 132 SMs); fp32: 16-byte loads, CUDA cores."""
    assert gemv_config(1, 8224, 1024) == GemvConfig(block_n=16, block_k=256, use_dot=False)  # 514 programs
    assert gemv_config(1, 1024, 3584) == GemvConfig(block_n=4, block_k=2048, use_dot=False)  # small N: long rows
    assert gemv_config(1, 1024, 2048, element_size=4) == GemvConfig(block_n=4, block_k=1024, use_dot=False)
    assert gemv_config(2, 1024, 3584) == GemvConfig(block_n=4, block_k=256, use_dot=False)  # 256 programs
    assert gemv_config(8, 8224, 1024) == GemvConfig(block_n=16, block_k=256, use_dot=True)
    assert gemv_config(8, 248320, 1024) == GemvConfig(block_n=32, block_k=256, use_dot=True)
    assert gemv_config(2, 100, 24).block_k == 32
    assert gemv_config(8, 8224, 1024, element_size=4) == GemvConfig(block_n=8, block_k=128, use_dot=False)


def test_gemv_no_rows():
    weight = torch.zeros(N, K, device=DEVICE)
    assert linear_fwd(torch.zeros(2, 0, K, device=DEVICE), weight).shape == (2, 0, N)


def test_gemv_preferred_follows_the_measured_table():
    from hybridlm.ops.triton.gemv import gemv_preferred

    assert gemv_preferred("linear", 1, 1024, 2048) and gemv_preferred("linear", 2, 4096, 4096)
    assert gemv_preferred("norm", 1, 8224, 1024) and gemv_preferred("norm", 2, 248320, 4096)  # 0.8B; LM heads
    assert not gemv_preferred("norm", 1, 12352, 4096)  # 9B in_proj: cuBLAS wins
    assert gemv_preferred("silu", 1, 1024, 3584) and not gemv_preferred("silu", 2, 1024, 3584)
    assert not gemv_preferred("silu", 1, 4096, 12288)
    assert gemv_preferred("gate", 2, 1024, 2048) and gemv_preferred("gate", 1, 4096, 4096)  # 0.8B, 9B o_proj
    assert not gemv_preferred("gate", 2, 4096, 4096)
    assert not any(gemv_preferred(kind, 4, 1024, 1024) for kind in ("linear", "norm", "silu", "gate"))
    with pytest.raises(ValueError, match="kind"):
        gemv_preferred("gelu", 1, 8, 8)
