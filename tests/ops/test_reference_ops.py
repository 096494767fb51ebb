"""The plain-PyTorch references against each other, against transformers, and in float64."""
from __future__ import annotations

import inspect

import pytest
import torch

from hybridlm.ops import (
    attention,
    attention_mask,
    attention_reference,
    causal_conv1d,
    chunk_gated_delta_rule,
    gated_rms_norm,
    gdn_gates,
    recurrent_gated_delta_rule,
    rms_norm,
    rope_inv_freq,
)


def gdn_inputs(batch, length, key_heads=2, value_heads=4, dk=16, dv=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, key_heads, dk, generator=g, dtype=dtype)
    k = torch.randn(batch, length, key_heads, dk, generator=g, dtype=dtype)
    v = torch.randn(batch, length, value_heads, dv, generator=g, dtype=dtype)
    decay = -torch.rand(batch, length, value_heads, generator=g, dtype=dtype) * 0.5
    beta = torch.rand(batch, length, value_heads, generator=g, dtype=dtype)
    state = torch.randn(batch, value_heads, dk, dv, generator=g, dtype=dtype)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_step_in_float64(length, with_state):
    q, k, v, g, beta, state = gdn_inputs(2, length)
    state = state if with_state else None
    o_step, s_step = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
    o_chunk, s_chunk = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert o_chunk.dtype == torch.float64 and s_chunk.dtype == torch.float64
    torch.testing.assert_close(o_chunk, o_step, atol=1e-10, rtol=0)
    torch.testing.assert_close(s_chunk, s_step, atol=1e-10, rtol=0)


def test_state_carries_across_calls():
    q, k, v, g, beta, _ = gdn_inputs(1, 150)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    first, s_first = chunk_gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70],
                                            output_final_state=True)
    second, s_second = chunk_gated_delta_rule(q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:],
                                              initial_state=s_first, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-10, rtol=0)
    torch.testing.assert_close(s_second, s_whole, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rule", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
@pytest.mark.parametrize("bounds", [[0, 5, 69, 100], [0, 5, 5, 69, 100, 100]], ids=["packed", "with-empty"])
def test_packed_sequences_do_not_leak_state(rule, bounds):
    """Each packed sequence as if alone; an empty one (a fixed-size table's unused row) keeps its state."""
    q, k, v, g, beta, _ = gdn_inputs(1, bounds[-1])
    states = torch.randn(len(bounds) - 1, 4, 16, 8, dtype=torch.float64)
    cu_seqlens = torch.tensor(bounds)
    packed, packed_states = rule(q, k, v, g, beta, initial_state=states, output_final_state=True,
                                 cu_seqlens=cu_seqlens)
    for i in range(len(bounds) - 1):
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        if s == e:
            torch.testing.assert_close(packed_states[i], states[i], atol=0, rtol=0)
            continue
        alone, alone_state = rule(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                  initial_state=states[i : i + 1], output_final_state=True)
        torch.testing.assert_close(packed[:, s:e], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(packed_states[i : i + 1], alone_state, atol=1e-12, rtol=0)


def test_delta_rule_matches_transformers():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    q, k, v, g, beta, state = gdn_inputs(2, 130, dtype=torch.float32)
    ours, our_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
    # transformers swaps in fla's Triton kernel when fla is importable: compare with its plain-torch function.
    # Its layer repeats q and k over the value heads first (older releases' function takes no grouped heads).
    torch_chunk = inspect.unwrap(hf.torch_chunk_gated_delta_rule)
    group = v.shape[2] // q.shape[2]
    theirs, their_state = torch_chunk(q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2), v, g,
                                      beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-5)


def test_delta_rule_rejects_bad_shapes():
    q, k, v, g, beta, state = gdn_inputs(1, 10)
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state[:, :2])
    with pytest.raises(ValueError, match="cu_seqlens must run from 0"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4]))


def test_gates_are_fp32_and_match_the_formula():
    a, b = torch.randn(2, 7, 4).bfloat16(), torch.randn(2, 7, 4).bfloat16()
    A_log, dt_bias = torch.randn(4), torch.randn(4)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32
    torch.testing.assert_close(g, -A_log.exp() * torch.nn.functional.softplus(a.float() + dt_bias))
    torch.testing.assert_close(beta, torch.sigmoid(b.float()))


@pytest.mark.parametrize("length", [1, 2, 3, 9])
def test_conv_in_pieces_equals_whole(length):
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    whole, final = causal_conv1d(x, weight, output_final_state=True)
    first, state = causal_conv1d(x[:, :length], weight, output_final_state=True)
    rest, state2 = causal_conv1d(x[:, length:], weight, initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(state2, final, atol=0, rtol=0)
    torch.testing.assert_close(final, x[:, -3:].transpose(1, 2), atol=0, rtol=0)


def test_conv_packed_and_against_transformers():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    x, weight = torch.randn(1, 20, 6), torch.randn(6, 4)
    ours, _ = causal_conv1d(x, weight)
    theirs = hf.causal_conv1d_fn(x.transpose(1, 2), weight, activation="silu").transpose(1, 2)
    torch.testing.assert_close(ours, theirs)
    packed, states = causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 7, 20]), output_final_state=True)
    torch.testing.assert_close(packed[:, 7:], causal_conv1d(x[:, 7:], weight)[0])
    assert states.shape == (2, 6, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_packed_with_states_equals_each_sequence_alone(dtype):
    """Ragged lengths, some shorter than the window, each sequence with its own carried state."""
    lengths = [1, 2, 7, 5, 1]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x, weight = torch.randn(1, sum(lengths), 6).to(dtype), torch.randn(6, 4).to(dtype)
    states = torch.randn(len(lengths), 6, 3).to(dtype)
    packed, finals = causal_conv1d(x, weight, initial_state=states, output_final_state=True, cu_seqlens=cu_seqlens)
    for i in range(len(lengths)):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        alone, final = causal_conv1d(x[:, start:end], weight, initial_state=states[i : i + 1], output_final_state=True)
        torch.testing.assert_close(packed[:, start:end], alone)  # same sums; the conv may order them differently
        assert torch.equal(finals[i : i + 1], final)  # the carried inputs are copies


def test_norms_match_transformers_bitwise_in_bf16():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    x, gate = torch.randn(5, 32).bfloat16(), torch.randn(5, 32).bfloat16()
    norm = hf.Qwen3NextRMSNorm(32).bfloat16()
    gated = hf.Qwen3NextRMSNormGated(32).bfloat16()
    with torch.no_grad():
        norm.weight.normal_()
        gated.weight.normal_()
        assert torch.equal(rms_norm(x, norm.weight, 1e-6), norm(x))
        assert torch.equal(gated_rms_norm(x, gate, gated.weight, 1e-6), gated(x, gate))


@pytest.mark.parametrize(
    "rope_type, params",
    [("default", {}), ("linear", {"factor": 4.0}),
     ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
     ("yarn", {"factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "attention_factor": 1.3})],
)
def test_rope_frequencies_match_transformers(rope_type, params):
    from transformers import Qwen3NextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": rope_type, "rope_theta": 1e7, "partial_rotary_factor": 0.25, **params}
    config = Qwen3NextConfig(head_dim=256, max_position_embeddings=32768, rope_parameters=rope)
    ours, our_scale = rope_inv_freq(64, 1e7, rope_type, params)
    if rope_type == "default":
        theirs = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
        their_scale = 1.0
    else:
        theirs, their_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    torch.testing.assert_close(ours, theirs)
    assert our_scale == pytest.approx(their_scale)


def test_sdpa_attention_equals_reference_with_padding_and_cache():
    q = torch.randn(2, 4, 5, 16)
    k, v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    key_valid[1, :4] = False  # row 1 is left-padded by 4
    mask = attention_mask(torch.arange(7, 12), torch.arange(12), key_valid)
    torch.testing.assert_close(attention(q, k, v, mask, 0.25), attention_reference(q, k, v, mask, 0.25))
    # a query never sees the future or the padding
    assert not mask[0, 0, 0, 8:].any() and not mask[1, 0, :, :4].any()
