"""Leases on SQLite and PostgreSQL: a server settles only the holds of servers whose lease has
expired (or whose process on this machine is gone), at the usage they recorded; a live server's
holds are never touched, even while another settles orphans in a loop beside it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from decimal import Decimal as D

import pytest
from sqlalchemy import select, update

from nanoseek.serve.accounts import Accounts, InsufficientBalance, NotReserved, Usage
from nanoseek.serve.db import holds, leases
from nanoseek.serve.leases import LeaseKeeper
from nanoseek.serve.pricing import request_cost
from tests.serve.test_accounts import _run_threads, expire_lease


@pytest.fixture
def two(db_url):
    """Two server instances on one database."""
    a, b = Accounts(db_url), Accounts(db_url)
    yield a, b
    a.close()
    b.close()


def test_a_starting_server_leaves_a_live_servers_holds_alone(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    r = a.reserve(key, "live", D("0.3"), prices)
    assert a.record_progress(r, Usage(0, 10, 4))
    assert b.settle_orphans().released == b.settle_orphans().settled == 0
    assert a.get_key(key.id).held == D("0.3")
    row = a.settle(r, Usage(0, 10, 9))  # a bills it in full, as if nothing had happened
    assert row.output_tokens == 9 and a.audit() == []


def test_orphans_of_an_expired_lease_are_settled_at_their_recorded_progress(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    mine = b.reserve(key, "b-live", D("0.2"), prices)       # b's own, live: untouched
    progressed = a.reserve(key, "a-progress", D("0.3"), prices, model="m")
    nothing = a.reserve(key, "a-nothing", D("0.1"), prices)
    assert a.record_progress(progressed, Usage(2, 8, 3))
    assert a.record_progress(progressed, Usage(2, 8, 5))
    assert not a.record_progress(progressed, Usage(2, 8, 4)), "progress never goes backwards"
    expire_lease(a, a.instance_id)                          # a stopped renewing (it died)

    report = b.settle_orphans()
    assert (report.settled, report.released, report.instances, report.output_tokens) == (1, 1, 1, 5)
    row = b.ledger_row("a-progress")
    assert (row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens, row.model) == (2, 8, 5, "m")
    assert row.amount == request_cost(prices, 2, 8, 5) and b.ledger_row("a-nothing") is None
    k = b.get_key(key.id)
    assert k.held == mine.amount and k.balance == 1 - row.amount and b.audit() == []
    with b.engine.connect() as conn:
        assert conn.execute(select(leases.c.instance_id)).scalars().all() == [b.instance_id]
    # the dead server, had it been only stalled, finds its holds gone and charges nothing twice
    assert not a.record_progress(progressed, Usage(2, 8, 6))
    with pytest.raises(NotReserved, match="already settled"):
        a.settle(progressed, Usage(2, 8, 6))
    with pytest.raises(NotReserved, match="no open reservation"):
        a.settle(nothing, Usage(0, 1, 1))
    assert b.settle_orphans().instances == 0 and b.settle(mine, Usage(0, 1, 1)).output_tokens == 1
    assert b.audit() == []


def test_a_server_whose_lease_was_ended_takes_a_new_one_for_new_holds(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    a.reserve(key, "first", D("0.1"), prices)
    expire_lease(a, a.instance_id)
    assert b.settle_orphans().released == 1                # a stalled past its TTL: its hold went
    assert not a.renew_lease()                               # a learns it when it renews...
    r = a.reserve(key, "second", D("0.1"), prices)          # ...and its new holds are live again
    assert b.settle_orphans().released == 0
    assert a.settle(r, Usage(0, 1, 1)).output_tokens == 1 and a.audit() == []


def test_holds_from_before_leases_are_orphans(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    a.reserve(key, "old", D("0.1"), prices)
    with a.engine.begin() as conn:  # what a schema-1 server left: no instance, no prices
        conn.execute(update(holds).values(instance_id=None, price_output=None))
    assert b.settle_orphans().released == 1 and b.audit() == []


def test_a_dead_process_on_this_machine_is_settled_without_waiting_for_its_lease(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    ra, rb = a.reserve(key, "of-a-dead-pid", D("0.1"), prices), b.reserve(key, "of-a-live-pid", D("0.1"), prices)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with a.engine.begin() as conn:  # both leases are far from expiring; only their pids differ
            conn.execute(update(leases).where(leases.c.instance_id == a.instance_id).values(pid=dead.pid))
            conn.execute(update(leases).where(leases.c.instance_id == b.instance_id).values(pid=alive.pid))
        c = Accounts(a.engine)
        report = c.settle_orphans()
        assert (report.released, report.instances) == (1, 1)
        assert c.get_key(key.id).held == rb.amount and c.audit() == []
        with a.engine.begin() as conn:  # another machine's lease is never judged by its pid
            conn.execute(update(leases).where(leases.c.instance_id == b.instance_id)
                         .values(host="elsewhere/boot/1", pid=dead.pid))
        assert c.settle_orphans().released == 0
    finally:
        alive.kill()
        alive.wait()
    assert c.ledger_row(ra.request_id) is None  # nothing recorded: released, not billed


def test_settling_orphans_in_a_loop_never_touches_a_live_servers_traffic(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "100")
    stop = threading.Event()
    sweeps = []

    def traffic(i):
        if i == 0:  # the second server, starting and sweeping over and over
            while not stop.is_set():
                sweeps.append(b.settle_orphans())
            return
        try:
            for j in range(25):
                r = a.reserve(key, f"t{i}-{j}", D("0.01"), prices)
                a.record_progress(r, Usage(0, 5, 1))
                a.settle(r, Usage(0, 5, 2))  # NotReserved here would be a live hold freed
        finally:
            if i == 1:
                stop.set()

    _run_threads(4, traffic)
    assert sweeps and all(s.settled == s.released == 0 for s in sweeps)
    assert len(a.ledger()) == 75 and all(r.output_tokens == 2 for r in a.ledger()) and a.audit() == []


def test_lease_keeper_renews_and_its_clean_stop_settles_what_it_still_holds(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    keeper = LeaseKeeper(a, ttl_s=3)
    keeper.start()
    r = a.reserve(key, "held-at-stop", D("0.2"), prices)
    a.record_progress(r, Usage(0, 4, 2))

    def expiry():
        with a.engine.connect() as conn:
            return conn.execute(select(leases.c.expires_at).where(leases.c.instance_id == a.instance_id)).scalar()

    first = expiry()
    deadline = time.monotonic() + 30  # not a timing assertion: it only turns a hang into a failure
    while expiry() == first:
        assert time.monotonic() < deadline, "the lease keeper never renewed"
        time.sleep(0.05)
    assert b.settle_orphans().settled == 0 and keeper.lost == 0
    keeper.stop()
    assert b.ledger_row("held-at-stop").output_tokens == 2 and b.get_key(key.id).held == 0
    with pytest.raises(ValueError, match="ttl_s=0"):
        LeaseKeeper(a, ttl_s=0)


def test_an_orphan_is_never_charged_more_than_its_hold(two, prices):
    a, b = two
    key, _ = a.create_key("alice", "1")
    r = a.reserve(key, "capped", D("0.000001"), prices)
    a.record_progress(r, Usage(0, 10_000, 10_000))
    expire_lease(a, a.instance_id)
    b.settle_orphans()
    assert b.ledger_row("capped").amount == D("0.000001") and b.audit() == []
    with pytest.raises(InsufficientBalance):
        b.reserve(key, "too-much", D("2"), prices)
