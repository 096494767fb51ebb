"""Continuous batching: which sequences run this step, with how many tokens. Plain Python over ids.

Every step has a token budget. Running sequences go first (a decoding sequence costs one token, a
prefilling one a chunk of its prompt), then waiting ones are admitted in arrival order while blocks,
state slots and budget last. When blocks run out the newest running sequence is preempted: its cache is
released and it waits to be recomputed (its K/V blocks usually stay findable in the prefix cache).

Prefill chunks that stop short of the prompt end stop on block boundaries, and the prompt is cut at its
last block boundary, so the recurrent state is available exactly where the prefix cache can use it.

With `prefill_align` (the engine sets it where packed prefill graphs run: 64) a prefill chunk costs its length
rounded up to a multiple of it, as the packed row holds it, so a step's chunks fit the bucket of its budget.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hybridlm.engine.block_manager import BlockManager, OutOfBlocks, extend_block_hashes
from hybridlm.engine.sequence import PLACEHOLDER, Sequence, Status


@dataclass
class Chunk:
    """Feed tokens [start, start + length) of `sequence` this step."""

    sequence: Sequence
    start: int
    length: int
    restore_from: int | None = None  # snapshot slot to copy into the state slot first
    reset_state: bool = False  # a fresh sequence: its state slot starts at zero
    save_to: int | None = None  # snapshot slot to copy the state into afterwards

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits give the next token."""
        return self.start + self.length == self.sequence.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048) -> None:
        if max_num_batched_tokens < blocks.block_size:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least the block size ({blocks.block_size})"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_align = 1  # what a prefill chunk's cost is rounded up to (module docstring)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.decode_snapshots: dict[str, bytes] = {}  # request id -> hash of its latest decode snapshot
        # request id -> (snapshot slot, end) of a decode snapshot whose block ends in a token still on the device
        # (a step scheduled ahead): keyed at commit, once the token is known
        self.pending_snapshots: dict[str, tuple[int, int]] = {}

    # ---- requests --------------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        needed = -(-(sequence.num_tokens + 1) // self.blocks.block_size)
        if needed > self.blocks.num_blocks:
            raise ValueError(
                f"prompt of {sequence.num_tokens} tokens needs {needed} KV blocks but the whole cache has "
                f"{self.blocks.num_blocks} ({self.blocks.num_blocks * self.blocks.block_size} tokens); "
                "raise gpu_memory_utilization or shorten the prompt"
            )
        self.waiting.append(sequence)

    def finish(self, sequence: Sequence, reason: str) -> None:
        """End a sequence (eos, length, stop string, or cancelled) and release its cache."""
        if sequence.is_finished:
            return
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        sequence.status = Status.FINISHED
        sequence.finish_reason = reason
        self._release(sequence)
        self.decode_snapshots.pop(sequence.request_id, None)
        pending = self.pending_snapshots.pop(sequence.request_id, None)
        if pending is not None:  # never committed: its slot was never indexed
            self.blocks.free_snapshot_slots.append(pending[0])

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, sequence: Sequence) -> None:
        self.blocks.release_blocks(sequence.block_table)
        sequence.block_table = []
        sequence.num_registered_blocks = 0
        if sequence.state_slot is not None:
            self.blocks.release_state_slot(sequence.state_slot)
            sequence.state_slot = None
        sequence.num_computed = 0

    def _preempt(self, sequence: Sequence, output: SchedulerOutput) -> None:
        self.running.remove(sequence)
        self._release(sequence)
        sequence.status = Status.WAITING
        sequence.num_preemptions += 1
        self.waiting.appendleft(sequence)
        output.preempted.append(sequence)

    # ---- one step ------------------------------------------------------------------------------------
    def _chunk_length(self, sequence: Sequence, budget: int) -> int:
        """How many tokens of `sequence` to feed, within `budget`; 0 if none fit."""
        start, end = sequence.num_computed, sequence.num_tokens
        length = min(end - start, budget)
        size = self.blocks.block_size
        if sequence.num_computed < sequence.num_prompt_tokens:
            # stop the prompt at its last block boundary first, so its state there can be snapshotted
            boundary = (sequence.num_prompt_tokens // size) * size
            if start < boundary < start + length:
                length = boundary - start
            elif start + length < end:  # a partial chunk ends on a block boundary
                aligned = ((start + length) // size) * size - start
                length = aligned if aligned > 0 else length
        align = self.prefill_align
        if self._cost(sequence, start, length) > budget >= align:  # a partial chunk whose aligned length fits
            length = budget // align * align
            aligned = ((start + length) // size) * size - start
            length = aligned if aligned > 0 else length
        return length

    def _cost(self, sequence: Sequence, start: int, length: int) -> int:
        """A chunk's charge on the step's budget: a decode token 1, a prefill chunk its length rounded up to
        `prefill_align` (where it leaves less than that, the step's last chunk may go over by the rest: with a
        budget that is a multiple of the alignment, the aligned chunks still fit it)."""
        if length == 1 and start > 0 and start + 1 == sequence.num_tokens:
            return 1
        return -(-length // self.prefill_align) * self.prefill_align

    def _hashes(self, sequence: Sequence, limit: int) -> list[bytes]:
        """The sequence's block hashes, extended to the full blocks of its first `limit` tokens (hashed once each:
        tokens are only ever appended)."""
        if len(sequence.block_hashes) < min(limit, sequence.num_tokens) // self.blocks.block_size:
            extend_block_hashes(sequence.block_hashes, sequence.token_ids(), self.blocks.block_size, limit)
        return sequence.block_hashes

    def _snapshot_slot(self, sequence: Sequence, end: int) -> int | None:
        """Where to save the state after computing up to `end`, if that is a block boundary worth keeping."""
        size = self.blocks.block_size
        if end % size or end == 0:
            return None
        decoding = sequence.num_computed >= sequence.num_prompt_tokens
        if decoding and sequence.token_at(end - 1) == PLACEHOLDER:  # scheduled ahead: key it at commit
            self._drop_decode_snapshot(sequence)  # first, so that its slot is reused before any other is evicted
            slot = self.blocks.take_snapshot_slot()
            if slot is not None:
                self.pending_snapshots[sequence.request_id] = (slot, end)
            return slot
        digest = self._hashes(sequence, end)[end // size - 1]
        if decoding:
            self._drop_decode_snapshot(sequence)
        slot = self.blocks.save_snapshot(digest)
        if decoding and slot is not None:
            self.decode_snapshots[sequence.request_id] = digest
        return slot

    def _drop_decode_snapshot(self, sequence: Sequence) -> None:
        """Keep one decode snapshot per sequence (the latest boundary): free the one before."""
        previous = self.decode_snapshots.pop(sequence.request_id, None)
        if previous is not None and previous in self.blocks.snapshots:
            self.blocks.free_snapshot_slots.append(self.blocks.snapshots.pop(previous))

    def _key_pending_snapshot(self, sequence: Sequence) -> None:
        """A snapshot taken by a step scheduled ahead: its block's tokens are real now, so index it."""
        slot, end = self.pending_snapshots.pop(sequence.request_id)
        digest = self._hashes(sequence, end)[end // self.blocks.block_size - 1]
        if self.blocks.key_snapshot(digest, slot):
            self.decode_snapshots[sequence.request_id] = digest

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # running sequences, oldest first; preempt the newest when blocks run out
        for sequence in list(self.running):
            if sequence not in self.running or budget <= 0:
                continue
            length = self._chunk_length(sequence, budget)
            while True:
                try:
                    self.blocks.grow(sequence.block_table, sequence.num_computed + length)
                    break
                except OutOfBlocks:
                    victims = [s for s in self.running if id(s) not in scheduled and s is not sequence]
                    victim = victims[-1] if victims else sequence
                    self._preempt(victim, output)
                    if victim is sequence:
                        break
            if sequence.status is not Status.RUNNING:
                continue
            end = sequence.num_computed + length
            output.chunks.append(Chunk(sequence, sequence.num_computed, length, save_to=self._snapshot_slot(sequence, end)))
            scheduled.add(id(sequence))
            budget -= self._cost(sequence, sequence.num_computed, length)
        # waiting sequences, in arrival order, while everything they need is free (not right after a
        # preemption: the freed blocks are spoken for by the running sequences' next tokens)
        while self.waiting and not output.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if self.blocks.num_free_state_slots == 0:
                break
            size = self.blocks.block_size
            prefix = self._hashes(sequence, sequence.num_tokens - 1)[: (sequence.num_tokens - 1) // size]
            matched, shared, snapshot = self.blocks.match_prefix(prefix, sequence.num_tokens)
            sequence.block_table = list(shared)
            sequence.num_computed = matched
            length = self._chunk_length(sequence, budget)
            try:
                self.blocks.grow(sequence.block_table, matched + length)
            except OutOfBlocks:
                self.blocks.release_blocks(sequence.block_table)
                sequence.block_table, sequence.num_computed = [], 0
                break
            self.waiting.popleft()
            sequence.state_slot = self.blocks.take_state_slot()
            sequence.status = Status.RUNNING
            if sequence.num_preemptions == 0:
                sequence.num_cached_prompt_tokens = matched
            self.running.append(sequence)
            end = matched + length
            output.chunks.append(Chunk(sequence, matched, length, restore_from=snapshot,
                                       reset_state=snapshot is None, save_to=self._snapshot_slot(sequence, end)))
            budget -= self._cost(sequence, matched, length)
        return output

    def commit(self, output: SchedulerOutput) -> None:
        """After the forward: the chunks' tokens are computed; full blocks become shareable."""
        for chunk in output.chunks:
            sequence = chunk.sequence
            sequence.num_computed = chunk.start + chunk.length
            if sequence.request_id in self.pending_snapshots:
                self._key_pending_snapshot(sequence)
            full = sequence.num_computed // self.blocks.block_size
            if full > sequence.num_registered_blocks:
                hashes = self._hashes(sequence, sequence.num_computed)[:full]
                self.blocks.register_full_blocks(hashes, sequence.block_table, sequence.num_registered_blocks)
                sequence.num_registered_blocks = full
