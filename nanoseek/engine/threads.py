"""Intra-op threads for decode steps, chosen by measuring the steps themselves while the engine runs.

    chooser = DecodeThreads([2, 1])
    n = chooser.pick(batch_bucket)          # before a decode forward: the thread count to use
    chooser.record(batch_bucket, n, secs)   # after it: how long the step took

A decode step is a few hundred small ops over weights streamed from memory. With 2 threads each
parallel op waits at a barrier for both; on a machine whose other core is busy (a shared host, a
server's own tokenizer threads), those waits cost more than the second thread gains: on the host in
bench/RESULTS.md (Zen 3, 2 cores, load 8) one thread decoded 2-4x faster, and which count wins
changes with the load. So every count is tried on live steps, the median of the recent steps of each
decides, and the others are re-tried every `probe_every` steps of that batch size. A count whose
recent steps all took over `slower` times the best one's median is not tried again until the next
probe: at first and at each probe it costs one step, not min_samples (idle 2 cores, fused step:
11.3 ms with 1 thread against 6.9 with 2; each wasted step was ~1 % of a 64-token run). Between
probes the best count is recomputed after each probe and every `window` steps, not on every pick
(a pick runs right after a step has left the caches cold, where two medians cost ~30 us); so a
count found far slower in the first steps is looked at again after `window` steps at the earliest.
Prefill keeps the process's thread count (large matmuls use both cores well).
"""

from __future__ import annotations

import statistics
from collections import deque


class DecodeThreads:
    def __init__(self, candidates: list[int], window: int = 8, min_samples: int = 3, probe_every: int = 64,
                 slower: float = 1.3):
        if not candidates or any(c < 1 for c in candidates):
            raise ValueError(f"thread candidates must be integers >= 1, got {candidates}")
        self.candidates = list(dict.fromkeys(candidates))
        self.window, self.min_samples, self.probe_every, self.slower = window, min_samples, probe_every, slower
        self._times: dict[object, dict[int, deque]] = {}
        self._steps: dict[object, int] = {}
        self._best: dict[object, int] = {}  # between probes: the best count, as last computed

    def pick(self, key) -> int:
        """The thread count for the next decode step of this key (e.g. the batch bucket)."""
        n = self._steps[key] = self._steps.get(key, 0) + 1
        phase = n % self.probe_every
        probe_steps = self.min_samples * (len(self.candidates) - 1)
        probing = phase < probe_steps
        if not probing and phase != probe_steps and n % self.window and key in self._best:
            return self._best[key]  # (recomputed right after a probe, and every `window` steps)
        times = self._times_of(key)
        for c in self.candidates:  # first every count gets its samples, unless its first step was far slower
            if len(times[c]) < self.min_samples and not self._far_slower(times, c):
                return c
        best = self._best[key] = self.best(key)
        others = [c for c in self.candidates if c != best]
        if others and probing:  # now and then, re-try the others
            c = others[phase // self.min_samples]
            if phase % self.min_samples == 0 or not self._far_slower(times, c):  # its probe's first step
                return c
        return best

    def _far_slower(self, times: dict, c: int) -> bool:
        """Whether even count c's fastest recent step took over `slower` times another count's median."""
        if not times[c]:
            return False
        return any(d != c and times[d] and min(times[c]) > self.slower * statistics.median(times[d])
                   for d in self.candidates)

    def _times_of(self, key) -> dict[int, deque]:
        """Each count's recent step times for this key (made on first use, not on every call)."""
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = {c: deque(maxlen=self.window) for c in self.candidates}
        return times

    def record(self, key, threads: int, seconds: float) -> None:
        times = self._times_of(key)
        if threads not in times:
            times[threads] = deque(maxlen=self.window)
        times[threads].append(seconds)

    def best(self, key) -> int:
        times = self._times.get(key, {})
        measured = [c for c in self.candidates if times.get(c)]
        if not measured:
            return self.candidates[0]
        return min(measured, key=lambda c: (statistics.median(times[c]), self.candidates.index(c)))

    def summary(self) -> dict:
        """{key: {threads: median ms of its recent steps}} (for logs and bench/)."""
        return {k: {c: round(statistics.median(ts) * 1e3, 2) for c, ts in v.items() if ts}
                for k, v in self._times.items()}
