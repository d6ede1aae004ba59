"""A non-streamed reply, for every API family: generate to the end, settle, then render.

    return await whole_reply(state, request, job, route,
                             reply=lambda job: JSONResponse(...),     # the API's response shape
                             refuse=lambda err: err.response())       # the API's error shape

The generation runs as its own task beside a watch on the connection: a client that disconnects
first aborts it and pays only for the tokens produced (settled as status 499). The job is settled
before the reply is rendered, so a client that reads its balance next sees the debit.

Keep-alive, as DeepSeek documents it: a reply not ready within `whole_keepalive_s` (--whole-keepalive)
is sent as a 200 whose body starts with a blank line, and another each interval until the JSON
follows, so a proxy does not cut a request that waits in the queue or generates for long. JSON
parsers skip the leading whitespace. The status is then sent before the outcome is known: a failure
found after the first blank line arrives as status 200 with the API's error JSON as the body
({"error": {...}} for OpenAI, {"type": "error", ...} for Anthropic), which a client must check for.
Replies that are ready (or fail) within the interval keep their own status, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .backends import BackendError
from .core import Job, close_job, generate, wait_for_disconnect
from .state import ApiError, ServeState

log = logging.getLogger("nanoseek.serve")
CLIENT_GONE = 499
KEEP_ALIVE_LINE = b"\n"   # what DeepSeek sends while a non-streamed request waits: JSON parsers skip it


def engine_failure_message(job: Job) -> str:
    return (f"the server failed while generating this request (request id {job.id}); it was charged "
            "only for tokens produced before the failure")


async def finish_job(state: ServeState, job: Job, route: str) -> ApiError | None:
    """Generate the job to its end and settle it; the failure (an ApiError to render), or None.
    Cancelled (the client left): settled for what was produced, recorded as status 499."""
    from nanoseek.engine.llm import RequestFailed

    status, failure = 200, None
    try:
        async for _ in generate(state, job):
            pass
    except ValueError as e:  # the engine refused it after all
        failure = ApiError(400, str(e), getattr(e, "param", None))
    except RequestFailed as e:
        log.error("request %s failed in the engine: %s", job.id, e.error)
        failure = ApiError(500, engine_failure_message(job))
    except BackendError as e:  # nothing reached the client, so nothing is billed
        job.num_output = 0
        failure = ApiError(e.status, e.message)
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        if failure is not None:
            status = failure.status
            failure.headers = {"X-Request-Id": job.id}
        # its own task: a second cancel (the client left while it settles) must not cut the settle
        await asyncio.shield(asyncio.ensure_future(close_job(state, job, route, status)))
    return failure


async def whole_reply(state: ServeState, request: Request, job: Job, route: str,
                      reply: Callable[[Job], Response], refuse: Callable[[ApiError], Response]) -> Response:
    """The job generated to its end and rendered by `reply` (or its failure by `refuse`), unless the
    client disconnects first: then the generation is aborted and only what was produced is billed.

    A reply not ready within `whole_keepalive_s` becomes a 200 streamed body: a blank line every
    interval, then the JSON (or the error JSON, its status lost to the 200 already sent)."""
    interval = state.config.whole_keepalive_s or None
    task = asyncio.ensure_future(finish_job(state, job, route))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _abort(task)
        raise
    finally:
        gone.cancel()
    if not task.done() and not gone.done():  # still waiting: commit to 200 and keep the line busy
        body = _blank_lines_then(task, job, interval, reply, refuse)
        loop = asyncio.get_running_loop()  # a body never started (the client left first) must stop it too
        weakref.finalize(body, lambda: task.done() or loop.call_soon_threadsafe(task.cancel))
        return StreamingResponse(body, media_type="application/json", headers={
            "X-Request-Id": job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not task.done():  # the client left: stop generating for it
        await _abort(task)
        return Response(status_code=CLIENT_GONE)
    failure = task.result()
    return refuse(failure) if failure is not None else reply(job)


async def _abort(task: asyncio.Future) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _blank_lines_then(task: asyncio.Future, job: Job, interval: float, reply: Callable[[Job], Response],
                            refuse: Callable[[ApiError], Response]) -> AsyncIterator[bytes]:
    """A blank line now and after each further interval until the job is done, then its JSON body.
    Cancelled (the client disconnected): the generation is aborted."""
    try:
        yield KEEP_ALIVE_LINE
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                break
            yield KEEP_ALIVE_LINE
        failure = task.result()
        yield (refuse(failure) if failure is not None else reply(job)).body
    finally:
        if not task.done():
            await _abort(task)
