"""The context-parallel state pass (gdn_chunk.STATE_PASS_CP, gdn_cp) against the plain pass and float64
(CPU: the Triton interpreter, segments of 2 chunks)."""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from hybridlm.ops.triton import gdn_chunk, gdn_cp  # noqa: E402
from tests.ops.test_triton_gdn_chunk import (  # noqa: E402,F401 (poisoned: a fixture)
    DEVICE, check_outputs, make_inputs, poisoned, rel_err, skip_where_triton_faults)

CASES = {  # (batch, length, key heads, value heads, dk, dv, dtype, cu_seqlens)
    "fp32-batch": (2, 300, 1, 2, 16, 16, torch.float32, None),
    "fp32-packed": (1, 460, 2, 4, 16, 32, torch.float32, [0, 5, 300, 330, 460]),
    "bf16-batch-odd-dims": (1, 330, 1, 4, 24, 40, torch.bfloat16, None),
}


def run(case, with_state, monkeypatch, cp, fold=False, log_decay=None, strong_decay=False, fused=False,
        row_norms=False):
    batch, length, key_heads, value_heads, dk, dv, dtype, offsets = CASES[case]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, dk, dv, dtype,
                                 batch if offsets is None else len(offsets) - 1)
    if strong_decay:  # exp(A_log) = 3: g ~ -2 a token, so one chunk decays by far more than e^-10
        inputs[5] = torch.full_like(inputs[5], 3.0).log()
    monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", cp)
    monkeypatch.setattr(gdn_chunk, "CP_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)  # cut these short sequences too
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    monkeypatch.setattr(gdn_chunk, "FOLD_WU_INTO_H", fold)
    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", fused)
    monkeypatch.setattr(gdn_chunk, "ROW_NORMS_IN_PASS", row_norms)
    if log_decay is not None:
        monkeypatch.setattr(gdn_cp, "CP_LOG_DECAY", log_decay)
    calls, segmented = [], gdn_chunk._segmented_state_pass
    monkeypatch.setattr(gdn_chunk, "_segmented_state_pass", lambda *a, **kw: calls.append(1) or segmented(*a, **kw))
    out = gdn_chunk._chunk_gdn_fwd(*inputs, scale=None, initial_state=state if with_state else None,
                                   output_final_state=True, cu_seqlens=cu_seqlens)
    assert calls == ([1] if cp else [])  # the segments really ran
    return out, inputs, (state if with_state else None), cu_seqlens, dtype


# every case with an initial state; without one only the smallest (the suite's time: the larger two took ~30 s each)
@pytest.mark.parametrize("case, with_state", [(case, True) for case in sorted(CASES)] + [("fp32-batch", False)])
def test_segments_chained_exactly_match_the_plain_pass(poisoned, monkeypatch, case, with_state):
    """Every segment a fallback (log decay bound -inf): the transitions chain the segments exactly, so h, v_new, o
    and the final state are the plain pass's up to rounding (and pass the float64 check)."""
    plain, *_ = run(case, with_state, monkeypatch, cp=False)
    cut, inputs, state, cu_seqlens, dtype = run(case, with_state, monkeypatch, cp=True, log_decay=-math.inf)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name in ("h", "v_new", "o", "final_state"):
        assert rel_err(cut[name], plain[name].double()) <= tolerance, name
    check_outputs(cut, *inputs, state, dtype, cu_seqlens=cu_seqlens)


def test_segments_with_the_fold(poisoned, monkeypatch):
    """FOLD_WU_INTO_H (no w, u) through the pre-pass, the transitions and the main pass."""
    plain, *_ = run("bf16-batch-odd-dims", True, monkeypatch, cp=False, fold=True)
    cut, inputs, state, cu_seqlens, dtype = run("bf16-batch-odd-dims", True, monkeypatch, cp=True, fold=True,
                                                log_decay=-math.inf)
    for name in ("h", "v_new", "o", "final_state"):
        assert rel_err(cut[name], plain[name].double()) <= 1e-2, name
    check_outputs(cut, *inputs, state, dtype, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("case, fold, row_norms", [("fp32-packed", False, False), ("bf16-batch-odd-dims", True, False),
                                                   ("bf16-batch-odd-dims", True, True)])
def test_segments_with_the_output_fused(poisoned, monkeypatch, case, fold, row_norms):
    """FUSED_OUTPUT in the main pass over the segments (the pre-pass and the transitions store nothing either
    way): the plain pass's o and final state, no h or v_new; also with ROW_NORMS_IN_PASS (raw keys and their norms
    through the pre-pass, the transitions and the main pass)."""
    skip_where_triton_faults(*CASES[case][4:6])  # (bf16 24/40 fused faulted on an H200, Triton 3.6)
    plain, *_ = run(case, True, monkeypatch, cp=False, fold=fold)
    cut, inputs, state, cu_seqlens, dtype = run(case, True, monkeypatch, cp=True, fold=fold, log_decay=-math.inf,
                                                fused=True, row_norms=row_norms)
    assert cut["h"] is None and cut["v_new"] is None
    for name in ("o", "final_state"):
        assert rel_err(cut[name], plain[name].double()) <= (1e-5 if dtype == torch.float32 else 1e-2), name
    check_outputs(cut, *inputs, state, dtype, cu_seqlens=cu_seqlens)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the o kernel's padded rows
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_fast_decay_takes_the_warmup(poisoned, monkeypatch):
    """With gates that decay by far more than e^-10 in a chunk the pre-pass starts one chunk before each boundary
    and no segment needs its transition; the result still matches the plain pass and float64."""
    plan = gdn_cp.plan_segments((0, 300, 600), 2, 64, torch.device(DEVICE))
    plain, *_ = run("fp32-batch", True, monkeypatch, cp=False, strong_decay=True)
    cut, inputs, state, cu_seqlens, dtype = run("fp32-batch", True, monkeypatch, cp=True, strong_decay=True)
    first, fallback = gdn_cp.warmup_chunks(plain["g_cumsum"], plan)
    assert fallback.sum() == 0 and (first[plan.inner] == 1).all()  # one warmup chunk of two
    for name in ("h", "v_new", "o", "final_state"):
        assert rel_err(cut[name], plain[name].double()) <= 1e-5, name
    check_outputs(cut, *inputs, state, dtype, cu_seqlens=cu_seqlens)


def test_segment_plan_tables():
    """Chunk-aligned segments of 2 chunks inside each sequence; the inner ones (with a successor) and the last
    row of each of their chunks."""
    plan = gdn_cp.plan_segments((0, 5, 300, 330), 2, 64, torch.device("cpu"))
    # sequence 0: 5 tokens, 1 chunk; sequence 1: 295 tokens, 5 chunks -> segments of 2, 2, 1; sequence 2: 1 chunk
    assert plan.cu_seqlens.tolist() == [0, 5, 133, 261, 300, 330]
    assert plan.chunk_offsets.tolist() == [0, 1, 3, 5, 6, 7]
    assert plan.first_segment.tolist() == [0, 1, 4, 5]
    assert plan.last_segment.tolist() == [0, 3, 4]
    assert plan.inner.tolist() == [1, 2]
    assert plan.inner_last_rows.tolist() == [[68, 132], [196, 260]]
    assert plan.final_slot.tolist() == [0, -1, -1, 1, 2]  # each sequence's last segment leaves its final state
    with pytest.raises(ValueError, match="zero tokens"):
        gdn_cp.plan_segments((0, 0, 10), 2, 64, torch.device("cpu"))


@pytest.mark.parametrize("segment_chunks", [2, 4])
@pytest.mark.parametrize("log_decay", [-10.0, -math.inf])
def test_warmup_kernel_matches_the_reference(segment_chunks, log_decay):
    """gdn_cp_warmup_kernel (one launch) gives warmup_chunks' first chunks and fallbacks, and the transition pass's
    first chunk (0 where a fallback, past the end elsewhere), for heads whose chunks decay from e^-0.3 to e^-30."""
    bounds = (0, 5, 1000, 1300, 1900)
    heads = 3
    plan = gdn_cp.plan_segments(bounds, segment_chunks, 64, torch.device(DEVICE))
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.3, 4.0, 30.0])  # a chunk's last row holds its total: -0.15 to -0.3, -2 to -4, -15 to -30
    g_cumsum = -((0.5 + 0.5 * torch.rand(bounds[-1], heads, generator=gen)) * scale).to(DEVICE)
    first, fallback = gdn_cp.warmup_chunks(g_cumsum, plan, log_decay)
    tables = gdn_cp.warmup_tables(g_cumsum, plan, log_decay)
    assert len(plan.inner) > 0
    assert torch.equal(tables[0].cpu(), first.cpu())
    assert torch.equal(tables[2].cpu(), fallback.to(torch.int32).cpu())
    assert torch.equal(tables[1].cpu(), torch.where(fallback.cpu() != 0, 0, segment_chunks + 1).to(torch.int32))
    if log_decay == -10.0:  # the slow head needs its transitions, the fast one starts one chunk before the end
        assert fallback[plan.inner, 0].all() and (first[plan.inner, 2] == segment_chunks - 1).all()


def test_segment_rule(monkeypatch):
    """Segments x value heads about one per SM (CP_SEGMENT_HEADS_PER_SM; segments a power of two of chunks, at least
    4), or ~3 sqrt(heads x chunks / SMs) chunks with it None; cut only few sequences of at least two segments (9B
    heads at B = 1 and 16k tokens on 132 SMs: 4 segments of 64 chunks; B = 4 stays whole)."""
    monkeypatch.setattr(gdn_cp, "CP_SEGMENT_HEADS_PER_SM", 1.0)
    assert gdn_cp.segment_chunks_for(32, 256, 132) == 64  # 9B heads, 16k: 4 x 32 = 128 segment-heads
    assert gdn_cp.segment_chunks_for(32, 1024, 132) == 256
    assert gdn_cp.segment_chunks_for(16, 256, 132) == 32  # 0.8B heads, 16k: 8 segments
    assert gdn_cp.segment_chunks_for(32, 512, 132) == 128  # 2 x 16k: two segments a sequence
    # 300 chunks: 75 a segment, 128 up to a power of two, 3 segments (96 segment-heads): the sqrt rule's 32
    assert gdn_cp.segment_chunks_for(32, 300, 132) == 32
    assert gdn_cp.segment_chunks_for(64, 256, 132) == 128  # 64 value heads: 2 segments, 128 segment-heads
    # 48 value heads: one wave would be 2.75 segments, 2 after the power of two (96 segment-heads, below 0.75 x 132):
    # the sqrt rule's 32 chunks
    assert gdn_cp.segment_chunks_for(48, 256, 132) == 32
    assert gdn_cp.segment_chunks_for(2, 8, 132) == 4  # tiny: the sqrt rule's least, 4
    assert gdn_cp.segment_chunks_for(256, 1024, 132) == 1024  # more heads than SMs: one segment (not cut)
    monkeypatch.setattr(gdn_cp, "CP_SEGMENT_HEADS_PER_SM", None)
    assert gdn_cp.segment_chunks_for(32, 256, 132) == 32
    assert gdn_cp.segment_chunks_for(32, 1024, 132) == 64
    assert gdn_cp.segment_chunks_for(2, 8, 132) == 4
    assert gdn_cp.worth_splitting((0, 16384), 32, 32, 64)
    assert not gdn_cp.worth_splitting(tuple(range(0, 5 * 4096, 4096)), 32, 32, 64)  # 4 x 4k at 32 heads
    assert not gdn_cp.worth_splitting((0, 2048), 32, 32, 64)  # one segment only
    # both head layouts are cut from 8k tokens (CP_MIN_CHUNKS); 4k stays whole (the host bounds it there)
    assert gdn_cp.worth_splitting((0, 8192), 32, 16, 64)
    assert gdn_cp.worth_splitting((0, 8192), 16, 16, 64)
    assert not gdn_cp.worth_splitting((0, 4096), 32, 8, 64)
    assert not gdn_cp.worth_splitting((0, 8192), 8, 16, 64)  # 128 chunks x 8 heads: below CP_MIN_HEAD_CHUNKS
    assert gdn_cp.worth_splitting((0, 8192), 8, 16, 64, min_head_chunks=0)
    # a few long sequences are cut up to CP_MAX_SEQUENCE_HEADS (2 x 16k at 32 heads), not 4 x 16k at 32 heads
    assert gdn_cp.worth_splitting((0, 16384, 32768), 32, 32, 64)
    assert not gdn_cp.worth_splitting(tuple(range(0, 5 * 16384, 16384)), 32, 32, 64)


def test_backward_recompute_through_segments(poisoned, monkeypatch):
    """Training with STATE_PASS_CP: the forward and the backward's recomputation of h and v_new both run
    segmented (keys normalised in the loop there); every gradient matches the plain path's and float64."""
    from tests.ops.test_triton_gdn_chunk_bwd import check as check_backward

    from hybridlm.ops.triton import chunk_gdn

    batch, length, key_heads, value_heads, d, dtype = 1, 330, 1, 2, 32, torch.bfloat16
    *inputs, state = make_inputs(batch, length, key_heads, value_heads, d, d, dtype, batch)
    monkeypatch.setattr(gdn_chunk, "CP_SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(gdn_cp, "CP_MIN_HEAD_CHUNKS", 0)  # cut these short sequences too
    monkeypatch.setattr(gdn_cp, "CP_MIN_CHUNKS", 0)
    monkeypatch.setattr(gdn_cp, "CP_LOG_DECAY", -math.inf)
    calls, segmented = [], gdn_chunk._segmented_state_pass

    def grads(cp):
        monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", cp)
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
        o, final = chunk_gdn(*leaves[:7], initial_state=leaves[7], output_final_state=True)
        (o.float().square().sum() + final.square().sum()).backward()
        return [leaf.grad for leaf in leaves]

    from hybridlm.ops.triton import gdn_chunk_bwd

    monkeypatch.setattr(gdn_chunk_bwd, "_segmented_state_pass",
                        lambda *a, **kw: calls.append("bwd") or segmented(*a, **kw))
    plain = grads(False)
    assert calls == []
    cut = grads(True)
    assert calls == ["bwd"]  # the backward's recomputation went through the segments
    for x, ref in zip(cut, plain):
        assert rel_err(x, ref.double()) <= 1e-2
    monkeypatch.setattr(gdn_chunk, "STATE_PASS_CP", True)
    check_backward(batch, length, key_heads, value_heads, d, d, dtype, with_state=True, with_dht=True)
