"""Cost-plus pricing: the derivation, rounding up, never below cost, the JSON sheet."""

from __future__ import annotations

import json
import random
from decimal import Decimal as D
from fractions import Fraction

import pytest

from nanoseek.serve.pricing import (PriceSheet, PricingError, Throughput, UnitPrices, derive_price_sheet,
                                    max_request_cost, request_cost)


def test_cost_and_price_from_throughput_exactly():
    # 3.6 per hour is 0.001 per second; at 1000 tokens/s a million tokens take 1000 s -> cost 1
    sheet = derive_price_sheet(Throughput(1000, 10_000, 100, decode_batch_size=8), "3.6")
    assert sheet.costs == UnitPrices(input_hit="0.1", input_miss="1", output="10")
    assert sheet.prices == UnitPrices(input_hit="0.11", input_miss="1.1", output="11")
    assert sheet.margin == D("0.10")
    free = derive_price_sheet(Throughput(1000, 10_000, 100), "3.6", margin=0)
    assert free.prices == free.costs


def test_rounding_goes_up():
    sheet = derive_price_sheet(Throughput(3, 3, 3), 1, margin="0.1")
    exact_cost = Fraction(10**6, 3600 * 3)            # 92.5925925...
    assert sheet.costs.input_miss == D("92.592593")
    assert Fraction(sheet.prices.input_miss) >= exact_cost * Fraction(11, 10)   # 101.85185185...
    assert sheet.prices.input_miss == D("101.851852")
    tiny = UnitPrices("0.000001", "0.000001", "0.000001")
    assert request_cost(tiny, 0, 1, 0) == D("0.000000001")   # 1e-12 rounds up, not to zero
    assert request_cost(tiny, 0, 0, 0) == 0


def test_no_request_is_priced_below_its_cost():
    rng = random.Random(0)
    for _ in range(300):
        tp = [rng.choice([rng.uniform(0.5, 50), rng.uniform(50, 1e5)]) for _ in range(3)]
        hw = D(str(round(rng.uniform(0.01, 40), 4)))
        margin = rng.choice(["0", "0.01", "0.1", "0.37"])
        sheet = derive_price_sheet(Throughput(*tp), hw, margin)
        hit, miss, out = (rng.randint(0, 50_000) for _ in range(3))
        # the exact machine time these tokens take, priced at the hardware cost
        seconds = Fraction(hit) / Fraction(D(repr(tp[1]))) + Fraction(miss) / Fraction(D(repr(tp[0]))) \
            + Fraction(out) / Fraction(D(repr(tp[2])))
        exact_cost = seconds * Fraction(hw) / 3600
        charged = request_cost(sheet.prices, hit, miss, out)
        assert Fraction(charged) >= exact_cost * (1 + Fraction(D(margin)))
        assert Fraction(request_cost(sheet.costs, hit, miss, out)) >= exact_cost


def test_request_cost_exact_sum():
    p = UnitPrices(input_hit="0.14", input_miss="0.56", output="1.68")
    assert request_cost(p, 1_000_000, 1_000_000, 1_000_000) == D("2.38")
    assert request_cost(p, 1000, 24, 512) == D("0.0010136")   # (140 + 13.44 + 860.16) / 1e6


def test_max_request_cost_bounds_every_outcome():
    for p in (UnitPrices("0.1", "1", "2"), UnitPrices("3", "1", "2")):  # hit dearer than miss too
        bound = max_request_cost(p, prompt_tokens=100, max_tokens=50)
        for hit in range(0, 101, 10):
            for out in (0, 25, 50):
                assert request_cost(p, hit, 100 - hit, out) <= bound
    assert max_request_cost(UnitPrices("0.1", "1", "2"), 100, 50) == D("0.0002")


@pytest.mark.parametrize("call, fragment", [
    (lambda: Throughput(0, 1, 1), "prefill_tokens_per_s=0 must be > 0"),
    (lambda: Throughput(1, -2, 1), "cached_tokens_per_s=-2"),
    (lambda: Throughput(1, 1, "fast"), "decode_tokens_per_s='fast' is not a number"),
    (lambda: Throughput(1, 1, float("inf")), "must be finite"),
    (lambda: Throughput(1, 1, 1, decode_batch_size=0), "decode_batch_size=0"),
    (lambda: derive_price_sheet(Throughput(1, 1, 1), "-1"), "hardware_cost_per_hour=-1"),
    (lambda: derive_price_sheet(Throughput(1, 1, 1), 1, margin="-0.05"), "margin=-0.05"),
    (lambda: UnitPrices("1", "-1", "1"), "input_miss=-1"),
    (lambda: request_cost(UnitPrices(1, 1, 1), -1, 0, 0), "hit_tokens=-1"),
    (lambda: request_cost(UnitPrices(1, 1, 1), 0, 1.5, 0), "miss_tokens=1.5"),
    (lambda: max_request_cost(UnitPrices(1, 1, 1), 10, True), "max_tokens=True"),
])
def test_bad_numbers_are_named(call, fragment):
    with pytest.raises(PricingError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_sheet_round_trips_through_json(tmp_path):
    sheet = derive_price_sheet(Throughput("9000.5", 90000, 1234, 32), "2.50", "0.15", model="demo",
                               currency="EUR", notes="measured")
    path = sheet.save(tmp_path / "sub" / "prices.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["prices.json"]  # no temp file left
    d = json.loads(path.read_text())
    assert d["prices"]["output"] == str(sheet.prices.output)
    assert d["derivation"]["decode_tokens_per_s"] == "1234" and d["derivation"]["margin"] == "0.15"
    assert PriceSheet.load(path) == sheet


def test_bad_sheet_files_are_named(tmp_path):
    with pytest.raises(PricingError, match="no price sheet at .*missing.json.*calibrate"):
        PriceSheet.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PricingError, match="bad.json is not valid JSON"):
        PriceSheet.load(bad)
    good = derive_price_sheet(Throughput(1000, 10_000, 100), "3.6").to_dict()
    d = json.loads(json.dumps(good))
    del d["derivation"]["costs"]
    bad.write_text(json.dumps(d))
    with pytest.raises(PricingError, match="missing field 'costs'"):
        PriceSheet.load(bad)
    d = json.loads(json.dumps(good))
    d["prices"]["output"] = "9.99"   # below the cost of 10
    bad.write_text(json.dumps(d))
    with pytest.raises(PricingError, match="output=9.99 is below its cost 10"):
        PriceSheet.load(bad)
