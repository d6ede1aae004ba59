"""Token-budget scheduler: continuous batching, chunked prefill, prefix hits, preemption (no torch).

    bm = BlockManager(num_blocks=512, block_size=64, fingerprint=fp)
    sched = Scheduler(max_num_seqs=16, max_num_batched_tokens=512, block_manager=bm,
                      max_model_len=4096, eos_token_ids=[2])
    sched.add(Sequence("a", prompt_ids, params))
    while sched.has_unfinished():
        out = sched.schedule()             # [(seq, num_new_tokens, start)], blocks to load/save
        ...load out.blocks_to_load, run the model on out.scheduled, save out.blocks_to_save...
        finished = sched.update(out, {seq_id: sampled_token for rows that reached their end})

There is no prefill phase and no decode phase (vLLM v1's idea): every running sequence has
num_computed_tokens catching up to len(token_ids), as far as the per-step token budget allows.
A long prompt is computed in chunks over several steps; a prefix hit starts it further along; a
decoding sequence needs one token. Running sequences go first, oldest first; waiting ones join
them while budget, `max_num_seqs` and free blocks allow. When blocks run out, the latest-arrived
running sequence is preempted: its blocks are freed and it goes back to the front of the queue, to
be recomputed (its own full blocks usually still sit in the prefix cache, so that is cheap).

Call `abort`/`finish` between steps or during one (then the blocks are freed in `update`).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.sequence import Sequence, SequenceStatus


class RequestRejected(ValueError):
    """A request that can never run (too long, empty, bad token ids); nothing else is affected.
    `param` names the request field at fault ("prompt", "max_tokens", "top_k", ...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # position of the first new token = num_computed_tokens when scheduled
    # This step computes the sequence's last token, so its logits give the next token. Fixed when
    # scheduled: after `update` appends that token it would no longer hold.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_sample = self.start + self.num_new_tokens == len(self.seq.token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_load: list[tuple[int, str]] = field(default_factory=list)  # before running the step
    blocks_to_save: list[tuple[int, str]] = field(default_factory=list)  # full once the step ran
    preempted: list[Hashable] = field(default_factory=list)              # seq ids sent back to wait

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def stop_reason_for(seq: Sequence, token_id: int, eos_token_ids: Iterable[int],
                    max_model_len: int) -> tuple[str, int | None] | None:
    """Why seq stops after appending token_id: ("stop", token) | ("length", None) | None."""
    p = seq.params
    if seq.num_output_tokens >= getattr(p, "min_tokens", 0):
        if not getattr(p, "ignore_eos", False) and token_id in eos_token_ids:
            return "stop", token_id
        if token_id in (getattr(p, "stop_token_ids", None) or ()):
            return "stop", token_id
    if seq.num_output_tokens >= seq.max_tokens or len(seq.token_ids) >= max_model_len:
        return "length", None
    return None


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 max_model_len: int, eos_token_ids: Iterable[int] = (), vocab_size: int | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        if max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} must be >= 2")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.vocab_size = vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival: the tail is preempted first
        self._seqs: dict[Hashable, Sequence] = {}
        self._arrivals = itertools.count()
        self._in_flight: SchedulerOutput | None = None

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises RequestRejected (changing nothing) if it can never run."""
        self._validate(seq)
        seq.status = SequenceStatus.WAITING
        seq.arrival = next(self._arrivals)
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def _validate(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise RequestRejected(f"request id {seq.seq_id!r} is already in the engine")
        try:
            seq.max_tokens = self.check(seq.token_ids, seq.params)
        except RequestRejected as e:
            raise RequestRejected(f"request {seq.seq_id!r}: {e}", e.param) from None

    def check(self, token_ids: list[int], params=None) -> int:
        """The one check of a request against this engine (vocabulary, context, KV cache); returns
        its effective max_tokens or raises RequestRejected naming the parameter. Reads only the
        engine's fixed sizes, so any thread may call it before queueing a request."""
        n_prompt, vocab, context = len(token_ids), self.vocab_size, self.max_model_len
        if n_prompt == 0:
            raise RequestRejected("the request has an empty prompt; at least 1 token is needed", "prompt")
        if vocab is not None:
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise RequestRejected(f"the prompt has token ids outside the vocabulary [0, {vocab}): "
                                      f"{bad[:5]}", "prompt")
            top_k = getattr(params, "top_k", -1)
            if top_k > vocab:
                raise RequestRejected(f"top_k={top_k} is larger than the vocabulary ({vocab} tokens)",
                                      "top_k")
            logprobs = getattr(params, "logprobs", None)
            if logprobs is not None and logprobs > vocab:
                raise RequestRejected(f"logprobs={logprobs} is larger than the vocabulary ({vocab} "
                                      "tokens)", "logprobs")
            bad = [t for t in getattr(params, "stop_token_ids", None) or () if not 0 <= t < vocab]
            if bad:
                raise RequestRejected(f"stop_token_ids {bad[:5]} are outside the vocabulary "
                                      f"[0, {vocab})", "stop_token_ids")
        bm = self.block_manager
        max_tokens = getattr(params, "max_tokens", None)
        room = min(context, bm.num_blocks * bm.block_size + 1) - n_prompt  # the last token needs no slot
        if n_prompt >= context or (max_tokens is None and room < 1):
            raise RequestRejected(
                f"the prompt has {n_prompt} tokens and the model's context is {context} tokens "
                f"({bm.num_blocks * bm.block_size} fit in the KV cache), which leaves no room to "
                "generate", "prompt")
        if max_tokens is None:  # as many as the context and the cache hold
            max_tokens = room
        elif n_prompt + max_tokens > context:
            raise RequestRejected(
                f"the model's context is {context} tokens, but {n_prompt + max_tokens} were "
                f"requested ({n_prompt} in the prompt, max_tokens={max_tokens}); lower max_tokens "
                "or shorten the prompt", "max_tokens")
        need = bm.blocks_for(n_prompt + max_tokens - 1)
        if need > bm.num_blocks:
            raise RequestRejected(
                f"the request needs up to {need} KV blocks of {bm.block_size} tokens "
                f"({n_prompt} prompt + {max_tokens} max_tokens) but the cache has {bm.num_blocks}",
                "max_tokens")
        return max_tokens

    def abort(self, seq_id: Hashable) -> bool:
        """Finish a request with reason "abort"; False if it is unknown or already finished."""
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: Hashable, reason: str, stop_reason: int | str | None = None) -> bool:
        """End a request now (stop strings are decided above this layer)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return False
        seq.mark_finished(reason, stop_reason)
        if seq in self.waiting:
            self.waiting.remove(seq)
            del self._seqs[seq_id]
        elif self._in_flight is None or not any(s.seq is seq for s in self._in_flight.scheduled):
            self._release(seq)
        # else: the running step may still write its blocks; `update` releases it.
        return True

    def get(self, seq_id: Hashable) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        if self._in_flight is not None:
            raise RuntimeError("schedule() called twice without update(): "
                               "run the previous output and pass it to update() first")
        bm = self.block_manager
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running sequences first, oldest first; preempt from the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                out.blocks_to_save += bm.plan_full_blocks(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
                budget -= n
                i += 1

        # Then new (or preempted) ones, first come first served, unless this step had to preempt.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            match = bm.match_prefix(seq)
            if match.wait_for_pending:
                break  # its next block is being computed right now: hit it next step instead
            n = min(len(seq.token_ids) - match.num_blocks * bm.block_size, budget)
            if not bm.can_admit(match, n):
                break
            self.waiting.popleft()
            out.blocks_to_load += bm.admit(seq, match)
            if not bm.allocate_slots(seq, n):
                raise RuntimeError(f"can_admit promised blocks for {seq.seq_id!r} that "
                                   "allocate_slots could not find")
            if seq.num_preemptions == 0:  # what the user sees: prompt tokens served from cache
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.blocks_to_save += bm.plan_full_blocks(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n

        self._in_flight = out
        return out

    def update(self, out: SchedulerOutput, sampled: Mapping[Hashable, int]) -> list[Sequence]:
        """Record that `out` ran: advance computed tokens, append the sampled tokens of sequences
        that reached their end, stop those that are done. Returns the sequences finished now."""
        if out is not self._in_flight:
            raise RuntimeError("update() must get the output of the latest schedule()")
        missing = [s.seq.seq_id for s in out.scheduled
                   if s.needs_sample and not s.seq.is_finished and s.seq.seq_id not in sampled]
        if missing:  # checked before any change, so the caller can retry with the full dict
            raise KeyError(f"no sampled token for sequences {missing}, which computed their last "
                           "token this step")
        self._in_flight = None
        self.block_manager.commit(out.blocks_to_save)
        finished = []
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted during the step
                self._release(seq)
                finished.append(seq)
                continue
            seq.num_computed_tokens = s.start + s.num_new_tokens
            if not s.needs_sample:
                continue
            token = int(sampled[seq.seq_id])
            seq.append_token(token)
            reason = stop_reason_for(seq, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                seq.mark_finished(*reason)
                self._release(seq)
                finished.append(seq)
        return finished

    def drop_loads(self, out: SchedulerOutput, failed: Iterable[str]) -> list[Hashable]:
        """The runner could not load these hashes from disk (corrupt or vanished file).

        Call before running `out`: the blocks are forgotten, and every sequence of the step that
        holds one of them leaves the step and goes back to the front of the queue to recompute.
        Returns those sequence ids. The disk cache must stop reporting these hashes as present.
        """
        if out is not self._in_flight:
            raise RuntimeError("drop_loads() must get the output of the latest schedule()")
        failed = set(failed)
        if not failed:
            return []
        bm = self.block_manager
        bad_blocks = set(bm.forget(sorted(failed)))
        out.blocks_to_load = [(b, h) for b, h in out.blocks_to_load if h not in failed]
        dropped = [s for s in out.scheduled if bad_blocks & set(s.seq.block_table)]
        for s in reversed(dropped):  # so the oldest ends up first in the queue
            mine = [(b, h) for b, h in out.blocks_to_save if b in s.seq.block_table]
            bm.cancel_pending(mine)
            out.blocks_to_save = [x for x in out.blocks_to_save if x not in mine]
            out.scheduled.remove(s)
            seq = s.seq
            if seq.is_finished:  # aborted meanwhile
                self._release(seq)
                continue
            self._preempt(seq)
            seq.num_preemptions -= 1  # not a preemption: its cache hit was void, it is re-admitted
        return [s.seq.seq_id for s in dropped]

    def recover(self, out: SchedulerOutput | None) -> list[Sequence]:
        """The step of `out` failed (or `update` did not finish): end its sequences with "abort" and
        make the scheduler ready for the next `schedule`. Blocks this step was to fill or load are
        unhashed, as their content cannot be trusted. With out=None, every sequence is ended.
        Returns the sequences ended, for the caller to fail their requests."""
        bm = self.block_manager
        if out is not None and out is self._in_flight:
            bm.cancel_pending(out.blocks_to_save)
            bm.forget([h for _, h in out.blocks_to_load])
        elif out is None and self._in_flight is not None:
            bm.cancel_pending(self._in_flight.blocks_to_save)
            bm.forget([h for _, h in self._in_flight.blocks_to_load])
        self._in_flight = None
        seqs = [s.seq for s in out.scheduled] if out is not None else list(self._seqs.values())
        for seq in seqs:
            if seq.seq_id in self._seqs:
                if not seq.is_finished:
                    seq.mark_finished("abort")
                if seq in self.waiting:
                    self.waiting.remove(seq)
                self._release(seq)
        return seqs

    # ------------------------------------------------------------------ internals
    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._seqs.pop(seq.seq_id, None)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
