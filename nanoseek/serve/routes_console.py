"""The web console: its pages at `/` and the JSON it reads under /v1/dashboard/.

    register_console_routes(app, state)        # called by app.create_app

Pages are plain HTML, CSS and ES-module JavaScript in `console/` (package data; no CDN, no build
step). They keep the API key in the browser's sessionStorage and send it as the API does
(Authorization: Bearer), so the key never appears in a URL or an access log. A Content-Security-
Policy lets the page load and fetch from its own origin only.

Endpoints (GET unless said; 401 without a valid key; one key only ever reads its own rows):
    /v1/dashboard/me                      the key: balance, held, available, limits, admin
    /v1/dashboard/usage?days=14           tokens and spend per UTC day
    /v1/dashboard/requests?limit=&before= recent requests from the ledger, newest first, paged
    /v1/dashboard/requests/{request_id}   one billed request (404 if not this key's)
    /v1/dashboard/server                  engine gauges and counters, read from /metrics' registry
  admin keys only (403 otherwise; every change is written to admin_log):
    /v1/dashboard/admin/keys              all keys with their usage;  POST: create (secret shown once)
    POST /v1/dashboard/admin/keys/{id}/topup {"amount"} · /revoke · PUT .../limits {rpm, tpm, concurrency}
    /v1/dashboard/admin/log               admin actions, newest first
"""

from __future__ import annotations

import asyncio
import functools
import time
import typing
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .accounts import AccountsError, Key, KeyNotFound
from .core import authenticate, read_json
from .key_admin import KeySettings, LimitsUpdate
from .pricing import format_money
from .protocol import ResponseFormat
from .state import ApiError, ServeState, error_response

CONSOLE_DIR = Path(__file__).parent / "console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
NOT_ADMIN = ("this key is not an admin key; the admin pages need a key created with "
             "`nanoseek keys create --admin`")
# the console's names for the limits, as the keys CLI spells them
LIMIT_NAMES = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "concurrency": "max_concurrent"}


def json_mode_supported() -> bool:
    """Whether the API accepts response_format={"type": "json_object"} (the playground's JSON mode)."""
    return "json_object" in typing.get_args(ResponseFormat.model_fields["type"].annotation)


def limits_dict(limits) -> dict:
    return {"rpm": limits.requests_per_minute, "tpm": limits.tokens_per_minute,
            "concurrency": limits.max_concurrent}


def key_dict(key: Key, settings: KeySettings, default_limits) -> dict:
    own = settings.to_dict()
    return {"id": key.id, "name": key.name, "prefix": key.key_prefix, "admin": settings.admin,
            "balance": format_money(key.balance), "held": format_money(key.held),
            "available": format_money(key.available), "created_at": key.created_at.isoformat(timespec="seconds"),
            "revoked_at": key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else None,
            "limits": {short: own[long] for short, long in LIMIT_NAMES.items()},   # null: server default
            "effective_limits": limits_dict(settings.limits(default_limits))}


def int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}={raw!r} must be a whole number", name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}={value} must be between {lo} and {hi}", name)
    return value


def register_console_routes(app: FastAPI, state: ServeState) -> None:
    from . import usage

    db = state.accounts.engine
    keys = state.key_admin

    def guarded(handler):
        """ApiError and bad account input become the API's error responses."""
        @functools.wraps(handler)
        async def run(request: Request, *args, **kw):
            try:
                return await handler(request, *args, **kw)
            except ApiError as e:
                return e.response()
            except KeyNotFound as e:
                return error_response(404, str(e))
            except AccountsError as e:  # a bad amount, name or limit
                return error_response(400, str(e))
        return run

    async def caller(request: Request) -> tuple[Key, KeySettings]:
        key = await authenticate(state, request)
        return key, await asyncio.to_thread(keys.settings, key.id)

    async def admin(request: Request) -> Key:
        key, settings = await caller(request)
        if not settings.admin:
            raise ApiError(403, NOT_ADMIN)
        return key

    # ------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(CONSOLE_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    # ------------------------------------------------------------------ the signed-in key
    @app.get("/v1/dashboard/me")
    @guarded
    async def me(request: Request):
        key, settings = await caller(request)
        return {**key_dict(key, settings, state.limiter.default), "currency": state.sheet.currency,
                "model": state.model_name, "features": {"json_mode": json_mode_supported()}}

    @app.get("/v1/dashboard/usage")
    @guarded
    async def usage_per_day(request: Request):
        key, _ = await caller(request)
        days = int_param(request, "days", 14, 1, usage.MAX_DAYS)
        rows = await asyncio.to_thread(usage.daily_usage, db, key.id, days)
        total = await asyncio.to_thread(usage.totals, db, key.id)
        return {"currency": state.sheet.currency, "days": rows, "total": total.to_dict()}

    @app.get("/v1/dashboard/requests")
    @guarded
    async def requests(request: Request):
        key, _ = await caller(request)
        limit = int_param(request, "limit", 20, 1, usage.MAX_PAGE)
        before = int_param(request, "before", None, 1, 2**62)
        page = await asyncio.to_thread(usage.recent_requests, db, key.id, limit, before)
        return {"currency": state.sheet.currency, "data": page.rows, "next_before": page.next_before}

    @app.get("/v1/dashboard/requests/{request_id}")
    @guarded
    async def one_request(request: Request, request_id: str):
        key, _ = await caller(request)
        row = await asyncio.to_thread(usage.request_for_key, db, key.id, request_id)
        if row is None:
            raise ApiError(404, f"no billed request {request_id!r} for this key")
        return {"currency": state.sheet.currency, **row}

    @app.get("/v1/dashboard/server")
    @guarded
    async def server(request: Request):
        await caller(request)
        return server_metrics(state)

    # ------------------------------------------------------------------ admin
    @app.get("/v1/dashboard/admin/keys")
    @guarded
    async def list_keys(request: Request):
        await admin(request)

        def read():
            all_keys, settings, totals = (state.accounts.list_keys(), keys.all_settings(),
                                          usage.totals_by_key(db))
            return [{**key_dict(k, settings.get(k.id, KeySettings()), state.limiter.default),
                     "usage": totals.get(k.id, usage.Totals()).to_dict()} for k in all_keys]
        return {"currency": state.sheet.currency, "data": await asyncio.to_thread(read)}

    @app.post("/v1/dashboard/admin/keys")
    @guarded
    async def create_key(request: Request):
        actor = await admin(request)
        body = await read_json(request)
        unknown = set(body) - {"name", "balance", "admin"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}; send name, balance, admin")
        if not isinstance(body.get("admin", False), bool):
            raise ApiError(400, f"admin={body['admin']!r} must be true or false", "admin")
        key, secret = await asyncio.to_thread(keys.create_key, body.get("name"), body.get("balance", "0"),
                                              body.get("admin", False), actor.id)
        settings = await asyncio.to_thread(keys.settings, key.id)
        return {**key_dict(key, settings, state.limiter.default), "secret": secret}

    @app.post("/v1/dashboard/admin/keys/{key_id}/topup")
    @guarded
    async def topup(request: Request, key_id: int):
        actor = await admin(request)
        body = await read_json(request)
        if "amount" not in body:
            raise ApiError(400, "amount is required (an exact decimal > 0)", "amount")
        amount = body["amount"]
        if isinstance(amount, float):  # JSON numbers arrive as floats: take them as written
            amount = repr(amount)
        key = await asyncio.to_thread(keys.topup, key_id, amount, actor.id)
        return key_dict(key, await asyncio.to_thread(keys.settings, key.id), state.limiter.default)

    @app.post("/v1/dashboard/admin/keys/{key_id}/revoke")
    @guarded
    async def revoke(request: Request, key_id: int):
        actor = await admin(request)
        if key_id == actor.id:
            raise ApiError(400, "refusing to revoke the key you are signed in with; use another admin "
                                "key or `nanoseek keys revoke`")
        key = await asyncio.to_thread(keys.revoke, key_id, actor.id)
        return key_dict(key, await asyncio.to_thread(keys.settings, key.id), state.limiter.default)

    @app.put("/v1/dashboard/admin/keys/{key_id}/limits")
    @guarded
    async def set_limits(request: Request, key_id: int):
        actor = await admin(request)
        body = await read_json(request)
        unknown = set(body) - set(LIMIT_NAMES)
        if unknown:
            raise ApiError(400, f"unknown limit {sorted(unknown)[0]!r}; send {sorted(LIMIT_NAMES)}")
        update = LimitsUpdate.parse({LIMIT_NAMES[k]: v for k, v in body.items()})
        await asyncio.to_thread(keys.set_limits, key_id, update, actor.id)
        key = await asyncio.to_thread(state.accounts.get_key, key_id)
        return key_dict(key, await asyncio.to_thread(keys.settings, key.id), state.limiter.default)

    @app.get("/v1/dashboard/admin/log")
    @guarded
    async def admin_log(request: Request):
        await admin(request)
        limit = int_param(request, "limit", 50, 1, usage.MAX_PAGE)
        return {"data": [a.to_dict() for a in await asyncio.to_thread(keys.log, limit)]}


def server_metrics(state: ServeState) -> dict:
    """The engine's numbers, read from the Prometheus registry /metrics renders (same counters)."""
    reg = state.metrics.registry

    def value(name: str) -> float:
        v = reg.get_sample_value(name)
        return 0.0 if v is None else v

    hits, queries = value("nanoseek:prefix_cache_hits_total"), value("nanoseek:prefix_cache_queries_total")
    return {
        "model": state.model_name,
        "time": time.time(),
        "uptime_s": round(time.time() - state.started, 3),
        "requests_running": int(value("nanoseek:num_requests_running")),
        "requests_waiting": int(value("nanoseek:num_requests_waiting")),
        "kv_cache_usage": value("nanoseek:kv_cache_usage_perc"),
        "prompt_tokens_total": int(value("nanoseek:prompt_tokens_total")),
        "generation_tokens_total": int(value("nanoseek:generation_tokens_total")),
        "prefix_cache_hits_total": int(hits),
        "prefix_cache_queries_total": int(queries),
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "requests_in_flight": state.limiter.in_flight,
        "engine_alive": state.backend.problem() is None,   # a gateway: some backend is healthy
    }
