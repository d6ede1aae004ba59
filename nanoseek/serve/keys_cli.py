"""`nanoseek keys ...` and `nanoseek price ...`: manage API keys and show the price sheet.

    nanoseek keys create --name alice --balance 10      # prints the secret once, on stdout
    nanoseek keys create --name root --admin            # an admin key (the console's admin page)
    nanoseek keys limits alice --rpm 60 --tpm default --concurrency 2   # 0: unlimited
    nanoseek keys list [--json]                          # never shows secrets
    nanoseek keys topup --name alice 5.50                 # or --id 3; a bare KEY is a name or an id,
    nanoseek keys revoke --id 3                           #   refused when it could be either
    nanoseek price show [--prices runs/prices.json] [--json]
    nanoseek price set --hardware-cost-per-hour 2.5 --prefill-tps 9000 --cached-tps 90000 \\
        --decode-tps 1200 --decode-batch-size 32 [--margin 0.10]

Every keys command takes --db URL (default $NANOSEEK_DB, else sqlite:///runs/nanoseek.db).
The engine's `price calibrate` adds itself under `price` through `price_commands(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PRICES = "runs/prices.json"


def _default_db() -> str:
    return os.environ.get("NANOSEEK_DB") or "sqlite:///runs/nanoseek.db"


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help="sqlite:///FILE, a file path, or postgresql+psycopg://... "
                        "(default: $NANOSEEK_DB or sqlite:///runs/nanoseek.db)")


def _add_key_ref(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--id", type=int, default=None, help="the key's id (as `keys list` shows it)")
    g.add_argument("--name", default=None, help="the key's name")
    p.add_argument("key", metavar="KEY", nargs="?", default=None,
                   help="a name, or an id when no key has that name; refused when it is one key's "
                        "name and another's id")


def _key_ref(args) -> tuple[str | int, str | None]:
    """(reference, by) for Accounts from --id, --name or the bare KEY; exactly one is needed."""
    given = [(args.id, "id"), (args.name, "name"), (args.key, None)]
    given = [(v, by) for v, by in given if v is not None]
    if len(given) != 1:
        from .accounts import AccountsError

        raise AccountsError("name the key once: --id N, --name NAME or a bare KEY"
                            + (f" (got {len(given)})" if given else ""))
    return given[0]


def price_commands(subparsers) -> argparse._SubParsersAction:
    """The `price` command's subcommand list, created on first use, so modules can add to it."""
    parser = subparsers.choices.get("price")
    if parser is None:
        parser = subparsers.add_parser("price", help="cost-plus prices: show, set, calibrate")
        parser.set_defaults(func=lambda args: parser.print_help() or 2)
        parser._nanoseek_sub = parser.add_subparsers(dest="price_command", metavar="ACTION")
    return parser._nanoseek_sub


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="API keys: create, list, topup, revoke")
    keys.set_defaults(func=lambda args: keys.print_help() or 2)
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION")

    p = ks.add_parser("create", help="create a key and print its secret (shown only once)")
    p.add_argument("--name", required=True, help="a unique name for the key")
    p.add_argument("--balance", default="0", help="starting balance, an exact decimal (default 0)")
    p.add_argument("--admin", action="store_true", help="an admin key: may use the console's admin page")
    _add_db(p)
    p.set_defaults(func=cmd_create)

    p = ks.add_parser("list", help="list keys with balances (no secrets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_db(p)
    p.set_defaults(func=cmd_list)

    p = ks.add_parser("topup", help="add to a key's balance")
    _add_key_ref(p)
    p.add_argument("amount", metavar="AMOUNT", help="an exact decimal > 0")
    _add_db(p)
    p.set_defaults(func=cmd_topup)

    p = ks.add_parser("revoke", help="stop a key from authenticating")
    _add_key_ref(p)
    _add_db(p)
    p.set_defaults(func=cmd_revoke)

    register_key_settings(ks)

    prices = price_commands(subparsers)
    p = prices.add_parser("show", help="print the price sheet and how it was derived")
    p.add_argument("--prices", default=DEFAULT_PRICES, metavar="FILE", help=f"default {DEFAULT_PRICES}")
    p.add_argument("--json", action="store_true", help="print the sheet's JSON")
    p.set_defaults(func=cmd_price_show)

    p = prices.add_parser("set", help="derive prices from throughput numbers you measured yourself")
    g = p.add_argument_group("measurements (aggregate tokens per second)")
    g.add_argument("--prefill-tps", required=True, help="prompt tokens/s missing the context cache")
    g.add_argument("--cached-tps", required=True, help="prompt tokens/s read from the context cache")
    g.add_argument("--decode-tps", required=True, help="output tokens/s over the whole decode batch")
    g.add_argument("--decode-batch-size", type=int, default=1, help="batch the decode rate was measured at")
    g = p.add_argument_group("money")
    g.add_argument("--hardware-cost-per-hour", required=True, help="what the machine costs per hour")
    g.add_argument("--margin", default="0.10", help="price = cost * (1 + margin); default 0.10")
    g.add_argument("--currency", default="USD")
    p.add_argument("--model", default="", help="the model these prices are for")
    p.add_argument("--prices", default=DEFAULT_PRICES, metavar="FILE", help=f"output, default {DEFAULT_PRICES}")
    p.set_defaults(func=cmd_price_set)


def _accounts(args):
    from .accounts import Accounts

    return Accounts(args.db or _default_db())


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _key_dict(k) -> dict:
    from .pricing import format_money

    return {"id": k.id, "name": k.name, "prefix": k.key_prefix, "balance": format_money(k.balance),
            "held": format_money(k.held), "available": format_money(k.available),
            "created_at": k.created_at.isoformat(timespec="seconds"),
            "revoked_at": k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else None}


def cmd_create(args) -> int:
    from .accounts import AccountsError

    from .key_admin import KeyAdmin

    acc = _accounts(args)
    try:
        key, secret = KeyAdmin(acc).create_key(args.name, args.balance, admin=args.admin)
    except AccountsError as e:
        return _fail(str(e))
    finally:
        acc.close()
    d = _key_dict(key)
    print(f"created key {d['name']!r} (id {d['id']}) with balance {d['balance']}; "
          "the secret below is shown only now:", file=sys.stderr)
    print(secret)
    return 0


def cmd_list(args) -> int:
    acc = _accounts(args)
    try:
        rows = [_key_dict(k) for k in acc.list_keys()]
    finally:
        acc.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["id", "name", "prefix", "balance", "held", "available", "created_at", "revoked_at"]
    table = [cols] + [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _change(args, action) -> int:
    from .accounts import AccountsError

    acc = _accounts(args)
    try:
        key = action(acc)
    except AccountsError as e:
        return _fail(str(e))
    finally:
        acc.close()
    d = _key_dict(key)
    state = f"revoked at {d['revoked_at']}" if d["revoked_at"] else "active"
    print(f"key {d['name']!r} (id {d['id']}): balance {d['balance']}, available {d['available']}, {state}")
    return 0


def cmd_topup(args) -> int:
    def topup(acc):
        ref, by = _key_ref(args)
        return acc.topup(ref, args.amount, by=by)

    return _change(args, topup)


def cmd_revoke(args) -> int:
    return _change(args, lambda acc: acc.revoke(*_key_ref(args)))


def cmd_price_show(args) -> int:
    from .pricing import PriceSheet, PricingError

    try:
        sheet = PriceSheet.load(args.prices)
    except PricingError as e:
        return _fail(str(e))
    if args.json:
        print(sheet.to_json(), end="")
        return 0
    _print_sheet(sheet)
    return 0


def _print_sheet(sheet) -> None:
    d, t = sheet.to_dict(), sheet.throughput
    print(f"model {sheet.model or '-'}, prices in {sheet.currency} per 1M tokens "
          f"(margin {sheet.margin}, created {sheet.created})")
    print(f"{'':12}{'price':>14}{'cost':>14}{'tokens/s':>14}")
    for name, tps in (("input_hit", t.cached_tokens_per_s), ("input_miss", t.prefill_tokens_per_s),
                      ("output", t.decode_tokens_per_s)):
        print(f"{name:12}{d['prices'][name]:>14}{d['derivation']['costs'][name]:>14}{str(tps):>14}")
    print(f"hardware {sheet.hardware_cost_per_hour} {sheet.currency}/hour, "
          f"decode batch size {t.decode_batch_size}")


def cmd_price_set(args) -> int:
    from .pricing import PricingError, Throughput, derive_price_sheet

    try:
        sheet = derive_price_sheet(
            Throughput(args.prefill_tps, args.cached_tps, args.decode_tps, args.decode_batch_size),
            args.hardware_cost_per_hour, args.margin, currency=args.currency, model=args.model,
            notes="set by hand with `nanoseek price set`")
    except PricingError as e:
        return _fail(str(e))
    path = sheet.save(args.prices)
    _print_sheet(sheet)
    print(f"saved {path}")
    return 0


# ---------------------------------------------------------------------------- per-key settings
def register_key_settings(ks) -> None:
    """`keys limits` and `keys admin` (settings of nanoseek.serve.key_admin)."""
    p = ks.add_parser("limits", help="show or set a key's own rate limits (default: the server's flags)")
    _add_key_ref(p)
    for flag, what in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute"),
                       ("--concurrency", "requests in flight")):
        p.add_argument(flag, default=None, metavar="N", help=f"{what}: a number, 0 = unlimited, "
                                                             "'default' = the server's flag")
    _add_db(p)
    p.set_defaults(func=cmd_limits)

    p = ks.add_parser("admin", help="grant or withdraw a key's admin rights")
    _add_key_ref(p)
    p.add_argument("--revoke", action="store_true", help="withdraw admin rights instead of granting them")
    _add_db(p)
    p.set_defaults(func=cmd_admin)


def _limit_text(v) -> str:
    return "server default" if v is None else ("unlimited" if v == 0 else str(v))


def cmd_limits(args) -> int:
    from .accounts import AccountsError
    from .key_admin import KeyAdmin, LimitsUpdate

    acc = _accounts(args)
    try:
        admin = KeyAdmin(acc)
        key = acc.get_key(*_key_ref(args))
        given = {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm, "max_concurrent": args.concurrency}
        if any(v is not None for v in given.values()):
            current = admin.settings(key.id)
            # a flag not given keeps its value
            merged = {n: (getattr(current, n) if v is None else v) for n, v in given.items()}
            settings = admin.set_limits(key.id, LimitsUpdate.parse(merged))
        else:
            settings = admin.settings(key.id)
    except AccountsError as e:
        return _fail(str(e))
    finally:
        acc.close()
    print(f"key {key.name!r} (id {key.id}): rpm {_limit_text(settings.requests_per_minute)}, "
          f"tpm {_limit_text(settings.tokens_per_minute)}, concurrency {_limit_text(settings.max_concurrent)}"
          + (", admin" if settings.admin else ""))
    return 0


def cmd_admin(args) -> int:
    from .accounts import AccountsError
    from .key_admin import KeyAdmin

    acc = _accounts(args)
    try:
        key = acc.get_key(*_key_ref(args))
        KeyAdmin(acc).set_admin(key.id, not args.revoke)
    except AccountsError as e:
        return _fail(str(e))
    finally:
        acc.close()
    print(f"key {key.name!r} (id {key.id}) is {'no longer ' if args.revoke else ''}an admin key")
    return 0
