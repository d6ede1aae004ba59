"""Sequence: the state of one request in the engine, in token ids only (no torch, no text).

    seq = Sequence("req-1", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=8))
    scheduler.add(seq)                 # the scheduler sets arrival, status and block_table
    seq.output_token_ids               # tokens generated so far
    seq.finish_reason                  # "stop" | "length" | "abort" | None while unfinished

`params` is read duck-typed (max_tokens, min_tokens, ignore_eos, stop_token_ids), so this module
needs nothing from `sampling.py` and stays free of torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Hashable

FINISH_REASONS = ("stop", "length", "abort")


class SequenceStatus(str, enum.Enum):
    WAITING = "waiting"    # queued, holds no blocks (new, or preempted and to be recomputed)
    RUNNING = "running"    # admitted, holds blocks, is scheduled each step the budget allows
    FINISHED = "finished"  # done; its blocks are freed (full ones stay cached for prefix hits)


@dataclass(eq=False)
class Sequence:
    """One request: prompt + generated token ids and how far the KV cache has caught up.

    Invariants kept by the scheduler: num_computed_tokens <= len(token_ids); a running sequence's
    block_table covers at least num_computed_tokens slots; a waiting one holds no blocks.
    """

    seq_id: Hashable
    token_ids: list[int]
    params: Any = None
    num_prompt_tokens: int = -1           # set from token_ids when left at -1
    num_computed_tokens: int = 0          # tokens whose KV is in the cache
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[str] = field(default_factory=list)  # chained hashes of full blocks, a prefix
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the token id or stop string that ended it, if any
    arrival: int = -1                     # order of `Scheduler.add`; lower is older
    num_preemptions: int = 0
    max_tokens: int = -1                  # effective output cap, resolved by the scheduler at add
    cache_salt: str | None = None         # prefix hashes start from it: only equal salts share blocks

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(f"num_prompt_tokens={self.num_prompt_tokens} must be in "
                             f"[0, len(token_ids)={len(self.token_ids)}]")

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.value}, tokens={len(self.token_ids)} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, finish={self.finish_reason})")

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def mark_finished(self, reason: str, stop_reason: int | str | None = None) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} is not one of {FINISH_REASONS}")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
