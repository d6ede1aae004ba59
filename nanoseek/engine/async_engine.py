"""AsyncEngine: one background thread drives `LLMEngine.step()`; asyncio code streams from it.

    engine = AsyncEngine(LLMEngine(model, tokenizer, max_num_seqs=16))
    engine.start()
    async for update in engine.generate("req-1", {"prompt_token_ids": ids}, SamplingParams(max_tokens=32)):
        for d in update.deltas:          # only the outputs that progressed in this step
            print(d.index, d.text, d.token_ids, d.finish_reason)
    engine.abort("req-1")                # from any thread; generation stops at the next step
    engine.shutdown()

The engine is not thread-safe, so every call into it happens on the engine thread while holding
`engine_lock`. Callers never touch the engine: `generate` and `abort` queue an operation that the
thread applies before its next step, so an event loop is never blocked behind a model forward.
Updates cross back to the loop with `call_soon_threadsafe`. Holding `engine_lock` from outside
pauses generation (tests use this to freeze a request mid-stream).

A `generate` iterator that is closed early (the client went away, the task was cancelled) aborts
its request, so its KV blocks are freed at the engine's next step.

No request can stop the thread. A request the engine refuses raises its ValueError from `generate`
(RequestRejected, SamplingParamsError); one the engine fails on (an exception while adding it, a
step that raised, an error publishing its output) raises RequestFailed, and only that request (or
that step's requests) ends; the loop goes on. Only an error in that recovery itself stops the
thread: then `error` is set, every open stream gets it, and `alive` turns False. `alive` and
`last_step_age_s` are what a health check reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from nanoseek.engine.llm import LLMEngine, RequestFailed, RequestOutput
from nanoseek.engine.sampling import SamplingParams


@dataclass
class OutputDelta:
    """What one output sequence gained in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None   # the stop string or token id that finished it, if any


@dataclass
class Update:
    """One step's progress of a request; `finished` on its last update."""

    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    deltas: list[OutputDelta]
    finished: bool
    first_token_time: float | None = None
    # a remote backend's count of all output tokens so far (its deltas carry text, not token ids);
    # None from the local engine, whose deltas carry the token ids themselves
    num_output_tokens: int | None = None


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: list[int] = field(default_factory=list)   # tokens already sent, per output index


_DONE = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_poll_s: float = 0.5):
        self.engine = engine
        self.engine_lock = threading.Lock()      # held around every call into `engine`
        self._ops_lock = threading.Lock()        # guards _ops and _streams; never held during a step
        self._ops: list[tuple[str, Any]] = []
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_poll_s = idle_poll_s
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the engine thread died
        self.last_loop_time: float | None = None # monotonic time the thread last went round its loop
        self.num_failed_steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def alive(self) -> bool:
        """The engine thread is running and has not died."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def last_step_age_s(self) -> float | None:
        """Seconds since the thread last finished a step or an idle wait (grows during a long step)."""
        t = self.last_loop_time
        return None if t is None else time.monotonic() - t

    # ------------------------------------------------------------------ public API
    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       keepalive_s: float | None = None) -> AsyncIterator[Update | None]:
        """Updates of one request until it finishes. With keepalive_s, yields None whenever that
        long passes without an update (so a server can send a keep-alive). Raises the engine's
        ValueError (RequestRejected, SamplingParamsError) if it refuses the request."""
        if self.error is not None:
            raise RuntimeError(f"the engine thread stopped: {self.error!r}")
        if self._thread is None:
            raise RuntimeError("the engine is not started (call start() first)")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._ops_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already being generated")
            self._streams[request_id] = stream
            self._ops.append(("add", (request_id, prompt, params)))
        self._wake.set()
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), keepalive_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._ops_lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request at the engine's next step and free its blocks; a no-op if it is done."""
        with self._ops_lock:
            self._ops.append(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_ops()
                with self.engine_lock:
                    busy = self.engine.has_unfinished_requests()
                    outputs = self._step() if busy else []
                for req in outputs:
                    self._publish_safely(req)
                self.last_loop_time = time.monotonic()
                if not busy:
                    self._wake.wait(self._idle_poll_s)
                    self._wake.clear()
        except BaseException as e:  # a crashed engine must not leave clients waiting forever
            self.error = e
            with self._ops_lock:
                streams = list(self._streams.values())
            for s in streams:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, RuntimeError(f"engine failed: {e!r}"))
            raise

    def _step(self) -> list[RequestOutput]:
        """One engine step; the engine fails the requests of a step that raised. An error it could
        not pin on requests fails all of them: the thread goes on, and only an error in that
        recovery reaches `_run`."""
        try:
            outputs = self.engine.step()
        except Exception as e:
            outputs = self.engine.fail_all(e)
        if any(r.error is not None for r in outputs):
            self.num_failed_steps += 1
        return outputs

    def _fail_stream(self, request_id: str, error: BaseException) -> None:
        with self._ops_lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _apply_ops(self) -> None:
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for kind, arg in ops:
            if kind == "add":
                request_id, prompt, params = arg
                with self._ops_lock:
                    if request_id not in self._streams:  # closed before it was ever added
                        continue
                try:
                    with self.engine_lock:
                        self.engine.add_request(request_id, prompt, params)
                except (ValueError, TypeError) as e:  # the request's fault: its client gets a 4xx
                    self._fail_stream(request_id, e)
                except Exception as e:  # the engine's fault, but this request's alone
                    self._fail_stream(request_id, RequestFailed(request_id, f"{type(e).__name__}: {e}"))
            else:
                with self.engine_lock:
                    self.engine.abort(arg)

    def _publish_safely(self, req: RequestOutput) -> None:
        if req.error is not None:
            self._fail_stream(req.request_id, RequestFailed(req.request_id, req.error))
            return
        try:
            self._publish(req)
        except Exception as e:
            with self.engine_lock:
                self.engine.abort(req.request_id)
            self._fail_stream(req.request_id, RequestFailed(req.request_id, f"{type(e).__name__}: {e}"))

    def _publish(self, req: RequestOutput) -> None:
        with self._ops_lock:
            stream = self._streams.get(req.request_id)
        if stream is None:
            return
        if not stream.sent:
            stream.sent = [0] * len(req.outputs)
        deltas = []
        for o in req.outputs:
            start = stream.sent[o.index]
            if start < 0:  # its finish was already sent
                continue
            if len(o.token_ids) == start and not o.delta_text and o.finish_reason is None:
                continue
            new_ids = o.token_ids[start:]
            logprobs = None if o.logprobs is None else o.logprobs[start:]
            deltas.append(OutputDelta(o.index, o.delta_text, new_ids, logprobs, o.finish_reason,
                                      o.stop_reason if o.finish_reason is not None else None))
            stream.sent[o.index] = -1 if o.finish_reason is not None else len(o.token_ids)
        if not deltas and not req.finished:
            return
        update = Update(req.request_id, len(req.prompt_token_ids), req.num_cached_tokens, deltas,
                        req.finished, req.first_token_time)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, update)
