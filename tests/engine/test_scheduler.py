"""Scheduler: token budget, chunked prefill, continuous batching, preemption, prefix and disk hits.

The runner here is a toy model over a real paged pool: it writes each scheduled token into the slot
its block table names and computes the next token from the context it reads back through the block
table. A block shared wrongly, evicted while in use or hit under the wrong prefix changes the
context, so the engine's tokens would differ from a plain loop over the same function.
"""

import pytest

from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import RequestRejected, Scheduler
from nanoseek.engine.sequence import Sequence, SequenceStatus

BS = 4
VOCAB = 97
EOS = 0


def next_token(context):
    """Deterministic stand-in for a model's greedy step: depends on every token and its position."""
    acc = 17
    for i, t in enumerate(context):
        acc = (acc * 31 + (i + 1) * (t + 3)) % 1_000_003
    return 1 + acc % (VOCAB - 1)   # never EOS, so lengths are decided by max_tokens


class PagedToyRunner:
    def __init__(self, num_blocks, disk=None, eos_at=None):
        self.pool = [[None] * BS for _ in range(num_blocks)]
        self.disk = disk if disk is not None else {}
        self.eos_at = eos_at or {}   # seq_id -> output index at which to emit EOS
        self.steps = []

    def run(self, out):
        self.steps.append(out)
        for b, h in out.blocks_to_load:
            self.pool[b] = list(self.disk[h])
        sampled = {}
        for s in out.scheduled:
            seq = s.seq
            for pos in range(s.start, s.start + s.num_new_tokens):
                self.pool[seq.block_table[pos // BS]][pos % BS] = seq.token_ids[pos]
            if s.needs_sample:
                ctx = [self.pool[seq.block_table[p // BS]][p % BS] for p in range(len(seq))]
                tok = next_token(ctx)
                if self.eos_at.get(seq.seq_id) == seq.num_output_tokens:
                    tok = EOS
                sampled[seq.seq_id] = tok
        for b, h in out.blocks_to_save:
            self.disk[h] = list(self.pool[b])
        return sampled


def reference(prompt, max_tokens):
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def make(num_blocks=64, max_num_seqs=8, budget=64, max_model_len=256, disk=None, fingerprint="m",
         lookup=True):
    ext = (lambda h: h in disk) if (disk is not None and lookup) else None
    bm = BlockManager(num_blocks, BS, fingerprint, external_lookup=ext)
    sched = Scheduler(max_num_seqs, budget, bm, max_model_len, eos_token_ids=[EOS], vocab_size=VOCAB)
    return sched, PagedToyRunner(num_blocks, disk)


def drain(sched, runner, max_steps=10_000):
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        finished += sched.update(out, runner.run(out))
    raise AssertionError("scheduler did not finish")


def prompt(seed, n):
    return [1 + (seed * 7 + i * 13) % (VOCAB - 1) for i in range(n)]


def test_mixed_batch_matches_plain_generation():
    sched, runner = make()
    prompts = {f"r{i}": prompt(i, n) for i, n in enumerate([1, 5, 17, 33, 8])}
    seqs = {k: Sequence(k, p, SamplingParams(max_tokens=6)) for k, p in prompts.items()}
    for s in seqs.values():
        sched.add(s)
    done = drain(sched, runner)
    assert {s.seq_id for s in done} == set(prompts)
    for k, s in seqs.items():
        assert s.output_token_ids == reference(prompts[k], 6)
        assert s.finish_reason == "length" and s.block_table == []
    assert sched.block_manager.num_free_blocks == 64


def test_token_budget_and_chunked_prefill():
    sched, runner = make(budget=16)
    seq = Sequence("long", prompt(1, 40), SamplingParams(max_tokens=3))
    sched.add(seq)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        (s,) = out.scheduled
        chunks.append((s.start, s.num_new_tokens, s.needs_sample))
        n_before = len(seq)
        sched.update(out, runner.run(out))
        # a token is appended only when the step computed the sequence's last token
        assert len(seq) == n_before + (1 if s.needs_sample else 0)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True), (40, 1, True), (41, 1, True)]
    assert seq.output_token_ids == reference(prompt(1, 40), 3)


def test_continuous_batching_new_request_joins_running_decode():
    sched, runner = make(budget=64)
    a = Sequence("a", prompt(1, 10), SamplingParams(max_tokens=8))
    sched.add(a)
    for _ in range(3):
        out = sched.schedule()
        sched.update(out, runner.run(out))
    b = Sequence("b", prompt(2, 12), SamplingParams(max_tokens=4))
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 12)]
    sched.update(out, runner.run(out))
    drain(sched, runner)
    assert a.output_token_ids == reference(prompt(1, 10), 8)
    assert b.output_token_ids == reference(prompt(2, 12), 4)


def test_max_num_seqs_caps_running():
    sched, runner = make(max_num_seqs=2)
    seqs = [Sequence(i, prompt(i, 6), SamplingParams(max_tokens=3)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1] and sched.num_waiting == 3
    sched.update(out, runner.run(out))
    drain(sched, runner)
    assert all(s.output_token_ids == reference(prompt(s.seq_id, 6), 3) for s in seqs)


def test_preemption_recomputes_the_latest_arrival_correctly():
    # 10 blocks of 4 tokens; three requests that each grow to 6 blocks cannot all stay resident
    sched, runner = make(num_blocks=10, budget=64)
    seqs = [Sequence(i, prompt(i + 3, 9), SamplingParams(max_tokens=14)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = []
    finished = []
    while sched.has_unfinished():
        out = sched.schedule()
        if out.preempted:
            preempted += out.preempted
            victim = sched.get(out.preempted[-1])
            assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            assert victim.num_computed_tokens == 0 and sched.waiting[0] is victim
            # the victim is always the newest of those that were running
            assert all(s.seq.arrival < victim.arrival for s in out.scheduled)
        finished += sched.update(out, runner.run(out))
    assert preempted, "the cache was sized to force preemption"
    assert 2 in preempted
    for s in seqs:
        assert s.output_token_ids == reference(prompt(s.seq_id + 3, 9), 14), s
        assert s.num_cached_tokens == 0       # recompute is not a prompt cache hit for the user
    assert any(s.num_preemptions for s in seqs)
    assert sched.block_manager.num_free_blocks == 10


def test_prefix_hit_skips_cached_tokens():
    sched, runner = make()
    shared = prompt(5, 13)                 # 3 full blocks + 1 token
    a = Sequence("a", shared + [7, 8], SamplingParams(max_tokens=2))
    sched.add(a)
    drain(sched, runner)
    b = Sequence("b", shared + [9], SamplingParams(max_tokens=2))
    sched.add(b)
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.start, s.num_new_tokens) == (12, 2)
    assert b.num_cached_tokens == 12
    sched.update(out, runner.run(out))
    drain(sched, runner)
    assert b.output_token_ids == reference(shared + [9], 2)


def test_identical_prompts_share_blocks_instead_of_computing_twice():
    sched, runner = make()
    p = prompt(9, 10)
    seqs = [Sequence(i, p, SamplingParams(max_tokens=3)) for i in range(3)]   # like n=3
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [s.seq.seq_id for s in first.scheduled] == [0]    # the others wait for its blocks
    sched.update(first, runner.run(first))
    second = sched.schedule()
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in second.scheduled] == [
        (0, 10, 1), (1, 8, 2), (2, 8, 2)]
    assert seqs[1].block_table[:2] == seqs[0].block_table[:2] == seqs[2].block_table[:2]
    sched.update(second, runner.run(second))
    drain(sched, runner)
    assert all(s.output_token_ids == reference(p, 3) for s in seqs)
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]


def test_disk_hits_after_restart_and_not_for_another_model():
    disk = {}
    p = prompt(11, 21)
    sched, runner = make(disk=disk)
    sched.add(Sequence("a", p, SamplingParams(max_tokens=2)))
    drain(sched, runner)
    assert len(disk) == 5                  # 20 computed prompt tokens + 2 outputs -> 5 full blocks

    sched, runner = make(disk=disk)        # a restart: empty memory, same disk, same model
    b = Sequence("b", p, SamplingParams(max_tokens=4))
    sched.add(b)
    out = sched.schedule()
    assert len(out.blocks_to_load) == 5 and out.scheduled[0].start == 20
    assert b.num_cached_tokens == 20
    sched.update(out, runner.run(out))
    drain(sched, runner)
    assert b.output_token_ids == reference(p, 4)

    sched, runner = make(disk=disk, fingerprint="another-model")
    c = Sequence("c", p, SamplingParams(max_tokens=1))
    sched.add(c)
    out = sched.schedule()
    assert out.blocks_to_load == [] and c.num_cached_tokens == 0


def test_a_corrupt_disk_block_is_dropped_and_recomputed():
    disk = {}
    p = prompt(12, 17)
    sched, runner = make(disk=disk)
    sched.add(Sequence("a", p, SamplingParams(max_tokens=1)))
    drain(sched, runner)
    hashes = sched.block_manager.hashes(Sequence("x", p), 4)
    assert set(hashes) == set(disk)

    sched, runner = make(disk=disk)                  # restart; block 2's file turns out corrupt
    b = Sequence("b", p, SamplingParams(max_tokens=3))
    c = Sequence("c", p[:8] + [5, 6, 7, 8, 9], SamplingParams(max_tokens=3))   # needs blocks 0, 1
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["b", "c"] and len(out.blocks_to_load) == 4
    del disk[hashes[2]]                              # the disk cache removes what it cannot read
    assert sched.drop_loads(out, [hashes[2]]) == ["b"]
    assert [s.seq.seq_id for s in out.scheduled] == ["c"]
    assert sched.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
    assert hashes[2] not in [h for _, h in out.blocks_to_load]
    sched.update(out, runner.run(out))
    drain(sched, runner)
    assert b.output_token_ids == reference(p, 3)
    assert c.output_token_ids == reference(p[:8] + [5, 6, 7, 8, 9], 3)
    assert b.num_cached_tokens == 8 and b.num_preemptions == 0    # blocks 0 and 1 still served
    assert sched.block_manager.num_free_blocks == 64


def test_stop_conditions():
    sched, runner = make()
    runner.eos_at = {"eos": 2, "early": 1, "ignore": 1}
    a = Sequence("eos", prompt(1, 5), SamplingParams(max_tokens=10))
    b = Sequence("early", prompt(2, 5), SamplingParams(max_tokens=10, min_tokens=3))
    c = Sequence("ignore", prompt(3, 5), SamplingParams(max_tokens=4, ignore_eos=True))
    stop_tok = reference(prompt(4, 5), 3)[2]
    d = Sequence("stop_id", prompt(4, 5), SamplingParams(max_tokens=10, stop_token_ids=[stop_tok]))
    for s in (a, b, c, d):
        sched.add(s)
    drain(sched, runner)
    assert (a.finish_reason, a.stop_reason, a.num_output_tokens) == ("stop", EOS, 3)
    assert b.output_token_ids[1] == EOS and b.finish_reason == "length"   # EOS before min_tokens
    assert b.num_output_tokens == 10
    assert c.output_token_ids[1] == EOS and (c.finish_reason, c.num_output_tokens) == ("length", 4)
    assert (d.finish_reason, d.stop_reason, d.num_output_tokens) == ("stop", stop_tok, 3)


def test_bad_requests_are_rejected_with_the_numbers_and_change_nothing():
    sched, _ = make(num_blocks=8, max_model_len=40)
    cases = [
        (Sequence("long", [1] * 30, SamplingParams(max_tokens=20)),
         r"context is 40 tokens, but 50 were requested \(30 in the prompt, max_tokens=20\)"),
        (Sequence("full", [1] * 40, SamplingParams(max_tokens=None)), "leaves no room"),
        (Sequence("empty", [], SamplingParams()), "empty prompt"),
        (Sequence("vocab", [1, VOCAB, -1], SamplingParams()), r"outside the vocabulary \[0, 97\)"),
        (Sequence("blocks", [1] * 30, SamplingParams(max_tokens=8)),
         r"request .blocks.: the request needs up to 10 KV blocks of 4 tokens \(30 prompt \+ 8 max_tokens\) but the cache has 8"),
    ]
    for seq, msg in cases:
        with pytest.raises(RequestRejected, match=msg):
            sched.add(seq)
    assert not sched.has_unfinished()
    ok = Sequence("ok", [1] * 10, SamplingParams(max_tokens=None))
    sched.add(ok)
    assert ok.max_tokens == 23      # 8 blocks of 4 hold 32 tokens; the last sampled one needs none
    with pytest.raises(RequestRejected, match="already in the engine"):
        sched.add(Sequence("ok", [1], SamplingParams()))


def test_abort_waiting_running_and_during_a_step():
    sched, runner = make(max_num_seqs=2)
    seqs = {k: Sequence(k, prompt(i, 9), SamplingParams(max_tokens=5)) for i, k in enumerate("abc")}
    for s in seqs.values():
        sched.add(s)
    out = sched.schedule()                         # a and b run, c waits
    sched.update(out, runner.run(out))
    assert sched.abort("c") and seqs["c"].finish_reason == "abort" and sched.num_waiting == 0
    free_before = sched.block_manager.num_free_blocks
    assert sched.abort("a") and seqs["a"].block_table == []
    assert sched.block_manager.num_free_blocks > free_before
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["b"]
    assert sched.abort("b")                        # mid-step: blocks stay until the step is done
    assert seqs["b"].block_table != []
    finished = sched.update(out, runner.run(out))
    assert finished == [seqs["b"]] and seqs["b"].block_table == []
    assert seqs["b"].num_output_tokens == 1        # no token appended after the abort
    assert not sched.has_unfinished() and not sched.abort("b") and not sched.abort("zzz")
    assert sched.block_manager.num_free_blocks == 64


def test_finish_from_the_text_layer_and_update_contract():
    sched, runner = make()
    s = Sequence("a", prompt(1, 6), SamplingParams(max_tokens=10))
    sched.add(s)
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="twice without update"):
        sched.schedule()
    with pytest.raises(KeyError, match=r"no sampled token for sequences \['a'\]"):
        sched.update(out, {})
    assert s.num_computed_tokens == 0               # the failed update changed nothing
    sched.update(out, runner.run(out))
    assert sched.finish("a", "stop", "\n\n")        # a stop string seen by the detokenizer
    assert (s.finish_reason, s.stop_reason) == ("stop", "\n\n")
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64


def test_bad_scheduler_settings_are_named():
    bm = BlockManager(4, BS, "m")
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        Scheduler(0, 8, bm, 64)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        Scheduler(1, 0, bm, 64)
