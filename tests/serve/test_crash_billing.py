"""Billing survives a crash up to a bound: `nanoseek serve` as a real subprocess, SIGKILLed while
it streams; the next start settles the orphaned hold at the usage last recorded on it, which is
at most K - 1 output tokens behind what the client received (README, Serve)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from nanoseek.serve.accounts import Accounts
from nanoseek.serve.pricing import Throughput, derive_price_sheet
from tests.serve.test_app import build_model_dir, free_port

K = 4  # --record-every-tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("crash-model"))


def serve(model_dir: Path, db: str, prices: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port",
                             str(port), "--db", db, "--prices", str(prices), "--block-size", "4", *extra],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # not a timing assertion: it only turns a hang into a failure
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "nanoseek serve did not come up"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


def test_sigkill_mid_stream_bills_what_was_delivered_up_to_the_bound(model_dir, tmp_path):
    prices, db, log = tmp_path / "prices.json", f"sqlite:///{tmp_path / 'accounts.db'}", tmp_path / "serve.log"
    derive_price_sheet(Throughput(1000, 10000, 500, 8), "3.6").save(prices)
    acc = Accounts(db)
    key, secret = acc.create_key("dana", Decimal("1"))
    # K tokens per record; the time rule is pushed out of the way so the bound is K's alone
    flags = ("--record-every-tokens", str(K), "--record-every-s", "3600")
    proc, url = serve(model_dir, db, prices, log, *flags)
    max_tokens, delivered, stop_at = 200, 0, 3 * K + 1
    try:
        body = {"model": model_dir.name, "max_tokens": max_tokens, "stream": True, "logprobs": True,
                "top_logprobs": 0, "messages": [{"role": "user", "content": "def add(a, b):"}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        delivered += len((choice.get("logprobs") or {}).get("content") or [])
                if delivered >= stop_at:
                    proc.send_signal(signal.SIGKILL)  # mid-stream: nothing settled, the hold is left
                    proc.wait()
                    break
    finally:
        proc.kill()
        proc.wait()
    assert delivered >= stop_at, log.read_text()
    assert acc.ledger_row(rid) is None and acc.get_key(key.id).held > 0

    proc, url = serve(model_dir, db, prices, log, *flags)  # the restart settles the dead server's hold
    try:
        row = acc.ledger_row(rid)
        assert row is not None, "the orphaned hold was not settled at start"
        assert delivered - (K - 1) <= row.output_tokens < max_tokens
        assert (row.cache_hit_tokens + row.cache_miss_tokens) > 0  # the prompt is billed too
        k = acc.get_key(key.id)
        assert k.held == 0 and k.balance == Decimal("1") - row.amount and acc.audit() == []
    finally:
        proc.terminate()
        proc.wait(60)
        acc.close()


def test_serve_flags_for_leases_and_progress(model_dir, capsys):
    from nanoseek.cli import build_parser
    from nanoseek.serve.cli import _serve_config

    def config(*flags):
        args = build_parser().parse_args(["serve", "--model", str(model_dir), *flags])
        return _serve_config(args, model_dir, "tiny")

    c = config("--lease-ttl", "9", "--record-every-tokens", "5", "--record-every-s", "0.5")
    assert (c.lease_ttl_s, c.record_every_tokens, c.record_every_s) == (9.0, 5, 0.5)
    assert capsys.readouterr().err == ""
    config("--stale-hold-age", "60")  # still accepted, so old scripts keep working, but it says so
    assert "--stale-hold-age is deprecated and ignored" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--record-every-tokens=0 must be > 0"):
        config("--record-every-tokens", "0")
