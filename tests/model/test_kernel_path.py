"""The model's forward with every Triton kernel forced on (the interpreter runs them on the CPU) against the
plain-PyTorch path: the fused norms (residual add included), q/k norm + RoPE, the conv, the chunked GDN."""
from __future__ import annotations

import pytest
import torch

import hybridlm
from hybridlm.model.layers import MLP
from hybridlm.ops import dispatch
from tests.checkpoints import VOCAB

pytest.importorskip("triton", reason="triton is not installed")


@pytest.fixture
def kernels_forced(monkeypatch):
    """dispatch takes the Triton kernels for CPU tensors too (inference only: their backwards are not all here)."""
    from hybridlm.ops import triton as kernel_module

    def forced(*tensors, differentiable=False):
        return differentiable or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    monkeypatch.setattr(dispatch, "use_kernels", forced)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    calls = {}
    for name in ("rms_norm_fwd", "rms_norm_rope_fwd", "gated_rms_norm_fwd", "causal_conv1d_fwd", "chunk_gdn",
                 "silu_mul_fwd"):
        def spy(*args, _name=name, _fn=getattr(kernel_module, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernel_module, name, spy)
    return calls


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next"])
def test_forward_on_kernels_matches_reference(checkpoint, family, request):
    directory, _ = checkpoint(family)
    model = hybridlm.load(directory)
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)
        calls = request.getfixturevalue("kernels_forced")
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    layers = model.config.num_hidden_layers
    # per layer: the input norm and the fused add + norm, and the final norm; q and k norm + RoPE per attention layer
    assert calls["rms_norm_fwd"] == 2 * layers + 1
    attention_layers = model.config.layer_types.count("full_attention")
    assert calls["rms_norm_rope_fwd"] == 2 * attention_layers > 0
    # every MLP module: the dense layers' and the MoE layers' shared experts
    assert calls.get("silu_mul_fwd", 0) == sum(isinstance(m, MLP) for m in model.modules()) > 0
    assert calls["chunk_gdn"] == calls["causal_conv1d_fwd"] == calls["gated_rms_norm_fwd"] > 0
