"""Cost-plus pricing: what a million tokens costs on this machine, and what we charge for it.

    from decimal import Decimal
    from nanoseek.serve.pricing import Throughput, derive_price_sheet, request_cost

    measured = Throughput(prefill_tokens_per_s=9000, cached_tokens_per_s=90000,
                          decode_tokens_per_s=1200, decode_batch_size=32)
    sheet = derive_price_sheet(measured, hardware_cost_per_hour=Decimal("2.50"), model="demo")
    sheet.prices.output                      # price per million output tokens (Decimal)
    request_cost(sheet.prices, hit_tokens=512, miss_tokens=64, output_tokens=100)
    sheet.save("runs/prices.json"); PriceSheet.load("runs/prices.json")

The machine costs `hardware_cost_per_hour` whether it computes or not, so a token costs the
seconds it occupies the machine: cost per million = cost per second / (tokens per second) * 1e6.
Three kinds of token take different amounts of machine time: a prompt token missing the context
cache is prefilled, a prompt token hitting it is only read back, an output token is decoded in a
batch of `decode_batch_size` (the throughputs are aggregate over the batch). Price = cost *
(1 + margin). Every rounding goes UP (unit prices to PRICE_PLACES, request amounts to
MONEY_PLACES) so that no request is ever charged below what it cost.

Measuring the engine is not done here: the engine's `price calibrate` command measures the
three throughputs and calls `derive_price_sheet`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_write

MONEY_PLACES = 9          # request amounts and balances are exact to 1e-9 currency units
PRICE_PLACES = 6          # unit prices (per million tokens) are exact to 1e-6 currency units
MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_PLACES)
DEFAULT_MARGIN = Decimal("0.10")
DEFAULT_PRICES_PATH = "runs/prices.json"
SHEET_VERSION = 1
_MILLION = Decimal(1_000_000)
_SECONDS_PER_HOUR = Decimal(3600)
# enough digits that the only rounding that matters is the explicit ceiling at the end
_EXACT = Context(prec=60)


class PricingError(ValueError):
    """A measurement, price or price file that cannot be priced from."""


def to_decimal(value: Any, name: str) -> Decimal:
    """Exact Decimal from an int, str or Decimal; floats go through their shortest repr."""
    if isinstance(value, bool):
        raise PricingError(f"{name}={value!r} must be a number, not a bool")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise PricingError(f"{name}={value!r} is not a number") from None
    if not d.is_finite():
        raise PricingError(f"{name}={value!r} must be finite")
    return d


def ceil_to(value: Decimal, quantum: Decimal) -> Decimal:
    """Round up (towards +infinity) to a multiple of quantum."""
    return value.quantize(quantum, rounding=ROUND_CEILING, context=_EXACT)


@dataclass(frozen=True)
class UnitPrices:
    """Currency units per million tokens for the three kinds of token."""

    input_hit: Decimal
    input_miss: Decimal
    output: Decimal

    def __post_init__(self) -> None:
        for name in ("input_hit", "input_miss", "output"):
            d = to_decimal(getattr(self, name), name)
            if d < 0:
                raise PricingError(f"{name}={d} per million tokens must be >= 0")
            object.__setattr__(self, name, d)

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnitPrices":
        missing = {"input_hit", "input_miss", "output"} - set(d)
        if missing:
            raise PricingError(f"unit prices lack {sorted(missing)}; got keys {sorted(d)}")
        return cls(d["input_hit"], d["input_miss"], d["output"])


@dataclass(frozen=True)
class Throughput:
    """What the engine measured on this machine; token rates are aggregate over the batch."""

    prefill_tokens_per_s: Decimal   # prompt tokens not in the context cache
    cached_tokens_per_s: Decimal    # prompt tokens read back from the context cache
    decode_tokens_per_s: Decimal    # output tokens, summed over a batch of decode_batch_size
    decode_batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "cached_tokens_per_s", "decode_tokens_per_s"):
            d = to_decimal(getattr(self, name), name)
            if d <= 0:
                raise PricingError(f"{name}={d} must be > 0 tokens per second")
            object.__setattr__(self, name, d)
        if not isinstance(self.decode_batch_size, int) or self.decode_batch_size < 1:
            raise PricingError(f"decode_batch_size={self.decode_batch_size!r} must be an int >= 1")


def cost_per_million(hardware_cost_per_hour: Decimal, tokens_per_s: Decimal) -> Decimal:
    """Exact (unrounded) cost of a million tokens at tokens_per_s on a machine costing that per hour."""
    return _EXACT.divide(_EXACT.multiply(hardware_cost_per_hour, _MILLION),
                         _EXACT.multiply(_SECONDS_PER_HOUR, tokens_per_s))


def apply_margin(cost: Decimal, margin: Decimal) -> Decimal:
    """cost * (1 + margin), rounded up to PRICE_QUANTUM."""
    return ceil_to(_EXACT.multiply(cost, 1 + margin), PRICE_QUANTUM)


@dataclass(frozen=True)
class PriceSheet:
    """Prices with the numbers they came from; what /v1/pricing shows and runs/prices.json holds."""

    prices: UnitPrices
    costs: UnitPrices
    margin: Decimal
    hardware_cost_per_hour: Decimal
    throughput: Throughput
    currency: str = "USD"
    model: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        t = self.throughput
        return {
            "version": SHEET_VERSION,
            "model": self.model,
            "currency": self.currency,
            "unit": "per 1M tokens",
            "prices": self.prices.to_dict(),
            "derivation": {
                "costs": self.costs.to_dict(),
                "margin": str(self.margin),
                "hardware_cost_per_hour": str(self.hardware_cost_per_hour),
                "prefill_tokens_per_s": str(t.prefill_tokens_per_s),
                "cached_tokens_per_s": str(t.cached_tokens_per_s),
                "decode_tokens_per_s": str(t.decode_tokens_per_s),
                "decode_batch_size": t.decode_batch_size,
                "formula": "cost = hardware_cost_per_hour / 3600 / tokens_per_s * 1e6 (rounded up); "
                           "price = cost * (1 + margin) (rounded up)",
            },
            "created": self.created,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "price sheet") -> "PriceSheet":
        try:
            if d.get("version") != SHEET_VERSION:
                raise PricingError(f"version={d.get('version')!r}, expected {SHEET_VERSION}")
            der = d["derivation"]
            sheet = cls(
                prices=UnitPrices.from_dict(d["prices"]),
                costs=UnitPrices.from_dict(der["costs"]),
                margin=to_decimal(der["margin"], "margin"),
                hardware_cost_per_hour=to_decimal(der["hardware_cost_per_hour"], "hardware_cost_per_hour"),
                throughput=Throughput(der["prefill_tokens_per_s"], der["cached_tokens_per_s"],
                                      der["decode_tokens_per_s"], der["decode_batch_size"]),
                currency=str(d.get("currency", "USD")), model=str(d.get("model", "")),
                created=str(d.get("created", "")), notes=str(d.get("notes", "")),
            )
        except KeyError as e:
            raise PricingError(f"{source}: missing field {e.args[0]!r}") from None
        except (PricingError, TypeError, AttributeError) as e:
            raise PricingError(f"{source}: {e}") from None
        for name in ("input_hit", "input_miss", "output"):
            price, cost = getattr(sheet.prices, name), getattr(sheet.costs, name)
            if price < cost:
                raise PricingError(f"{source}: price {name}={price} is below its cost {cost}; "
                                   "no token may be sold below cost")
        return sheet

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike = DEFAULT_PRICES_PATH) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a sheet."""
        return atomic_write(path, self.to_json(), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_PRICES_PATH) -> "PriceSheet":
        path = Path(path)
        if not path.exists():
            raise PricingError(f"no price sheet at {path}; run `nanoseek price calibrate` to measure one")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PricingError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise PricingError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))


def derive_price_sheet(throughput: Throughput, hardware_cost_per_hour: Any,
                       margin: Any = DEFAULT_MARGIN, *, currency: str = "USD", model: str = "",
                       notes: str = "") -> PriceSheet:
    """Costs from measured throughput and the machine's hourly cost; prices = cost * (1 + margin)."""
    hw = to_decimal(hardware_cost_per_hour, "hardware_cost_per_hour")
    if hw < 0:
        raise PricingError(f"hardware_cost_per_hour={hw} must be >= 0")
    m = to_decimal(margin, "margin")
    if m < 0:
        raise PricingError(f"margin={m} must be >= 0 (a negative margin sells below cost)")
    exact = {
        "input_hit": cost_per_million(hw, throughput.cached_tokens_per_s),
        "input_miss": cost_per_million(hw, throughput.prefill_tokens_per_s),
        "output": cost_per_million(hw, throughput.decode_tokens_per_s),
    }
    costs = UnitPrices(**{k: ceil_to(v, PRICE_QUANTUM) for k, v in exact.items()})
    # margin applies to the exact cost; rounding the cost first would compound two ceilings
    prices = UnitPrices(**{k: max(apply_margin(v, m), getattr(costs, k)) for k, v in exact.items()})
    return PriceSheet(prices=prices, costs=costs, margin=m, hardware_cost_per_hour=hw,
                      throughput=throughput, currency=currency, model=model, notes=notes)


def format_money(amount: Decimal) -> str:
    """At least two decimals, no trailing zeros beyond them: 1.5 -> "1.50", 0.000012 -> "0.000012"."""
    text = f"{amount:f}"
    if "." not in text:
        return text + ".00"
    whole, frac = text.split(".")
    frac = frac.rstrip("0")
    return f"{whole}.{frac.ljust(2, '0')}"


def _check_tokens(**counts: int) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PricingError(f"{name}={n!r} must be an int >= 0")


def request_cost(prices: UnitPrices, hit_tokens: int, miss_tokens: int, output_tokens: int) -> Decimal:
    """Amount for one request: tokens * price per million / 1e6, rounded up to MONEY_QUANTUM."""
    _check_tokens(hit_tokens=hit_tokens, miss_tokens=miss_tokens, output_tokens=output_tokens)
    total = (hit_tokens * prices.input_hit + miss_tokens * prices.input_miss
             + output_tokens * prices.output)
    return ceil_to(_EXACT.divide(total, _MILLION), MONEY_QUANTUM)


def max_request_cost(prices: UnitPrices, prompt_tokens: int, max_tokens: int) -> Decimal:
    """The most a request can cost: every prompt token at the dearer input price, max_tokens out."""
    _check_tokens(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    if prices.input_hit > prices.input_miss:
        return request_cost(prices, prompt_tokens, 0, max_tokens)
    return request_cost(prices, 0, prompt_tokens, max_tokens)
