"""Rate, token, concurrency and queue limits with a stepped clock: no sleeping."""

from __future__ import annotations

import threading

import pytest

from nanoseek.serve.limits import KeyLimits, Limiter, Permit, refill, seconds_until


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


def test_bucket_math():
    assert refill(0, capacity=60, per_minute=60, elapsed_s=10) == 10
    assert refill(55, 60, 60, 10) == 60
    assert refill(5, 60, 60, -3) == 5  # a clock that steps back refills nothing
    assert seconds_until(level=0.5, need=1, per_minute=30) == 1.0
    assert seconds_until(2, 1, 30) == 0


def test_requests_per_minute_with_retry_after():
    clock = Clock()
    lim = Limiter(KeyLimits(requests_per_minute=3), clock=clock)
    for _ in range(3):
        d = lim.acquire("k")
        assert d.allowed
        lim.release(d.permit)
    d = lim.acquire("k")
    assert (d.allowed, d.reason, d.status) == (False, "requests", 429)
    assert d.retry_after == pytest.approx(20.0) and d.retry_after_header == "20"
    assert "3 requests per minute" in d.message
    clock.advance(19.5)
    assert lim.acquire("k").reason == "requests"
    clock.advance(0.5)
    assert lim.acquire("k").allowed
    assert lim.acquire("other").allowed  # keys do not share buckets


def test_arrive_charges_every_request_before_any_work():
    clock = Clock()
    lim = Limiter(KeyLimits(requests_per_minute=2, tokens_per_minute=100), clock=clock)
    assert lim.arrive("k").allowed  # refused later (a bad body): still counted
    assert lim.arrive("k").allowed
    d = lim.acquire("k", tokens=10, count_request=False)  # admission does not count it twice
    assert d.allowed
    lim.release(d.permit, 10)
    refused = lim.arrive("k")
    assert (refused.allowed, refused.reason, refused.status, refused.retry_after_header) == (False, "requests", 429, "30")
    assert lim.in_flight == 0


def test_tokens_per_minute_charges_estimate_and_refunds_unused():
    clock = Clock()
    lim = Limiter(KeyLimits(tokens_per_minute=1000), clock=clock)
    first = lim.acquire("k", tokens=600)
    assert first.allowed
    d = lim.acquire("k", tokens=600)
    assert (d.allowed, d.reason) == (False, "tokens")
    assert d.retry_after == pytest.approx(12.0)  # 200 missing at 1000/min
    assert "needs 600, 400 available" in d.message
    lim.release(first.permit, used_tokens=100)   # 500 of the estimate come back
    assert lim.acquire("k", tokens=600).allowed
    too_big = lim.acquire("k", tokens=1001)
    assert (too_big.reason, too_big.status, too_big.retry_after) == ("too_large", 429, None)
    assert "1001 tokens" in too_big.message and "1000 tokens per minute" in too_big.message


def test_concurrency_and_global_queue():
    lim = Limiter(KeyLimits(max_concurrent=2), max_queue=3, clock=Clock())
    a1, a2 = lim.acquire("a"), lim.acquire("a")
    d = lim.acquire("a")
    assert (d.allowed, d.reason, d.status, d.retry_after_header) == (False, "concurrency", 429, "1")
    b1 = lim.acquire("b")
    full = lim.acquire("c")
    assert (full.allowed, full.reason, full.status) == (False, "queue_full", 503)
    assert "3 requests queued or running, limit 3" in full.message
    lim.release(b1.permit)
    assert lim.acquire("c").allowed and lim.in_flight == 3
    lim.release(a1.permit)
    assert lim.running("a") == 1 and lim.acquire("a").allowed
    lim.release(a2.permit)
    with pytest.raises(ValueError, match="'nobody' that holds none"):
        lim.release(Permit("nobody", 0))


def test_a_refused_request_costs_nothing():
    clock = Clock()
    lim = Limiter(KeyLimits(requests_per_minute=2, tokens_per_minute=100, max_concurrent=1), clock=clock)
    held = lim.acquire("k", tokens=10)
    for _ in range(5):
        assert lim.acquire("k", tokens=10).reason == "concurrency"
    lim.release(held.permit, used_tokens=10)
    assert lim.acquire("k", tokens=90).allowed  # the 5 refusals took no requests and no tokens


def test_per_key_overrides():
    lim = Limiter(KeyLimits(requests_per_minute=1), overrides={"vip": KeyLimits()}, clock=Clock())
    assert lim.acquire("basic").allowed and not lim.acquire("basic").allowed
    assert all(lim.acquire("vip").allowed for _ in range(50))


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="max_concurrent=0"):
        KeyLimits(max_concurrent=0)
    with pytest.raises(ValueError, match="requests_per_minute=0.5 must be >= 1"):
        KeyLimits(requests_per_minute=0.5)
    with pytest.raises(ValueError, match="max_queue=0"):
        Limiter(max_queue=0)
    with pytest.raises(ValueError, match="tokens=-1"):
        Limiter().acquire("k", tokens=-1)


def test_threads_never_exceed_the_concurrency_limit():
    lim = Limiter(KeyLimits(max_concurrent=3), max_queue=5)
    lock, running, peak, admitted, over = threading.Lock(), [0], [0], [0], []

    def worker(i):
        key = "shared" if i % 2 else f"own{i}"
        for _ in range(200):
            d = lim.acquire(key, tokens=1)
            if not d.allowed:
                continue
            with lock:
                running[0] += 1
                admitted[0] += 1
                peak[0] = max(peak[0], running[0])
                if lim.running(key) > 3:
                    over.append(lim.running(key))
            with lock:
                running[0] -= 1
            lim.release(d.permit, used_tokens=1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted[0] > 0 and peak[0] <= 5 and over == []
    assert lim.in_flight == 0 and all(lim.running(k) == 0 for k in ["shared"] + [f"own{i}" for i in range(8)])
