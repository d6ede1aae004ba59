"""`nanoseek price calibrate` on a tiny model, `nanoseek serve` as a real subprocess answering the
openai client, and the demo key of `make run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from nanoseek.cli import main
from nanoseek.serve.pricing import PriceSheet
from tests.serve.test_app import build_model_dir, free_port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cli-model"))


def calibrate(model_dir: Path, prices: Path, *extra: str) -> int:
    return main(["price", "calibrate", "--model", str(model_dir), "--hardware-cost-per-hour", "3.6",
                 "--prices", str(prices), "--prompt-len", "24", "--decode-tokens", "4", "--max-num-seqs", "3",
                 "--block-size", "4", *extra])


def test_price_calibrate_measures_and_stores_a_sheet_never_below_cost(model_dir, tmp_path, capsys):
    prices = tmp_path / "prices.json"
    assert calibrate(model_dir, prices, "--margin", "0.25") == 0
    sheet = PriceSheet.load(prices)
    t = sheet.throughput
    assert t.decode_batch_size == 3 and min(t.prefill_tokens_per_s, t.cached_tokens_per_s, t.decode_tokens_per_s) > 0
    assert sheet.margin == Decimal("0.25") and sheet.hardware_cost_per_hour == Decimal("3.6")
    rates = {"input_hit": t.cached_tokens_per_s, "input_miss": t.prefill_tokens_per_s,
             "output": t.decode_tokens_per_s}
    for name, tps in rates.items():
        exact_cost = Decimal("3.6") / 3600 / tps * 1_000_000   # hourly cost per million tokens at tps
        assert getattr(sheet.costs, name) >= exact_cost
        assert getattr(sheet.prices, name) >= exact_cost * Decimal("1.25") >= getattr(sheet.costs, name)
    assert "input_miss" in capsys.readouterr().out


def test_price_calibrate_rejects_bad_input_and_keeps_the_old_sheet(model_dir, tmp_path, capsys):
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    prices = derive_price_sheet(Throughput(10, 10, 10), "1").save(tmp_path / "prices.json")
    before = prices.read_text()
    assert calibrate(model_dir, prices, "--margin", "-0.5") != 0
    assert "margin=-0.5" in capsys.readouterr().err and prices.read_text() == before
    assert main(["price", "calibrate", "--model", str(tmp_path / "nowhere"), "--hardware-cost-per-hour", "1",
                 "--prices", str(prices)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_serve_subprocess_answers_the_openai_client(model_dir, tmp_path):
    prices, db = tmp_path / "prices.json", f"sqlite:///{tmp_path / 'accounts.db'}"
    assert calibrate(model_dir, prices) == 0
    from nanoseek.serve.accounts import Accounts

    acc = Accounts(db)
    key, secret = acc.create_key("carol", Decimal("1"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port",
                             str(port), "--db", db, "--prices", str(prices), "--block-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "nanoseek serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)
        model = client.models.list().data[0].id
        assert model == model_dir.name
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert acc.get_key(key.id).balance == Decimal("1") - acc.ledger_row(r.id).amount
    finally:
        proc.terminate()
        proc.wait(30)
        acc.close()


def test_demo_key_is_created_once_and_reused(tmp_path):
    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.cli import demo_key

    db, path = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "demo_key.txt"
    secret, new = demo_key(db, "10", str(path))
    assert new and path.read_text().strip() == secret and (path.stat().st_mode & 0o777) == 0o600
    again, new = demo_key(db, "10", str(path))
    assert again == secret and not new
    acc = Accounts(db)
    acc.revoke("demo")
    fresh, new = demo_key(db, "10", str(path))
    assert new and fresh != secret and acc.authenticate(fresh).name == "demo-2"
    assert acc.get_key("demo-2").balance == Decimal("10")
    from nanoseek.serve.key_admin import KeyAdmin
    assert KeyAdmin(acc).settings(acc.get_key("demo-2").id).admin  # the operator's own key
    acc.close()
