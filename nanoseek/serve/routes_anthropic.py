"""POST /anthropic/v1/messages: Anthropic's Messages API (DeepSeek's path) over the same core.py.

    register_anthropic_routes(app, state)        # called by app.create_app (not on a gateway)
    client = anthropic.Anthropic(base_url="http://127.0.0.1:8000/anthropic", api_key=KEY)

The same life as an OpenAI request (routes_openai.py): the key (from `x-api-key`, or
`Authorization: Bearer`), its rate and balance → the body, bounded and validated → the prompt by the
same chat template (system, user / assistant turns, tool_use blocks as the assistant's tool calls,
tool_result blocks as tool turns) → the engine's checks → core.admit → core.generate →
core.close_job, billed through the same keys, ledger, limits and prices. Tools go through the
same grammar as OpenAI's (tools.py): tool_choice any / tool force a call whose input validates
against its input_schema.

Errors answer in Anthropic's shape {"type": "error", "error": {"type", "message"}}; the message
starts with the parameter it is about. Validation errors are 400 (Anthropic's choice; OpenAI's
routes say 422), a full queue 529 overloaded_error. Streams send Anthropic's events (message_start,
content_block_start / _delta / _stop, message_delta with the final usage and stop_reason,
message_stop), `ping` while waiting, and an `error` event for a failure after the stream began.
message_start waits for the engine's first update, so its usage counts the cache hits.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .backends import BackendError
from .core import (Job, admit, authenticate_generation, chat_prompt_ids, check_grammar, check_model,
                   check_prompt_chars, check_request, close_job, generate, make_sampling_params, new_id,
                   off_loop, parse_body, read_json)
from .protocol import FunctionDef, Tool
from .protocol_anthropic import (AnthropicUsage, BlockDelta, BlockStart, BlockStop, InputJsonDelta, Message,
                                 MessageDelta, MessagesRequest, MessageStart, MessageStop, Ping, StopDelta,
                                 TextBlock, TextDelta, ToolUseBlock, anthropic_error, anthropic_status,
                                 error_event, event)
from .state import ApiError, ServeState
from .tools import ToolStream, check_tools, function_schema, parse_output, tool_grammar
from .whole import engine_failure_message, log, whole_reply

ROUTE = "/anthropic/v1/messages"
KEY_HEADERS = ("x-api-key", "authorization")
NO_KEY = "missing or invalid API key (send x-api-key: sk-... or Authorization: Bearer sk-...)"


def refuse(err: ApiError) -> JSONResponse:
    """An ApiError in Anthropic's shape; its message names the parameter."""
    message = err.message
    if err.param and err.param not in message:
        message = f"{err.param}: {message}"
    status = anthropic_status(err.status)
    return JSONResponse(anthropic_error(status, message), status_code=status, headers=err.headers)


def new_tool_use_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------- the request as a job
def chat_messages(req: MessagesRequest, tokenizer) -> list[dict]:
    """The chat template's messages: the system prompt, then each turn; a user turn's tool_result
    blocks become tool turns (in their order among its text), an assistant turn's tool_use blocks
    its tool_calls."""
    out = [{"role": "system", "content": req.system_text}] if req.system_text else []
    for i, m in enumerate(req.messages):
        text, calls = [], []
        for j, b in enumerate(m.blocks):
            where = f"messages.{i}.content.{j}"
            if b.type != "text" and tokenizer.tool_ids is None:
                raise ApiError(400, f"{where}: this model's tokenizer has no tool-call tokens", where)
            if b.type == "text":
                text.append(b.text)
            elif b.type == "tool_use":
                if m.role != "assistant":
                    raise ApiError(400, f"{where}: tool_use blocks belong in assistant messages", where)
                calls.append({"id": b.id, "type": "function", "function": {
                    "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            else:
                if m.role != "user":
                    raise ApiError(400, f"{where}: tool_result blocks belong in user messages", where)
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                out.append({"role": "tool", "content": ("error: " if b.is_error else "") + b.text})
        if m.role == "assistant":
            out.append({"role": "assistant", "content": "".join(text), **({"tool_calls": calls} if calls else {})})
        elif text:
            out.append({"role": "user", "content": "".join(text)})
    return out


def openai_tools(req: MessagesRequest) -> list[Tool] | None:
    """The tools in OpenAI's shape, which the template and the grammar (tools.py) read."""
    if not req.tools:
        return None
    return [Tool(type="function", function=FunctionDef(name=t.name, description=t.description,
                                                       parameters=t.input_schema)) for t in req.tools]


def uses_tools(req: MessagesRequest) -> bool:
    return bool(req.tools) and req.tool_mode != "none"


async def build_job(state: ServeState, req: MessagesRequest, cache_salt: str | None) -> Job:
    """The request as a Job: prompt ids, checks, tool grammar, sampling params (ApiError on each refusal)."""
    check_model(state, req.model)
    tok = state.tokenizer
    messages = chat_messages(req, tok)
    texts = [m["content"] for m in messages] + [c["function"]["arguments"] for m in messages
                                                 for c in m.get("tool_calls", ())]
    check_prompt_chars(state, texts, req.max_tokens, "messages")
    tools = openai_tools(req)
    mode = req.tool_mode
    named = req.tool_choice.name if mode == "named" else None
    check_tools(tools, mode, named, tok, 1)
    grammar = None
    if uses_tools(req):
        from nanoseek.engine.structured import StructuredOutputs

        for i, t in enumerate(tools):
            await check_grammar(state, StructuredOutputs(json=function_schema(t)), f"tools.{i}.input_schema")
        parallel = not (req.tool_choice and req.tool_choice.disable_parallel_tool_use)
        grammar = tool_grammar(tools, mode, named, tok, parallel)
        await check_grammar(state, grammar, "tools")
    rendered = [t.model_dump(exclude_none=True) for t in tools] if uses_tools(req) else None
    prompt_ids = await off_loop(state, chat_prompt_ids, messages, tok, rendered)
    params = make_sampling_params(
        n=1, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1,
        max_tokens=req.max_tokens, stop=list(req.stop_sequences or ()), structured_outputs=grammar)
    await off_loop(state, check_request, state, prompt_ids, params, "messages")
    return Job(new_id("msg_"), "chat", prompt_ids, params, cache_salt=cache_salt)


# ---------------------------------------------------------------------------- response shapes
def usage(job: Job) -> AnthropicUsage:
    return AnthropicUsage(input_tokens=job.uncached_prompt_tokens, output_tokens=job.output_tokens,
                          cache_read_input_tokens=job.cached_prompt_tokens)


def stop_of(job: Job, has_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of the job's one output."""
    if job.finish[0] == "length":
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    by = job.stopped_by[0]
    return ("stop_sequence", by) if isinstance(by, str) else ("end_turn", None)


def whole_message(state: ServeState, req: MessagesRequest, job: Job) -> Message:
    content: list[TextBlock | ToolUseBlock] = []
    calls = []
    if uses_tools(req):
        text, calls, _ = parse_output(job.token_ids[0], state.tokenizer, req.stop_sequences or ())
    if calls:
        content += [TextBlock(text=text)] if text else []
        content += [ToolUseBlock(id=new_tool_use_id(), name=n, input=json.loads(a)) for n, a in calls]
    elif job.texts[0]:
        content.append(TextBlock(text=job.texts[0]))  # the engine's text: stop sequences applied
    reason, sequence = stop_of(job, bool(calls))
    return Message(id=job.id, model=state.model_name, content=content, stop_reason=reason,
                   stop_sequence=sequence, usage=usage(job))


class Blocks:
    """Turns pieces of output (("text", s), ("call", name), ("args", s)) into content-block events,
    opening a new block whenever the kind changes."""

    def __init__(self):
        self.index, self.kind = -1, None

    def add(self, kind: str, piece: str) -> list[str]:
        events = []
        if kind == "call" or (kind == "text" and self.kind != "text"):
            events += self.close()
            self.index += 1
            self.kind = "text" if kind == "text" else "tool_use"
            block = TextBlock(text="") if kind == "text" else ToolUseBlock(id=new_tool_use_id(), name=piece, input={})
            events.append(event(BlockStart(index=self.index, content_block=block)))
        if kind == "text":
            events.append(event(BlockDelta(index=self.index, delta=TextDelta(text=piece))))
        elif kind == "args":
            events.append(event(BlockDelta(index=self.index, delta=InputJsonDelta(partial_json=piece))))
        return events

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event(BlockStop(index=self.index))]


# ---------------------------------------------------------------------------- routes
def register_anthropic_routes(app: FastAPI, state: ServeState) -> None:
    @app.post(ROUTE)
    async def messages(request: Request):
        try:
            key = await authenticate_generation(state, request, KEY_HEADERS, NO_KEY)
            req = parse_body(await read_json(request, state.max_body_bytes), MessagesRequest)
            job = await build_job(state, req, state.cache_salt(key))
            await admit(state, key, job)
        except ApiError as e:
            state.metrics.request_done(ROUTE, e.status)
            return refuse(e)
        if not req.stream:
            return await whole_reply(state, request, job, ROUTE, refuse=refuse, reply=lambda job: JSONResponse(
                whole_message(state, req, job).model_dump(), headers={"X-Request-Id": job.id}))
        events = stream(req, job)
        # a client gone before the first event leaves the generator unstarted: close the job then
        loop = asyncio.get_running_loop()
        weakref.finalize(events, lambda: job.closed or loop.call_soon_threadsafe(
            lambda: loop.create_task(close_job(state, job, ROUTE, 499))))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})

    async def stream(req: MessagesRequest, job: Job):
        from nanoseek.engine.llm import RequestFailed

        status, closed, started = 200, False, False
        blocks = Blocks()
        tools = ToolStream(state.tokenizer, req.stop_sequences or ()) if uses_tools(req) else None

        def start() -> str:
            return event(MessageStart(message=Message(id=job.id, model=state.model_name, content=[],
                                                      usage=usage(job))))

        try:
            async for update in generate(state, job, keepalive_s=state.config.keepalive_s):
                if update is None:
                    yield event(Ping())
                    continue
                if not started:
                    started = True
                    yield start()
                for d in update.deltas:
                    if tools:
                        pieces = tools.feed(d.token_ids) + (tools.finish() if d.finish_reason is not None else [])
                    else:  # the engine's text: stop sequences applied
                        pieces = [("text", d.text)] if d.text else []
                    for kind, piece in pieces:
                        for e in blocks.add(kind, piece):
                            yield e
            if not started:
                started = True
                yield start()
            for e in blocks.close():
                yield e
            # settled before message_stop, so a client that reads its balance next sees the debit
            closed = True
            await close_job(state, job, ROUTE, status)
            reason, sequence = stop_of(job, bool(tools and tools.num_calls))
            yield event(MessageDelta(delta=StopDelta(stop_reason=reason, stop_sequence=sequence), usage=usage(job)))
            yield event(MessageStop())
        except ValueError as e:
            status = 400
            yield error_event(400, str(e))
        except RequestFailed as e:
            status = 500
            log.error("request %s failed in the engine: %s", job.id, e.error)
            yield error_event(500, engine_failure_message(job))
        except BackendError as e:  # billed for what was delivered before it
            status = e.status
            yield error_event(anthropic_status(e.status), e.message)
        finally:
            if not closed:
                await close_job(state, job, ROUTE, status)
