"""The HTTP API: FastAPI app over one engine thread, the accounts database and the price sheet.

    from nanoseek.serve.app import ServeConfig, build_app
    app = build_app(ServeConfig(model_dir="runs/default/model", db="sqlite:///runs/nanoseek.db"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `nanoseek serve` does

Routes: POST /v1/chat/completions and /v1/completions (routes_generate.py), GET /v1/models,
/v1/user/balance (also /user/balance, DeepSeek's path), /v1/pricing, /health, /metrics. Every
error answers in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

At start the app releases holds a crashed predecessor left behind (one server per database by
default; with several replicas pass `stale_hold_age_s` longer than the longest request), so a
restart keeps balances and the ledger and frees nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .limits import KeyLimits, Limiter
from .protocol import ModelCard, ModelList, UserBalance, error_for_status

DEFAULT_DB_URL = "sqlite:///runs/nanoseek.db"


@dataclass
class ServeConfig:
    model_dir: str = ""
    model_name: str = ""                 # the id clients send as `model`; default: folder name
    db: str = ""                         # default: $NANOSEEK_DB or sqlite:///runs/nanoseek.db
    prices: str = "runs/prices.json"
    cache_dir: str | None = None         # the engine's on-disk context cache
    # engine
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    # per key limits (None: unlimited) and the global queue
    requests_per_minute: float | None = 600
    tokens_per_minute: float | None = 1_000_000
    max_concurrent: int | None = 16
    max_queue: int | None = 256
    # requests
    default_max_tokens: int = 512        # when a request names no max_tokens (bounds its hold)
    keepalive_s: float = 5.0             # SSE comment while a streamed request waits
    stale_hold_age_s: float = 0.0        # holds older than this are released at start (0: all)

    def limits(self) -> KeyLimits:
        return KeyLimits(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_for_status(status, message, param), status_code=status, headers=headers)


class ServeState:
    """What the routes share: engine, tokenizer, accounts, prices, limiter, metrics."""

    def __init__(self, engine, tokenizer, accounts, sheet, config: ServeConfig, limiter: Limiter | None = None):
        from nanoseek.engine.async_engine import AsyncEngine
        from .metrics import ServeMetrics

        self.llm = engine
        self.engine = AsyncEngine(engine)
        self.tokenizer = tokenizer
        self.accounts = accounts
        self.sheet = sheet
        self.config = config
        self.model_name = config.model_name or Path(config.model_dir or "nanoseek").name
        self.limiter = limiter or Limiter(config.limits(), max_queue=config.max_queue)
        self.metrics = ServeMetrics(engine)
        self.started = time.time()

    async def authenticate(self, request: Request):
        """The caller's active key, or None (401)."""
        header = request.headers.get("authorization")
        return await asyncio.to_thread(self.accounts.authenticate, header)


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI app over a ready ServeState (tests build the state from in-memory parts)."""
    from .routes_generate import register_generate_routes

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        released = await asyncio.to_thread(state.accounts.release_stale_holds, state.config.stale_hold_age_s)
        if released:
            print(f"released {released} holds left by an earlier server", flush=True)
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

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
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        if state.engine.error is not None:
            return error_response(503, f"engine thread stopped: {state.engine.error!r}")
        return {"status": "ok", "model": state.model_name, "uptime_s": round(time.time() - state.started, 1),
                "requests_in_flight": state.limiter.in_flight}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=state.model_name, created=int(state.started))]).model_dump()

    @app.get("/v1/pricing")
    async def pricing():
        sheet = state.sheet.to_dict()
        sheet["model"] = sheet.get("model") or state.model_name
        return sheet

    async def balance(request: Request):
        key = await state.authenticate(request)
        if key is None:
            return error_response(401, "missing or invalid API key (send Authorization: Bearer sk-...)")
        return UserBalance.from_available(key.available, state.sheet.currency).model_dump()

    app.get("/v1/user/balance")(balance)
    app.get("/user/balance")(balance)
    register_generate_routes(app, state)
    return app


def load_state(config: ServeConfig) -> ServeState:
    """Load model, tokenizer, price sheet and accounts from disk; errors name the missing file."""
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
    sheet = PriceSheet.load(config.prices)
    model = load_model(str(folder))
    tokenizer = load_tokenizer(str(folder))
    engine = LLMEngine(model, tokenizer, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                       max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
                       kv_cache_bytes=config.kv_cache_bytes, cache_dir=config.cache_dir)
    url = config.db or os.environ.get("NANOSEEK_DB") or DEFAULT_DB_URL
    return ServeState(engine, tokenizer, Accounts(url), sheet, config)


def build_app(config: ServeConfig) -> FastAPI:
    return create_app(load_state(config))
