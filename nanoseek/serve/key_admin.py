"""Per-key settings (admin flag, rate limits) and the admin trail, beside the accounts.

    from nanoseek.serve.key_admin import KeyAdmin, LimitsUpdate

    admin = KeyAdmin(accounts)
    key, secret = admin.create_key("root", "0", admin=True)            # `nanoseek keys create --admin`
    admin.set_limits("alice", LimitsUpdate(requests_per_minute=60, max_concurrent=2), actor=root.id)
    admin.settings(alice.id).limits(server_default)                      # what the limiter enforces
    admin.topup(alice.id, "5", actor=root.id); admin.revoke(alice.id, actor=root.id)
    admin.log()                                                          # newest first

A limit stored as NULL follows the server's flag (`--rpm`, `--tpm`, `--max-concurrent`), 0 means
unlimited, a number overrides the flag for that key. Money still moves only through `Accounts`;
an admin's top-up carries the admin's name in the top-up note (the same transaction as the
credit) and every admin action gets an `admin_log` row naming who did what to which key. Setting
limits or the admin flag writes the setting and its log row in one transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from .accounts import Accounts, AccountsError, Key
from .db import admin_log, key_settings, read_only, utcnow
from .limits import KeyLimits
from .pricing import format_money

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
MAX_LIMIT = 10**12


@dataclass(frozen=True)
class KeySettings:
    admin: bool = False
    requests_per_minute: int | None = None     # None: the server's default; 0: unlimited
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def limits(self, default: KeyLimits) -> KeyLimits:
        """The limits this key runs under, given the server-wide defaults."""
        def pick(name):
            own = getattr(self, name)
            return getattr(default, name) if own is None else (own or None)   # 0 -> None: unlimited
        return KeyLimits(*(pick(n) for n in LIMIT_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {"admin": self.admin, **{n: getattr(self, n) for n in LIMIT_FIELDS}}


@dataclass(frozen=True)
class LimitsUpdate:
    """New per-key limits; each None returns that limit to the server's default, 0 is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @classmethod
    def parse(cls, values: dict[str, Any]) -> "LimitsUpdate":
        """From JSON or CLI values: int >= 0, null/"default" for the server's default."""
        unknown = set(values) - set(LIMIT_FIELDS)
        if unknown:
            raise AccountsError(f"unknown limit {sorted(unknown)[0]!r}; the limits are {list(LIMIT_FIELDS)}")
        out = {}
        for name in LIMIT_FIELDS:
            v = values.get(name)
            if v is None or v == "default" or v == "":
                out[name] = None
                continue
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise AccountsError(f"{name}={v!r} must be a whole number >= 0 or 'default'")
            try:
                n = int(v)
            except ValueError:
                raise AccountsError(f"{name}={v!r} must be a whole number >= 0 or 'default'") from None
            if not 0 <= n <= MAX_LIMIT:
                raise AccountsError(f"{name}={n} must be between 0 (unlimited) and {MAX_LIMIT}")
            out[name] = n
        return cls(**out)


@dataclass(frozen=True)
class AdminAction:
    id: int
    actor_key_id: int | None
    action: str
    target_key_id: int
    detail: dict
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "actor_key_id": self.actor_key_id, "action": self.action,
                "target_key_id": self.target_key_id, "detail": self.detail,
                "created_at": self.created_at.isoformat(timespec="seconds")}


def _settings(row) -> KeySettings:
    if row is None:
        return KeySettings()
    return KeySettings(bool(row.admin), row.requests_per_minute, row.tokens_per_minute, row.max_concurrent)


def _log(conn, actor: int | None, action: str, target: int, detail: dict) -> None:
    conn.execute(admin_log.insert().values(actor_key_id=actor, action=action, target_key_id=target,
                                           detail=json.dumps(detail, sort_keys=True)[:512],
                                           created_at=utcnow()))


class KeyAdmin:
    """Settings and admin actions over the accounts' database."""

    def __init__(self, accounts: Accounts):
        self.accounts = accounts
        self.engine = accounts.engine

    # ------------------------------------------------------------------ reading
    def settings(self, key_id: int) -> KeySettings:
        with read_only(self.engine.connect()) as conn:
            return _settings(conn.execute(select(key_settings).where(key_settings.c.key_id == key_id)).first())

    def all_settings(self) -> dict[int, KeySettings]:
        with read_only(self.engine.connect()) as conn:
            return {r.key_id: _settings(r) for r in conn.execute(select(key_settings))}

    def log(self, limit: int = 50, target: int | None = None) -> list[AdminAction]:
        q = select(admin_log).order_by(admin_log.c.id.desc()).limit(limit)
        if target is not None:
            q = q.where(admin_log.c.target_key_id == target)
        with read_only(self.engine.connect()) as conn:
            return [AdminAction(r.id, r.actor_key_id, r.action, r.target_key_id, json.loads(r.detail or "{}"),
                                r.created_at) for r in conn.execute(q)]

    # ------------------------------------------------------------------ writing
    def _write(self, key_id: int, values: dict, actor: int | None, action: str, detail: dict) -> KeySettings:
        """Upsert the key's settings row and log the action, in one transaction."""
        with self.engine.begin() as conn:
            q = select(key_settings).where(key_settings.c.key_id == key_id).with_for_update()
            row = conn.execute(q).first()
            values = {**values, "updated_at": utcnow()}
            if row is None:
                conn.execute(key_settings.insert().values(key_id=key_id, **{"admin": False, **values}))
            else:
                conn.execute(key_settings.update().where(key_settings.c.key_id == key_id).values(**values))
            _log(conn, actor, action, key_id, detail)
            return _settings(conn.execute(select(key_settings).where(key_settings.c.key_id == key_id)).one())

    def set_limits(self, ref, limits: LimitsUpdate, actor: int | None = None) -> KeySettings:
        key = self.accounts.get_key(ref)
        values = {n: getattr(limits, n) for n in LIMIT_FIELDS}
        return self._write(key.id, values, actor, "limits", values)

    def set_admin(self, ref, admin: bool, actor: int | None = None) -> KeySettings:
        key = self.accounts.get_key(ref)
        return self._write(key.id, {"admin": bool(admin)}, actor, "admin", {"admin": bool(admin)})

    def create_key(self, name: str, balance: Any = 0, admin: bool = False, actor: int | None = None,
                   limits: LimitsUpdate | None = None, note: str = "initial balance") -> tuple[Key, str]:
        """A new key (Accounts.create_key), then its settings; a failure between leaves an ordinary
        key without admin rights, never the reverse."""
        key, secret = self.accounts.create_key(name, balance, note=_note(note, actor, self))
        values = {"admin": bool(admin), **({n: getattr(limits, n) for n in LIMIT_FIELDS} if limits else {})}
        detail = {"name": key.name, "balance": format_money(key.balance), **values}
        self._write(key.id, values, actor, "create", detail)
        return key, secret

    def topup(self, ref, amount: Any, actor: int | None = None) -> Key:
        key = self.accounts.topup(ref, amount, note=_note("top-up", actor, self))
        self._log_only(actor, "topup", key.id, {"amount": str(amount)})
        return key

    def revoke(self, ref, actor: int | None = None) -> Key:
        key = self.accounts.revoke(ref)
        self._log_only(actor, "revoke", key.id, {})
        return key

    def _log_only(self, actor: int | None, action: str, target: int, detail: dict) -> None:
        with self.engine.begin() as conn:
            _log(conn, actor, action, target, detail)


def _note(what: str, actor: int | None, admin: KeyAdmin) -> str:
    if actor is None:
        return what
    key = admin.accounts.get_key(actor)
    return f"{what} by admin key {key.name!r} (id {key.id})"[:256]
