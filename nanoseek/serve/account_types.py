"""The accounts' value types, errors and input checks (no database): keys, reservations, usage,
ledger rows, secrets and money amounts. nanoseek.serve.accounts re-exports all of them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from .pricing import MONEY_PLACES, UnitPrices, format_money, to_decimal

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


KeyRef = Key | int | str


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
class OrphanReport:
    """What settle_orphans did: holds settled at their recorded usage, holds released (nothing
    recorded), the dead instances whose leases it ended, and the output tokens it billed."""

    settled: int = 0
    released: int = 0
    instances: int = 0
    output_tokens: int = 0


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
