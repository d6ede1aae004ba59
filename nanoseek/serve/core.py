"""One generation core under every API route: admit → reserve → generate → settle.

    key = await authenticate_generation(state, request)   # 401; then 429 / 402 before the body is read
    req = parse_body(await read_json(request, state.max_body_bytes), ChatCompletionRequest)  # 413/400/422
    check_prompt_chars(state, texts, req.max_tokens, "messages")  # 400 before tokenizing
    prompt_ids = await off_loop(state, tokenizer.encode_chat, messages)   # on the tokenizer threads
    params = make_sampling_params(max_tokens=default_max_tokens(state, len(prompt_ids), req.max_tokens), ...)
    check_request(state, prompt_ids, params, "messages")   # 400 naming the field (vocab, context)
    job = Job(new_id("chatcmpl-"), "chat", prompt_ids, params, cache_salt=state.cache_salt(key))
    await admit(state, key, job)          # the key's tokens and concurrency (429, 503), its hold (402)
    try:
        async for update in generate(state, job):               # absorbed into job as they come
            ...
    finally:
        await close_job(state, job, route, status)              # settle what was produced

While it generates, the job's usage so far is written onto its hold at its first token and then
every K tokens or S seconds (`record_progress`), so that if this server dies another settles
the hold at that usage (leases.py; the bound is in README, Serve).

Work before admission is bounded, cheapest check first: the key (one indexed lookup), its request
rate (every request counts, refused or not) and a zero balance are checked before the body is
read; the body is read up to a size limit; prompts that cannot fit are refused by their length in
characters before they are tokenized; tokenization runs on its own threads, so a huge prompt never
stalls the event loop (or /health).

A request that produced nothing is released instead of settled. The settle runs shielded from
cancellation, so a client that disconnects (streamed or not) is billed for the tokens produced up
to then and no more; closing the generation aborts the engine request, which frees its KV blocks.
Routes (routes_openai.py, ...) know their API's shapes; this module knows none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Literal, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError

from .protocol import validation_error_body
from .state import ApiError, ServeState

if TYPE_CHECKING:
    from nanoseek.engine.async_engine import Update
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.engine.structured import StructuredOutputs

    from .accounts import Key, Reservation
    from .limits import Permit

JobKind = Literal["chat", "completion"]
Body = TypeVar("Body", bound=BaseModel)
log = logging.getLogger("nanoseek.serve")
NO_KEY = "missing or invalid API key (send Authorization: Bearer sk-...)"


@dataclass
class Job:
    """An admitted request: its prompt, limits permit and hold, and what it has produced so far."""

    id: str
    kind: JobKind
    prompt_ids: list[int]
    params: "SamplingParams"
    cache_salt: str | None = None # prefix-cache namespace (the tenant); None: shared
    permit: "Permit | None" = None
    reservation: "Reservation | None" = None
    texts: list[str] = field(default_factory=list)            # per output index
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[dict[int, float]]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)    # the engine's reason, per output
    stopped_by: list[int | str | None] = field(default_factory=list)  # the stop string / token that ended it
    cached: int = 0               # prompt tokens served from the prefix/disk cache
    body: dict | None = None      # the validated request, as a remote backend receives it
    num_prompt: int | None = None  # prompt tokens when not len(prompt_ids): a remote backend's count
    num_output: int | None = None  # output tokens as a remote backend counts them (its deltas carry text)
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    closed: bool = False          # settled or released, and its permit given back
    recorded_tokens: int = 0      # output tokens last written onto the hold (record_progress)
    recorded_at: float = 0.0

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.token_ids = [[] for _ in range(self.n)]
        self.logprobs = [[] for _ in range(self.n)]
        self.finish = [None] * self.n
        self.stopped_by = [None] * self.n

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids) if self.num_prompt is None else self.num_prompt

    @property
    def output_tokens(self) -> int:
        counted = sum(len(t) for t in self.token_ids)
        return counted if self.num_output is None else max(counted, self.num_output)

    @property
    def cached_prompt_tokens(self) -> int:
        return min(self.cached, self.prompt_tokens)

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_prompt_tokens

    def absorb(self, update: "Update") -> None:
        self.cached = max(self.cached, update.num_cached_tokens)
        if update.num_output_tokens is not None:  # a remote backend: its counts are the bill
            self.num_output = update.num_output_tokens
            if update.num_prompt_tokens:
                self.num_prompt = update.num_prompt_tokens
        for d in update.deltas:
            self.texts[d.index] += d.text
            self.token_ids[d.index] += d.token_ids
            if d.logprobs:
                self.logprobs[d.index] += d.logprobs
            if d.finish_reason is not None:
                self.finish[d.index] = d.finish_reason
                self.stopped_by[d.index] = d.stop_reason
        if self.first_token is None and self.output_tokens:
            self.first_token = time.monotonic()


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


# ---------------------------------------------------------------------------- reading a request
async def authenticate(state: ServeState, request: Request, headers: tuple[str, ...] = ("authorization",),
                       no_key: str = NO_KEY) -> "Key":
    key = await state.authenticate(request, headers)
    if key is None:
        raise ApiError(401, no_key)
    return key


async def authenticate_generation(state: ServeState, request: Request, headers: tuple[str, ...] = ("authorization",),
                                  no_key: str = NO_KEY) -> "Key":
    """The caller's key (from the first of `headers` present), its request counted against its
    rate before any other work (401, 429); a key with nothing to spend is refused here too (402),
    before its body is read."""
    key = await authenticate(state, request, headers, no_key)
    arrival = state.limiter.arrive(key.id)
    if not arrival.allowed:
        headers = {"Retry-After": arrival.retry_after_header} if arrival.retry_after_header else None
        raise ApiError(arrival.status, arrival.message, None, headers)
    prices = state.sheet.prices
    if key.available <= 0 and (prices.input_miss > 0 or prices.output > 0):
        raise ApiError(402, f"insufficient balance on key {key.name!r}: nothing is available to spend")
    return key


async def read_json(request: Request, max_bytes: int = 2 ** 20) -> dict:
    """The body as a JSON object, read up to max_bytes (413 beyond, before reading it all when the
    client declares its length); 400 for invalid JSON or JSON nested too deeply to parse."""
    too_large = (f"the request body is larger than this server's limit of {max_bytes} bytes "
                 "(--max-body-bytes)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, too_large)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if size < 2 ** 16 else await asyncio.to_thread(json.loads, raw)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def off_loop(state: ServeState, fn, *args):
    """fn(*args) on the tokenizer threads, so the event loop keeps serving while it runs."""
    return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, functools.partial(fn, *args))


def parse_body(body: dict, schema: type[Body]) -> Body:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = validation_error_body(e)["error"]
        raise ApiError(422, err["message"], err["param"]) from None


def chat_prompt_ids(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> list[int]:
    """The template's ids; content is encoded as text (the template writes BOS itself)."""
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None


def check_model(state: ServeState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"model={model!r} is not served here; this server has {state.model_name!r}", "model")


def make_sampling_params(**values) -> "SamplingParams":
    """SamplingParams, or a 422 naming the field the engine refused."""
    from nanoseek.engine.sampling import SamplingParams, SamplingParamsError

    try:
        return SamplingParams(**values)
    except SamplingParamsError as e:
        raise ApiError(422, str(e), e.param) from None


def check_prompt_chars(state: ServeState, texts: list[str], max_tokens: int | None, param: str) -> None:
    """Refuse, before tokenizing, text that cannot fit the context: n characters are at least
    n / max_token_chars tokens (400 stating the numbers)."""
    per_token = state.tokenizer.max_token_chars
    least = sum(-(-len(t) // per_token) for t in texts)
    context = state.llm.max_model_len
    if least + (max_tokens or 1) > context:
        chars = sum(len(t) for t in texts)
        raise ApiError(400, f"{param}: the prompt has {chars} characters, so at least {least} tokens (no token "
                            f"of this model is longer than {per_token} characters); with max_tokens="
                            f"{max_tokens or 1} that exceeds this model's context of {context} tokens",
                       param if least >= context or max_tokens is None else "max_tokens")


def default_max_tokens(state: ServeState, n_prompt: int, max_tokens: int | None) -> int:
    """max_tokens, or the server's default bounded by the room the context leaves (at least 1, so
    that a prompt that fills the context is refused by `check_request`, naming the prompt)."""
    if max_tokens is not None:
        return max_tokens
    return max(1, min(state.config.default_max_tokens, state.llm.max_model_len - n_prompt))


def check_request(state: ServeState, prompt_ids: list[int], params: "SamplingParams", prompt_param: str) -> None:
    """The engine's own check (vocabulary, context, KV cache, top_k), as a 400 naming the field."""
    from nanoseek.engine.scheduler import RequestRejected

    try:
        state.llm.check_request(prompt_ids, params)
    except RequestRejected as e:
        param = prompt_param if e.param in (None, "prompt") else e.param
        raise ApiError(400, f"{param}: {e}", param) from None


async def check_grammar(state: ServeState, spec: "StructuredOutputs", param: str) -> None:
    """Compile the grammar now (cached; off the event loop), so a bad one is a 400 naming `param`."""
    from nanoseek.engine.structured import StructuredOutputError

    try:
        await asyncio.to_thread(state.llm.grammars.check, spec)
    except StructuredOutputError as e:
        raise ApiError(400, f"{param}: {e}", param) from None


# ---------------------------------------------------------------------------- admit, generate, settle
async def admit(state: ServeState, key: "Key", job: Job) -> None:
    """Take the key's limits permit and hold the job's maximum cost; ApiError for every refusal."""
    from .accounts import InsufficientBalance, KeyRevoked
    from .pricing import max_request_cost

    max_output = job.params.max_tokens * job.n
    decision = state.limiter.acquire(key.id, job.prompt_tokens + max_output, count_request=False)
    if not decision.allowed:
        headers = {"Retry-After": decision.retry_after_header} if decision.retry_after_header else None
        raise ApiError(decision.status, decision.message, None, headers)
    job.permit = decision.permit
    try:
        cost = max_request_cost(state.sheet.prices, job.prompt_tokens, max_output)
        job.reservation = await asyncio.to_thread(state.accounts.reserve, key, job.id, cost,
                                                  state.sheet.prices, state.model_name)
    except InsufficientBalance as e:
        state.limiter.release(job.permit, 0)
        raise ApiError(402, str(e)) from None
    except KeyRevoked as e:
        state.limiter.release(job.permit, 0)
        raise ApiError(401, str(e)) from None
    except BaseException:
        state.limiter.release(job.permit, 0)
        raise


async def generate(state: ServeState, job: Job, keepalive_s: float | None = None
                   ) -> AsyncIterator["Update | None"]:
    """The backend's updates for the job, each absorbed into it before it is yielded; None while
    waiting longer than keepalive_s. ValueError if the engine refuses the request, RequestFailed
    if it fails on it, BackendError if a remote backend fails. Closing this iterator aborts the
    request."""
    stream = state.backend.generate(job, keepalive_s=keepalive_s)
    async with contextlib.aclosing(stream):
        async for update in stream:
            if update is not None:
                job.absorb(update)
                await record_progress(state, job)  # before the new tokens go out
            yield update


async def record_progress(state: ServeState, job: Job) -> None:
    """Write the job's usage so far onto its hold when due (leases.progress_due): a server that
    dies after this is billed within the documented bound by whoever settles its holds."""
    from .accounts import Usage as Billed
    from .leases import progress_due

    now, cfg = time.monotonic(), state.config
    if not progress_due(job.recorded_tokens, job.recorded_at, job.output_tokens, now,
                        cfg.record_every_tokens, cfg.record_every_s):
        return
    job.recorded_tokens, job.recorded_at = job.output_tokens, now
    billed = Billed(job.cached_prompt_tokens, job.uncached_prompt_tokens, job.output_tokens)
    try:
        await asyncio.to_thread(state.accounts.record_progress, job.reservation, billed)
    except Exception:  # the settle at the end still bills in full; only the crash bound is at risk
        log.exception("recording the progress of %s failed", job.id)


async def close_job(state: ServeState, job: Job, route: str, status: int = 200) -> None:
    """Settle (or release when nothing was produced) and give back the limiter permit; shielded so a
    cancelled request still pays exactly for what it produced."""
    from .accounts import Usage as Billed

    if job.closed:
        return
    job.closed = True
    with anyio.CancelScope(shield=True):
        try:
            if job.output_tokens == 0:
                await asyncio.to_thread(state.accounts.release, job.reservation)
            else:
                billed = Billed(job.cached_prompt_tokens, job.uncached_prompt_tokens, job.output_tokens)
                await asyncio.to_thread(state.accounts.settle, job.reservation, billed)
        finally:
            state.limiter.release(job.permit, job.prompt_tokens + job.output_tokens)
            now = time.monotonic()
            ttft = None if job.first_token is None else job.first_token - job.arrival
            tpot = None
            if job.first_token is not None and job.output_tokens > job.n:
                tpot = (now - job.first_token) / (job.output_tokens - job.n)
            state.metrics.request_done(route, status, job.prompt_tokens, job.cached_prompt_tokens,
                                       job.output_tokens, ttft, tpot)
