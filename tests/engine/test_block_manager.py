"""Cache bookkeeping and scheduling, over ids only (no model)."""
from __future__ import annotations

import pytest

from hybridlm.engine.block_manager import BlockManager, OutOfBlocks, block_hashes, extend_block_hashes
from hybridlm.engine.params import SamplingParams
from hybridlm.engine.scheduler import Scheduler
from hybridlm.engine.sequence import Sequence, Status


def test_block_hashes_chain_over_the_prefix():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(40)), 16, limit=32)
    assert len(a) == 2 and a == b
    c = block_hashes([99] + list(range(1, 40)), 16)
    assert c[0] != a[0] and c[1] != a[1]  # a change early changes every later hash
    grown = extend_block_hashes(block_hashes(list(range(20)), 16), list(range(40)), 16, 40)
    assert grown == a  # extending a prefix's hashes equals hashing the whole


def match(blocks, tokens):
    return blocks.match_prefix(block_hashes(tokens, blocks.block_size, len(tokens) - 1), len(tokens))


def test_blocks_are_shared_by_content_and_evicted_lru():
    blocks = BlockManager(num_blocks=4, block_size=4, num_state_slots=2, num_snapshot_slots=2)
    tokens = list(range(12))
    table: list[int] = []
    blocks.grow(table, 12)
    assert len(table) == 3 and blocks.num_free_blocks == 1
    blocks.register_full_blocks(block_hashes(tokens, 4), table)
    slot = blocks.save_snapshot(block_hashes(tokens, 4)[1])
    blocks.release_blocks(table)
    assert blocks.num_free_blocks == 4
    matched, shared, snapshot = match(blocks, tokens + [50])
    assert matched == 8 and shared == table[:2] and snapshot == slot
    blocks.release_blocks(shared)
    with pytest.raises(OutOfBlocks):
        blocks.grow([], 20)  # all or nothing
    other: list[int] = []
    blocks.grow(other, 16)  # takes every block, evicting the cached ones
    assert blocks.cached_blocks == {}
    assert match(blocks, tokens + [50]) == (0, [], None)


def test_match_leaves_a_token_to_compute():
    blocks = BlockManager(num_blocks=4, block_size=4, num_state_slots=1, num_snapshot_slots=2)
    tokens = list(range(8))
    table: list[int] = []
    blocks.grow(table, 8)
    blocks.register_full_blocks(block_hashes(tokens, 4), table)
    for digest in block_hashes(tokens, 4):
        blocks.save_snapshot(digest)
    matched, _, _ = match(blocks, tokens)  # the whole prompt is cached: keep its last token to run
    assert matched == 4


def test_snapshots_are_bounded_and_lru():
    blocks = BlockManager(num_blocks=1, block_size=4, num_state_slots=1, num_snapshot_slots=2)
    first, second, third = (bytes([i]) * 16 for i in range(3))
    a, b = blocks.save_snapshot(first), blocks.save_snapshot(second)
    assert {a, b} == {0, 1}
    assert blocks.save_snapshot(first) is None  # already there: refreshed, not copied again
    c = blocks.save_snapshot(third)  # evicts `second`, the least recently used
    assert c == b and second not in blocks.snapshots and first in blocks.snapshots


def test_block_hashes_are_of_uint32_little_endian_token_ids():
    import hashlib

    tokens = [0, 1, 255, 256, 2**32 - 1, 151_643, 7, 9]
    expected = hashlib.blake2b(b"", digest_size=16)
    expected.update(b"".join(t.to_bytes(4, "little") for t in tokens[:4]))
    assert block_hashes(tokens, 4)[0] == expected.digest()
    with pytest.raises(OverflowError):
        block_hashes([-1, 0, 0, 0], 4)  # a placeholder (-1) is never hashed


def test_snapshot_slots_keyed_later():
    """A slot taken before its key is known (a step scheduled ahead) is indexed later, or given back if that
    prefix was saved meanwhile."""
    blocks = BlockManager(num_blocks=1, block_size=4, num_state_slots=1, num_snapshot_slots=2)
    first, second = bytes([1]) * 16, bytes([2]) * 16
    slot = blocks.take_snapshot_slot()
    assert blocks.key_snapshot(first, slot) and blocks.snapshots[first] == slot
    other = blocks.take_snapshot_slot()  # the last free one
    assert blocks.save_snapshot(second) == slot  # no slot free: `first` is evicted
    assert first not in blocks.snapshots
    assert not blocks.key_snapshot(second, other)  # saved meanwhile: the slot goes back
    assert blocks.free_snapshot_slots == [other] and blocks.snapshots == {second: slot}


def make(n, max_tokens=4):
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens))


def test_scheduler_budget_chunks_on_block_boundaries():
    scheduler = Scheduler(BlockManager(64, 16, 4, 4), max_num_seqs=4, max_num_batched_tokens=40)
    long, short = make(100), make(10)
    scheduler.add(long)
    scheduler.add(short)
    out = scheduler.schedule()
    # the long prompt's 40 tokens are cut back to a block boundary; the short one fills the budget
    assert [(c.sequence, c.start, c.length) for c in out.chunks] == [(long, 0, 32), (short, 0, 8)]
    assert not out.chunks[1].samples
    scheduler.commit(out)
    out = scheduler.schedule()
    assert [(c.start, c.length) for c in out.chunks] == [(32, 32), (8, 2)]
    assert out.chunks[1].samples


def test_prompt_is_cut_at_its_last_block_boundary():
    scheduler = Scheduler(BlockManager(64, 16, 4, 4), max_num_seqs=4, max_num_batched_tokens=256)
    sequence = make(40)
    scheduler.add(sequence)
    out = scheduler.schedule()
    assert (out.chunks[0].length, out.chunks[0].save_to is not None) == (32, True)
    scheduler.commit(out)
    out = scheduler.schedule()
    assert (out.chunks[0].start, out.chunks[0].length, out.chunks[0].samples) == (32, 8, True)


def test_preemption_frees_the_newest_running_sequence():
    scheduler = Scheduler(BlockManager(4, 4, 4, 0), max_num_seqs=4, max_num_batched_tokens=64)
    old, new = make(6), make(6)
    scheduler.add(old)
    scheduler.add(new)
    scheduler.commit(scheduler.schedule())  # both prompts up to their block boundary (4 tokens)
    scheduler.commit(scheduler.schedule())  # the last 2 prompt tokens: a second block each
    assert old.status is new.status is Status.RUNNING and scheduler.blocks.num_free_blocks == 0
    for s in (old, new):
        s.output_token_ids.append(7)
        s.output_token_ids.append(7)
        s.output_token_ids.append(7)  # 9 tokens: both need a third block
    out = scheduler.schedule()
    assert out.preempted == [new] and new.status is Status.WAITING and new.block_table == []
    assert [c.sequence for c in out.chunks] == [old]


def test_too_long_prompt_is_refused_at_once():
    scheduler = Scheduler(BlockManager(2, 4, 1, 0), max_num_seqs=1, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="needs 3 KV blocks but the whole cache has 2"):
        scheduler.add(make(8))


def test_aligned_prefill_costs_fit_the_budget():
    """With `prefill_align` (packed prefill graphs), each prefill chunk costs its length rounded up to 64: a full
    step's aligned prefill chunks fit the budget (the packed bucket), its tokens too, and every prompt finishes."""
    scheduler = Scheduler(BlockManager(256, 64, 8, 8), max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.prefill_align = 64
    sequences = [make(n, max_tokens=3) for n in (100, 30, 200, 10, 300, 70)]
    for s in sequences:
        scheduler.add(s)
    steps = 0
    while scheduler.has_work and steps < 100:
        out = scheduler.schedule()
        prefill = [c for c in out.chunks if not (c.length == 1 and c.start > 0 and c.samples)]
        decode = len(out.chunks) - len(prefill)
        assert sum(-(-c.length // 64) * 64 for c in prefill) <= 256, [(c.start, c.length) for c in out.chunks]
        assert sum(c.length for c in prefill) + decode <= 256
        scheduler.commit(out)
        for c in out.chunks:
            if c.samples:
                c.sequence.output_token_ids.append(7)
                if len(c.sequence.output_token_ids) == 3:
                    scheduler.finish(c.sequence, "length")
        steps += 1
    assert not scheduler.has_work and all(s.is_finished for s in sequences)
    # the first step: 100 cut at 64, 30 (aligned 64), 200 cut at 128: 256 aligned tokens
    first = Scheduler(BlockManager(256, 64, 8, 8), max_num_seqs=8, max_num_batched_tokens=256)
    first.prefill_align = 64
    for n in (100, 30, 200):
        first.add(make(n))
    assert [(c.start, c.length) for c in first.schedule().chunks] == [(0, 64), (0, 30), (0, 128)]
