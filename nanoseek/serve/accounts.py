"""API keys, balances and the ledger: the accounts the API bills against.

    from decimal import Decimal
    from nanoseek.serve.accounts import Accounts, Usage

    acc = Accounts("runs/nanoseek.db")          # or "postgresql+psycopg://user@host/db"
    key, secret = acc.create_key("alice", Decimal("10"))
    key = acc.authenticate(secret)              # Key, or None for unknown/revoked tokens
    r = acc.reserve(key, "req-1", max_cost=Decimal("0.02"), prices=sheet.prices)  # or InsufficientBalance
    row = acc.settle(r, Usage(cache_hit_tokens=0, cache_miss_tokens=12, output_tokens=30))
    acc.release(r)                              # instead of settle, when nothing was produced

Secrets are "sk-" + 256 random bits; only their sha256 is stored, compared in constant time.
A reservation moves `max_cost` into the key's `held` in one atomic UPDATE guarded by
`balance - held >= max_cost`, so concurrent requests cannot together overdraw a key. `settle`
deletes the hold, writes the ledger row and debits the balance in ONE transaction; the hold row
is the token for that, so a second settle of the same request finds no hold and charges nothing
(the UNIQUE request_id of the ledger is the backstop). A request is never charged more than it
reserved. Invariants, checked by `audit()`: balance = topups - ledger, held = sum(open holds),
0 <= held <= balance.

Holds live in the database, not in memory, and belong to the server instance that took them
(`instance_id`), which keeps a lease on the ledger (leases.py). A server records a request's
usage on its hold as it goes (`record_progress`). When a server dies, the others (or its own
restart) find its lease expired and settle each of its holds at the last recorded usage, or
release it when nothing was recorded (`settle_orphans`). A live server's holds are never touched.

The value types, errors and input checks live in account_types.py and are re-exported here.
"""

from __future__ import annotations

import hmac
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.exc import IntegrityError

from . import leases as lease
from .account_types import (  # noqa: F401 (all re-exported: callers import them from here)
    MAX_AMOUNT, MAX_NAME, MAX_REQUEST_ID, SECRET_HEX_CHARS, SECRET_PREFIX, AccountsError, DuplicateRequest,
    InsufficientBalance, Key, KeyNotFound, KeyRef, KeyRevoked, LedgerRow, NotReserved, OrphanReport, Reservation,
    Usage, hash_secret, new_secret, parse_amount)
from .db import DEFAULT_DB, api_keys, holds, ledger, leases, money, open_engine, read_only, topups, utcnow
from .pricing import UnitPrices, request_cost

def _key(row) -> Key:
    return Key(row.id, row.name, row.key_prefix, row.balance, row.held, row.created_at, row.revoked_at)


def _ledger_row(row) -> LedgerRow:
    return LedgerRow(row.id, row.key_id, row.request_id, row.model, row.cache_hit_tokens,
                     row.cache_miss_tokens, row.output_tokens, row.price_input_hit,
                     row.price_input_miss, row.price_output, row.amount, row.created_at)


class Accounts:
    """Keys, holds and the ledger over one SQLAlchemy engine; safe to share between threads."""

    def __init__(self, url: str | Engine = DEFAULT_DB, *, instance_id: str | None = None,
                 lease_ttl_s: float = lease.DEFAULT_TTL_S):
        self.engine = url if isinstance(url, Engine) else open_engine(url)
        # the holds this object takes belong to this instance; its lease is taken at the first
        # reservation (or by a LeaseKeeper) and lives lease_ttl_s after each renewal
        self.instance_id = instance_id or uuid.uuid4().hex
        self.lease_ttl_s = lease_ttl_s

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str, balance: Any = 0, note: str = "initial balance") -> tuple[Key, str]:
        """A new key with its secret; the secret is shown here once and never stored."""
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise AccountsError(f"key name {name!r} must be 1..{MAX_NAME} characters")
        amount = parse_amount(balance, "balance")
        secret = new_secret()
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                key_id = conn.execute(api_keys.insert().values(
                    name=name, key_hash=hash_secret(secret), key_prefix=secret[:10], balance=amount,
                    held=Decimal(0), created_at=now, revoked_at=None)).inserted_primary_key[0]
                if amount > 0:
                    conn.execute(topups.insert().values(key_id=key_id, amount=amount, note=note,
                                                        created_at=now))
        except IntegrityError:
            raise AccountsError(f"a key named {name!r} already exists") from None
        return self.get_key(key_id), secret

    def get_key(self, ref: KeyRef, by: str | None = None) -> Key:
        """The key `ref` names: an int or by="id" is an id, by="name" a name; a string otherwise is
        a name, or an id when it is digits that name no key, and refused when it could be both."""
        with read_only(self.engine.connect()) as conn:
            return _key(self._find(conn, ref, by))

    def list_keys(self) -> list[Key]:
        with read_only(self.engine.connect()) as conn:
            return [_key(r) for r in conn.execute(select(api_keys).order_by(api_keys.c.id))]

    def _find(self, conn, ref: KeyRef, by: str | None = None, lock: bool = False):
        if isinstance(ref, Key):
            ref, by = ref.id, "id"
        if by not in (None, "id", "name"):
            raise ValueError(f"by={by!r}: expected 'id', 'name' or None")
        text = str(ref).strip()
        as_id = by == "id" or (by is None and (isinstance(ref, int) or text.isdigit()))
        as_name = by == "name" or (by is None and not isinstance(ref, int))
        if as_id and not text.isdigit():
            raise KeyNotFound(f"key id {ref!r} is not a number")
        conds = ([api_keys.c.id == int(text)] if as_id else []) + ([api_keys.c.name == text] if as_name else [])
        q = select(api_keys).where(or_(*conds)).order_by(api_keys.c.id)
        rows = conn.execute(q.with_for_update() if lock else q).all()
        if not rows:
            what = {"id": "with id", "name": "named"}.get(by, "named or numbered")
            raise KeyNotFound(f"no API key {what} {ref!r}")
        if len(rows) > 1:
            raise AccountsError(f"{ref!r} is ambiguous: key id {text} is {rows[0].name!r} but another key is "
                                f"named {text!r}; say which (--id {text} or --name {text})")
        return rows[0]

    def topup(self, ref: KeyRef, amount: Any, note: str = "top-up", by: str | None = None) -> Key:
        amount = parse_amount(amount, "amount", positive=True)
        with self.engine.begin() as conn:
            row = self._find(conn, ref, by, lock=True)
            if row.balance + amount > MAX_AMOUNT:
                raise AccountsError(f"balance {row.balance} + {amount} would exceed {MAX_AMOUNT}")
            conn.execute(api_keys.update().where(api_keys.c.id == row.id)
                         .values(balance=api_keys.c.balance + money(amount)))
            conn.execute(topups.insert().values(key_id=row.id, amount=amount, note=note,
                                                created_at=utcnow()))
        return self.get_key(row.id)

    def revoke(self, ref: KeyRef, by: str | None = None) -> Key:
        """Stops the key authenticating; requests already admitted still settle."""
        with self.engine.begin() as conn:
            row = self._find(conn, ref, by, lock=True)
            if row.revoked_at is None:
                conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(revoked_at=utcnow()))
        return self.get_key(row.id)

    def authenticate(self, bearer_token: str | None) -> Key | None:
        """The active key whose secret this is, else None. Accepts "Bearer sk-..." or the bare secret."""
        if not bearer_token:
            return None
        token = bearer_token.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not token.startswith(SECRET_PREFIX) or len(token) != len(SECRET_PREFIX) + SECRET_HEX_CHARS:
            return None
        digest = hash_secret(token)
        with read_only(self.engine.connect()) as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return _key(row)

    # ------------------------------------------------------------------ billing
    def reserve(self, key: Key | int, request_id: str, max_cost: Any, prices: UnitPrices,
                model: str = "") -> Reservation:
        """Hold max_cost of the key's balance for this request, or raise InsufficientBalance."""
        key_id = key.id if isinstance(key, Key) else key
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID:
            raise AccountsError(f"request_id {request_id!r} must be 1..{MAX_REQUEST_ID} characters")
        amount = parse_amount(max_cost, "max_cost")
        now = utcnow()
        with self.engine.begin() as conn:
            if conn.execute(select(ledger.c.id).where(ledger.c.request_id == request_id)).first():
                raise DuplicateRequest(f"request {request_id!r} was already billed")
            # the lease first: a reaper locks leases before keys, so this order cannot deadlock with it
            lease.ensure_live(conn, self.instance_id, self.lease_ttl_s, now)
            # one atomic statement: the check and the hold cannot be split by another request
            taken = conn.execute(
                api_keys.update()
                .where(and_(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None),
                            api_keys.c.balance >= api_keys.c.held + money(amount)))
                .values(held=api_keys.c.held + money(amount))).rowcount
            if taken != 1:
                row = self._find(conn, key_id)
                if row.revoked_at is not None:
                    raise KeyRevoked(f"API key {row.name!r} was revoked at {row.revoked_at.isoformat()}")
                raise InsufficientBalance(row.name, row.balance, row.held, amount)
            try:  # on failure the transaction, and with it the hold above, rolls back
                conn.execute(holds.insert().values(
                    request_id=request_id, key_id=key_id, amount=amount, created_at=now,
                    instance_id=self.instance_id, model=model, price_input_hit=prices.input_hit,
                    price_input_miss=prices.input_miss, price_output=prices.output))
            except IntegrityError:
                raise DuplicateRequest(f"request {request_id!r} already holds a reservation") from None
        return Reservation(key_id, request_id, amount, prices, model)

    def record_progress(self, reservation: Reservation, usage: Usage) -> bool:
        """Write the usage so far onto the hold, so that if this server dies the request is settled
        at it. False when the hold is gone (settled, released, or taken as an orphan)."""
        r = reservation
        with self.engine.begin() as conn:
            return conn.execute(holds.update().where(and_(
                holds.c.request_id == r.request_id, holds.c.key_id == r.key_id,
                holds.c.instance_id == self.instance_id, holds.c.output_tokens <= usage.output_tokens))
                .values(cache_hit_tokens=usage.cache_hit_tokens, cache_miss_tokens=usage.cache_miss_tokens,
                        output_tokens=usage.output_tokens, progress_at=utcnow())).rowcount == 1

    def settle(self, reservation: Reservation, usage: Usage) -> LedgerRow:
        """Bill the request: ledger row + debit + hold released, in one transaction."""
        r = reservation
        with self.engine.begin() as conn:
            hold = self._take_hold(conn, r)
            row_id = self._bill(conn, hold, r.prices, r.model, usage)
            return _ledger_row(conn.execute(select(ledger).where(ledger.c.id == row_id)).one())

    @staticmethod
    def _bill(conn, hold, prices: UnitPrices, model: str, usage: Usage) -> int:
        """Ledger row + debit for a hold already taken; the hold's amount is the ceiling the client
        agreed to. Returns the ledger row's id."""
        cost = request_cost(prices, usage.cache_hit_tokens, usage.cache_miss_tokens, usage.output_tokens)
        amount = min(cost, hold.amount)
        try:
            row_id = conn.execute(ledger.insert().values(
                key_id=hold.key_id, request_id=hold.request_id, model=model,
                cache_hit_tokens=usage.cache_hit_tokens, cache_miss_tokens=usage.cache_miss_tokens,
                output_tokens=usage.output_tokens, price_input_hit=prices.input_hit,
                price_input_miss=prices.input_miss, price_output=prices.output,
                amount=amount, created_at=utcnow())).inserted_primary_key[0]
        except IntegrityError:  # only reachable when a request id was reused; rolls back
            raise DuplicateRequest(f"request {hold.request_id!r} was already billed") from None
        conn.execute(api_keys.update().where(api_keys.c.id == hold.key_id).values(
            balance=api_keys.c.balance - money(amount), held=api_keys.c.held - money(hold.amount)))
        return row_id

    def release(self, reservation: Reservation) -> None:
        """Give the hold back without charging (the request failed before producing anything)."""
        with self.engine.begin() as conn:
            hold = self._take_hold(conn, reservation)
            conn.execute(api_keys.update().where(api_keys.c.id == reservation.key_id)
                         .values(held=api_keys.c.held - money(hold.amount)))

    def _take_hold(self, conn, r: Reservation):
        """Lock and delete the request's hold; whoever deletes it is the only one to bill it."""
        hold = conn.execute(select(holds).where(and_(holds.c.request_id == r.request_id,
                                                     holds.c.key_id == r.key_id))
                            .with_for_update()).first()
        gone = hold is None or conn.execute(
            holds.delete().where(holds.c.request_id == r.request_id)).rowcount != 1
        if gone:
            billed = conn.execute(select(ledger.c.id).where(ledger.c.request_id == r.request_id)).first()
            state = ("was already settled (by this server, or by another at its recorded progress)" if billed
                     else "has no open reservation (released, or released as an orphan)")
            raise NotReserved(f"request {r.request_id!r} {state}; nothing charged now")
        return hold

    # ------------------------------------------------------------------ leases and orphans
    def renew_lease(self, ttl_s: float | None = None) -> bool:
        """Extend this instance's lease (LeaseKeeper calls it); False when it had ended."""
        if ttl_s is not None:
            self.lease_ttl_s = ttl_s
        with self.engine.begin() as conn:
            return lease.renew(conn, self.instance_id, self.lease_ttl_s, utcnow())

    def end_lease(self) -> OrphanReport:
        """Clean shutdown: expire the lease and settle what this instance still holds."""
        with self.engine.begin() as conn:
            lease.expire(conn, self.instance_id, utcnow())
        return self.settle_orphans()

    def settle_orphans(self) -> OrphanReport:
        """Settle every hold no live lease covers (its server died, or it predates leases) at its
        recorded usage, or release it when nothing was recorded; end the dead leases."""
        now = utcnow()
        with read_only(self.engine.connect()) as conn:  # the common case: nothing to do, no write lock
            if not lease.anything_to_settle(conn, now):
                return OrphanReport()
        settled = released = tokens = 0
        with self.engine.begin() as conn:
            dead = lease.dead_instances(conn, now)  # locked: their servers cannot add holds meanwhile
            for h in conn.execute(select(holds).where(lease.orphaned(now)).order_by(holds.c.key_id)
                                  .with_for_update()).all():
                if conn.execute(holds.delete().where(holds.c.request_id == h.request_id)).rowcount != 1:
                    continue
                if h.output_tokens > 0 and h.price_output is not None:
                    prices = UnitPrices(h.price_input_hit, h.price_input_miss, h.price_output)
                    self._bill(conn, h, prices, h.model,
                               Usage(h.cache_hit_tokens, h.cache_miss_tokens, h.output_tokens))
                    settled, tokens = settled + 1, tokens + h.output_tokens
                else:
                    conn.execute(api_keys.update().where(api_keys.c.id == h.key_id)
                                 .values(held=api_keys.c.held - money(h.amount)))
                    released += 1
            if dead:
                conn.execute(leases.delete().where(and_(leases.c.instance_id.in_(dead),
                                                        leases.c.expires_at < now)))
        return OrphanReport(settled, released, len(dead), tokens)

    # ------------------------------------------------------------------ reading
    def ledger(self, key: Key | int | None = None, limit: int | None = None) -> list[LedgerRow]:
        q = select(ledger).order_by(ledger.c.id)
        if key is not None:
            q = q.where(ledger.c.key_id == (key.id if isinstance(key, Key) else key))
        if limit is not None:
            q = q.limit(limit)
        with read_only(self.engine.connect()) as conn:
            return [_ledger_row(r) for r in conn.execute(q)]

    def ledger_row(self, request_id: str) -> LedgerRow | None:
        with read_only(self.engine.connect()) as conn:
            row = conn.execute(select(ledger).where(ledger.c.request_id == request_id)).first()
        return None if row is None else _ledger_row(row)

    def audit(self) -> list[str]:
        """Every way the balances disagree with top-ups, ledger and holds; [] when consistent."""
        def sums(table):
            q = select(table.c.key_id, func.sum(table.c.amount)).group_by(table.c.key_id)
            return {k: v for k, v in conn.execute(q)}

        problems = []
        with read_only(self.engine.connect()) as conn:
            credited, charged, held = sums(topups), sums(ledger), sums(holds)
            for k in conn.execute(select(api_keys).order_by(api_keys.c.id)):
                expect = credited.get(k.id, Decimal(0)) - charged.get(k.id, Decimal(0))
                if k.balance != expect:
                    problems.append(f"key {k.name!r}: balance {k.balance} != top-ups - ledger = {expect}")
                if k.held != held.get(k.id, Decimal(0)):
                    problems.append(f"key {k.name!r}: held {k.held} != open holds {held.get(k.id, 0)}")
                if k.balance < 0 or k.held < 0 or k.held > k.balance:
                    problems.append(f"key {k.name!r}: balance {k.balance}, held {k.held} out of range")
        return problems
