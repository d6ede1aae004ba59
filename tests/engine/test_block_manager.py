"""BlockManager: allocation, reference counts, chained prefix hashes, LRU eviction, disk hooks."""

import os
import subprocess
import sys

import pytest

from nanoseek.engine.block_manager import ROOT_HASH, BlockManager, block_hash
from nanoseek.engine.sequence import Sequence

BS = 4


def run_step(bm, seq, n):
    """What the scheduler does for one admitted sequence: admit, allocate, run, commit."""
    match = bm.match_prefix(seq)
    assert bm.can_admit(match, n)
    loads = bm.admit(seq, match)
    assert bm.allocate_slots(seq, n)
    saves = bm.plan_full_blocks(seq, n)
    bm.commit(saves)
    seq.num_computed_tokens += n
    return match, loads, saves


def admit_all(bm, seq):
    """Admit seq and compute all of its tokens in one step."""
    match = bm.match_prefix(seq)
    n = len(seq.token_ids) - match.num_blocks * BS
    return run_step(bm, seq, n)


def test_hash_is_chained_and_keyed_by_fingerprint():
    block = [1, 2, 3, 4]
    h0 = block_hash(ROOT_HASH, block, "model-a")
    assert h0 == block_hash(ROOT_HASH, list(block), "model-a")
    assert h0 != block_hash(ROOT_HASH, block, "model-b")
    assert h0 != block_hash(ROOT_HASH, [1, 2, 3, 5], "model-a")
    # the same block content after a different parent is a different block
    pa, pb = block_hash(ROOT_HASH, [9, 9, 9, 9], "m"), block_hash(ROOT_HASH, [8, 8, 8, 8], "m")
    assert block_hash(pa, block, "m") != block_hash(pb, block, "m")


def test_hash_is_stable_across_processes():
    code = ("from nanoseek.engine.block_manager import block_hash; "
            "print(block_hash('ab' * 16, [3, 1, 4, 1, 5], 'fp'))")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=env)
        outs.add(out.stdout.strip())
    assert outs == {block_hash("ab" * 16, [3, 1, 4, 1, 5], "fp")}


def test_allocation_and_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    a = Sequence("a", list(range(10)))          # 2 full blocks + 2 tokens
    _, loads, saves = admit_all(bm, a)
    assert loads == [] and len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert [b for b, _ in saves] == a.block_table[:2]
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)

    b = Sequence("b", list(range(8)) + [50, 51, 52])   # shares a's two full blocks
    match, _, _ = admit_all(bm, b)
    assert match.hit_blocks == a.block_table[:2]
    assert b.num_computed_tokens == 11 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[x].ref_count for x in a.block_table[:2]] == [2, 2]
    assert bm.num_free_blocks == 4                  # b took only one new block

    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]
    assert bm.num_free_blocks == 5 and a.block_table == []
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2                # freed full blocks stay findable
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(Sequence("c", [1], block_table=[0]))


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    admit_all(bm, Sequence("a", list(range(8))))
    again = Sequence("b", list(range(8)))           # exactly two full blocks, both cached
    match = bm.match_prefix(again)
    assert match.num_blocks == 1                    # the last block is computed again for logits
    longer = Sequence("c", list(range(9)))
    assert bm.match_prefix(longer).num_blocks == 2


def test_same_block_under_a_different_prefix_does_not_hit():
    bm = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    admit_all(bm, Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    other = Sequence("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])  # block 2 is the same, block 1 differs
    assert bm.match_prefix(other).num_blocks == 0
    other_model = BlockManager(num_blocks=8, block_size=BS, fingerprint="m2")
    admit_all(other_model, Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert other_model.match_prefix(Sequence("x", [1, 2, 3, 4, 5, 6, 7, 8, 0])).num_blocks == 2
    assert bm.hashes(Sequence("y", [1, 2, 3, 4]), 1) != other_model.hashes(Sequence("y", [1, 2, 3, 4]), 1)


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=BS, fingerprint="m")
    a = Sequence("a", [1] * 8 + [0])                # blocks a0 a1 + partial
    b = Sequence("b", [2] * 8 + [0])
    admit_all(bm, a)
    admit_all(bm, b)
    a0, a1, a_tail = a.block_table
    b0, b1, b_tail = b.block_table
    bm.free(a)   # a's tail first, then a1, then a0: the head of a chain is kept longest
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4

    # partial blocks hold nothing reusable, so they are handed out before any cached block
    c = Sequence("c", [3] * 4)
    assert bm.allocate_slots(c, 8)
    assert set(c.block_table) == {a_tail, b_tail}
    assert bm.num_cached_blocks == 4
    # then least recently freed first: a1 (freed before a0), a0, b1, b0
    order = []
    for i in range(4):
        s = Sequence(f"d{i}", [4] * 4)
        assert bm.allocate_slots(s, 1)
        order += s.block_table
    assert order == [a1, a0, b1, b0]
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert not bm.allocate_slots(Sequence("e", [5]), 1)


def test_a_hit_revives_an_evictable_block_and_protects_it():
    bm = BlockManager(num_blocks=3, block_size=BS, fingerprint="m")
    a = Sequence("a", [1] * 4 + [0])
    admit_all(bm, a)
    head = a.block_table[0]
    bm.free(a)
    b = Sequence("b", [1] * 4 + [7, 7])
    match, _, _ = admit_all(bm, b)
    assert match.hit_blocks == [head] and bm.blocks[head].ref_count == 1
    # the remaining free blocks are taken without touching b's hit block
    c = Sequence("c", [9])
    assert bm.allocate_slots(c, 4)
    assert head not in c.block_table
    assert not bm.allocate_slots(Sequence("d", [9]), 1)


def test_allocate_slots_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=BS, fingerprint="m")
    seq = Sequence("a", list(range(12)))
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert not bm.can_admit(bm.match_prefix(seq), 12)


def test_chunked_blocks_are_reported_once_when_they_become_full():
    bm = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    seq = Sequence("a", list(range(11)))
    saved = []
    for n in (3, 3, 3, 2):                       # 11 tokens in chunks that straddle blocks
        if not seq.block_table:
            saved += run_step(bm, seq, n)[2]
            continue
        assert bm.allocate_slots(seq, n)
        s = bm.plan_full_blocks(seq, n)
        bm.commit(s)
        seq.num_computed_tokens += n
        saved += s
    assert [b for b, _ in saved] == seq.block_table[:2]
    assert [h for _, h in saved] == bm.hashes(seq, 2)


def test_pending_block_makes_an_identical_prompt_wait():
    bm = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    a, b = Sequence("a", list(range(9))), Sequence("b", list(range(9)))
    match = bm.match_prefix(a)
    bm.admit(a, match)
    assert bm.allocate_slots(a, 9)
    saves = bm.plan_full_blocks(a, 9)                 # being computed now, not yet in the cache
    assert bm.match_prefix(b).wait_for_pending and bm.match_prefix(b).num_blocks == 0
    bm.commit(saves)
    match = bm.match_prefix(b)
    assert not match.wait_for_pending and match.hit_blocks == a.block_table[:2]


def test_external_lookup_blocks_are_loaded_and_counted_as_computed():
    on_disk = {}
    writer = BlockManager(num_blocks=8, block_size=BS, fingerprint="m")
    a = Sequence("a", list(range(13)))
    _, _, saves = admit_all(writer, a)
    on_disk.update({h: b for b, h in saves})          # what a runner would save after the step
    assert len(on_disk) == 3

    asked = []

    def lookup(h):
        asked.append(h)
        return h in on_disk

    # a fresh process: nothing in memory, three blocks on disk
    reader = BlockManager(num_blocks=8, block_size=BS, fingerprint="m", external_lookup=lookup)
    b = Sequence("b", list(range(12)) + [99])
    match, loads, saves_b = admit_all(reader, b)
    assert match.num_blocks == 3 and match.hit_blocks == []
    assert loads == list(zip(b.block_table[:3], writer.hashes(a, 3)))
    assert saves_b == []                             # loaded blocks are not saved again
    assert b.num_computed_tokens == 13
    # now they are in memory: no disk lookup needed for the next one
    asked.clear()
    c = Sequence("c", list(range(12)) + [5])
    assert reader.match_prefix(c).hit_blocks == b.block_table[:3] and asked == []
    # a different model never sees those files as hits
    other = BlockManager(num_blocks=8, block_size=BS, fingerprint="other", external_lookup=lookup)
    assert other.match_prefix(Sequence("d", list(range(13)))).num_blocks == 0
