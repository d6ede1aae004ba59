"""POST /v1/chat/completions and /v1/completions: admit, bill, generate, stream.

    register_generate_routes(app, state)        # called by app.create_app

One request's life: authenticate (401) → validate the body (422 naming the parameter) → build
the prompt's token ids and check them against the context (400 stating the numbers) → the key's
limits (429 + Retry-After, 503 when the global queue is full) → reserve its maximum cost (402)
→ generate → settle what was produced, in one transaction with its ledger row. A request that
produced nothing is released instead. The settle runs shielded from cancellation, so a client
that disconnects mid-stream is billed for the tokens produced up to then and no more; closing
the engine stream aborts the request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .app import ServeState, error_response
from .protocol import (SSE_DONE, SSE_KEEP_ALIVE, ChatChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, AssistantMessage, ChoiceLogprobs, ChunkChoice, Completion,
                       CompletionChoice, CompletionLogprobs, CompletionRequest, Delta, TokenLogprob,
                       TopLogprob, Usage, error_for_status, sse, validation_error_body)

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.headers)


@dataclass
class Job:
    """An admitted request: its prompt, limits permit and hold, and what it has produced so far."""

    id: str
    kind: str                     # "chat" | "completion"
    prompt_ids: list[int]
    params: object                # SamplingParams
    n: int
    permit: object = None
    reservation: object = None
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[dict[int, float]]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    cached: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    closed: bool = False          # settled or released, and its permit given back

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.token_ids = [[] for _ in range(self.n)]
        self.logprobs = [[] for _ in range(self.n)]
        self.finish = [None] * self.n

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def usage(self) -> Usage:
        hit = min(self.cached, len(self.prompt_ids))
        return Usage.from_counts(hit=hit, miss=len(self.prompt_ids) - hit, output=self.output_tokens)

    def absorb(self, update) -> None:
        self.cached = max(self.cached, update.num_cached_tokens)
        for d in update.deltas:
            self.texts[d.index] += d.text
            self.token_ids[d.index] += d.token_ids
            if d.logprobs:
                self.logprobs[d.index] += d.logprobs
            if d.finish_reason is not None:
                self.finish[d.index] = d.finish_reason
        if self.first_token is None and self.output_tokens:
            self.first_token = time.monotonic()


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


# ---------------------------------------------------------------------------- prompt building
def chat_prompt_ids(req: ChatCompletionRequest, tokenizer) -> list[int]:
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(400, f"messages.{i}.role={m.role!r} is not supported by this model; "
                                f"use one of {sorted(CHAT_ROLES)}", f"messages.{i}.role")
        messages.append({"role": CHAT_ROLES[m.role], "content": m.text})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    return tokenizer.encode(text)  # the template writes BOS itself


def completion_prompt_ids(req: CompletionRequest, tokenizer) -> list[int]:
    prompts = req.prompts
    if len(prompts) != 1:
        raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompts)}", "prompt")
    prompt = prompts[0]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    if req.suffix is None:
        return list(prompt) if isinstance(prompt, list) else bos + tokenizer.encode(prompt)
    fim = (tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id)
    if None in fim:
        raise ApiError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens", "suffix")
    if isinstance(prompt, list):
        raise ApiError(400, "suffix needs a text prompt, not token ids", "suffix")
    # prefix-suffix-middle order: the model writes the middle after seeing both sides
    return bos + [fim[0]] + tokenizer.encode(prompt) + [fim[1]] + tokenizer.encode(req.suffix) + [fim[2]]


def sampling_params(req, max_tokens: int, logprobs: int | None):
    from nanoseek.engine.sampling import SamplingParams, SamplingParamsError

    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if not req.top_k or req.top_k < 0 else req.top_k,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            max_tokens=max_tokens, stop=req.stop_list, seed=req.seed, logprobs=logprobs)
    except SamplingParamsError as e:
        raise ApiError(422, str(e), str(e).split("=")[0]) from None


def check_context(state: ServeState, n_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
    """The request's max_tokens (defaulted), or a 400 stating the prompt, limit and context."""
    llm = state.llm
    context = llm.max_model_len
    if n_prompt == 0:
        raise ApiError(400, f"{prompt_param}: the prompt is empty; at least 1 token is needed", prompt_param)
    if n_prompt >= context:
        raise ApiError(400, f"{prompt_param}: the prompt has {n_prompt} tokens but this model's context is "
                            f"{context} tokens, which leaves no room to generate", prompt_param)
    if max_tokens is None:
        max_tokens = min(state.config.default_max_tokens, context - n_prompt)
    elif n_prompt + max_tokens > context:
        raise ApiError(400, f"this model's context is {context} tokens, but {n_prompt + max_tokens} were "
                            f"requested ({n_prompt} in the prompt, max_tokens={max_tokens}); lower "
                            "max_tokens or shorten the prompt", "max_tokens")
    bm = llm.block_manager
    need = bm.blocks_for(n_prompt + max_tokens - 1)
    if need > bm.num_blocks:
        raise ApiError(400, f"this request needs up to {need * bm.block_size} tokens of KV cache ({n_prompt} "
                            f"prompt + max_tokens={max_tokens}) but the server's cache holds "
                            f"{bm.num_blocks * bm.block_size}", "max_tokens")
    return max_tokens


# ---------------------------------------------------------------------------- admission and billing
async def admit(state: ServeState, request: Request, kind: str):
    """Authenticated key, parsed request and an admitted Job; raises ApiError for every refusal."""
    from .accounts import InsufficientBalance, KeyRevoked
    from .pricing import max_request_cost

    key = await state.authenticate(request)
    if key is None:
        raise ApiError(401, "missing or invalid API key (send Authorization: Bearer sk-...)")
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        err = validation_error_body(e)["error"]
        raise ApiError(422, err["message"], err["param"]) from None
    if req.model != state.model_name:
        raise ApiError(404, f"model={req.model!r} is not served here; this server has {state.model_name!r}",
                       "model")
    if kind == "chat":
        prompt_ids, prompt_param = chat_prompt_ids(req, state.tokenizer), "messages"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        prompt_ids, prompt_param = completion_prompt_ids(req, state.tokenizer), "prompt"
        logprobs = req.logprobs
    max_tokens = check_context(state, len(prompt_ids), req.max_tokens, prompt_param)
    params = sampling_params(req, max_tokens, logprobs)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    job = Job(prefix + uuid.uuid4().hex, kind, prompt_ids, params, req.n)

    decision = state.limiter.acquire(key.id, len(prompt_ids) + max_tokens * req.n)
    if not decision.allowed:
        headers = {"Retry-After": decision.retry_after_header} if decision.retry_after_header else None
        raise ApiError(decision.status, decision.message, None, headers)
    job.permit = decision.permit
    try:
        cost = max_request_cost(state.sheet.prices, len(prompt_ids), max_tokens * req.n)
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
    return req, job


async def close_job(state: ServeState, job: Job, route: str, status: int = 200) -> None:
    """Settle (or release when nothing was produced) and give back the limiter permit; shielded so a
    cancelled request still pays exactly for what it produced."""
    from .accounts import Usage as Billed

    if job.closed:
        return
    job.closed = True
    with anyio.CancelScope(shield=True):
        try:
            usage = job.usage()
            if job.output_tokens == 0:
                await asyncio.to_thread(state.accounts.release, job.reservation)
            else:
                billed = Billed(usage.prompt_cache_hit_tokens, usage.prompt_cache_miss_tokens, job.output_tokens)
                await asyncio.to_thread(state.accounts.settle, job.reservation, billed)
        finally:
            state.limiter.release(job.permit, len(job.prompt_ids) + job.output_tokens)
            now = time.monotonic()
            ttft = None if job.first_token is None else job.first_token - job.arrival
            tpot = None
            if job.first_token is not None and job.output_tokens > job.n:
                tpot = (now - job.first_token) / (job.output_tokens - job.n)
            state.metrics.request_done(route, status, len(job.prompt_ids), job.usage().prompt_cache_hit_tokens,
                                       job.output_tokens, ttft, tpot)


# ---------------------------------------------------------------------------- response shapes
def chat_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float]], top: int) -> ChoiceLogprobs:
    content = []
    for tid, d in zip(ids, lps):
        tok = tokenizer.decode([tid])
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append(TokenLogprob(token=tok, logprob=d[tid], bytes=list(tok.encode()), top_logprobs=[
            TopLogprob(token=(t := tokenizer.decode([i])), logprob=lp, bytes=list(t.encode())) for i, lp in best]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float]], top: int,
                        offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tid, d in zip(ids, lps):
        tok = tokenizer.decode([tid])
        out.tokens.append(tok)
        out.token_logprobs.append(d[tid])
        out.top_logprobs.append({tokenizer.decode([i]): lp for i, lp in sorted(d.items(), key=lambda kv: -kv[1])[:top]})
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def whole_response(state: ServeState, req, job: Job):
    tok = state.tokenizer
    if job.kind == "chat":
        choices = [ChatChoice(index=i, message=AssistantMessage(content=job.texts[i]),
                              finish_reason=finish_reason(job.finish[i]),
                              logprobs=chat_logprobs(tok, job.token_ids[i], job.logprobs[i], req.top_logprobs or 0)
                              if req.logprobs else None) for i in range(job.n)]
        return ChatCompletion(id=job.id, model=state.model_name, choices=choices, usage=job.usage())
    choices = [CompletionChoice(index=i, text=job.texts[i], finish_reason=finish_reason(job.finish[i]),
                                logprobs=completion_logprobs(tok, job.token_ids[i], job.logprobs[i], req.logprobs)
                                if req.logprobs is not None else None) for i in range(job.n)]
    return Completion(id=job.id, model=state.model_name, choices=choices, usage=job.usage())


def stream_events(state: ServeState, req, job: Job, update) -> list[str]:
    """SSE events for one engine update: one chunk per output that has text or finished."""
    tok, events = state.tokenizer, []
    for d in update.deltas:
        if not d.text and d.finish_reason is None:
            continue  # tokens still held by the detokenizer (half a character); billed all the same
        reason = None if d.finish_reason is None else finish_reason(d.finish_reason)
        if job.kind == "chat":
            lp = chat_logprobs(tok, d.token_ids, d.logprobs, req.top_logprobs or 0) if req.logprobs else None
            events.append(sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[
                ChunkChoice(index=d.index, delta=Delta(content=d.text), logprobs=lp, finish_reason=reason)])))
        else:
            lp = completion_logprobs(tok, d.token_ids, d.logprobs, req.logprobs) if req.logprobs is not None else None
            events.append(sse(Completion(id=job.id, model=state.model_name, choices=[
                CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=reason)])))
    return events


def usage_event(state: ServeState, job: Job) -> str:
    if job.kind == "chat":
        return sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[], usage=job.usage()))
    return sse(Completion(id=job.id, model=state.model_name, choices=[], usage=job.usage()))


# ---------------------------------------------------------------------------- routes
def register_generate_routes(app: FastAPI, state: ServeState) -> None:
    async def handle(request: Request, kind: str, route: str):
        try:
            req, job = await admit(state, request, kind)
        except ApiError as e:
            state.metrics.request_done(route, e.status)
            return e.response()
        prompt = {"prompt_token_ids": job.prompt_ids}
        if req.stream:
            events = stream(req, job, prompt, route)
            # a client gone before the first event leaves the generator unstarted, so its finally
            # never runs: close the job when the generator is dropped instead
            loop = asyncio.get_running_loop()
            weakref.finalize(events, lambda: job.closed or loop.call_soon_threadsafe(
                lambda: loop.create_task(close_job(state, job, route, 499))))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})
        status = 200
        try:
            async for update in state.engine.generate(job.id, prompt, job.params):
                job.absorb(update)
        except ValueError as e:  # the engine refused it after all
            status = 400
            return error_response(400, str(e))
        finally:
            await close_job(state, job, route, status)
        return JSONResponse(whole_response(state, req, job).model_dump(), headers={"X-Request-Id": job.id})

    async def stream(req, job: Job, prompt, route: str):
        status, closed = 200, False
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                yield sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[
                    ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(job.n)]))
            async for update in state.engine.generate(job.id, prompt, job.params,
                                                      keepalive_s=state.config.keepalive_s):
                if update is None:
                    yield SSE_KEEP_ALIVE
                    continue
                job.absorb(update)
                for event in stream_events(state, req, job, update):
                    yield event
            # settled before [DONE], so a client that reads its balance next sees the debit
            closed = True
            await close_job(state, job, route, status)
            if req.include_usage:
                yield usage_event(state, job)
            yield SSE_DONE
        except ValueError as e:
            status = 400
            yield f"data: {json.dumps(error_for_status(400, str(e)))}\n\n"
        finally:
            if not closed:
                await close_job(state, job, route, status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion", "/v1/completions")
