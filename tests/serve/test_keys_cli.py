"""`nanoseek keys ...` and `nanoseek price ...` through the real argument parser."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal

import pytest

from nanoseek import cli
from nanoseek.serve.accounts import Accounts
from nanoseek.serve.keys_cli import price_commands


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_keys_lifecycle(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    rc, out, err = run(capsys, "keys", "create", "--name", "alice", "--balance", "10.5", "--db", db)
    secret = out.strip()
    assert rc == 0 and secret.startswith("sk-") and "shown only now" in err and secret not in err
    acc = Accounts(db)
    assert acc.authenticate(secret).name == "alice"

    rc, out, _ = run(capsys, "keys", "list", "--db", db)
    assert rc == 0 and "alice" in out and "10.50" in out and secret[3:12] not in out.replace(secret[:10], "")
    rc, out, _ = run(capsys, "keys", "topup", "alice", "0.25", "--db", db)
    assert rc == 0 and "balance 10.75" in out
    rc, out, _ = run(capsys, "keys", "topup", "1", "1", "--db", db)
    assert rc == 0 and "balance 11.75" in out
    rc, out, _ = run(capsys, "keys", "revoke", "alice", "--db", db)
    assert rc == 0 and "revoked at" in out and acc.authenticate(secret) is None
    rc, out, _ = run(capsys, "keys", "list", "--json", "--db", db)
    (row,) = json.loads(out)
    assert row["balance"] == "11.75" and row["revoked_at"] and "secret" not in row and secret not in out
    assert acc.audit() == []
    acc.close()


@pytest.mark.parametrize("argv, fragment", [
    (["keys", "create", "--name", "bob", "--balance", "-3"], "balance=-3 must be >= 0"),
    (["keys", "create", "--name", "bob", "--balance", "ten"], "balance='ten' is not a number"),
    (["keys", "topup", "nobody", "1"], "no API key named or numbered 'nobody'"),
    (["keys", "topup", "carol", "0"], "amount=0 must be > 0"),
    (["keys", "revoke", "nobody"], "'nobody'"),
    (["keys", "revoke", "--name", "nobody"], "no API key named 'nobody'"),
    (["keys", "topup", "--id", "7", "1"], "no API key with id 7"),
    (["keys", "topup", "--name", "carol", "carol", "1"], "name the key once"),
    (["keys", "topup", "1"], "name the key once"),
])
def test_bad_input_exits_2_with_the_reason(tmp_path, capsys, argv, fragment):
    db = str(tmp_path / "keys.db")  # a plain path means an SQLite file
    assert run(capsys, "keys", "create", "--name", "carol", "--db", db)[0] == 0
    rc, out, err = run(capsys, *argv, "--db", db)
    assert rc == 2 and fragment in err and out == ""
    acc = Accounts(db)
    assert [k.name for k in acc.list_keys()] == ["carol"] and acc.audit() == []
    acc.close()


def test_key_named_like_an_id_needs_id_or_name(tmp_path, capsys):
    db = str(tmp_path / "keys.db")
    for name in ("alice", "1"):  # "alice" has id 1; the key named "1" has id 2
        assert run(capsys, "keys", "create", "--name", name, "--db", db)[0] == 0
    rc, out, err = run(capsys, "keys", "topup", "1", "5", "--db", db)
    assert rc == 2 and "ambiguous" in err and "--id 1 or --name 1" in err and out == ""
    rc, out, _ = run(capsys, "keys", "topup", "--id", "1", "5", "--db", db)
    assert rc == 0 and out.startswith("key 'alice' (id 1): balance 5.00")
    rc, out, _ = run(capsys, "keys", "topup", "--name", "1", "2", "--db", db)
    assert rc == 0 and out.startswith("key '1' (id 2): balance 2.00")
    rc, out, _ = run(capsys, "keys", "revoke", "--id", "2", "--db", db)
    assert rc == 0 and "key '1' (id 2)" in out and "revoked at" in out
    acc = Accounts(db)
    assert [(k.name, k.balance, k.active) for k in acc.list_keys()] == [("alice", 5, True), ("1", 2, False)]
    acc.close()


def test_db_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_DB", str(tmp_path / "env.db"))
    assert run(capsys, "keys", "create", "--name", "envkey")[0] == 0
    assert (tmp_path / "env.db").exists()


def test_price_set_and_show(tmp_path, capsys):
    path = tmp_path / "prices.json"
    rc, out, _ = run(capsys, "price", "set", "--hardware-cost-per-hour", "3.6", "--prefill-tps", "1000",
                     "--cached-tps", "10000", "--decode-tps", "100", "--decode-batch-size", "8",
                     "--prices", str(path))
    assert rc == 0 and path.exists()
    rc, out, _ = run(capsys, "price", "show", "--prices", str(path), "--json")
    d = json.loads(out)
    assert {k: Decimal(v) for k, v in d["prices"].items()} == {
        "input_hit": Decimal("0.11"), "input_miss": Decimal("1.1"), "output": Decimal("11")}
    assert d["derivation"]["decode_batch_size"] == 8
    rc, out, _ = run(capsys, "price", "show", "--prices", str(path))
    assert rc == 0 and "output" in out and "11" in out and "margin 0.10" in out
    rc, _, err = run(capsys, "price", "show", "--prices", str(tmp_path / "none.json"))
    assert rc == 2 and "none.json" in err and "calibrate" in err
    rc, _, err = run(capsys, "price", "set", "--hardware-cost-per-hour", "1", "--prefill-tps", "0",
                     "--cached-tps", "1", "--decode-tps", "1", "--prices", str(tmp_path / "p2.json"))
    assert rc == 2 and "prefill_tokens_per_s=0" in err and not (tmp_path / "p2.json").exists()


def test_other_modules_can_add_price_subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    example = price_commands(sub).add_parser("example")  # `calibrate` is taken by nanoseek.serve.cli
    example.add_argument("--model")
    example.set_defaults(func=lambda args: args.model)
    args = parser.parse_args(["price", "example", "--model", "m"])
    assert args.func(args) == "m"
    assert parser.parse_args(["price", "show"]).func.__name__ == "cmd_price_show"


def test_entry_point_runs(tmp_path):
    db = str(tmp_path / "ep.db")
    done = subprocess.run([sys.executable, "-m", "nanoseek", "keys", "create", "--name", "x", "--db", db],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sk-") and len(done.stdout.strip()) == 67
