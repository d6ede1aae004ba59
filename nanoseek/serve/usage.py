"""Reading the ledger for the console: usage per day, recent requests, totals per key.

    from nanoseek.serve.usage import daily_usage, recent_requests, totals_by_key
    days = daily_usage(accounts.engine, key_id, days=14)       # oldest first, zero days included
    page = recent_requests(accounts.engine, key_id, limit=20)  # newest first; page.next_before pages on
    totals = totals_by_key(accounts.engine)                    # {key_id: Totals}

Every function that reads one key's rows takes the key id and filters on it in SQL, so a caller
cannot see another key's requests by naming them. Days are UTC calendar days, grouped in the
database (SQLite and PostgreSQL spell "the UTC date of" differently). Amounts are the ledger's
exact Decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, select

from .db import holds, ledger, read_only
from .pricing import format_money

MAX_DAYS = 366
MAX_PAGE = 200


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    cache_hit_tokens: int = 0
    cache_miss_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hit_tokens": self.cache_hit_tokens,
                "cache_miss_tokens": self.cache_miss_tokens, "output_tokens": self.output_tokens,
                "cost": format_money(self.cost)}


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    next_before: int | None        # pass as `before` for the next (older) page; None: no more


def _sums():
    c = ledger.c
    return (func.count(c.id), func.coalesce(func.sum(c.cache_hit_tokens), 0),
            func.coalesce(func.sum(c.cache_miss_tokens), 0), func.coalesce(func.sum(c.output_tokens), 0),
            func.sum(c.amount))


def _totals(count, hit, miss, out, cost) -> Totals:
    return Totals(int(count), int(hit), int(miss), int(out), cost if cost is not None else Decimal(0))


def _utc_day(engine: Engine, column):
    if engine.dialect.name == "postgresql":
        return func.date(func.timezone("UTC", column))
    return func.date(column)  # SQLite stores naive UTC text


def daily_usage(engine: Engine, key_id: int, days: int = 14, today: date | None = None) -> list[dict[str, Any]]:
    """One entry per UTC day of the last `days` (today included), oldest first."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days={days} must be between 1 and {MAX_DAYS}")
    today = today or datetime.now(timezone.utc).date()
    first = today - timedelta(days=days - 1)
    start = datetime.combine(first, time(0), tzinfo=timezone.utc)
    day = _utc_day(engine, ledger.c.created_at).label("day")
    q = (select(day, *_sums()).where(ledger.c.key_id == key_id, ledger.c.created_at >= start)
         .group_by(day))
    with read_only(engine.connect()) as conn:
        found = {str(r[0])[:10]: _totals(*r[1:]) for r in conn.execute(q)}
    out = []
    for i in range(days):
        d = (first + timedelta(days=i)).isoformat()
        out.append({"date": d, **found.get(d, Totals()).to_dict()})
    return out


def _row(r) -> dict[str, Any]:
    return {"id": r.id, "request_id": r.request_id, "created_at": r.created_at.isoformat(timespec="seconds"),
            "model": r.model, "cache_hit_tokens": r.cache_hit_tokens, "cache_miss_tokens": r.cache_miss_tokens,
            "output_tokens": r.output_tokens, "cost": format_money(r.amount), "status": "billed"}


def recent_requests(engine: Engine, key_id: int, limit: int = 20, before: int | None = None) -> Page:
    """The key's billed requests, newest first, `limit` at a time (keyset paging on the ledger id).
    The first page starts with the key's requests still running (status "in flight", no cost yet)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit={limit} must be between 1 and {MAX_PAGE}")
    q = select(ledger).where(ledger.c.key_id == key_id).order_by(ledger.c.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(ledger.c.id < before)
    with read_only(engine.connect()) as conn:
        rows = conn.execute(q).all()
        running = [] if before is not None else conn.execute(
            select(holds.c.request_id, holds.c.created_at).where(holds.c.key_id == key_id)
            .order_by(holds.c.created_at.desc())).all()
    more = len(rows) > limit
    rows = rows[:limit]
    out = [{"id": None, "request_id": h.request_id, "created_at": h.created_at.isoformat(timespec="seconds"),
            "model": "", "cache_hit_tokens": None, "cache_miss_tokens": None, "output_tokens": None,
            "cost": None, "status": "in flight"} for h in running]
    out += [_row(r) for r in rows]
    return Page(out, rows[-1].id if more else None)


def request_for_key(engine: Engine, key_id: int, request_id: str) -> dict[str, Any] | None:
    """The ledger row of one request, only if it belongs to key_id."""
    with read_only(engine.connect()) as conn:
        r = conn.execute(select(ledger).where(ledger.c.request_id == request_id,
                                              ledger.c.key_id == key_id)).first()
    return None if r is None else _row(r)


def totals(engine: Engine, key_id: int) -> Totals:
    with read_only(engine.connect()) as conn:
        return _totals(*conn.execute(select(*_sums()).where(ledger.c.key_id == key_id)).one())


def totals_by_key(engine: Engine) -> dict[int, Totals]:
    q = select(ledger.c.key_id, *_sums()).group_by(ledger.c.key_id)
    with read_only(engine.connect()) as conn:
        return {r[0]: _totals(*r[1:]) for r in conn.execute(q)}
