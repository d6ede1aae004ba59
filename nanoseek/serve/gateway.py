"""The gateway's backend: a pool of OpenAI-compatible workers (nanoseek `serve --worker`, vLLM,
SGLang, llama.cpp) behind nanoseek's keys, limits and ledger.

    pool = RemotePool(["http://10.0.0.2:8001", "http://10.0.0.3:8001"])
    state = ServeState(None, None, Accounts(url), sheet, config, backend=pool)   # no model loaded
    job = forwarded_job(state, req)          # routes_openai.build_job does this when tokenizer is None

Every request goes upstream as a stream (whatever the client asked) with `max_tokens` set to what
the hold covers and usage asked for on every chunk (`stream_options.continuous_usage_stats`, as
vLLM and nanoseek workers send it), so a stream cut short is billed for what was delivered. The
bill is the backend's usage: cached prompt tokens from `usage.prompt_tokens_details.cached_tokens`
or nanoseek's `prompt_cache_hit_tokens`; a backend that reports neither is billed as misses.
Before the backend's usage arrives, output is counted one token per text chunk and the prompt at
the gateway's estimate (one token per UTF-8 byte plus the chat template's per-message overhead, an
upper bound for byte-level BPE tokenizers); the hold is taken on that estimate too.

A request that has not produced anything is retried on another backend when one fails (refused
connection, 5xx, 429, a broken stream); one whose output has begun ends with BackendError (502),
which the route sends as an error event. A failed backend leaves the rotation until its health
check (GET /health, backing off exponentially) passes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, AsyncIterator

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanoseek.engine.async_engine import OutputDelta, Update

from .backends import BackendError, BackendJob
from .routing import BackendState, Router, prefix_hashes
from .state import ApiError

if TYPE_CHECKING:
    from .core import Job
    from .protocol import ChatCompletionRequest, CompletionRequest
    from .state import ServeState

MESSAGE_OVERHEAD = 8     # prompt tokens a chat template may add per message (role markers, BOS)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RETRYABLE = {408, 429, 500, 502, 503, 504}
CACHE_NOTE = ("a gateway bills cached prompt tokens at input_hit only when the backend reports them "
              "(usage.prompt_tokens_details.cached_tokens or prompt_cache_hit_tokens); prompt tokens "
              "of a backend that reports no cached count are billed as cache misses")


# ---------------------------------------------------------------------------- the job
def forwarded_job(state: "ServeState", req: "ChatCompletionRequest | CompletionRequest") -> "Job":
    """The request as a Job for a remote backend: the body to send, the prompt-token estimate the
    hold is taken on, and the prefix hashes that route it (ApiError for what cannot be forwarded)."""
    from .core import Job, make_sampling_params, new_id
    from .protocol import ChatCompletionRequest

    chat = isinstance(req, ChatCompletionRequest)
    if (req.logprobs if chat else req.logprobs is not None):
        raise ApiError(400, "logprobs: not available through the gateway", "logprobs")
    if not chat and (req.echo or len(req.prompts) != 1):
        param = "echo" if req.echo else "prompt"
        raise ApiError(400, f"{param}: one prompt per request, without echo, through the gateway", param)
    if chat:
        estimate = len(prompt_text(req.model_dump()).encode()) + MESSAGE_OVERHEAD * (len(req.messages) + 1)
    else:
        prompt = req.prompts[0]
        estimate = len(prompt) if isinstance(prompt, list) else len(prompt.encode()) + MESSAGE_OVERHEAD
        if req.suffix is not None:
            estimate += len(req.suffix.encode()) + MESSAGE_OVERHEAD
    max_tokens = req.max_tokens or state.config.default_max_tokens
    body = req.model_dump(exclude_unset=True)
    body.pop("max_completion_tokens", None)
    body.update(max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    params = make_sampling_params(n=req.n, max_tokens=max_tokens)   # only n and max_tokens are read
    kind, prefix = ("chat", "chatcmpl-") if chat else ("completion", "cmpl-")
    return Job(new_id(prefix), kind, [], params, body=body, num_prompt=estimate)


def prompt_text(body: dict) -> str:
    """The prompt of a chat or completion body as text, what routing hashes by prefix."""
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content")
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(f"{m.get('role')}\n{c or ''}\n")
        return "".join(parts)
    p = body.get("prompt", "")
    return p if isinstance(p, str) else json.dumps(p)


def reported_usage(usage: dict) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens from an OpenAI-shaped usage object."""
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens") or 0
    return int(usage.get("prompt_tokens") or 0), int(cached), int(usage.get("completion_tokens") or 0)


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace")


class _Retry(Exception):
    """The backend failed before producing anything: try another."""


# ---------------------------------------------------------------------------- the pool
class RemotePool:
    def __init__(self, urls: list[str], *, health_interval_s: float = 2.0, max_backoff_s: float = 30.0,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 300.0, slack: int = 4,
                 max_connections: int = 1024):
        if not urls:
            raise ValueError("--backend: at least one backend URL is needed")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"--backend {u!r}: expected an http:// or https:// URL")
        self.backends = [BackendState(u.rstrip("/").removesuffix("/v1")) for u in urls]
        self.router = Router(self.backends, slack=slack)
        self.health_interval_s, self.max_backoff_s = health_interval_s, max_backoff_s
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("nanoseek:backend_requests", "requests sent to a backend", ["backend"], registry=r)
        self.m_errors = Counter("nanoseek:backend_errors", "failed requests and health checks by kind",
                                ["backend", "kind"], registry=r)
        self.m_ttft = Histogram("nanoseek:backend_time_to_first_token_seconds", "request sent to first text",
                                ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.m_latency = Histogram("nanoseek:backend_request_seconds", "request sent to its last byte",
                                   ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.m_routed = Counter("nanoseek:backend_routed", "routing decisions: affinity (a known prefix), "
                                "least_loaded, retry", ["backend", "how"], registry=r)
        self.m_prompt = Counter("nanoseek:backend_prompt_tokens", "prompt tokens the backend reported",
                                ["backend"], registry=r)
        self.m_cached = Counter("nanoseek:backend_cached_tokens", "prompt tokens the backend served from "
                                "its cache (cached / prompt is the hit rate routing achieves)", ["backend"],
                                registry=r)
        self.m_healthy = Gauge("nanoseek:backend_healthy", "1 while in rotation", ["backend"], registry=r)
        self.m_in_flight = Gauge("nanoseek:backend_in_flight", "requests in flight", ["backend"], registry=r)
        for b in self.backends:
            self.m_healthy.labels(b.name).set_function(lambda b=b: float(b.healthy))
            self.m_in_flight.labels(b.name).set_function(lambda b=b: b.in_flight)

    # ------------------------------------------------------------------ lifecycle and health
    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=self.timeout, limits=self.limits)
        await asyncio.gather(*(self.check(b) for b in self.backends))
        self._health_task = asyncio.create_task(self._health_loop())

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.client is not None:
            await self.client.aclose()

    def problem(self) -> str | None:
        if any(b.healthy for b in self.backends):
            return None
        return "no backend is healthy: " + ", ".join(b.url for b in self.backends)

    def render_metrics(self) -> bytes:
        return generate_latest(self.registry)

    async def check(self, b: BackendState) -> bool:
        """GET /health (and /v1/models once, for the model id); updates the backend's health."""
        try:
            r = await self.client.get(b.url + "/health", timeout=self.timeout.connect)
            ok = r.status_code == 200
            if ok and b.model is None:
                r = await self.client.get(b.url + "/v1/models", timeout=self.timeout.connect)
                data = r.json().get("data") or [{}]
                b.model = data[0].get("id")
        except (httpx.HTTPError, ValueError, AttributeError):
            ok = False
        now = time.monotonic()
        if ok:
            b.recovered(now, self.health_interval_s)
        else:
            self.m_errors.labels(b.name, "health").inc()
            b.failed(now, self.health_interval_s, self.max_backoff_s)
        return ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.health_interval_s, 0.5))
            now = time.monotonic()
            due = [b for b in self.backends if b.next_check <= now]
            if due:
                await asyncio.gather(*(self.check(b) for b in due))

    def _failed(self, b: BackendState, kind: str) -> None:
        self.m_errors.labels(b.name, kind).inc()
        b.failed(time.monotonic(), self.health_interval_s, self.max_backoff_s)

    # ------------------------------------------------------------------ generation
    async def generate(self, job: BackendJob, keepalive_s: float | None = None) -> AsyncIterator[Update | None]:
        """The job's updates from the first backend that takes it; retried elsewhere while nothing
        has been produced. An upstream keep-alive comment comes through as None."""
        hashes = prefix_hashes(prompt_text(job.body))
        tried: set[str] = set()
        last = "no backend is configured"
        while True:
            b, how = self.router.pick(hashes, tried)
            if b is None:
                raise BackendError(503, f"no backend could take the request ({last})")
            self.router.record(hashes, b)
            self.m_routed.labels(b.name, "retry" if tried else how).inc()
            tried.add(b.url)
            try:
                async with contextlib.aclosing(self._stream(b, job)) as updates:
                    async for update in updates:
                        yield update
                return
            except _Retry as e:
                last = f"{b.url}: {e}"

    async def _stream(self, b: BackendState, job: BackendJob) -> AsyncIterator[Update | None]:
        path = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        body = dict(job.body, model=b.model or job.body.get("model"))
        started, chunks, finished = False, 0, set()
        prompt = cached = 0
        output: int | None = None
        t0 = time.monotonic()
        b.in_flight += 1
        self.m_requests.labels(b.name).inc()
        try:
            async with self.client.stream("POST", b.url + path, json=body) as resp:
                if resp.status_code != 200:
                    message = _error_message(await resp.aread())
                    if resp.status_code in RETRYABLE:
                        self.m_errors.labels(b.name, f"http_{resp.status_code}").inc()
                        if resp.status_code >= 500:
                            self._failed(b, "unavailable")
                        raise _Retry(f"HTTP {resp.status_code}: {message}")
                    self.m_errors.labels(b.name, f"http_{resp.status_code}").inc()
                    if resp.status_code in (400, 422):
                        raise ValueError(message)  # the client's request: the route answers 400
                    raise BackendError(502, f"backend {b.url} answered HTTP {resp.status_code}: {message}")
                async for line in resp.aiter_lines():
                    if line.startswith(":"):
                        yield None  # the backend's keep-alive while the request waits
                        continue
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        message = _error_message(data.encode())
                        self.m_errors.labels(b.name, "stream_error").inc()
                        if started:
                            raise BackendError(502, f"backend {b.url} failed mid-stream: {message}")
                        raise ValueError(message)
                    deltas = []
                    for c in chunk.get("choices") or []:
                        text = (c.get("delta") or {}).get("content") if job.kind == "chat" else c.get("text")
                        reason = c.get("finish_reason")
                        if text:
                            chunks += 1
                        if reason is not None:
                            finished.add(c.get("index", 0))
                        if text or reason is not None:
                            deltas.append(OutputDelta(c.get("index", 0), text or "", [], None, reason))
                    if chunk.get("usage"):
                        prompt, cached, output = reported_usage(chunk["usage"])
                    if not deltas and not chunk.get("usage"):
                        continue
                    if not started and chunks:
                        started = True
                        self.m_ttft.labels(b.name).observe(time.monotonic() - t0)
                    yield Update(job.id, prompt, cached, deltas, False,
                                 num_output_tokens=max(chunks, output or 0))
            if len(finished) < job.params.n:
                raise httpx.RemoteProtocolError("the stream ended before every output finished")
            self.m_prompt.labels(b.name).inc(prompt)
            self.m_cached.labels(b.name).inc(cached)
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self._failed(b, "transport")
            if not started:
                raise _Retry(f"{type(e).__name__}: {e}") from None
            raise BackendError(502, f"backend {b.url} failed mid-stream after {chunks} chunks: "
                                    f"{type(e).__name__}: {e}") from None
        finally:
            b.in_flight -= 1
            self.m_latency.labels(b.name).observe(time.monotonic() - t0)
