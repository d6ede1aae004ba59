"""Accounts on SQLite and PostgreSQL: hashed keys, holds, one ledger row per request, no
overdraw and no double charge under concurrency, state kept across a restart."""

from __future__ import annotations

import hashlib
import random
import threading
from decimal import Decimal as D

import pytest
from sqlalchemy import select, text, update

from nanoseek.serve.accounts import (Accounts, AccountsError, DuplicateRequest, InsufficientBalance,
                                     KeyNotFound, KeyRevoked, NotReserved, Usage)
from nanoseek.serve.db import SCHEMA_VERSION, SchemaError, api_keys, schema_version
from nanoseek.serve.pricing import max_request_cost, request_cost


def test_secret_is_stored_only_as_its_hash(accounts, db_url):
    key, secret = accounts.create_key("alice", "10")
    assert secret.startswith("sk-") and len(secret) == 67
    with accounts.engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(select(api_keys))]
    assert rows and not any(secret in v or secret[3:] in v for r in rows for v in r)
    assert any(hashlib.sha256(secret.encode()).hexdigest() in r for r in rows)
    assert accounts.authenticate(secret).id == key.id
    assert accounts.authenticate(f"Bearer {secret}").id == key.id
    assert accounts.authenticate(secret[:-1] + ("0" if secret[-1] != "0" else "1")) is None
    for bad in (None, "", "Bearer", "sk-short", "x" * 67, secret.upper()):
        assert accounts.authenticate(bad) is None
    _, other = accounts.create_key("bob", 0)
    assert other != secret and accounts.authenticate(other).name == "bob"


def test_bad_input_names_the_value_and_writes_nothing(accounts):
    accounts.create_key("alice", "1.5")
    cases = [("alice", "1", "already exists"), ("", "1", "1..64"), ("x" * 65, "1", "1..64"),
             ("carol", "-1", "-1"), ("carol", "abc", "'abc'"), ("carol", "NaN", "finite"),
             ("carol", "0.0000000001", "decimal places"), ("carol", "1e12", "exceeds")]
    for name, balance, fragment in cases:
        with pytest.raises(AccountsError, match=fragment.replace(".", r"\.")):
            accounts.create_key(name, balance)
    assert [k.name for k in accounts.list_keys()] == ["alice"]
    with pytest.raises(AccountsError, match="must be > 0"):
        accounts.topup("alice", "0")
    with pytest.raises(KeyNotFound, match="'nobody'"):
        accounts.topup("nobody", "1")
    assert accounts.get_key("alice").balance == D("1.5") and accounts.audit() == []


def test_topup_and_revoke_by_name_or_id(accounts, prices):
    key, secret = accounts.create_key("alice", "1")
    assert accounts.topup("alice", "2.25").balance == D("3.25")
    assert accounts.topup(str(key.id), "0.000000001").balance == D("3.250000001")
    assert accounts.topup(key.id, "1", by="id").balance == D("4.250000001")
    r = accounts.reserve(key, "before-revoke", D("0.5"), prices)
    assert accounts.revoke(str(key.id)).revoked_at is not None
    assert accounts.authenticate(secret) is None
    with pytest.raises(KeyRevoked, match="'alice' was revoked"):
        accounts.reserve(key, "after-revoke", D("0.1"), prices)
    accounts.settle(r, Usage(0, 10, 10))  # admitted before the revoke: still billed
    assert accounts.audit() == []


def test_reserve_holds_and_refuses_what_the_balance_cannot_cover(accounts, prices):
    key, _ = accounts.create_key("alice", "1.00")
    r1 = accounts.reserve(key, "r1", D("0.60"), prices)
    k = accounts.get_key("alice")
    assert (k.balance, k.held, k.available) == (D("1"), D("0.6"), D("0.4"))
    with pytest.raises(InsufficientBalance) as e:
        accounts.reserve(key, "r2", D("0.50"), prices)
    assert "balance 1.00 (0.60 held by requests in flight, available 0.40)" in str(e.value)
    assert "needs up to 0.50" in str(e.value)
    assert (e.value.available, e.value.needed) == (D("0.4"), D("0.5"))
    accounts.reserve(key, "r3", D("0.40"), prices)  # exactly the rest is fine
    assert accounts.get_key("alice").available == 0
    accounts.release(r1)
    assert accounts.get_key("alice").available == D("0.6") and accounts.audit() == []


def test_settle_writes_one_row_and_debits_once(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    hold = max_request_cost(prices, prompt_tokens=1000, max_tokens=500)
    r = accounts.reserve(key, "req-1", hold, prices, model="demo")
    usage = Usage(cache_hit_tokens=800, cache_miss_tokens=200, output_tokens=123)
    row = accounts.settle(r, usage)
    expected = request_cost(prices, 800, 200, 123)
    assert row.amount == expected == D("0.000526")  # (800*0.1 + 200*1 + 123*2) / 1e6
    assert (row.request_id, row.model, row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens) \
        == ("req-1", "demo", 800, 200, 123)
    assert (row.price_input_hit, row.price_input_miss, row.price_output) == (D("0.1"), D("1"), D("2"))
    k = accounts.get_key("alice")
    assert k.balance == 1 - expected and k.held == 0
    with pytest.raises(NotReserved, match="already settled"):
        accounts.settle(r, usage)
    with pytest.raises(NotReserved):
        accounts.release(r)
    with pytest.raises(DuplicateRequest, match="already billed"):
        accounts.reserve(key, "req-1", hold, prices)
    assert accounts.get_key("alice").balance == 1 - expected
    assert len(accounts.ledger(key)) == 1 and accounts.ledger_row("req-1") == row
    assert accounts.audit() == []


def test_release_and_reuse_of_open_request_ids(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    r = accounts.reserve(key, "req-1", D("0.1"), prices)
    with pytest.raises(DuplicateRequest, match="already holds"):
        accounts.reserve(key, "req-1", D("0.1"), prices)
    assert accounts.get_key("alice").held == D("0.1")  # the refused duplicate held nothing
    accounts.release(r)
    with pytest.raises(NotReserved, match="no open reservation"):
        accounts.settle(r, Usage(0, 1, 1))
    assert accounts.ledger() == [] and accounts.get_key("alice").balance == 1


def test_charge_never_exceeds_the_reservation(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    r = accounts.reserve(key, "req", max_request_cost(prices, 10, 10), prices)
    row = accounts.settle(r, Usage(0, 10_000, 10_000))  # far more than was reserved for
    assert row.amount == r.amount == D("0.00003")
    assert accounts.get_key("alice").balance == 1 - r.amount and accounts.audit() == []


def test_restart_keeps_balances_and_ledger_and_settles_only_dead_holds(db_url, prices):
    acc = Accounts(db_url)
    key, secret = acc.create_key("alice", "2")
    acc.settle(acc.reserve(key, "done", D("0.5"), prices), Usage(100, 100, 100))
    acc.reserve(key, "in-flight", D("0.7"), prices)  # the server "crashes" holding this
    before, ledger_before = acc.get_key("alice"), acc.ledger()
    dead = acc.instance_id
    acc.close()

    acc = Accounts(db_url)  # restart: schema already there, nothing recreated
    assert acc.authenticate(secret).id == key.id
    assert acc.ledger() == ledger_before and acc.get_key("alice") == before
    assert acc.settle_orphans().released == 0  # its lease has not expired: it may still be alive
    expire_lease(acc, dead)
    report = acc.settle_orphans()
    assert (report.released, report.settled, report.instances) == (1, 0, 1)
    k = acc.get_key("alice")
    assert k.held == 0 and k.balance == before.balance and acc.audit() == []
    with acc.engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]
    acc.close()


def expire_lease(acc: Accounts, instance_id: str) -> None:
    """What the clock does to a server that stopped renewing: its lease lies in the past."""
    from datetime import timedelta

    from nanoseek.serve.db import leases, utcnow

    with acc.engine.begin() as conn:
        assert conn.execute(leases.update().where(leases.c.instance_id == instance_id)
                            .values(expires_at=utcnow() - timedelta(seconds=1))).rowcount == 1


def test_newer_schema_is_refused(db_url):
    acc = Accounts(db_url)
    with acc.engine.begin() as conn:
        conn.execute(update(schema_version).values(version=SCHEMA_VERSION + 98))
    acc.close()
    with pytest.raises(SchemaError, match=f"version {SCHEMA_VERSION + 98} is newer"):
        Accounts(db_url)


def test_database_refuses_a_negative_balance_even_if_code_tried(accounts):
    key, _ = accounts.create_key("alice", "1")
    with pytest.raises(Exception, match="(?i)check"):
        with accounts.engine.begin() as conn:
            conn.execute(text("UPDATE api_keys SET balance = -1 WHERE id = :id"), {"id": key.id})
    assert accounts.get_key("alice").balance == 1


def _run_threads(n, target):
    barrier = threading.Barrier(n)
    errors = []

    def run(i):
        try:
            barrier.wait()
            target(i)
        except Exception as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors


def test_concurrent_reservations_cannot_overdraw(accounts, prices):
    key, _ = accounts.create_key("alice", "0.5")
    won, refused = [], []

    def grab(i):
        try:
            won.append(accounts.reserve(key, f"r{i}", D("0.1"), prices))
        except InsufficientBalance:
            refused.append(i)

    _run_threads(12, grab)
    assert len(won) == 5 and len(refused) == 7
    assert accounts.get_key("alice").available == 0 and accounts.audit() == []


def test_concurrent_settles_of_one_request_bill_it_once(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    r = accounts.reserve(key, "once", D("0.5"), prices)
    rows, refused = [], []

    def settle(i):
        try:
            rows.append(accounts.settle(r, Usage(0, 1000, 1000)))
        except NotReserved:
            refused.append(i)

    _run_threads(8, settle)
    assert len(rows) == 1 and len(refused) == 7
    assert len(accounts.ledger()) == 1
    assert accounts.get_key("alice").balance == 1 - rows[0].amount and accounts.audit() == []


def test_ledger_matches_balances_under_concurrent_traffic(accounts, prices):
    initial = {"a": D("0.02"), "b": D("0.05"), "c": D("1")}
    keys = {name: accounts.create_key(name, bal)[0] for name, bal in initial.items()}
    settled, refused = [], []
    lock = threading.Lock()

    def client(i):
        rng = random.Random(i)
        for j in range(15):
            key = keys[rng.choice("abc")]
            prompt, max_tokens = rng.randint(1, 4000), rng.randint(1, 4000)
            try:
                r = accounts.reserve(key, f"t{i}-{j}", max_request_cost(prices, prompt, max_tokens), prices)
            except InsufficientBalance:
                with lock:
                    refused.append(key.name)
                continue
            if rng.random() < 0.2:
                accounts.release(r)
                continue
            hit = rng.randint(0, prompt)
            row = accounts.settle(r, Usage(hit, prompt - hit, rng.randint(0, max_tokens)))
            with lock:
                settled.append(row)

    _run_threads(8, client)
    assert settled and refused, "the traffic should both bill requests and hit empty balances"
    assert accounts.audit() == []
    ledger = accounts.ledger()
    assert sorted(r.request_id for r in ledger) == sorted(r.request_id for r in settled)
    for name, key in keys.items():
        k = accounts.get_key(name)
        spent = sum((r.amount for r in ledger if r.key_id == key.id), D(0))
        assert k.balance == initial[name] - spent and k.held == 0 and k.balance >= 0


def test_audit_reports_a_balance_that_disagrees_with_the_ledger(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    accounts.settle(accounts.reserve(key, "r", D("0.1"), prices), Usage(0, 100, 100))
    assert accounts.audit() == []
    with accounts.engine.begin() as conn:  # a write that bypasses the accounts API
        conn.execute(text("UPDATE api_keys SET balance = balance + 1 WHERE id = :id"), {"id": key.id})
    problems = accounts.audit()
    assert len(problems) == 1 and "'alice'" in problems[0] and "top-ups - ledger" in problems[0]


def test_postgres_half_fails_in_ci_without_a_server(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_TEST_PG_URL"}
    env["CI"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_newer_schema_is_refused"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    bad = [line for line in done.stdout.splitlines() if line.startswith(("ERROR", "FAILED"))]
    assert len(bad) == 1 and "[postgresql]" in bad[0] and "NANOSEEK_TEST_PG_URL is not" in bad[0]


def test_a_failed_settle_changes_nothing(accounts, prices):
    key, _ = accounts.create_key("alice", "1")
    r = accounts.reserve(key, "reused", D("0.2"), prices)
    with accounts.engine.begin() as conn:  # another writer billed the same id behind our back
        conn.execute(text("INSERT INTO ledger (key_id, request_id, model, cache_hit_tokens, "
                          "cache_miss_tokens, output_tokens, price_input_hit, price_input_miss, "
                          "price_output, amount, created_at) VALUES (:k, 'reused', '', 0, 0, 0, 0, 0, 0, 0, "
                          ":t)"), {"k": key.id, "t": "2026-01-01 00:00:00"})
    with pytest.raises(DuplicateRequest, match="'reused' was already billed"):
        accounts.settle(r, Usage(0, 100, 100))
    k = accounts.get_key("alice")  # the ledger insert failed, so neither debit nor release happened
    assert (k.balance, k.held) == (D(1), D("0.2"))


def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path, prices):
    acc = Accounts(f"sqlite:///{tmp_path / 'a.db'}")
    key, secret = acc.create_key("alice", "1")
    with acc.engine.begin() as writer:  # BEGIN IMMEDIATE: holds the write lock for the block
        writer.execute(update(api_keys).values(name="renamed"))
        # a reader that took the write lock too would block here (busy timeout) and then fail
        assert acc.authenticate(secret).name == "alice"  # sees the last committed state
        assert acc.get_key("alice").balance == 1 and acc.audit() == []
    assert acc.get_key("renamed").id == key.id
    acc.close()


def test_a_key_named_like_another_keys_id_is_refused_as_ambiguous(accounts):
    first, _ = accounts.create_key("alice", "1")            # id 1 on a fresh database
    named, _ = accounts.create_key(str(first.id), "2")      # a key named "1"
    with pytest.raises(AccountsError, match=f"ambiguous.*--id {first.id} or --name {first.id}"):
        accounts.topup(str(first.id), "1")
    assert accounts.topup(str(first.id), "1", by="id").id == first.id
    assert accounts.topup(str(first.id), "1", by="name").id == named.id
    assert accounts.get_key(first.id).balance == 2 and accounts.get_key(named.id).balance == 3
    assert accounts.get_key(str(named.id)).id == named.id    # digits that name no key: an id
    with pytest.raises(KeyNotFound, match="no API key named '99'"):
        accounts.get_key("99", by="name")
    with pytest.raises(KeyNotFound, match="key id 'alice' is not a number"):
        accounts.get_key("alice", by="id")
    assert accounts.audit() == []


def test_sqlite_file_is_created_private(tmp_path):
    import stat

    path = tmp_path / "sub" / "accounts.db"
    acc = Accounts(str(path))
    acc.create_key("alice", "1")  # writes through the WAL, which takes the file's mode
    for f in [path] + [p for p in path.parent.iterdir() if p.name.startswith("accounts.db-")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    acc.close()


def test_a_schema_1_database_is_migrated_and_its_holds_become_orphans(tmp_path, prices):
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # the tables as schema 1 made them
        for ddl in SCHEMA_1:
            conn.execute(text(ddl))
        conn.execute(text("INSERT INTO schema_version VALUES (1, '2026-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO api_keys VALUES (1, 'alice', 'h', 'sk-', 1000000000, 100000000, "
                          "'2026-01-01 00:00:00', NULL)"))
        conn.execute(text("INSERT INTO topups VALUES (1, 1, 1000000000, '', '2026-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO holds VALUES ('old', 1, 100000000, '2026-01-01 00:00:00')"))
    engine.dispose()
    acc = Accounts(url)
    with acc.engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version).order_by(schema_version.c.version)
                            ).scalars().all() == [1, SCHEMA_VERSION]
    assert acc.audit() == [] and acc.get_key("alice").held == D("0.1")
    assert acc.settle_orphans().released == 1 and acc.get_key("alice").held == 0
    r = acc.reserve(1, "new", D("0.1"), prices)
    assert acc.record_progress(r, Usage(0, 1, 1)) and acc.settle(r, Usage(0, 1, 2)).output_tokens == 2
    assert acc.audit() == []
    acc.close()


SCHEMA_1 = [
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME NOT NULL)",
    "CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name VARCHAR(64) NOT NULL UNIQUE, key_hash VARCHAR(64) "
    "NOT NULL UNIQUE, key_prefix VARCHAR(16) NOT NULL, balance BIGINT NOT NULL, held BIGINT NOT NULL, "
    "created_at DATETIME NOT NULL, revoked_at DATETIME)",
    "CREATE TABLE holds (request_id VARCHAR(128) PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES api_keys(id), "
    "amount BIGINT NOT NULL, created_at DATETIME NOT NULL)",
    "CREATE TABLE ledger (id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES api_keys(id), "
    "request_id VARCHAR(128) NOT NULL UNIQUE, model VARCHAR(128) NOT NULL, cache_hit_tokens INTEGER NOT NULL, "
    "cache_miss_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, price_input_hit BIGINT NOT NULL, "
    "price_input_miss BIGINT NOT NULL, price_output BIGINT NOT NULL, amount BIGINT NOT NULL, "
    "created_at DATETIME NOT NULL)",
    "CREATE TABLE topups (id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES api_keys(id), "
    "amount BIGINT NOT NULL, note VARCHAR(256) NOT NULL, created_at DATETIME NOT NULL)",
]
