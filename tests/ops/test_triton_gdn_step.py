"""Fused Triton decode step vs causal_conv1d (T = 1) + recurrent_gated_delta_rule in float64, on slot pools."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.conv import causal_conv1d  # noqa: E402
from hybridlm.ops.delta_rule import gdn_gates, recurrent_gated_delta_rule  # noqa: E402
from hybridlm.ops.norm import gated_rms_norm  # noqa: E402
from hybridlm.ops.triton import gdn_decode_step  # noqa: E402
from hybridlm.ops.triton.gdn_step import _ARRIVALS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all()
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def reference_step(x, z, a, b, weight, A_log, dt_bias, conv_states, states, dims, norm_weight):
    """One token through the references; returns o and the new states of these rows.

    The conv runs in the input dtype, as the model runs it (it computes in the weight's dtype; float64 depthwise
    conv is also seconds slow on CPU); the delta rule and the norm run in float64."""
    key_heads, dk, value_heads, dv = dims
    batch = x.shape[0]
    y, conv_states = causal_conv1d(x[:, None], weight, initial_state=conv_states, output_final_state=True)
    y = y.double()  # [B, 1, C]
    key_dim = key_heads * dk
    q = y[..., :key_dim].reshape(batch, 1, key_heads, dk)
    k = y[..., key_dim:2 * key_dim].reshape(batch, 1, key_heads, dk)
    v = y[..., 2 * key_dim:].reshape(batch, 1, value_heads, dv)
    g, beta = gdn_gates(a[:, None].double(), b[:, None].double(), A_log.double(), dt_bias.double())
    o, states = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=states, output_final_state=True)
    o = o[:, 0]  # [B, Hv, dv]
    if z is not None:
        o = gated_rms_norm(o, z.double(), norm_weight.double())
    return o, conv_states, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse_norm", [False, True])
@pytest.mark.parametrize("key_heads, value_heads", [(2, 4), (2, 2)])
@pytest.mark.parametrize("path", ["main", "prefetch", "split"])
def test_decode_steps_on_a_pool(monkeypatch, dtype, fuse_norm, key_heads, value_heads, path):
    """`path`: the main kernel, the main kernel loading each next value head's state early (gdn_step.STEP_PREFETCH),
    or the split kernel."""
    from hybridlm.ops.triton import gdn_step

    split = path == "split"
    monkeypatch.setattr(gdn_step, "STEP_PREFETCH", path == "prefetch")
    # the split path deals value channels in slices of 32: dv = 48 makes two, the second one ragged
    dk, dv, width, pool_size = 16, 48 if split else 32, 4, 7
    channels = 2 * key_heads * dk + value_heads * dv
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    weight = randn(channels, width)
    A_log = torch.empty(value_heads).uniform_(-2.0, 0.5, generator=gen).to(DEVICE)
    dt_bias = torch.randn(value_heads, generator=gen).to(DEVICE)
    norm_weight = randn(dv)
    conv_pool = randn(pool_size, channels, width - 1)
    state_pool = torch.randn(pool_size, value_heads, dk, dv, generator=gen).to(DEVICE)
    slots = torch.tensor([5, 1, 3], dtype=torch.int32, device=DEVICE)  # non-contiguous, out of order
    untouched = [i for i in range(pool_size) if i not in slots.tolist()]
    conv_before, state_before = conv_pool.clone(), state_pool.clone()
    conv_ref, state_ref = conv_pool.clone(), state_pool.double()
    rows = slots.long()
    for _ in range(3):
        batch = len(slots)
        x, a, b = randn(batch, channels), randn(batch, value_heads), randn(batch, value_heads)
        z = randn(batch, value_heads, dv) if fuse_norm else None
        o = gdn_decode_step(x, z, a, b, weight, A_log, dt_bias, conv_pool, state_pool, slots,
                            num_key_heads=key_heads, key_head_dim=dk, value_head_dim=dv,
                            norm_weight=norm_weight if fuse_norm else None, split=split)
        o_ref, conv_ref[rows], state_ref[rows] = reference_step(
            x, z, a, b, weight, A_log, dt_bias, conv_ref[rows], state_ref[rows],
            (key_heads, dk, value_heads, dv), norm_weight)
        assert o.shape == (batch, value_heads, dv) and o.dtype == dtype
        assert rel_err(o, o_ref) <= TOLERANCE[dtype]
        assert rel_err(state_pool[rows], state_ref[rows]) <= TOLERANCE[dtype]
        # the conv state holds raw inputs: an exact copy
        assert torch.equal(conv_pool[rows], conv_ref[rows])
        assert torch.equal(conv_pool[untouched], conv_before[untouched])
        assert torch.equal(state_pool[untouched], state_before[untouched])
        if split:  # the last program of each key head resets its arrival count for the next launch
            assert not _ARRIVALS[o.device].any()


@pytest.mark.parametrize("path", ["main", "prefetch", "split"])
def test_padding_rows_touch_nothing(monkeypatch, path):
    from hybridlm.ops.triton import gdn_step

    split = path == "split"
    monkeypatch.setattr(gdn_step, "STEP_PREFETCH", path == "prefetch")
    key_heads, value_heads, dk, dv, width = 1, 2, 16, 16, 4
    channels = 2 * key_heads * dk + value_heads * dv
    conv_pool = torch.randn(3, channels, width - 1, device=DEVICE)
    state_pool = torch.randn(3, value_heads, dk, dv, device=DEVICE)
    conv_before, state_before = conv_pool.clone(), state_pool.clone()
    slots = torch.tensor([-1, 2], dtype=torch.int32, device=DEVICE)
    o = gdn_decode_step(torch.randn(2, channels, device=DEVICE), None, torch.randn(2, value_heads, device=DEVICE),
                        torch.randn(2, value_heads, device=DEVICE), torch.randn(channels, width, device=DEVICE),
                        torch.zeros(value_heads, device=DEVICE), torch.zeros(value_heads, device=DEVICE),
                        conv_pool, state_pool, slots, num_key_heads=key_heads, key_head_dim=dk, value_head_dim=dv,
                        split=split)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isfinite(o[1]).all()
    assert torch.equal(conv_pool[:2], conv_before[:2]) and torch.equal(state_pool[:2], state_before[:2])
    assert not torch.equal(state_pool[2], state_before[2])
