"""What every route shares: the config, the engine client, accounts, prices, limiter, metrics, and
the one error type the routes raise.

    state = ServeState(llm_engine, tokenizer, Accounts(url), sheet, ServeConfig(...))
    raise ApiError(400, "messages.0.role='tool' is not supported", "messages.0.role")
    return error_response(402, "insufficient balance ...")     # OpenAI's error shape

The lowest module of the server: it imports no route, so app.py, core.py and the route modules
all import it and none of them import each other upward.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from .limits import KeyLimits, Limiter
from .protocol import error_for_status

if TYPE_CHECKING:
    from nanoseek.engine.llm import LLMEngine

    from .accounts import Accounts, Key
    from .backends import Backend
    from .pricing import PriceSheet

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
    enforce_eager: bool = True           # False: compiled decode step (nanoseek.engine.compile)
    decode_kernel: str = "auto"          # the uncompiled step: "fused", "model" or "auto" (fused_decode.py)
    # per key limits (None: unlimited) and the global queue
    requests_per_minute: float | None = 600
    tokens_per_minute: float | None = 1_000_000
    max_concurrent: int | None = 16
    max_queue: int | None = 256
    # requests
    default_max_tokens: int = 512        # when a request names no max_tokens (bounds its hold)
    keepalive_s: float = 5.0             # SSE comment (Anthropic: ping) while a streamed request waits
    whole_keepalive_s: float | None = 5.0  # blank lines while a non-streamed one waits (whole.py); None: off
    # billing across crashes: the lease other servers must see expire before settling our holds,
    # and how often a request's usage so far is written onto its hold (every K tokens or S seconds)
    lease_ttl_s: float = 30.0
    record_every_tokens: int = 32
    record_every_s: float = 2.0
    max_body_bytes: int | None = None    # request body limit (413); None: derived from the context
    tokenizer_threads: int = 2           # prompts are tokenized on these, off the event loop
    shared_prefix_cache: bool = False    # True: all keys share cached prefixes (one tenant only)

    def limits(self) -> KeyLimits:
        return KeyLimits(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)


BODY_BYTES_PER_TOKEN = 32   # generous: JSON escapes a CJK character to 6 bytes, and it is ~1 token
BODY_BYTES_BASE = 2 ** 20


def default_body_limit(max_model_len: int) -> int:
    """The largest request body worth reading for a model with this context: 1 MiB plus 32 bytes per
    context token. A body beyond it cannot hold a prompt that fits (but with unusual tokens)."""
    return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * max_model_len


class ApiError(Exception):
    """A refusal with its HTTP status and the parameter it is about; each API family renders it in
    its own error shape (`response()` is OpenAI's)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.headers)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(error_for_status(status, message, param), status_code=status, headers=headers)


class ServeState:
    """What the routes share: backend (the local engine, or remote workers), tokenizer, accounts,
    prices, limiter, metrics. A gateway has no engine and no tokenizer (engine=tokenizer=None) and
    passes its RemotePool as `backend`."""

    def __init__(self, engine: "LLMEngine | None", tokenizer, accounts: "Accounts", sheet: "PriceSheet",
                 config: ServeConfig, limiter: Limiter | None = None, backend: "Backend | None" = None,
                 key_admin=None):
        from .backends import LocalBackend
        from .key_admin import KeyAdmin
        from .metrics import ServeMetrics

        self.llm = engine
        self.engine = None
        if engine is not None:
            # imported here so `nanoseek serve --help` (and a gateway) does not load torch
            from nanoseek.engine.async_engine import AsyncEngine

            self.engine = AsyncEngine(engine)
        self.backend = backend or LocalBackend(self.engine)
        self.tokenizer = tokenizer
        self.accounts = accounts
        self.sheet = sheet
        self.config = config
        self.model_name = config.model_name or Path(config.model_dir or "nanoseek").name
        self.limiter = limiter or Limiter(config.limits(), max_queue=config.max_queue)
        self.key_admin = key_admin or KeyAdmin(accounts)   # a worker passes its own (worker.py)
        self.metrics = ServeMetrics(engine)
        self.started = time.time()
        # a gateway does not know its backends' context: it allows DeepSeek-V3's 128K tokens
        self.max_body_bytes = config.max_body_bytes or default_body_limit(
            engine.max_model_len if engine is not None else 131_072)
        self.tokenize_pool = ThreadPoolExecutor(max(1, config.tokenizer_threads),
                                                thread_name_prefix="nanoseek-tokenize")
        if tokenizer is not None:
            self._warm_up_tokenizer()

    def _warm_up_tokenizer(self) -> None:
        """Build what the tokenizer builds on first use (the chat template, the text-only copy) now:
        done by the first large request, it held the GIL for seconds and stalled the event loop."""
        self.tokenizer.encode("x", split_special_tokens=True)
        with contextlib.suppress(ValueError):  # a tokenizer without a chat template
            self.tokenizer.encode_chat([{"role": "user", "content": "x"}])

    def cache_salt(self, key: "Key") -> str | None:
        """The prefix-cache namespace of a key's requests: its account, unless all share one."""
        return None if self.config.shared_prefix_cache else f"key:{key.id}"

    async def authenticate(self, request: Request, headers: tuple[str, ...] = ("authorization",)) -> "Key | None":
        """The caller's active key, or None (401), from the first of `headers` the request has
        (Anthropic's clients send `x-api-key`). The limiter learns the key's own limits here
        (key_settings; the server's flags where it has none), so a change made by an admin, the
        keys CLI or another replica applies from the key's next request."""
        header = next((request.headers[h] for h in headers if h in request.headers), None)

        def find() -> "Key | None":
            key = self.accounts.authenticate(header)
            if key is not None:
                self.limiter.set_limits(key.id, self.key_admin.settings(key.id).limits(self.limiter.default))
            return key

        return await asyncio.to_thread(find)
