"""Per-key rate limits (requests/min, tokens/min, concurrent requests) and a global queue cap.

    from nanoseek.serve.limits import Limiter, KeyLimits

    limiter = Limiter(KeyLimits(requests_per_minute=60, tokens_per_minute=100_000,
                                max_concurrent=4), max_queue=256)
    limiter.set_limits(key_id, KeyLimits(requests_per_minute=5))   # a key's own limits (None: default)
    arrival = limiter.arrive(key_id)       # on arrival, before any work: charges the request
    decision = limiter.acquire(key_id, tokens=prompt_tokens + max_tokens, count_request=False)
    if not decision.allowed:
        return error(decision.status, decision.message, headers={"Retry-After": decision.retry_after_header})
    try: ... finally: limiter.release(decision.permit, used_tokens=actual_tokens)

Requests and tokens use token buckets: a bucket holds up to one minute's allowance and refills
continuously, so a key may burst its whole minute and then runs at the steady rate. A request is
charged its estimated tokens (prompt + max_tokens) on admission; `release` refunds what it did
not use. All checks pass before any bucket is charged, so a refused request costs nothing, unless
the server charged its request on arrival (`arrive`, before reading the body): then every request
a key sends counts toward its requests per minute, whether it is later refused, fails or runs. The
clock is injected (`clock=`) so tests step time instead of sleeping. One lock guards the state,
held only for arithmetic, so the limiter is safe from threads and from an asyncio loop.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class KeyLimits:
    """None means unlimited."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}={v!r} must be > 0 or None (unlimited)")
        if self.requests_per_minute is not None and self.requests_per_minute < 1:
            # the bucket holds one minute's allowance; under 1 it could never admit a request
            raise ValueError(f"requests_per_minute={self.requests_per_minute} must be >= 1")


# ---------------------------------------------------------------------------- bucket math (pure)
def refill(level: float, capacity: float, per_minute: float, elapsed_s: float) -> float:
    """Bucket level after elapsed_s of refilling at per_minute, capped at capacity."""
    return min(capacity, level + max(0.0, elapsed_s) * per_minute / SECONDS_PER_MINUTE)


def seconds_until(level: float, need: float, per_minute: float) -> float:
    """How long until the bucket holds `need` (0 if it already does)."""
    return max(0.0, (need - level) * SECONDS_PER_MINUTE / per_minute)


@dataclass
class _KeyState:
    requests: float          # bucket levels
    tokens: float
    updated: float           # clock time the levels refer to
    limits: KeyLimits        # the limits the levels were kept under
    running: int = 0


@dataclass(frozen=True)
class Permit:
    key: Hashable
    tokens: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    permit: Permit | None = None
    reason: str = ""             # "", "requests", "tokens", "concurrency", "queue_full", "too_large"
    message: str = ""
    retry_after: float | None = None     # seconds; None when waiting will not help
    status: int = 200                    # HTTP status the app should answer with

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up, at least 1 (the Retry-After header has no fractions)."""
        return None if self.retry_after is None else str(max(1, math.ceil(self.retry_after)))


@dataclass
class Limiter:
    default: KeyLimits = field(default_factory=KeyLimits)
    max_queue: int | None = None                 # requests admitted and not yet finished, all keys
    overrides: dict[Hashable, KeyLimits] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue={self.max_queue} must be >= 1 or None (unlimited)")
        self._lock = threading.Lock()
        self._keys: dict[Hashable, _KeyState] = {}
        self._in_flight = 0

    def limits_for(self, key: Hashable) -> KeyLimits:
        return self.overrides.get(key, self.default)

    def set_limits(self, key: Hashable, limits: KeyLimits | None) -> None:
        """Limits of their own for `key` (None: back to the default). Takes effect on its next
        acquire; its buckets keep their levels, capped at the new minute's allowance."""
        with self._lock:
            if limits is None or limits == self.default:
                self.overrides.pop(key, None)
            else:
                self.overrides[key] = limits

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def running(self, key: Hashable) -> int:
        st = self._keys.get(key)
        return st.running if st else 0

    def arrive(self, key: Hashable) -> Decision:
        """Charge one request to `key` as it arrives, before any work is spent on it; refused (429)
        when the key's requests per minute are used up. A later `acquire` passes count_request=False."""
        lim = self.limits_for(key)
        rpm = lim.requests_per_minute
        with self._lock:
            st = self._state(key, lim, self.clock())
            if rpm is not None:
                if st.requests < 1:
                    return self._rate_refusal(st, rpm)
                st.requests -= 1
            return Decision(True)

    @staticmethod
    def _rate_refusal(st: _KeyState, rpm: float) -> Decision:
        wait = seconds_until(st.requests, 1, rpm)
        return Decision(False, reason="requests", status=429, retry_after=wait, message=(
            f"rate limit of {rpm:g} requests per minute reached; retry in {wait:.1f}s"))

    def acquire(self, key: Hashable, tokens: int = 0, count_request: bool = True) -> Decision:
        """Admit a request of `tokens` estimated tokens for `key`, or say why not and for how long.
        count_request=False: `arrive` already charged its request."""
        if tokens < 0:
            raise ValueError(f"tokens={tokens} must be >= 0")
        lim = self.limits_for(key)
        rpm, tpm = lim.requests_per_minute, lim.tokens_per_minute
        with self._lock:
            now = self.clock()
            st = self._state(key, lim, now)
            if tpm is not None and tokens > tpm:
                return Decision(False, reason="too_large", status=429, message=(
                    f"this request may use {tokens} tokens, more than this key's limit of "
                    f"{tpm:g} tokens per minute; lower max_tokens or shorten the prompt"))
            if self.max_queue is not None and self._in_flight >= self.max_queue:
                return Decision(False, reason="queue_full", status=503, retry_after=1.0, message=(
                    f"the server is at capacity ({self._in_flight} requests queued or running, "
                    f"limit {self.max_queue}); retry shortly"))
            if lim.max_concurrent is not None and st.running >= lim.max_concurrent:
                return Decision(False, reason="concurrency", status=429, retry_after=1.0, message=(
                    f"this key already has {st.running} requests running, limit "
                    f"{lim.max_concurrent}"))
            if count_request and rpm is not None and st.requests < 1:
                return self._rate_refusal(st, rpm)
            if tpm is not None and st.tokens < tokens:
                wait = seconds_until(st.tokens, tokens, tpm)
                return Decision(False, reason="tokens", status=429, retry_after=wait, message=(
                    f"rate limit of {tpm:g} tokens per minute reached: this request needs {tokens}, "
                    f"{int(st.tokens)} available; retry in {wait:.1f}s"))
            if count_request and rpm is not None:
                st.requests -= 1
            if tpm is not None:
                st.tokens -= tokens
            st.running += 1
            self._in_flight += 1
            return Decision(True, permit=Permit(key, tokens))

    def release(self, permit: Permit, used_tokens: int | None = None) -> None:
        """The request finished; refund the tokens it reserved but did not use."""
        with self._lock:
            st = self._keys.get(permit.key)
            if st is None or st.running < 1:
                raise ValueError(f"release of a permit for key {permit.key!r} that holds none")
            st.running -= 1
            self._in_flight -= 1
            tpm = self.limits_for(permit.key).tokens_per_minute
            if tpm is not None and used_tokens is not None:
                refund = max(0, permit.tokens - max(0, used_tokens))
                st.tokens = min(tpm, st.tokens + refund)

    def _state(self, key: Hashable, lim: KeyLimits, now: float) -> _KeyState:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState(requests=lim.requests_per_minute or 0.0,
                                             tokens=lim.tokens_per_minute or 0.0, updated=now, limits=lim)
            self._prune(now)
            return st
        if st.limits != lim:  # a bucket that was unlimited starts full, as for a new key
            if st.limits.requests_per_minute is None:
                st.requests = lim.requests_per_minute or 0.0
            if st.limits.tokens_per_minute is None:
                st.tokens = lim.tokens_per_minute or 0.0
            st.limits = lim
        elapsed = now - st.updated
        if lim.requests_per_minute is not None:
            st.requests = refill(st.requests, lim.requests_per_minute, lim.requests_per_minute, elapsed)
        if lim.tokens_per_minute is not None:
            st.tokens = refill(st.tokens, lim.tokens_per_minute, lim.tokens_per_minute, elapsed)
        st.updated = now
        return st

    def _prune(self, now: float) -> None:
        """Forget keys idle for over a minute: their buckets are full again, as for a new key."""
        if len(self._keys) % 1024:
            return
        idle = [k for k, s in self._keys.items()
                if s.running == 0 and now - s.updated >= SECONDS_PER_MINUTE]
        for k in idle:
            del self._keys[k]
