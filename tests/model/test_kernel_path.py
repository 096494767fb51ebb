"""The model's forward with every Triton kernel forced on (the interpreter runs them on the CPU) against the
plain-PyTorch path: the fused norms (residual add included), q/k norm + RoPE, the output gate, the conv, the
chunked GDN."""
from __future__ import annotations

import os

import pytest
import torch

import hybridlm
from hybridlm.model.layers import MLP
from hybridlm.ops import dispatch
from tests.checkpoints import VOCAB

pytest.importorskip("triton", reason="triton is not installed")
# the model stays on the CPU and the kernels run in Triton's interpreter (which CI sets); on a GPU machine without it
# Triton cannot read CPU tensors, and tests/cuda runs the model there
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available(),
                                reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")


@pytest.fixture
def kernels_forced(monkeypatch):
    """dispatch takes the Triton kernels for CPU tensors too (inference only: their backwards are not all here)."""
    from hybridlm.ops import triton as kernel_module

    def forced(*tensors, differentiable=False):
        return differentiable or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    monkeypatch.setattr(dispatch, "use_kernels", forced)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    calls = {}
    for name in ("rms_norm_fwd", "qk_rms_norm_rope_fwd", "gated_rms_norm_fwd", "causal_conv1d_fwd", "chunk_gdn",
                 "silu_mul_fwd", "sigmoid_gate_fwd"):
        def spy(*args, _name=name, _fn=getattr(kernel_module, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernel_module, name, spy)
    return calls


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next"])
def test_forward_on_kernels_matches_reference(checkpoint, family, request):
    directory, _ = checkpoint(family)
    model = hybridlm.load(directory, device="cpu")  # the interpreter runs the kernels
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)
        calls = request.getfixturevalue("kernels_forced")
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    layers = model.config.num_hidden_layers
    # per layer: the input norm and the fused add + norm, and the final norm; q and k norm + RoPE in one launch per
    # attention layer
    assert calls["rms_norm_fwd"] == 2 * layers + 1
    attention_layers = model.config.layer_types.count("full_attention")
    assert calls["qk_rms_norm_rope_fwd"] == attention_layers > 0
    assert calls["sigmoid_gate_fwd"] == attention_layers
    # every MLP module: the dense layers' and the MoE layers' shared experts
    assert calls.get("silu_mul_fwd", 0) == sum(isinstance(m, MLP) for m in model.modules()) > 0
    assert calls["chunk_gdn"] == calls["causal_conv1d_fwd"] == calls["gated_rms_norm_fwd"] > 0


def test_fused_input_projections(checkpoint, tmp_path):
    """One GEMM for each block's input projections (GDN, attention, MLP): same logits, weights shared (not copied),
    gradients through the unfused path, a later .to() falls back safely, and the model still saves and reloads."""
    directory, _ = checkpoint("qwen3_5_text")
    model = hybridlm.load(directory, device="cpu")  # the interpreter runs the kernels
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)
    layers = [layer.linear_attn for layer in model.layers if layer.is_linear]
    attention = [layer.self_attn for layer in model.layers if not layer.is_linear]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert model.fuse_input_projections() == len(layers) + len(attention) + len(mlps) and layers and attention
    gdn, fused = layers[0], layers[0]._inputs.weight
    assert gdn.in_proj_b.weight.data_ptr() == fused.data_ptr() + fused.element_size() * (
        fused.shape[1] * (fused.shape[0] - gdn.in_proj_b.weight.shape[0]))
    assert mlps[0].up_proj.weight.data_ptr() == mlps[0]._inputs.weight.data_ptr() + (
        mlps[0].gate_proj.weight.numel() * fused.element_size())
    calls = []
    original = torch.nn.functional.linear
    with torch.no_grad():
        torch.nn.functional.linear = lambda x, w, *a: calls.append(w.shape) or original(x, w, *a)
        try:
            got = model(ids)
        finally:
            torch.nn.functional.linear = original
    fused_shapes = {layers[0]._inputs.weight.shape, attention[0]._inputs.weight.shape, mlps[0]._inputs.weight.shape}
    assert fused_shapes <= set(calls)
    assert mlps[0].gate_proj.weight.shape not in calls  # every MLP runs its one GEMM
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    loss = model(ids).float().logsumexp(-1).mean()  # training: the unfused projections get their gradients
    loss.backward()
    assert gdn.in_proj_a.weight.grad is not None and gdn.in_proj_a.weight.grad.abs().sum() > 0

    hybridlm.save(model, tmp_path / "saved")
    reloaded = hybridlm.load(tmp_path / "saved", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected, atol=1e-5, rtol=1e-5)
        model.to(torch.float64)  # splits the shared weights: the layer must notice and use its own projections
        torch.testing.assert_close(model(ids).float(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows, fused_norms, fused_silu", [((1, 1), True, True), ((2, 1), True, False),
                                                         ((1, 3), False, False), ((2, 8), False, False)])
def test_fused_decode_gemvs_match_the_unfused_model(checkpoint, request, rows, fused_norms, fused_silu):
    """At decode sizes with fused projections, each norm runs in its GEMV's prologue, SwiGLU in the down
    projection's and the attention's output gate in o_proj's (`norm_linear`, `silu_mul_linear`,
    `sigmoid_gate_linear`), the final norm in the LM head's, where `gemv_preferred` says they win (norms up to 2 rows
    at this model's K, SwiGLU at 1 row, the gate up to 2 rows at this K): same logits as the plain model either way."""
    directory, _ = checkpoint("qwen3_5_text")
    model = hybridlm.load(directory, device="cpu")
    ids = torch.randint(0, VOCAB, rows, generator=torch.Generator().manual_seed(sum(rows)))
    with torch.no_grad():
        expected = model(ids)
        model.fuse_input_projections()
        calls = request.getfixturevalue("kernels_forced")
        from hybridlm.ops import triton as kernel_module
        for name in ("rms_norm_linear_fwd", "silu_mul_linear_fwd", "sigmoid_gate_linear_fwd", "linear_fwd"):
            def spy(*args, _name=name, _fn=getattr(kernel_module, name), **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            request.getfixturevalue("monkeypatch").setattr(kernel_module, name, spy)
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    layers = model.config.num_hidden_layers
    # two norms per layer and the final one; the first layer's input norm has no residual to add
    assert calls.get("rms_norm_linear_fwd", 0) == (2 * layers + 1 if fused_norms else 0)
    assert calls.get("rms_norm_fwd", 0) == (0 if fused_norms else 2 * layers + 1)
    assert calls.get("silu_mul_linear_fwd", 0) == (layers if fused_silu else 0)
    assert calls.get("silu_mul_fwd", 0) == (0 if fused_silu else layers)
    attention_layers = model.config.layer_types.count("full_attention")
    assert calls.get("sigmoid_gate_linear_fwd", 0) == (attention_layers if fused_norms else 0)  # up to 2 rows here
    assert calls.get("sigmoid_gate_fwd", 0) == (0 if fused_norms else attention_layers)
    assert calls.get("linear_fwd", 0) == (layers - attention_layers if fused_norms else 0)  # out_proj, up to 2 rows


def test_forward_through_context_parallel_segments(checkpoint, monkeypatch):
    """gdn_chunk.STATE_PASS_CP in the model (segments of 2 chunks: one 260-token row is cut in three): the same
    logits as the plain-PyTorch path, and the segmented pass really ran in every GDN layer."""
    from hybridlm.ops import triton as kernel_module
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    directory, _ = checkpoint("qwen3_5_text")
    model = hybridlm.load(directory, device="cpu")
    ids = torch.randint(0, VOCAB, (1, 260), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)  # plain PyTorch on the CPU
    monkeypatch.setattr(dispatch, "use_kernels", lambda *tensors, **kwargs: True)
    monkeypatch.setattr(dispatch, "kernels", lambda: kernel_module)
    monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", True)
    monkeypatch.setattr(gdn_chunk, "CP_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)  # cut this short sequence too
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    calls, segmented = [], gdn_chunk._segmented_state_pass
    monkeypatch.setattr(gdn_chunk, "_segmented_state_pass", lambda *a, **kw: calls.append(1) or segmented(*a, **kw))
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert len(calls) == model.config.layer_types.count("linear_attention") > 0
