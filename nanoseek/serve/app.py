"""The HTTP API: FastAPI app over one engine thread, the accounts database and the price sheet.

    from nanoseek.serve.app import ServeConfig, build_app
    app = build_app(ServeConfig(model_dir="runs/default/model", db="sqlite:///runs/nanoseek.db"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `nanoseek serve` does

Routes: POST /v1/chat/completions and /v1/completions (routes_openai.py) and Anthropic's
/anthropic/v1/messages (routes_anthropic.py), siblings over the generation core in core.py
(non-streamed replies in whole.py; shared state and errors in state.py), GET /v1/models,
/v1/user/balance (also /user/balance, DeepSeek's path), /v1/pricing, /health, /metrics; the web
console at / and its JSON under /v1/dashboard/ (routes_console.py). Every error answers in
OpenAI's shape {"error": {"message", "type", "param", "code"}}, but /anthropic's, in Anthropic's.

While it runs the app keeps a lease on the accounts database (leases.py): at start, and every
lease_ttl_s/3 after, it settles the holds of servers whose lease expired at their recorded usage,
and never touches a live server's, so replicas and blue/green restarts share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .responses import ModelCard, ModelList, UserBalance
from .routes_anthropic import register_anthropic_routes
from .routes_console import register_console_routes
from .routes_openai import register_openai_routes
from .state import DEFAULT_DB_URL, ServeConfig, ServeState, error_response

__all__ = ["DEFAULT_DB_URL", "ServeConfig", "ServeState", "build_app", "create_app", "load_state"]


def create_app(state: ServeState, console: bool = True) -> FastAPI:
    """The FastAPI app over a ready ServeState (tests build the state from in-memory parts); a
    worker has no console (console=False): it has no keys to sign in with."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from .leases import LeaseKeeper

        keeper = LeaseKeeper(state.accounts, state.config.lease_ttl_s)
        await asyncio.to_thread(keeper.start)
        await state.backend.start()
        try:
            yield
        finally:
            await state.backend.shutdown()
            await asyncio.to_thread(keeper.stop)
            state.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan)
    app.state.serve = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404:
            detail = f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions"
        return error_response(status, detail)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # the details go to the log under an id the client can quote; the body carries no internals
        rid = "err-" + uuid.uuid4().hex
        logging.getLogger("nanoseek.serve").error("request %s %s %s failed", rid, request.method,
                                                  request.url.path, exc_info=exc)
        return error_response(500, f"internal server error (request id {rid})", None, {"X-Request-Id": rid})

    @app.get("/health")
    async def health():
        """200 while the engine thread (a gateway: some backend) runs; 503 once it stopped."""
        if state.engine is None:  # a gateway
            problem = state.backend.problem()
            if problem is not None:
                return error_response(503, problem)
            return {"status": "ok", "model": state.model_name,
                    "uptime_s": round(time.time() - state.started, 1), "requests_in_flight": state.limiter.in_flight}
        eng = state.engine
        age = eng.last_step_age_s
        engine = {"alive": eng.alive, "last_loop_age_s": None if age is None else round(age, 3),
                  "failed_steps": eng.num_failed_steps}
        if not eng.alive:
            why = "stopped" if eng.error is None else f"stopped after {type(eng.error).__name__}"
            return error_response(503, f"the engine thread has {why}; restart the server")
        return {"status": "ok", "model": state.model_name, "uptime_s": round(time.time() - state.started, 1),
                "requests_in_flight": state.limiter.in_flight, "engine": engine}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body + state.backend.render_metrics(), media_type=content_type)

    @app.get("/v1/models")
    async def models():
        context = None if state.llm is None else state.llm.max_model_len
        return ModelList(data=[ModelCard(id=state.model_name, created=int(state.started),
                                         max_model_len=context)]).model_dump(exclude_none=True)

    @app.get("/v1/pricing")
    async def pricing():
        sheet = state.sheet.to_dict()
        sheet["model"] = sheet.get("model") or state.model_name
        if state.llm is None:  # a gateway: the backends count the cache hits
            from .gateway import CACHE_NOTE

            sheet["cache_hits"] = CACHE_NOTE
        return sheet

    async def balance(request: Request):
        key = await state.authenticate(request)
        if key is None:
            return error_response(401, "missing or invalid API key (send Authorization: Bearer sk-...)")
        return UserBalance.from_available(key.available, state.sheet.currency).model_dump()

    app.get("/v1/user/balance")(balance)
    app.get("/user/balance")(balance)
    register_openai_routes(app, state)
    if state.tokenizer is not None:  # not on a gateway: it forwards OpenAI bodies only
        register_anthropic_routes(app, state)
    if console:
        register_console_routes(app, state)
    return app


def load_state(config: ServeConfig, accounts=None, sheet=None, key_admin=None) -> ServeState:
    """Load model, tokenizer, price sheet and accounts from disk; errors name the missing file.
    A worker passes its own `accounts` (worker.Unmetered) and `sheet`."""
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.engine.llm import LLMEngine
    from nanoseek.model.checkpoint import load_model

    from .accounts import Accounts
    from .pricing import PriceSheet

    folder = Path(config.model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json there (a model folder in HF layout)")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no tokenizer.json there; the API needs one to read text")
    sheet = sheet or PriceSheet.load(config.prices)
    model = load_model(str(folder))
    tokenizer = load_tokenizer(str(folder))
    engine = LLMEngine(model, tokenizer, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                       max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
                       kv_cache_bytes=config.kv_cache_bytes, cache_dir=config.cache_dir,
                       enforce_eager=config.enforce_eager, decode_kernel=config.decode_kernel)
    if not config.enforce_eager:  # compile before serving, not while the first requests wait
        t = time.perf_counter()
        buckets = engine.warmup_decode()
        logging.getLogger("nanoseek.serve").info("compiled %d decode buckets in %.0f s", len(buckets),
                                                 time.perf_counter() - t)
    url = config.db or os.environ.get("NANOSEEK_DB") or DEFAULT_DB_URL
    return ServeState(engine, tokenizer, accounts or Accounts(url), sheet, config, key_admin=key_admin)


def gateway_state(config: ServeConfig, pool) -> ServeState:
    """A gateway's state: accounts and prices from disk, generation by the RemotePool; no model."""
    from .accounts import Accounts
    from .pricing import PriceSheet

    sheet = PriceSheet.load(config.prices)
    url = config.db or os.environ.get("NANOSEEK_DB") or DEFAULT_DB_URL
    return ServeState(None, None, Accounts(url), sheet, config, backend=pool)


def build_app(config: ServeConfig) -> FastAPI:
    return create_app(load_state(config))
