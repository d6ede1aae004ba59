"""POST /v1/chat/completions and /v1/completions: OpenAI's request and response shapes over core.py.

    register_openai_routes(app, state)        # called by app.create_app

One request's life: authenticate, count the request and check the balance (401, 429, 402) → read
and validate the body (413, 400, 422 naming the parameter) → refuse text that cannot fit by its
length, then tokenize it off the event loop, message content as text (special-token text in it
never becomes a control token) → the engine's check of ids and context (400 naming the field) →
core.admit (429 + Retry-After, 503 when the global queue is full, 402) → core.generate →
core.close_job. A client that disconnects, streamed or not, aborts its generation and pays for
the tokens produced until then. An engine failure answers 500 (or an error event) carrying the
request id and no internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .backends import BackendError
from .core import (Job, admit, authenticate_generation, chat_prompt_ids, check_grammar, check_model,
                   check_prompt_chars, check_request, close_job, default_max_tokens, generate, make_sampling_params,
                   new_id, off_loop, parse_body, read_json)
from .protocol import ChatCompletionRequest, CompletionRequest, error_for_status
from .responses import (SSE_DONE, SSE_KEEP_ALIVE, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                        ChoiceLogprobs, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs, Delta,
                        DeltaFunctionCall, DeltaToolCall, ResponseFunctionCall, ResponseToolCall, TokenLogprob,
                        TopLogprob, Usage, sse)
from .state import ApiError, ServeState
from .tools import ToolStream, check_tools, new_call_id, parse_output, schema_params, tool_grammar
from .whole import engine_failure_message, whole_reply

if TYPE_CHECKING:
    from nanoseek.engine.structured import StructuredOutputs

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
              "tool": "tool"}
OpenAIRequest = ChatCompletionRequest | CompletionRequest
log = logging.getLogger("nanoseek.serve")


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage(job: Job) -> Usage:
    return Usage.from_counts(hit=job.cached_prompt_tokens, miss=job.uncached_prompt_tokens,
                             output=job.output_tokens)


# ---------------------------------------------------------------------------- prompt building
def chat_messages(req: ChatCompletionRequest, tokenizer) -> list[dict]:
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(400, f"messages.{i}.role={m.role!r} is not supported by this model; "
                                f"use one of {sorted(CHAT_ROLES)}", f"messages.{i}.role")
        if m.reasoning_content is not None:
            raise ApiError(400, f"messages.{i}.reasoning_content: send back only the content of earlier "
                                "replies; reasoning_content is not accepted in input messages",
                           f"messages.{i}.reasoning_content")
        if (m.role == "tool" or m.tool_calls) and tokenizer.tool_ids is None:
            raise ApiError(400, f"messages.{i}: this model's tokenizer has no tool-call tokens",
                           f"messages.{i}.role")
        message = {"role": CHAT_ROLES[m.role], "content": m.text}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        messages.append(message)
    return messages


def chat_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tool definitions the template renders (none under tool_choice "none")."""
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_mode != "none" else None


def completion_prompt_ids(req: CompletionRequest, tokenizer) -> list[int]:
    """Text prompts are encoded as text: special-token text in them stays text (send token ids to
    place control tokens)."""
    prompts = req.prompts
    if len(prompts) != 1:
        raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompts)}", "prompt")
    prompt = prompts[0]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    if req.suffix is None:
        return list(prompt) if isinstance(prompt, list) else bos + tokenizer.encode(prompt, split_special_tokens=True)
    fim = (tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id)
    if None in fim:
        raise ApiError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens", "suffix")
    if isinstance(prompt, list):
        raise ApiError(400, "suffix needs a text prompt, not token ids", "suffix")
    # prefix-suffix-middle order: the model writes the middle after seeing both sides
    return (bos + [fim[0]] + tokenizer.encode(prompt, split_special_tokens=True) + [fim[1]]
            + tokenizer.encode(req.suffix, split_special_tokens=True) + [fim[2]])


def response_grammar(req: ChatCompletionRequest) -> tuple["StructuredOutputs | None", str]:
    """The grammar response_format asks for, and the parameter to blame if it does not compile."""
    from nanoseek.engine.structured import StructuredOutputs

    rf = req.response_format
    if rf is None or rf.type == "text":
        return None, ""
    if rf.type == "json_object":
        return StructuredOutputs(json_object=True), "response_format"
    schema = rf.json_schema.schema_
    return StructuredOutputs(json=schema if schema is not None else {"type": "object"}), \
        "response_format.json_schema.schema"


async def build_job(state: ServeState, req: OpenAIRequest, cache_salt: str | None) -> Job:
    """The request as a Job: prompt ids, checks, grammar, sampling params (ApiError on each refusal)."""
    check_model(state, req.model)
    if state.tokenizer is None:  # a gateway: the backend reads the prompt
        from .gateway import forwarded_job

        return forwarded_job(state, req)
    grammar = None
    if isinstance(req, ChatCompletionRequest):
        kind, prefix, prompt_param = "chat", "chatcmpl-", "messages"
        messages = chat_messages(req, state.tokenizer)
        check_prompt_chars(state, [m["content"] for m in messages], req.max_tokens, prompt_param)
        prompt_ids = await off_loop(state, chat_prompt_ids, messages, state.tokenizer, chat_tools(req))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        grammar, grammar_param = response_grammar(req)
        named = req.tool_choice.function.name if req.tool_mode == "named" else None
        check_tools(req.tools, req.tool_mode, named, state.tokenizer, req.n)
        if req.tools and req.tool_mode != "none":
            if grammar is not None:
                raise ApiError(400, "response_format: use it or tools, not both in one request", "response_format")
            for param, spec in schema_params(req.tools):
                await check_grammar(state, spec, param)
            grammar, grammar_param = tool_grammar(req.tools, req.tool_mode, named, state.tokenizer,
                                                         req.parallel_tool_calls), "tools"
        if grammar is not None:
            await check_grammar(state, grammar, grammar_param)
    else:
        kind, prefix, prompt_param = "completion", "cmpl-", "prompt"
        if req.echo:
            raise ApiError(400, "echo=true is not supported: the response holds only the completion", "echo")
        texts = [p for p in req.prompts if isinstance(p, str)] + ([req.suffix] if req.suffix else [])
        check_prompt_chars(state, texts, req.max_tokens, prompt_param)
        prompt_ids = await off_loop(state, completion_prompt_ids, req, state.tokenizer)
        logprobs = req.logprobs
    params = make_sampling_params(
        n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if not req.top_k or req.top_k < 0 else req.top_k,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        max_tokens=default_max_tokens(state, len(prompt_ids), req.max_tokens), stop=req.stop_list,
        seed=req.seed, logprobs=logprobs, structured_outputs=grammar)
    await off_loop(state, check_request, state, prompt_ids, params, prompt_param)  # O(prompt) in Python
    return Job(new_id(prefix), kind, prompt_ids, params, cache_salt=cache_salt)


# ---------------------------------------------------------------------------- response shapes
def chat_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float]], top: int) -> ChoiceLogprobs:
    content = []
    for tid, d in zip(ids, lps):
        tok = tokenizer.decode([tid])
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append(TokenLogprob(token=tok, logprob=d[tid], bytes=list(tokenizer.token_bytes(tid)), top_logprobs=[
            TopLogprob(token=tokenizer.decode([i]), logprob=lp, bytes=list(tokenizer.token_bytes(i))) for i, lp in best]))
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


def uses_tools(req: OpenAIRequest) -> bool:
    return isinstance(req, ChatCompletionRequest) and bool(req.tools) and req.tool_mode != "none"


def assistant_message(state: ServeState, req: OpenAIRequest, job: Job, i: int) -> AssistantMessage:
    if not uses_tools(req):
        return AssistantMessage(content=job.texts[i])
    content, calls, _ = parse_output(job.token_ids[i], state.tokenizer, req.stop_list)
    if not calls:
        return AssistantMessage(content=job.texts[i])  # the engine's text: stop strings applied
    return AssistantMessage(content=content or None, tool_calls=[
        ResponseToolCall(id=new_call_id(), function=ResponseFunctionCall(name=n, arguments=a)) for n, a in calls])


def chat_finish_reason(state: ServeState, req: OpenAIRequest, job: Job, i: int) -> str:
    reason = finish_reason(job.finish[i])
    if reason == "stop" and uses_tools(req) and parse_output(job.token_ids[i], state.tokenizer, req.stop_list)[1]:
        return "tool_calls"
    return reason


def whole_response(state: ServeState, req: OpenAIRequest, job: Job) -> ChatCompletion | Completion:
    tok = state.tokenizer
    if job.kind == "chat":
        choices = [ChatChoice(index=i, message=assistant_message(state, req, job, i),
                              finish_reason=chat_finish_reason(state, req, job, i),
                              logprobs=chat_logprobs(tok, job.token_ids[i], job.logprobs[i], req.top_logprobs or 0)
                              if req.logprobs else None) for i in range(job.n)]
        return ChatCompletion(id=job.id, model=state.model_name, choices=choices, usage=usage(job))
    choices = [CompletionChoice(index=i, text=job.texts[i], finish_reason=finish_reason(job.finish[i]),
                                logprobs=completion_logprobs(tok, job.token_ids[i], job.logprobs[i], req.logprobs)
                                if req.logprobs is not None else None) for i in range(job.n)]
    return Completion(id=job.id, model=state.model_name, choices=choices, usage=usage(job))


def tool_stream_events(state: ServeState, req: ChatCompletionRequest, job: Job, update,
                       streams: list[ToolStream]) -> list[str]:
    """With tools: text as content deltas, each call as delta.tool_calls (id, type and name first,
    then pieces of its arguments)."""
    events = []

    def chunk(delta: Delta, reason=None, lp=None) -> str:
        return sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[
            ChunkChoice(index=d.index, delta=delta, logprobs=lp, finish_reason=reason)]))

    for d in update.deltas:
        stream = streams[d.index]
        k = stream.num_calls - 1
        pieces = stream.feed(d.token_ids) + (stream.finish() if d.finish_reason is not None else [])
        for kind, piece in pieces:
            if kind == "text":
                events.append(chunk(Delta(content=piece)))
            elif kind == "call":
                k += 1
                events.append(chunk(Delta(tool_calls=[DeltaToolCall(index=k, id=new_call_id(), type="function",
                                                                    function=DeltaFunctionCall(name=piece, arguments=""))])))
            else:
                events.append(chunk(Delta(tool_calls=[DeltaToolCall(index=k, function=DeltaFunctionCall(arguments=piece))])))
        lp = chat_logprobs(state.tokenizer, d.token_ids, d.logprobs, req.top_logprobs or 0) if req.logprobs else None
        if d.finish_reason is not None or lp is not None:
            reason = None if d.finish_reason is None else finish_reason(d.finish_reason)
            if reason == "stop" and stream.num_calls:
                reason = "tool_calls"
            events.append(chunk(Delta(), reason, lp))
    return events


def stream_events(state: ServeState, req: OpenAIRequest, job: Job, update,
                  tool_streams: list[ToolStream] | None = None) -> list[str]:
    """SSE events for one engine update: one chunk per output that has text or finished; each with
    the usage so far when the client asked for continuous_usage_stats (as a gateway does)."""
    if tool_streams is not None:
        return tool_stream_events(state, req, job, update, tool_streams)
    tok, events = state.tokenizer, []
    so_far = usage(job) if req.stream_options and req.stream_options.continuous_usage_stats else None
    for d in update.deltas:
        if not d.text and d.finish_reason is None:
            continue  # tokens still held by the detokenizer (half a character); billed all the same
        reason = None if d.finish_reason is None else finish_reason(d.finish_reason)
        if job.kind == "chat":
            lp = chat_logprobs(tok, d.token_ids, d.logprobs, req.top_logprobs or 0) if req.logprobs else None
            events.append(sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[
                ChunkChoice(index=d.index, delta=Delta(content=d.text), logprobs=lp, finish_reason=reason)],
                usage=so_far)))
        else:
            lp = completion_logprobs(tok, d.token_ids, d.logprobs, req.logprobs) if req.logprobs is not None else None
            events.append(sse(Completion(id=job.id, model=state.model_name, choices=[
                CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=reason)], usage=so_far)))
    return events


def usage_event(state: ServeState, job: Job) -> str:
    if job.kind == "chat":
        return sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[], usage=usage(job)))
    return sse(Completion(id=job.id, model=state.model_name, choices=[], usage=usage(job)))


# ---------------------------------------------------------------------------- routes
def register_openai_routes(app: FastAPI, state: ServeState) -> None:
    async def handle(request: Request, schema: type[OpenAIRequest], route: str):
        try:
            key = await authenticate_generation(state, request)
            req = parse_body(await read_json(request, state.max_body_bytes), schema)
            job = await build_job(state, req, state.cache_salt(key))
            await admit(state, key, job)
        except ApiError as e:
            state.metrics.request_done(route, e.status)
            return e.response()
        if req.stream:
            events = stream(req, job, route)
            # a client gone before the first event leaves the generator unstarted, so its finally
            # never runs: close the job when the generator is dropped instead
            loop = asyncio.get_running_loop()
            weakref.finalize(events, lambda: job.closed or loop.call_soon_threadsafe(
                lambda: loop.create_task(close_job(state, job, route, 499))))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})
        return await whole(request, req, job, route)

    async def whole(request: Request, req: OpenAIRequest, job: Job, route: str):
        return await whole_reply(state, request, job, route, refuse=ApiError.response, reply=lambda job: JSONResponse(
            whole_response(state, req, job).model_dump(), headers={"X-Request-Id": job.id}))

    async def stream(req: OpenAIRequest, job: Job, route: str):
        from nanoseek.engine.llm import RequestFailed

        status, closed = 200, False
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                yield sse(ChatCompletionChunk(id=job.id, model=state.model_name, choices=[
                    ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(job.n)]))
            tool_streams = [ToolStream(state.tokenizer, req.stop_list) for _ in range(job.n)] if uses_tools(req) else None
            async for update in generate(state, job, keepalive_s=state.config.keepalive_s):
                if update is None:
                    yield SSE_KEEP_ALIVE
                    continue
                for event in stream_events(state, req, job, update, tool_streams):
                    yield event
            # settled before [DONE], so a client that reads its balance next sees the debit
            closed = True
            await close_job(state, job, route, status)
            if req.include_usage:
                yield usage_event(state, job)
            yield SSE_DONE
        except ValueError as e:
            status = 400
            yield f"data: {json.dumps(error_for_status(400, str(e), getattr(e, 'param', None)))}\n\n"
        except RequestFailed as e:
            status = 500
            log.error("request %s failed in the engine: %s", job.id, e.error)
            yield f"data: {json.dumps(error_for_status(500, engine_failure_message(job)))}\n\n"
        except BackendError as e:  # billed for what was delivered before it
            status = e.status
            yield f"data: {json.dumps(error_for_status(e.status, e.message))}\n\n"
        finally:
            if not closed:
                await close_job(state, job, route, status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, "/v1/completions")
