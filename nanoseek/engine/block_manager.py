"""Paged KV blocks with reference counts and prefix caching by chained block hashes (no torch).

    bm = BlockManager(num_blocks=512, block_size=64, fingerprint=model_fingerprint)
    match = bm.match_prefix(seq)                 # cached full blocks (memory, then disk) of its tokens
    if bm.can_admit(match, num_new_tokens):
        loads = bm.admit(seq, match)             # [(block_id, hash)] to read from disk before running
        bm.allocate_slots(seq, num_new_tokens)   # grow seq.block_table for the tokens of this step
        saves = bm.plan_full_blocks(seq, num_new_tokens)  # [(block_id, hash)] full after this step
    bm.commit(saves)                             # after the step ran: those blocks now hold their KV
    bm.free(seq)                                 # full blocks stay cached until evicted (LRU)

A block's hash is `block_hash(parent_hash, its token ids, fingerprint)`: the same tokens after a
different prefix, or under a different model, hash differently. The chain starts from
`root_hash(seq.cache_salt)`, so sequences with different salts (tenants) never share a block.
The hash is stable across processes and restarts (blake2b, no Python `hash`), so the disk context
cache can key its files on it (and is isolated by salt the same way).

Block states: free-plain (no useful content), free-cached (ref 0, content valid, evictable in LRU
order), in use (ref >= 1). Only blocks whose KV has been computed are found by `match_prefix`; a
block being computed this step is "pending", and a sequence that would hit it is told to wait a step
instead of computing the same tokens again (this is how n > 1 samples share their prompt's blocks).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

from nanoseek.engine.sequence import Sequence

ROOT_HASH = ""  # parent of a sequence's first block when it has no cache salt


def root_hash(cache_salt: str | None) -> str:
    """The parent of a sequence's first block: the salt's own namespace (block hashes are hex, so
    no salt can pose as a block)."""
    return ROOT_HASH if cache_salt is None else "salt:" + cache_salt


def block_hash(parent_hash: str, token_ids: Seq[int], fingerprint: str) -> str:
    """Chained hash of one full block: 32 hex chars, identical in every process and on every run."""
    h = hashlib.blake2b(digest_size=16)
    fp = fingerprint.encode()
    parent = parent_hash.encode()
    # Length prefixes keep (fingerprint, parent) pairs from colliding by concatenation.
    h.update(struct.pack("<II", len(fp), len(parent)))
    h.update(fp)
    h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.hexdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: str | None = None  # set while the block holds (or is computing) a full, hashed block


@dataclass
class PrefixMatch:
    """What `match_prefix` found at the start of a sequence's tokens, one entry per full block."""

    hashes: list[str] = field(default_factory=list)
    block_ids: list[int | None] = field(default_factory=list)  # None: the disk cache holds it
    wait_for_pending: bool = False  # the next block is being computed by another sequence now

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def hit_blocks(self) -> list[int]:
        """Blocks found in memory."""
        return [b for b in self.block_ids if b is not None]

    @property
    def external_hashes(self) -> list[str]:
        """Blocks to load from the disk cache."""
        return [h for h, b in zip(self.hashes, self.block_ids) if b is None]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 64, fingerprint: str = "",
                 external_lookup: Callable[[str], bool] | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.external_lookup = external_lookup
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._plain: deque[int] = deque(range(num_blocks))       # free, nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; first = LRU
        self._cached: dict[str, int] = {}   # hash -> block whose KV is computed
        self._pending: dict[str, int] = {}  # hash -> block whose KV is computed by the running step

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by a prefix lookup (in use or evictable)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block_id(self, h: str) -> int | None:
        return self._cached.get(h)

    # ------------------------------------------------------------------ hashing
    def hashes(self, seq: Sequence, num_blocks: int) -> list[str]:
        """The first `num_blocks` chained hashes of seq's full blocks, extending seq.block_hashes."""
        bs = self.block_size
        if num_blocks * bs > len(seq.token_ids):
            raise ValueError(f"asked for {num_blocks} full blocks of {bs} tokens but sequence "
                             f"{seq.seq_id!r} has {len(seq.token_ids)} tokens")
        hs = seq.block_hashes
        while len(hs) < num_blocks:
            i = len(hs)
            parent = hs[-1] if hs else root_hash(seq.cache_salt)
            hs.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], self.fingerprint))
        return hs[:num_blocks]

    # ------------------------------------------------------------------ admission
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """The longest chain of cached full blocks at the start of seq.token_ids.

        Never the whole sequence: at least one token is left to compute, so the step has logits.
        """
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hashes = self.hashes(seq, max_blocks)
        match = PrefixMatch()
        for h in hashes:
            b = self._cached.get(h)
            if b is None and (h in self._pending or self.external_lookup is None
                              or not self.external_lookup(h)):
                break
            match.hashes.append(h)
            match.block_ids.append(b)
        i = match.num_blocks
        match.wait_for_pending = i < max_blocks and hashes[i] in self._pending
        return match

    def can_admit(self, match: PrefixMatch, num_new_tokens: int) -> bool:
        total = match.num_blocks * self.block_size + num_new_tokens
        new = self.blocks_for(total) - len(match.hit_blocks)
        # hit blocks sitting in the evictable pool leave it when taken
        revived = sum(1 for b in match.hit_blocks if self.blocks[b].ref_count == 0)
        return new + revived <= self.num_free_blocks

    def admit(self, seq: Sequence, match: PrefixMatch) -> list[tuple[int, str]]:
        """Give seq the matched blocks; returns the (block_id, hash) pairs to load from disk.

        Sets block_table and num_computed_tokens; the caller checked `can_admit` first.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id!r} already holds {len(seq.block_table)} blocks")
        need = len(match.external_hashes) + sum(
            1 for b in match.hit_blocks if self.blocks[b].ref_count == 0)
        if need > self.num_free_blocks:
            raise RuntimeError(f"admitting {seq.seq_id!r} needs {need} free blocks, "
                               f"{self.num_free_blocks} are free")
        for b in match.hit_blocks:  # first, so that loading cannot evict a hit
            self._take_ref(b)
        loads = []
        for h, b in zip(match.hashes, match.block_ids):
            if b is None:
                b = self._pop_free()
                # Loaded before the step runs, so it counts as computed from now on.
                self.blocks[b].hash = h
                self._cached[h] = b
                loads.append((b, h))
            seq.block_table.append(b)
        seq.num_computed_tokens = match.num_blocks * self.block_size
        return loads

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq.block_table to hold num_computed_tokens + num_new_tokens; False (and no change)
        when there are not enough free blocks."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def plan_full_blocks(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, str]]:
        """Hash the blocks that this step's tokens fill; they are pending until `commit`.

        Returns each (block_id, hash) once, for the runner to save to disk after the step. A block
        whose content is already cached under another block id stays unhashed (a duplicate).
        """
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        end = (seq.num_computed_tokens + num_new_tokens) // bs
        if end <= first:
            return []
        hashes = self.hashes(seq, end)
        out = []
        for i in range(first, end):
            b, h = seq.block_table[i], hashes[i]
            block = self.blocks[b]
            if block.hash is not None or h in self._cached or h in self._pending:
                continue
            block.hash = h
            self._pending[h] = b
            out.append((b, h))
        return out

    def commit(self, blocks: Seq[tuple[int, str]]) -> None:
        """The step that filled these blocks has run: make them findable by prefix lookups."""
        for b, h in blocks:
            if self._pending.get(h) == b:
                del self._pending[h]
                self._cached[h] = b
                if self.blocks[b].ref_count == 0:  # its sequence was freed during the step
                    self._evictable[b] = None

    def forget(self, hashes: Seq[str]) -> list[int]:
        """These blocks' content cannot be trusted (a disk load failed): no prefix lookup finds
        them any more. Returns their block ids; sequences holding them must recompute."""
        dropped = []
        for h in hashes:
            b = self._cached.pop(h, None)
            if b is None:
                continue
            self.blocks[b].hash = None
            if self.blocks[b].ref_count == 0:
                del self._evictable[b]
                self._plain.append(b)
            dropped.append(b)
        return dropped

    def cancel_pending(self, blocks: Seq[tuple[int, str]]) -> None:
        """The step that was to fill these blocks will not run for them: unhash them."""
        for b, h in blocks:
            if self._pending.get(h) == b:
                del self._pending[h]
                self.blocks[b].hash = None
                if self.blocks[b].ref_count == 0:
                    self._plain.append(b)

    # ------------------------------------------------------------------ release
    def free(self, seq: Sequence) -> None:
        """Drop seq's references; unreferenced cached blocks become evictable, tail blocks first
        (a prefix hit needs the whole chain, so the chain's head is worth keeping longest)."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {b} of sequence {seq.seq_id!r} has ref_count "
                                   f"{block.ref_count}; freed twice?")
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and self._cached.get(block.hash) == b:
                self._evictable[b] = None
            elif block.hash is not None and self._pending.get(block.hash) == b:
                pass  # commit() after the step decides: cached-evictable
            else:
                block.hash = None
                self._plain.append(b)
        seq.block_table = []

    # ------------------------------------------------------------------ internals
    def _take_ref(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count == 0:
            del self._evictable[b]
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._plain:
            b = self._plain.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)  # least recently freed
            self._cached.pop(self.blocks[b].hash, None)
            self.blocks[b].hash = None
        else:
            raise RuntimeError(f"no free block: all {self.num_blocks} blocks are in use")
        self.blocks[b].ref_count = 1
        return b
