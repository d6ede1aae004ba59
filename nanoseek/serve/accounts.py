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

Holds live in the database, not in memory. A crashed server leaves its holds behind; the app
calls `release_stale_holds()` at start (all holds, for a single server; with several replicas
on one PostgreSQL, pass a max_age longer than the longest request).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, and_, func, literal, select
from sqlalchemy.exc import IntegrityError

from .db import DEFAULT_DB, Money, api_keys, holds, ledger, open_engine, read_only, topups, utcnow
from .pricing import MONEY_PLACES, UnitPrices, format_money, request_cost, to_decimal

SECRET_PREFIX = "sk-"
SECRET_HEX_CHARS = 64            # 256 bits of entropy
MAX_AMOUNT = Decimal(10) ** 9    # a sanity cap on one balance/top-up, far above any real one
MAX_NAME = 64
MAX_REQUEST_ID = 128


class AccountsError(ValueError):
    """Bad input to the accounts (an amount, a name, an unknown key)."""


class KeyNotFound(AccountsError):
    pass


class KeyRevoked(AccountsError):
    pass


class InsufficientBalance(AccountsError):
    """HTTP 402: the key's available balance cannot cover the request's maximum cost."""

    def __init__(self, key_name: str, balance: Decimal, held: Decimal, needed: Decimal):
        self.balance, self.held, self.needed = balance, held, needed
        self.available = balance - held
        super().__init__(f"insufficient balance on key {key_name!r}: balance {format_money(balance)} "
                         f"({format_money(held)} held by requests in flight, available "
                         f"{format_money(self.available)}); this request needs up to {format_money(needed)}")


class DuplicateRequest(AccountsError):
    """The request id was already reserved or billed."""


class NotReserved(AccountsError):
    """No open hold for this request: already settled, released, or released as stale."""


@dataclass(frozen=True)
class Key:
    id: int
    name: str
    key_prefix: str
    balance: Decimal
    held: Decimal
    created_at: datetime
    revoked_at: datetime | None

    @property
    def available(self) -> Decimal:
        return self.balance - self.held

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Reservation:
    key_id: int
    request_id: str
    amount: Decimal          # the hold: the most this request may be charged
    prices: UnitPrices       # the prices in force when the request was admitted
    model: str = ""


@dataclass(frozen=True)
class Usage:
    cache_hit_tokens: int
    cache_miss_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LedgerRow:
    id: int
    key_id: int
    request_id: str
    model: str
    cache_hit_tokens: int
    cache_miss_tokens: int
    output_tokens: int
    price_input_hit: Decimal
    price_input_miss: Decimal
    price_output: Decimal
    amount: Decimal
    created_at: datetime


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_hex(SECRET_HEX_CHARS // 2)


def parse_amount(value: Any, name: str = "amount", *, positive: bool = False) -> Decimal:
    """An exact money amount: finite, >= 0 (> 0 if positive), at most MONEY_PLACES decimals."""
    try:
        d = to_decimal(value, name)
    except ValueError as e:
        raise AccountsError(str(e)) from None
    if d < 0 or (positive and d == 0):
        raise AccountsError(f"{name}={value} must be {'> 0' if positive else '>= 0'}")
    if d > MAX_AMOUNT:
        raise AccountsError(f"{name}={value} exceeds the limit of {MAX_AMOUNT}")
    if d != d.quantize(Decimal(1).scaleb(-MONEY_PLACES), rounding="ROUND_DOWN"):
        raise AccountsError(f"{name}={value} has more than {MONEY_PLACES} decimal places")
    return d


def _money(amount: Decimal):
    # explicit type: arithmetic on Money columns yields plain BigInteger expressions, which would
    # bind a Decimal unscaled (0.5 instead of 500000000 units) in a comparison
    return literal(amount, type_=Money)


def _key(row) -> Key:
    return Key(row.id, row.name, row.key_prefix, row.balance, row.held, row.created_at, row.revoked_at)


def _ledger_row(row) -> LedgerRow:
    return LedgerRow(row.id, row.key_id, row.request_id, row.model, row.cache_hit_tokens,
                     row.cache_miss_tokens, row.output_tokens, row.price_input_hit,
                     row.price_input_miss, row.price_output, row.amount, row.created_at)


class Accounts:
    """Keys, holds and the ledger over one SQLAlchemy engine; safe to share between threads."""

    def __init__(self, url: str | Engine = DEFAULT_DB):
        self.engine = url if isinstance(url, Engine) else open_engine(url)

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

    def get_key(self, name_or_id: str | int) -> Key:
        with read_only(self.engine.connect()) as conn:
            return _key(self._find(conn, name_or_id))

    def list_keys(self) -> list[Key]:
        with read_only(self.engine.connect()) as conn:
            return [_key(r) for r in conn.execute(select(api_keys).order_by(api_keys.c.id))]

    def _find(self, conn, name_or_id: str | int, lock: bool = False):
        q = select(api_keys)
        if isinstance(name_or_id, int):
            cond = api_keys.c.id == name_or_id
        elif name_or_id.isdigit():  # a name made of digits still wins over an id
            cond = (api_keys.c.name == name_or_id) | (api_keys.c.id == int(name_or_id))
        else:
            cond = api_keys.c.name == name_or_id
        q = q.where(cond).order_by((api_keys.c.name == str(name_or_id)).desc()).limit(1)
        row = conn.execute(q.with_for_update() if lock else q).first()
        if row is None:
            raise KeyNotFound(f"no API key named or numbered {name_or_id!r}")
        return row

    def topup(self, name_or_id: str | int, amount: Any, note: str = "top-up") -> Key:
        amount = parse_amount(amount, "amount", positive=True)
        with self.engine.begin() as conn:
            row = self._find(conn, name_or_id, lock=True)
            if row.balance + amount > MAX_AMOUNT:
                raise AccountsError(f"balance {row.balance} + {amount} would exceed {MAX_AMOUNT}")
            conn.execute(api_keys.update().where(api_keys.c.id == row.id)
                         .values(balance=api_keys.c.balance + _money(amount)))
            conn.execute(topups.insert().values(key_id=row.id, amount=amount, note=note,
                                                created_at=utcnow()))
        return self.get_key(row.id)

    def revoke(self, name_or_id: str | int) -> Key:
        """Stops the key authenticating; requests already admitted still settle."""
        with self.engine.begin() as conn:
            row = self._find(conn, name_or_id, lock=True)
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
        with self.engine.begin() as conn:
            if conn.execute(select(ledger.c.id).where(ledger.c.request_id == request_id)).first():
                raise DuplicateRequest(f"request {request_id!r} was already billed")
            # one atomic statement: the check and the hold cannot be split by another request
            taken = conn.execute(
                api_keys.update()
                .where(and_(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None),
                            api_keys.c.balance >= api_keys.c.held + _money(amount)))
                .values(held=api_keys.c.held + _money(amount))).rowcount
            if taken != 1:
                row = self._find(conn, key_id)
                if row.revoked_at is not None:
                    raise KeyRevoked(f"API key {row.name!r} was revoked at {row.revoked_at.isoformat()}")
                raise InsufficientBalance(row.name, row.balance, row.held, amount)
            try:  # on failure the transaction, and with it the hold above, rolls back
                conn.execute(holds.insert().values(request_id=request_id, key_id=key_id,
                                                   amount=amount, created_at=utcnow()))
            except IntegrityError:
                raise DuplicateRequest(f"request {request_id!r} already holds a reservation") from None
        return Reservation(key_id, request_id, amount, prices, model)

    def settle(self, reservation: Reservation, usage: Usage) -> LedgerRow:
        """Bill the request: ledger row + debit + hold released, in one transaction."""
        r = reservation
        cost = request_cost(r.prices, usage.cache_hit_tokens, usage.cache_miss_tokens, usage.output_tokens)
        with self.engine.begin() as conn:
            hold = self._take_hold(conn, r)
            amount = min(cost, hold.amount)  # the reservation is the ceiling the client agreed to
            try:
                row_id = self._insert_ledger(conn, r, usage, amount)
            except IntegrityError:  # only reachable when a request id was reused; rolls back
                raise DuplicateRequest(f"request {r.request_id!r} was already billed") from None
            conn.execute(api_keys.update().where(api_keys.c.id == r.key_id).values(
                balance=api_keys.c.balance - _money(amount), held=api_keys.c.held - _money(hold.amount)))
            return _ledger_row(conn.execute(select(ledger).where(ledger.c.id == row_id)).one())

    @staticmethod
    def _insert_ledger(conn, r: Reservation, usage: Usage, amount: Decimal) -> int:
        return conn.execute(ledger.insert().values(
                key_id=r.key_id, request_id=r.request_id, model=r.model,
                cache_hit_tokens=usage.cache_hit_tokens, cache_miss_tokens=usage.cache_miss_tokens,
                output_tokens=usage.output_tokens, price_input_hit=r.prices.input_hit,
                price_input_miss=r.prices.input_miss, price_output=r.prices.output,
            amount=amount, created_at=utcnow())).inserted_primary_key[0]

    def release(self, reservation: Reservation) -> None:
        """Give the hold back without charging (the request failed before producing anything)."""
        with self.engine.begin() as conn:
            hold = self._take_hold(conn, reservation)
            conn.execute(api_keys.update().where(api_keys.c.id == reservation.key_id)
                         .values(held=api_keys.c.held - _money(hold.amount)))

    def _take_hold(self, conn, r: Reservation):
        """Lock and delete the request's hold; whoever deletes it is the only one to bill it."""
        hold = conn.execute(select(holds).where(and_(holds.c.request_id == r.request_id,
                                                     holds.c.key_id == r.key_id))
                            .with_for_update()).first()
        gone = hold is None or conn.execute(
            holds.delete().where(holds.c.request_id == r.request_id)).rowcount != 1
        if gone:
            billed = conn.execute(select(ledger.c.id).where(ledger.c.request_id == r.request_id)).first()
            state = "was already settled" if billed else "has no open reservation (released or stale)"
            raise NotReserved(f"request {r.request_id!r} {state}; nothing charged")
        return hold

    def release_stale_holds(self, max_age_s: float = 0.0) -> int:
        """Release holds older than max_age_s (0: all of them); returns how many."""
        cutoff = utcnow() - timedelta(seconds=max_age_s)
        released = 0
        with self.engine.begin() as conn:
            stale = conn.execute(select(holds).where(holds.c.created_at <= cutoff)
                                 .order_by(holds.c.key_id).with_for_update()).all()
            for h in stale:
                conn.execute(holds.delete().where(holds.c.request_id == h.request_id))
                conn.execute(api_keys.update().where(api_keys.c.id == h.key_id)
                             .values(held=api_keys.c.held - _money(h.amount)))
                released += 1
        return released

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
