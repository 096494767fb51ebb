"""The fused state pass's options (gdn_chunk: the output made in the pass, row norms, the w/u kernel's chunks per
program, prefetched row factors) against the plain path and the float64 reference (CPU: the Triton interpreter)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from tests.ops.test_triton_gdn_chunk import (  # noqa: E402,F401 (poisoned: a fixture)
    DEVICE, check_outputs, make_inputs, poisoned, record_launches, rel_err, skip_where_triton_faults)

FUSED_CASES = {  # (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens, fold)
    "fp32": (2, 130, 2, 4, 32, 32, torch.float32, None, False),
    "bf16-two-v-blocks": (2, 100, 1, 2, 32, 128, torch.bfloat16, None, False),
    "bf16-fold": (2, 130, 2, 4, 32, 64, torch.bfloat16, None, True),
    "fp16-odd-dims": (1, 70, 1, 4, 24, 40, torch.float16, None, False),
    "bf16-one-token": (2, 1, 2, 4, 32, 32, torch.bfloat16, None, True),
    "bf16-packed": (1, 130, 2, 4, 16, 32, torch.bfloat16, [0, 5, 69, 130], False),
    # the engine's packed prefill graphs: sequences on chunk boundaries, empty ones between, folded
    "bf16-packed-empty-fold": (1, 192, 2, 4, 32, 64, torch.bfloat16, [0, 64, 64, 128, 128, 192], True),
}


def fused_case(case, with_state):
    """FUSED_CASES[case]'s inputs (the initial state only `with_state`), _chunk_gdn_fwd's keyword arguments, its
    dtype and head dims."""
    batch, length, key_heads, value_heads, dk, dv, dtype, offsets, _ = FUSED_CASES[case]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype,
                                 batch if offsets is None else len(offsets) - 1)
    state = state if with_state else None
    return inputs, dict(scale=0.25, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens), dtype, dk, dv


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the o kernel's padded rows
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("with_state", [False, True])
def test_output_fused_into_the_state_pass(poisoned, monkeypatch, case, with_state):
    """FUSED_OUTPUT (the output made inside the state pass; no h, v_new stored, no output launch) gives the output
    kernel's o and the same final state: the same operands meet in the same products (fp32 and 16-bit, with and
    without the fold, several V blocks, packed sequences, a ragged last chunk, one token), and passes float64."""
    from hybridlm.ops.triton import gdn_chunk

    inputs, args, dtype, dk, dv = fused_case(case, with_state)
    skip_where_triton_faults(dk, dv)  # (bf16-fold faulted on an H200, Triton 3.6; fp16-odd-dims passed)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", FUSED_CASES[case][-1])
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", False)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    launched = []
    for name in ("chunk_gdn_fwd_o_looped_kernel", "chunk_gdn_fwd_o_kernel"):
        monkeypatch.setattr(gdn_chunk, name, launched)  # launching it would raise (a list takes no grid)
    fused = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert fused["h"] is None and fused["v_new"] is None and plain["h"] is not None
    # 16-bit: o is rounded from fp32 sums made in another order, so a few elements land one unit of bf16 apart (one
    # token at bf16 with states: 1.01e-3 on an H100, 2026-12-05); within one bf16 unit (2^-8) as a whole
    for name in ("o", "final_state"):
        assert rel_err(fused[name], plain[name].double()) <= (1e-6 if dtype == torch.float32 else 2 ** -8), name
    check_outputs(fused, *inputs, args["initial_state"], dtype, cu_seqlens=args["cu_seqlens"], scale=args["scale"])


@pytest.mark.parametrize("case, with_state", [("bf16-fold", True), ("bf16-one-token", True), ("bf16-packed", False),
                                              ("fp16-odd-dims", False)])
def test_row_norms_in_the_fused_pass(poisoned, monkeypatch, case, with_state):
    """ROW_NORMS_IN_PASS: the w/u kernel stores the rows' inverse norms of q and k instead of normalised copies, and
    the folded, fused state pass takes the raw q, k and scales its products' rows by them: the output and final
    state of the normalised copies (up to their rounding to the input dtype) and float64's, for batches, packed
    sequences, one token, odd head dims."""
    from hybridlm.ops.triton import gdn_chunk

    inputs, args, dtype, dk, dv = fused_case(case, with_state)
    skip_where_triton_faults(dk, dv)
    if DEVICE == "cuda" and max(dk, dv) < 64 and gdn_chunk.hopper_miscompiles(torch.device(DEVICE)):
        pytest.skip("narrow heads keep w and u with the fused output on this GPU: no fold, so no row norms")
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    monkeypatch.setattr(gdn_chunk, "ROW_NORMS_IN_PASS", False)
    normed = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "ROW_NORMS_IN_PASS", True)
    launched = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_wu_kernel",
                    lambda kw: ("w/u", kw["STORE_RSTD"], kw["STORE_KN"], kw["STORE_QN"]), launched)
    state_pass = gdn_chunk.state_pass_kernel
    monkeypatch.setattr(gdn_chunk, "state_pass_kernel", lambda *a: type("Recorder", (), {"__getitem__": (
        lambda self, grid: lambda *args, **kw: launched.append(("pass", kw["ROW_NORMS"], kw["Q_NORMED"],
                                                                kw["PREFETCH_ROWS"]))
        or state_pass(*a)[grid](*args, **kw))})())
    rows = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert launched == [("w/u", True, False, False), ("pass", True, False, True)]  # (the prefetch follows them)
    for name in ("o", "final_state"):
        assert rel_err(rows[name], normed[name].double()) <= 2 ** -8, name
    check_outputs(rows, *inputs, args["initial_state"], dtype, cu_seqlens=args["cu_seqlens"], scale=args["scale"])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # rows past T (never stored)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("case, chunks, row_norms, launched_chunks", [
    ("bf16-fold", 2, True, 2), ("bf16-packed", 2, True, 2), ("bf16-one-token", 4, True, 4),
    ("fp16-odd-dims", 3, True, 3), ("bf16-fold", 3, False, 3), ("bf16-packed", 2, False, 2),
    ("bf16-fold", None, True, 2), ("bf16-fold", None, False, None)])
def test_wu_chunks_per_program_change_nothing(poisoned, monkeypatch, case, chunks, row_norms, launched_chunks):
    """WU_CHUNKS: the w/u kernel making several chunks per program (where it makes no w, u) stores the same aqk, row
    norms or normalised copies, so the output and final state are the same bits; grids whose chunks do not divide
    evenly repeat the last chunk. By the rule (None) 2 where it makes row norms for grouped value heads, else 1."""
    from hybridlm.ops.triton import gdn_chunk

    inputs, args, dtype, dk, dv = fused_case(case, True)
    skip_where_triton_faults(dk, dv)
    if DEVICE == "cuda" and max(dk, dv) < 64 and gdn_chunk.hopper_miscompiles(torch.device(DEVICE)):
        pytest.skip("narrow heads keep w and u with the fused output on this GPU: no fold")
    for flag, value in (("FOLD_WU_INTO_H", True), ("FUSED_OUTPUT", True), ("ROW_NORMS_IN_PASS", row_norms)):
        monkeypatch.setattr(gdn_chunk, flag, value)
    monkeypatch.setattr(gdn_chunk, "WU_CHUNKS", 1)
    one = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "WU_CHUNKS", chunks)
    launched = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_wu_kernel", lambda kw: kw.get("CHUNKS"), launched)
    several = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert launched == [launched_chunks]
    for name in ("o", "final_state", "aqk"):  # (aqk's upper blocks are never written: the poison stays in both)
        torch.testing.assert_close(several[name], one[name], rtol=0, atol=0, equal_nan=True, msg=name)
    check_outputs(several, *inputs, args["initial_state"], dtype, cu_seqlens=args["cu_seqlens"], scale=args["scale"])


@pytest.mark.parametrize("cut", [False, True])
def test_prefetched_row_factors_change_nothing(poisoned, monkeypatch, cut):
    """STATE_PASS_PREFETCH_ROWS alone (each step loads the next chunk's G): the same output and final state, with
    and without the context-parallel cut (its pre-passes prefetch too)."""
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    skip_where_triton_faults(32, 64)
    *inputs, state = make_inputs(1, 330, 1, 4, 32, 64, torch.bfloat16, 1)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", True)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    monkeypatch.setattr(gdn_chunk, "ROW_NORMS_IN_PASS", False)
    monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", cut)
    monkeypatch.setattr(gdn_chunk, "CP_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    outs = []
    for prefetch in (False, True):
        monkeypatch.setattr(gdn_chunk, "STATE_PASS_PREFETCH_ROWS", prefetch)
        outs.append(gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=state, output_final_state=True,
                                             cu_seqlens=None))
    for name in ("o", "final_state"):
        if DEVICE == "cpu":  # the same operations in the same order
            assert torch.equal(outs[1][name], outs[0][name]), name
        else:
            assert rel_err(outs[1][name], outs[0][name].double()) <= 1e-3, name


@pytest.mark.parametrize("cut", [False, True])
def test_register_cap_of_the_fused_pass_changes_nothing(poisoned, monkeypatch, cut):
    """FUSED_OUTPUT_MAXNREG reaches the fused pass's launches (the cut's main pass included; the pre-passes keep the
    compiler's pick) as Triton's maxnreg and leaves o and the final state bit for bit as they were."""
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    skip_where_triton_faults(32, 64)
    *inputs, state = make_inputs(1, 330, 1, 4, 32, 64, torch.bfloat16, 1)  # (the cut takes one sequence)
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=None)
    for flag, value in (("FOLD_WU_INTO_H", True), ("FUSED_OUTPUT", True), ("STATE_PASS_CP", cut),
                        ("CP_SEGMENT_CHUNKS", 2)):
        monkeypatch.setattr(gdn_chunk, flag, value)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    plain = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT_MAXNREG", 168)
    launches = []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_fwd_h_kernel",
                    lambda kwargs: (kwargs.get("FUSED_O", False), kwargs.get("maxnreg")), launches)
    capped = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert (True, 168) in launches and all(cap == (168 if fused else None) for fused, cap in launches), launches
    assert len(launches) == (3 if cut else 1), launches
    for name in ("o", "final_state"):
        assert torch.equal(capped[name], plain[name]), name


@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kv", [False, True])
def test_prefetched_tiles_change_nothing(poisoned, monkeypatch, cut, fused, kv):
    """STATE_PASS_PREFETCH_TILES (the next chunk's X, beta and fused q k^T loaded during each step, under the block
    triangle), alone or with STATE_PASS_PREFETCH_KV (k and v too, the fused output made after the update): the same
    output and final state, cut into segments (pre-passes included) or not, fused or not; a ragged last chunk, and
    the step past the last chunk loading nothing."""
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    skip_where_triton_faults(32, 64)
    *inputs, state = make_inputs(1, 330, 1, 4, 32, 64, torch.bfloat16, 1)
    for flag, value in (("FOLD_WU_INTO_H", True), ("FUSED_OUTPUT", fused), ("STATE_PASS_CP", cut),
                        ("CP_SEGMENT_CHUNKS", 2)):
        monkeypatch.setattr(gdn_chunk, flag, value)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    outs, launches = [], []
    record_launches(monkeypatch, gdn_chunk, "chunk_gdn_fwd_h_kernel",
                    lambda kwargs: kwargs.get("PREFETCH_TILES") and kwargs.get("PREFETCH_KV") == kv, launches)
    for prefetch in (False, True):
        monkeypatch.setattr(gdn_chunk, "STATE_PASS_PREFETCH_TILES", prefetch)
        monkeypatch.setattr(gdn_chunk, "STATE_PASS_PREFETCH_KV", prefetch and kv)
        outs.append(gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=state, output_final_state=True,
                                             cu_seqlens=None))
    assert launches == [False] * (len(launches) // 2) + [True] * (len(launches) // 2), launches
    assert len(launches) == (6 if cut else 2), launches
    for name in ("o", "final_state"):
        if DEVICE == "cpu":  # the same operations in the same order
            assert torch.equal(outs[1][name], outs[0][name]), name
        else:
            assert rel_err(outs[1][name], outs[0][name].double()) <= 1e-3, name
    check_outputs(outs[1], *inputs, state, torch.bfloat16, scale=None)


@pytest.mark.skipif(DEVICE == "cpu", reason="Gluon kernels need a CUDA GPU (the interpreter does not run them)")
@pytest.mark.parametrize("bv", [32, 64])
@pytest.mark.parametrize("case", ["cut", "cut-ragged", "rows", "packed"])
def test_gluon_state_pass_matches_the_triton_pass(poisoned, monkeypatch, bv, case):
    """STATE_PASS_GLUON (the fused, folded state pass in Gluon, its copies placed by hand): the Triton pass's o and
    final state within one bf16 unit, and float64's: the cut's main pass over several segments (row norms, a ragged
    last chunk), uncut rows and packed sequences (q and k normalised beforehand); grouped value heads, initial
    states."""
    from hybridlm.ops.triton import gdn_chunk, gdn_cp

    batch, length, offsets = {"cut": (1, 1024, None), "cut-ragged": (1, 1000, None), "rows": (2, 700, None),
                              "packed": (1, 1000, [0, 300, 301, 1000])}[case]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    *inputs, state = make_inputs(batch, length, 2, 4, 128, 128, torch.bfloat16,
                                 batch if offsets is None else len(offsets) - 1)
    for flag, value in (("FOLD_WU_INTO_H", True), ("FUSED_OUTPUT", True), ("STATE_PASS_CP", case.startswith("cut")),
                        ("CP_SEGMENT_CHUNKS", 4), ("STATE_PASS_GLUON_BV", bv)):
        monkeypatch.setattr(gdn_chunk, flag, value)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    args = dict(scale=None, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    triton_pass = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    monkeypatch.setattr(gdn_chunk, "STATE_PASS_GLUON", True)
    applies = []
    real = gdn_chunk._gluon_pass_applies
    monkeypatch.setattr(gdn_chunk, "_gluon_pass_applies", lambda *a: applies.append(real(*a)) or applies[-1])
    gluon_pass = gdn_chunk._chunk_gdn_fwd(*inputs, **args)
    assert applies == [True], applies
    for name in ("o", "final_state"):
        assert rel_err(gluon_pass[name], triton_pass[name].double()) <= 2 ** -8, name
    check_outputs(gluon_pass, *inputs, state, torch.bfloat16, cu_seqlens=cu_seqlens, scale=None)
