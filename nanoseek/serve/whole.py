"""A non-streamed reply, for every API family: generate to the end, settle, then render.

    return await whole_reply(state, request, job, route,
                             reply=lambda job: JSONResponse(...),     # the API's response shape
                             refuse=lambda err: err.response())       # the API's error shape

The generation runs as its own task beside a watch on the connection: a client that disconnects
first aborts it and pays only for the tokens produced (settled as status 499). The job is settled
before the reply is rendered, so a client that reads its balance next sees the debit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from fastapi import Request
from fastapi.responses import Response

from .backends import BackendError
from .core import Job, close_job, generate, wait_for_disconnect
from .state import ApiError, ServeState

log = logging.getLogger("nanoseek.serve")
CLIENT_GONE = 499


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
        await close_job(state, job, route, status)
    return failure


async def whole_reply(state: ServeState, request: Request, job: Job, route: str,
                      reply: Callable[[Job], Response], refuse: Callable[[ApiError], Response]) -> Response:
    """The job generated to its end and rendered by `reply` (or its failure by `refuse`), unless the
    client disconnects first: then the generation is aborted and only what was produced is billed."""
    task = asyncio.ensure_future(finish_job(state, job, route))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left (or the server is stopping): stop generating for it
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=CLIENT_GONE)
    failure = task.result()
    return refuse(failure) if failure is not None else reply(job)
