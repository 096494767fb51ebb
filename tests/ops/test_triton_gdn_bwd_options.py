"""The chunked gated delta rule backward's kernel options and training's forward paths (key blocks, k k^T modes,
kept forward states, the fused output, the forward's aqk, TMA): each against float64 autograd through the reference or
against the default's gradients (CPU: the Triton interpreter). The default path's checks and the helpers they share are
in test_triton_gdn_chunk_bwd.py."""
from __future__ import annotations

import pytest
import torch

from tests.ops.test_triton_gdn_chunk import (  # noqa: F401 (poisoned: a fixture)
    DEVICE, make_inputs, poisoned, record_launches, rel_err, skip_where_triton_faults,
)
from tests.ops.test_triton_gdn_chunk_bwd import (
    NAMES, TOLERANCE, check_results, chunk_gdn, loss_of, output_grads,
)


@pytest.mark.parametrize("case", ["bf16-grouped", "bf16-packed"])
def test_training_never_folds(poisoned, monkeypatch, case):
    """gdn_chunk.FOLD_WU_INTO_H forced on, TRAIN_FORWARD_AS_INFERENCE off: inference folds, training does not (its
    forward stores w and u, its backward recomputes them); the gradients pass the float64 check."""
    from hybridlm.ops.triton import gdn_chunk

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = {
        "bf16-grouped": (2, 130, 1, 2, 32, 32, torch.bfloat16, None),
        "bf16-packed": (1, 130, 1, 2, 32, 32, torch.bfloat16, [0, 5, 69, 130]),
    }[case]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    num_states = batch if offsets is None else len(offsets) - 1
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "TRAIN_FORWARD_AS_INFERENCE", False)
    forwards = recorded_forwards(monkeypatch)
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, num_states)
    inference = gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=state, output_final_state=True,
                                         cu_seqlens=cu_seqlens)
    assert inference["w"] is None  # the fold is on
    do, dht = output_grads(inputs[2], num_states, dk, True, dtype)
    leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
    o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True, cu_seqlens=cu_seqlens)
    assert len(forwards) == 1 and forwards[0]["w"] is not None and forwards[0]["u"] is not None
    loss_of(o, final, do, dht).backward()
    check_results([*inputs, state], do, dht, cu_seqlens, o, final, [leaf.grad for leaf in leaves], dtype)


def blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets):
    """(cu_seqlens, inputs, state, do, dht) of a key-block test case."""
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    num_states = batch if offsets is None else len(offsets) - 1
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, num_states)
    do, dht = output_grads(inputs[2], num_states, dk, True, dtype)
    return cu_seqlens, inputs, state, do, dht


def cut_forward_into_segments(monkeypatch):
    """The forward's state pass runs in segments of two chunks (STATE_PASS_CP at any length)."""
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", True)
    monkeypatch.setattr(gdn_chunk, "CP_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)


def recorded_forwards(monkeypatch) -> list[dict]:
    """The intermediates of every forward that `chunk_gdn` runs from now on (`_chunk_gdn_fwd`'s results, in order)."""
    from hybridlm.ops.triton import gdn_chunk, gdn_chunk_bwd

    forwards, forward = [], gdn_chunk._chunk_gdn_fwd
    monkeypatch.setattr(gdn_chunk_bwd, "_chunk_gdn_fwd", lambda *a, **kw: forwards.append(forward(*a, **kw))
                        or forwards[-1])
    return forwards


def grads_with(monkeypatch, flag, value, case_inputs, check_dtype=None):
    """Every input's gradient through chunk_gdn with gdn_chunk_bwd.<flag> = value; with check_dtype (the inputs'),
    the outputs and gradients also pass the float64 check (`check_results`)."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    cu_seqlens, inputs, state, do, dht = case_inputs
    monkeypatch.setattr(gdn_chunk_bwd, flag, value)
    leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
    o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True, cu_seqlens=cu_seqlens)
    loss_of(o, final, do, dht).backward()
    grads = [leaf.grad for leaf in leaves]
    if check_dtype is not None:
        check_results([*inputs, state], do, dht, cu_seqlens, o, final, grads, check_dtype)
    return grads


def check_blocked_grads(split, again, whole, dtype):
    """A key-block option's gradients: the same bits when run again, the default path's up to rounding."""
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, x, y, ref in zip(NAMES, split, again, whole):
        assert torch.equal(x, y), name
        assert rel_err(x, ref.double()) <= tolerance, name


def launched_block(dk, block, narrowest=32):
    """The launchers' key block for BWD_*_BK = block: `narrowest` to dk's power of two."""
    return max(narrowest, min(1 << (dk - 1).bit_length(), block))


# (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens, BWD_WY_BK); value dims of 64 where dk is 96 or
# 128: with 32 the forward faulted on an H200 (Triton 3.6, `hopper_head_dims_fault`), whichever WY kernel ran
WY_BLOCKED_CASES = {
    "fp32-two-blocks": (1, 130, 1, 2, 64, 32, torch.float32, None, 32),
    "bf16-grouped-two-blocks": (2, 70, 1, 2, 64, 64, torch.bfloat16, None, 32),
    "fp16-partial-block": (1, 70, 1, 4, 96, 40, torch.float16, None, 64),
    "bf16-packed-two-blocks": (1, 130, 1, 2, 128, 64, torch.bfloat16, [0, 5, 69, 130], 64),
    "bf16-three-blocks-one-token": (2, 1, 1, 2, 96, 64, torch.bfloat16, None, 32),
    "bf16-one-block": (1, 70, 1, 2, 32, 32, torch.bfloat16, None, 64),  # the whole-row kernel runs
}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # as in test_bwd_strong_decay
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(WY_BLOCKED_CASES))
def test_bwd_wy_key_blocks(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_WY_BK: the WY kernel walking the key columns in blocks (two passes, dk stored and read back)
    gives the whole-row kernel's gradients up to rounding, the same bits when run again (on an H200, blocks at other
    warp/stage counts did not), and passes the float64 check; where one block would cover dk, the whole-row kernel
    runs (a single block gave wrong dk on the GPU, Triton 3.6)."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, block = WY_BLOCKED_CASES[case]
    skip_where_triton_faults(dk, dv)  # (bf16-three-blocks-one-token, 96/64, faulted on an H200, Triton 3.6)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_wy_kblocked_kernel", lambda kwargs: kwargs["BKW"],
                    launched)

    whole = grads_with(monkeypatch, "BWD_WY_BK", None, case_inputs)
    assert launched == []
    split = grads_with(monkeypatch, "BWD_WY_BK", block, case_inputs)
    width = launched_block(dk, block)
    expected = [] if width >= dk else [width]
    assert launched == expected
    again = grads_with(monkeypatch, "BWD_WY_BK", block, case_inputs, check_dtype=dtype)
    assert launched == expected * 2
    check_blocked_grads(split, again, whole, dtype)


@pytest.mark.parametrize("case", ["bf16-packed-two-blocks", "fp16-partial-block"])
def test_bwd_wy_kk_late(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_WY_KK_LATE: the key-blocked WY kernel summing k k^T in its second pass gives the first
    pass's gradients (the same products and sums, in the same order). (Only without BWD_WY_KK_FREE, which makes no
    k k^T.)"""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, block = WY_BLOCKED_CASES[case]
    skip_where_triton_faults(dk, dv)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_BK", block)
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_KK_FREE", False)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_wy_kblocked_kernel",
                    lambda kwargs: kwargs["KK_IN_PASS2"], launched)
    early = grads_with(monkeypatch, "BWD_WY_KK_LATE", False, case_inputs)
    late = grads_with(monkeypatch, "BWD_WY_KK_LATE", True, case_inputs)
    assert launched == [False, True]
    for name, x, y in zip(NAMES, late, early):
        assert rel_err(x, y.double()) <= 1e-3, name


@pytest.mark.parametrize("case", ["bf16-packed-two-blocks", "fp16-partial-block", "fp32-two-blocks"])
def test_bwd_wy_kk_free(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_WY_KK_FREE: beta's and G's shares through A taken from the E k and E^T (beta k) products
    instead of k k^T give the default's gradients up to rounding (E enters those products in the input dtype) and pass
    the float64 check."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, block = WY_BLOCKED_CASES[case]
    skip_where_triton_faults(dk, dv)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_BK", block)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_wy_kblocked_kernel", lambda kwargs: kwargs["KK_FREE"],
                    launched)
    default = grads_with(monkeypatch, "BWD_WY_KK_FREE", False, case_inputs)
    free = grads_with(monkeypatch, "BWD_WY_KK_FREE", True, case_inputs, check_dtype=dtype)
    assert launched == [False, True]
    for name, x, y in zip(NAMES, free, default):
        assert rel_err(x, y.double()) <= (1e-5 if dtype == torch.float32 else 1e-2), name
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_KK_FREE", True)


# (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens, BWD_WY_BK)
NORM_FUSED_CASES = {
    "bf16-whole-row-wy": (2, 70, 2, 2, 32, 32, torch.bfloat16, None, 64),
    # (1 head: at 2 heads and 64/64 the default path's da is 1.1e-2 from float64, just past bf16's bound, either way)
    "bf16-packed-key-blocks": (1, 130, 1, 1, 64, 64, torch.bfloat16, [0, 5, 69, 130], 32),
    "fp32-key-blocks": (1, 70, 1, 1, 64, 32, torch.float32, None, 32),
    "bf16-grouped": (1, 70, 1, 2, 32, 32, torch.bfloat16, None, 64),  # the norm kernel still runs
}


@pytest.mark.parametrize("case", sorted(NORM_FUSED_CASES))
def test_bwd_qk_norm_fused(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_QK_NORM_FUSED: where each key head has one value head, the norm kernel does not launch (the
    dq/dk and WY kernels take dq and dk through the L2 norms), the gradients are the default's up to rounding and
    pass the float64 check; with grouped value heads the norm kernel runs as before."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, block = NORM_FUSED_CASES[case]
    skip_where_triton_faults(dk, dv)  # (64/32 at first: the forward faulted on an H100, Triton 3.6, as the rule says)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_BK", block)
    default = grads_with(monkeypatch, "BWD_QK_NORM_FUSED", False, case_inputs)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_qk_norm_kernel", lambda kwargs: "norm", launched)
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_dqk_kernel", lambda kwargs: kwargs["NORM_Q"], launched)
    wy = "chunk_gdn_bwd_wy_kernel" if block >= dk else "chunk_gdn_bwd_wy_kblocked_kernel"
    record_launches(monkeypatch, gdn_chunk_bwd, wy, lambda kwargs: kwargs["NORM_K"], launched)
    fused = grads_with(monkeypatch, "BWD_QK_NORM_FUSED", True, case_inputs, check_dtype=dtype)
    assert launched == ([False, False, "norm"] if key_heads < value_heads else [True, True])
    for name, x, y in zip(NAMES, fused, default):
        assert rel_err(x, y.double()) <= (1e-5 if dtype == torch.float32 else 5e-3), name


# (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens, BWD_DQK_BK, BWD_WY_BK)
DQK_BLOCKED_CASES = {
    "fp32-two-blocks-whole-row-wy": (1, 130, 1, 2, 64, 32, torch.float32, None, 32, None),
    "bf16-grouped-two-blocks-blocked-wy": (2, 70, 1, 2, 64, 64, torch.bfloat16, None, 32, 32),
    "bf16-packed-partial-block": (1, 130, 1, 2, 96, 64, torch.bfloat16, [0, 5, 69, 130], 64, 64),
    "bf16-one-token": (2, 1, 1, 2, 128, 64, torch.bfloat16, None, 64, 64),
    "bf16-one-block": (1, 70, 1, 2, 32, 32, torch.bfloat16, None, 64, None),  # the whole-row kernel runs
}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # as in test_bwd_strong_decay
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(DQK_BLOCKED_CASES))
def test_bwd_dqk_key_blocks(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_DQK_BK: the dq/dk kernel over key blocks (`gdn_bwd_dqk`), which also makes dw for the WY
    kernel (either one) and leaves one share of dG per block, gives the whole-row path's gradients up to rounding,
    the same bits when run again, and passes the float64 check; where one block would cover dk the whole-row kernel
    runs and the WY kernel makes dw itself."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, block, wy_block = DQK_BLOCKED_CASES[case]
    skip_where_triton_faults(dk, dv)
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_BK", wy_block)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_bwd_dqkw_kblocked_kernel",
                    lambda kwargs: ("dqkw", kwargs["BKQ"]), launched)
    for name in ("chunk_gdn_bwd_wy_kernel", "chunk_gdn_bwd_wy_kblocked_kernel"):
        record_launches(monkeypatch, gdn_chunk_bwd, name, lambda kwargs: ("wy", kwargs["DW_GIVEN"], kwargs["NKD"]),
                        launched)

    whole = grads_with(monkeypatch, "BWD_DQK_BK", None, case_inputs)
    assert launched == [("wy", False, 1)]
    launched.clear()
    split = grads_with(monkeypatch, "BWD_DQK_BK", block, case_inputs)
    # (64 where Triton miscompiles on Hopper: blocks of 32 gave dk that changed between runs on an H200)
    width = launched_block(dk, block, gdn_chunk_bwd.dqk_narrowest_block(torch.device(DEVICE)))
    expected = [("wy", False, 1)] if width >= dk else [("dqkw", width), ("wy", True, -(-dk // width))]
    assert launched == expected
    again = grads_with(monkeypatch, "BWD_DQK_BK", block, case_inputs, check_dtype=dtype)
    check_blocked_grads(split, again, whole, dtype)


@pytest.mark.parametrize("case", ["bf16-packed", "fp32-grouped", "bf16-cut-forward"])
def test_bwd_reuses_forward_states(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_REUSE_FORWARD_STATES: the backward takes the forward's w, h and v_new (also when the forward
    cut the sequence into segments) and launches neither the w/u recompute nor a state pass; the gradients match the
    recomputing path's and float64."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = {
        "bf16-packed": (1, 200, 1, 2, 32, 32, torch.bfloat16, [0, 7, 70, 200]),
        "fp32-grouped": (2, 130, 1, 2, 16, 32, torch.float32, None),
        "bf16-cut-forward": (1, 330, 1, 2, 32, 32, torch.bfloat16, None),
    }[case]
    if case == "bf16-cut-forward":
        cut_forward_into_segments(monkeypatch)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    recomputed = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", False, case_inputs)
    launched = []
    record_launches(monkeypatch, gdn_chunk_bwd, "chunk_gdn_wu_kernel", lambda kwargs: "recompute", launched)
    state_pass_kernel = gdn_chunk_bwd.state_pass_kernel  # (the backward's state pass: whichever kernel it picks)
    monkeypatch.setattr(gdn_chunk_bwd, "state_pass_kernel",
                        lambda *args, **kwargs: launched.append("recompute") or state_pass_kernel(*args, **kwargs))
    monkeypatch.setattr(gdn_chunk_bwd, "_segmented_state_pass", lambda *args, **kwargs: launched.append("segments"))
    reused = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", True, case_inputs, check_dtype=dtype)
    assert launched == []
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, x, ref in zip(NAMES, reused, recomputed):
        assert rel_err(x, ref.double()) <= tolerance, name


@pytest.mark.parametrize("case", ["bf16-packed", "fp32-cut-forward"])
def test_training_with_the_output_fused(poisoned, monkeypatch, case):
    """gdn_chunk.FUSED_OUTPUT in training: the forward stores neither h nor v_new (the backward recomputes them from
    X), the gradients are the unfused forward's bit for bit (the same o, the same saved tensors); with the forward's
    states kept for the backward it does not fuse."""
    from hybridlm.ops.triton import gdn_chunk

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = {
        "bf16-packed": (1, 200, 1, 2, 32, 32, torch.bfloat16, [0, 7, 70, 200]),
        "fp32-cut-forward": (1, 330, 1, 2, 16, 32, torch.float32, None),
    }[case]
    if case == "fp32-cut-forward":
        cut_forward_into_segments(monkeypatch)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    forwards = recorded_forwards(monkeypatch)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)
    unfused = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", False, case_inputs)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    fused = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", False, case_inputs)
    kept = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", True, case_inputs)
    assert forwards[0]["h"] is not None and forwards[1]["h"] is None and forwards[2]["h"] is not None
    for name, x, y, z in zip(NAMES, fused, unfused, kept):
        assert torch.equal(x, y), name
        assert rel_err(z, y.double()) <= (1e-5 if dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize("case", ["bf16-packed", "bf16-cut-forward", "fp16-narrow-heads"])
def test_training_forward_as_inference(poisoned, monkeypatch, case):
    """gdn_chunk.TRAIN_FORWARD_AS_INFERENCE: training's forward folds and fuses as inference does (row norms too
    where it cuts), storing no h, v_new (nor w, u where it folds); the backward reads only the inputs, X and
    g_cumsum, so the gradients are the default path's bit for bit (and, where it cuts, pass the float64 check); kept
    states still keep w, h and v_new."""
    from hybridlm.ops.triton import gdn_chunk

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = {
        "bf16-packed": (1, 200, 1, 2, 32, 32, torch.bfloat16, [0, 7, 70, 200]),
        "bf16-cut-forward": (1, 330, 1, 2, 32, 32, torch.bfloat16, None),
        "fp16-narrow-heads": (2, 70, 1, 4, 24, 40, torch.float16, None),
    }[case]
    skip_where_triton_faults(dk, dv)  # (fp16 24/40 faults in the WY kernel on Hopper with Triton 3.6)
    if case == "bf16-cut-forward":
        cut_forward_into_segments(monkeypatch)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_MIN_PROGRAMS_PER_SM", 0)
    # (folded and fused at once, both dims below 64 faulted on Hopper: such GPUs fuse without folding there)
    folds = not (max(dk, dv) < 64 and gdn_chunk.hopper_miscompiles(torch.device(DEVICE)))
    monkeypatch.setattr(gdn_chunk, "TRAIN_FORWARD_AS_INFERENCE", False)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    forwards = recorded_forwards(monkeypatch)
    default = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", False, case_inputs)
    monkeypatch.setattr(gdn_chunk, "TRAIN_FORWARD_AS_INFERENCE", True)
    as_inference = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", False, case_inputs)
    # (where it cuts, the float64 check; the other cases' o is the default's up to rounding, checked below)
    kept = grads_with(monkeypatch, "BWD_REUSE_FORWARD_STATES", True, case_inputs,
                      check_dtype=dtype if case == "bf16-cut-forward" else None)
    assert forwards[0]["w"] is not None and forwards[0]["h"] is not None
    assert (forwards[1]["w"] is None) == folds and forwards[1]["h"] is None and forwards[1]["v_new"] is None
    assert forwards[2]["w"] is not None and forwards[2]["h"] is not None
    assert torch.equal(forwards[0]["x_inv"].nan_to_num(), forwards[1]["x_inv"].nan_to_num())  # (upper: unwritten)
    tolerance = TOLERANCE[dtype]
    assert rel_err(forwards[1]["o"], forwards[0]["o"].double()) <= tolerance
    for name, x, y, z in zip(NAMES, as_inference, default, kept):
        assert torch.equal(x, y), name
        assert rel_err(z, y.double()) <= tolerance, name


@pytest.mark.parametrize("case", ["bf16-packed", "bf16-cut-forward", "fp16-grouped", "bf16-unfused"])
def test_bwd_aqk_from_forward(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_AQK_FROM_FORWARD: where training's forward fused its output (and so made aqk), the dv_local
    and whole-row dq/dk kernels read aqk instead of remaking q k^T: the default's gradients up to rounding, and the
    float64 check; where the forward did not fuse, nothing changes."""
    from hybridlm.ops.triton import gdn_chunk, gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = {
        "bf16-packed": (1, 200, 1, 2, 64, 64, torch.bfloat16, [0, 7, 70, 200]),
        "bf16-cut-forward": (1, 330, 1, 2, 32, 32, torch.bfloat16, None),
        "fp16-grouped": (2, 70, 1, 4, 64, 64, torch.float16, None),
        "bf16-unfused": (1, 130, 1, 2, 64, 64, torch.bfloat16, None),
    }[case]
    skip_where_triton_faults(dk, dv)
    if case == "bf16-cut-forward":
        cut_forward_into_segments(monkeypatch)
    fused = case != "bf16-unfused"
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", None if fused else False)
    monkeypatch.setattr(gdn_chunk, "FUSED_MIN_PROGRAMS_PER_SM", 0)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    launched = []
    for name in ("chunk_gdn_bwd_dv_local_kernel", "chunk_gdn_bwd_dqk_kernel"):
        record_launches(monkeypatch, gdn_chunk_bwd, name, lambda kwargs: kwargs["A_GIVEN"], launched)
    default = grads_with(monkeypatch, "BWD_AQK_FROM_FORWARD", False, case_inputs)
    given = grads_with(monkeypatch, "BWD_AQK_FROM_FORWARD", True, case_inputs, check_dtype=dtype)
    assert launched == [False, False, fused, fused]
    for name, x, y in zip(NAMES, given, default):
        if fused:
            assert rel_err(x, y.double()) <= TOLERANCE[dtype], name
        else:
            assert torch.equal(x, y), name


def test_bwd_refuses_misshaped_forward_tensors():
    from hybridlm.ops.triton.gdn_chunk import _chunk_gdn_fwd
    from hybridlm.ops.triton.gdn_chunk_bwd import chunk_gdn_bwd

    *inputs, state = make_inputs(1, 70, 1, 2, 16, 16, torch.float32, 1)
    out = _chunk_gdn_fwd(*inputs, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                         store_x=True)
    do = torch.randn_like(out["o"])
    with pytest.raises(ValueError, match="forward_states must be w, h, v_new"):
        chunk_gdn_bwd(*inputs, out["g_cumsum"], out["x_inv"], do, forward_states=(out["w"], out["h"][:1], out["v_new"]))
    with pytest.raises(ValueError, match="aqk must be"):
        chunk_gdn_bwd(*inputs, out["g_cumsum"], out["x_inv"], do, aqk=out["x_inv"][:, :64])


def test_kept_states_under_activation_checkpointing(poisoned):
    """`forward_states_kept` (what `hybridlm train --gdn-keep-states` enters around each forward and backward):
    under non-reentrant activation checkpointing the rerun forward saves the same tensors, and the gradients are the
    plain run's; the flag is restored on exit."""
    from torch.utils.checkpoint import checkpoint

    from hybridlm.ops.triton import gdn_chunk_bwd

    *inputs, state = make_inputs(1, 130, 1, 2, 32, 32, torch.bfloat16, 1)
    do, dht = output_grads(inputs[2], 1, 32, True, torch.bfloat16)

    def layer(*leaves):
        return chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True)

    def grads(checkpointed):
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
        with gdn_chunk_bwd.forward_states_kept():
            assert gdn_chunk_bwd.BWD_REUSE_FORWARD_STATES
            o, final = checkpoint(layer, *leaves, use_reentrant=False) if checkpointed else layer(*leaves)
            loss_of(o, final, do, dht).backward()
        return [leaf.grad for leaf in leaves]

    for name, x, ref in zip(NAMES, grads(True), grads(False)):
        assert rel_err(x, ref.double()) <= 1e-3, name
    assert gdn_chunk_bwd.BWD_REUSE_FORWARD_STATES is False


@pytest.mark.parametrize("case", ["bf16-whole-row", "fp32-whole-row", "bf16-key-blocks", "bf16-packed-one-block"])
def test_bwd_wy_e_through_scratch(poisoned, monkeypatch, case):
    """gdn_chunk_bwd.BWD_WY_E_SCRATCH: E^T through a scratch buffer instead of tl.trans (the remedy held ready for
    Triton's Hopper miscompile) gives the same gradients, with either WY kernel."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, wy_block = {
        "bf16-whole-row": (2, 70, 1, 2, 32, 32, torch.bfloat16, None, None),
        "fp32-whole-row": (1, 130, 1, 2, 16, 32, torch.float32, None, None),
        "bf16-key-blocks": (1, 130, 1, 2, 128, 64, torch.bfloat16, None, 64),
        "bf16-packed-one-block": (1, 130, 1, 2, 64, 64, torch.bfloat16, [0, 5, 69, 130], 64),
    }[case]
    monkeypatch.setattr(gdn_chunk_bwd, "BWD_WY_BK", wy_block)
    case_inputs = blocked_case_inputs(batch, length, key_heads, value_heads, dk, dv, dtype, offsets)
    plain = grads_with(monkeypatch, "BWD_WY_E_SCRATCH", False, case_inputs)
    scratch = grads_with(monkeypatch, "BWD_WY_E_SCRATCH", True, case_inputs, check_dtype=dtype)
    for name, x, ref in zip(NAMES, scratch, plain):
        assert rel_err(x, ref.double()) <= 1e-6, name


@pytest.mark.parametrize("offsets", [None, [0, 5, 69, 130]])
def test_bwd_dh_pass_tma(poisoned, monkeypatch, offsets):
    """gdn_chunk_bwd.BWD_DH_TMA: the dH pass reads q, k, w, do and dv_local through tensor descriptors over the
    [B * T, ..] rows (a chunk ending inside a sequence reads the next one's rows there, which must not reach dH)
    and gives the pointer loads' gradients; the float64 check passes."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length = (2, 100) if offsets is None else (1, 130)
    case_inputs = blocked_case_inputs(batch, length, 2, 4, 64, 64, torch.bfloat16, offsets)
    plain = grads_with(monkeypatch, "BWD_DH_TMA", False, case_inputs)
    used, build = [], gdn_chunk_bwd.dh_pass_descriptors
    monkeypatch.setattr(gdn_chunk_bwd, "dh_pass_descriptors", lambda *a: used.append(build(*a)) or used[-1])
    tma = grads_with(monkeypatch, "BWD_DH_TMA", True, case_inputs, check_dtype=torch.bfloat16)
    assert used and used[0].get("TMA") is True
    for name, x, ref in zip(NAMES, tma, plain):
        assert rel_err(x, ref.double()) <= 1e-3, name


@pytest.mark.parametrize("case", ["bf16-packed-grouped", "fp32-batch", "bf16-key-blocks"])
def test_heads_fastest_grids(poisoned, monkeypatch, case):
    """gdn_chunk.KKT_HEADS_FASTEST and gdn_chunk_bwd.BWD_HEADS_FASTEST (0: always, None: never): the chunk-parallel
    kernels on grids (heads, chunks), the heads of each chunk side by side, give the same bits (each program does what it did, in another
    order)."""
    from hybridlm.ops.triton import gdn_chunk, gdn_chunk_bwd
    from hybridlm.ops.triton.utils import chunk_launch

    cases = {"bf16-packed-grouped": (1, 130, 2, 4, 32, 32, torch.bfloat16, [0, 5, 69, 130]),
             "fp32-batch": (2, 100, 1, 2, 32, 32, torch.float32, None),
             "bf16-key-blocks": (1, 70, 1, 2, 128, 64, torch.bfloat16, None)}  # (the key-blocked WY kernel)
    case_inputs = blocked_case_inputs(*cases[case])
    launched = []
    names = {"chunk_gdn_fwd_kkt_solve_kernel": gdn_chunk, "chunk_gdn_bwd_dv_local_kernel": gdn_chunk_bwd,
             "chunk_gdn_bwd_dqk_kernel": gdn_chunk_bwd, "chunk_gdn_bwd_wy_kernel": gdn_chunk_bwd,
             "chunk_gdn_bwd_wy_kblocked_kernel": gdn_chunk_bwd}
    for name, module in names.items():
        record_launches(monkeypatch, module, name, lambda kwargs, name=name: (name, "HEADS_FASTEST" in kwargs),
                        launched)
    monkeypatch.setattr(gdn_chunk, "KKT_HEADS_FASTEST", None)
    default = grads_with(monkeypatch, "BWD_HEADS_FASTEST", None, case_inputs)
    monkeypatch.setattr(gdn_chunk, "KKT_HEADS_FASTEST", 0)
    fastest = grads_with(monkeypatch, "BWD_HEADS_FASTEST", 0, case_inputs)
    ran = {name for name, _ in launched}  # (one of the two WY kernels)
    assert len(ran) == 4 and sorted(launched) == sorted((name, ordered) for ordered in (False, True) for name in ran)
    for name, x, y in zip(NAMES, fastest, default):
        assert torch.equal(x, y), name
    assert chunk_launch(65535, 32, 0) == ((32, 65535), {"HEADS_FASTEST": True})
    assert chunk_launch(65536, 32, 0) == ((65536, 32), {})  # (a grid's second dimension holds 65535)
    assert chunk_launch(255, 32, 256) == ((255, 32), {}) and chunk_launch(256, 32, 256)[0] == (32, 256)
    assert chunk_launch(1000, 32, None) == ((1000, 32), {})
