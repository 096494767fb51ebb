"""Cache bookkeeping for hybrids, over ids and counters only (no tensors).

Three pools, all sized once by the engine from the model's CacheLayout and a memory budget:
- KV blocks of `block_size` tokens for the attention layers, with reference counts and a content-hash
  index of full blocks, so identical prefixes share blocks (vLLM's prefix caching);
- state slots, one per running sequence, for the conv + recurrent state of every GDN layer;
- snapshot slots: copies of a sequence's state at a block boundary, found by the same content hash. A
  prefix hit needs both: the KV blocks up to the boundary *and* the state at that boundary, because the
  recurrent state cannot be rebuilt from K/V.
Freed cached blocks and snapshots stay findable until their memory is needed (least recently used go
first).
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq


def extend_block_hashes(hashes: list[bytes], token_ids: Seq[int], block_size: int, limit: int) -> list[bytes]:
    """Extend `hashes` (the chained hashes of the first len(hashes) full blocks of `token_ids`) in place to every
    full block of token_ids[:limit]; return it. Hash i covers tokens [0, (i+1)*block_size), so equal hashes mean
    equal prefixes."""
    limit = min(limit, len(token_ids))
    previous = hashes[-1] if hashes else b""
    for start in range(len(hashes) * block_size, limit - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(_as_bytes(token_ids[start : start + block_size]))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


def _as_bytes(token_ids: Seq[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (one C-level conversion, not one Python call per token)."""
    packed = array("I", token_ids)
    if packed.itemsize != 4:  # no C unsigned int of 4 bytes here: the slow, portable way
        return b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def block_hashes(token_ids: Seq[int], block_size: int, limit: int | None = None) -> list[bytes]:
    """Chained content hashes of the full blocks of `token_ids[:limit]`."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) if limit is None else limit)


class OutOfBlocks(Exception):
    """Raised inside the scheduler when a request cannot get the blocks it needs right now."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_state_slots: int, num_snapshot_slots: int) -> None:
        if num_blocks < 1 or block_size < 1 or num_state_slots < 1:
            raise ValueError(
                f"the cache needs at least one KV block and one state slot, got {num_blocks} blocks, "
                f"{num_state_slots} state slots"
            )
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}  # hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.free_state_slots = list(range(num_state_slots - 1, -1, -1))
        self.num_state_slots = num_state_slots
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # hash -> snapshot slot, LRU first
        self.free_snapshot_slots = list(range(num_snapshot_slots - 1, -1, -1))
        self.num_snapshot_slots = num_snapshot_slots
        self.hits = self.queries = 0  # prefix-cache statistics, in tokens

    # ---- KV blocks ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _take_block(self) -> int:
        if not self.free_blocks:
            raise OutOfBlocks()
        block, _ = self.free_blocks.popitem(last=False)
        stale = self.block_hash[block]
        if stale is not None:  # evict: its content is about to be overwritten
            del self.cached_blocks[stale]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _share_block(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def release_blocks(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # tail blocks are the least likely to be shared: evict them first
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hash[block] is None:
                    self.free_blocks.move_to_end(block, last=False)  # no content worth keeping

    def blocks_needed(self, num_blocks_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_blocks_held)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Make `block_table` hold `num_tokens` tokens; all or nothing."""
        needed = self.blocks_needed(len(block_table), num_tokens)
        if needed > self.num_free_blocks:
            raise OutOfBlocks()
        block_table.extend(self._take_block() for _ in range(needed))

    def register_full_blocks(self, hashes: Seq[bytes], block_table: list[int], first: int = 0) -> None:
        """Index blocks first.. of `block_table` (all tokens computed; `hashes` are theirs), so later requests can
        share them."""
        for index in range(first, len(hashes)):
            digest, block = hashes[index], block_table[index]
            if self.block_hash[block] is not None:
                continue
            if digest in self.cached_blocks:
                continue  # another block already holds this content
            self.block_hash[block] = digest
            self.cached_blocks[digest] = block

    # ---- state slots and snapshots --------------------------------------------------------------------
    @property
    def num_free_state_slots(self) -> int:
        return len(self.free_state_slots)

    def take_state_slot(self) -> int:
        if not self.free_state_slots:
            raise OutOfBlocks()
        return self.free_state_slots.pop()

    def release_state_slot(self, slot: int) -> None:
        self.free_state_slots.append(slot)

    def save_snapshot(self, digest: bytes) -> int | None:
        """A snapshot slot to copy a state into, keyed by the prefix hash; None if none can be had."""
        if digest in self.snapshots:
            self.snapshots.move_to_end(digest)
            return None  # already saved
        slot = self.take_snapshot_slot()
        if slot is not None:
            self.snapshots[digest] = slot
        return slot

    def take_snapshot_slot(self) -> int | None:
        """A snapshot slot not yet keyed (a free one, else the least recently used); None if there are none."""
        if self.free_snapshot_slots:
            return self.free_snapshot_slots.pop()
        if self.snapshots:
            return self.snapshots.popitem(last=False)[1]
        return None

    def key_snapshot(self, digest: bytes, slot: int) -> bool:
        """Index a slot taken by `take_snapshot_slot` (and since filled) under `digest`; if that prefix is already
        saved, the slot goes back to the free ones. Returns whether it was indexed."""
        if digest in self.snapshots:
            self.snapshots.move_to_end(digest)
            self.free_snapshot_slots.append(slot)
            return False
        self.snapshots[digest] = slot
        return True

    # ---- prefix matching -----------------------------------------------------------------------------
    def match_prefix(self, hashes: Seq[bytes], num_tokens: int) -> tuple[int, list[int], int | None]:
        """The longest block-aligned prefix of a sequence of `num_tokens` tokens with cached KV blocks and a
        state snapshot; `hashes` are those of its full blocks before its last token (at least one token is
        left to compute: its logits pick the next token).

        Returns (tokens matched, the shared blocks, the snapshot slot to restore); the blocks are taken
        (reference counted).
        """
        self.queries += num_tokens
        blocks = []
        for digest in hashes:
            block = self.cached_blocks.get(digest)
            if block is None:
                break
            blocks.append(block)
        for count in range(len(blocks), 0, -1):
            slot = self.snapshots.get(hashes[count - 1])
            if slot is not None:
                self.snapshots.move_to_end(hashes[count - 1])
                for block in blocks[:count]:
                    self._share_block(block)
                self.hits += count * self.block_size
                return count * self.block_size, blocks[:count], slot
        return 0, [], None
