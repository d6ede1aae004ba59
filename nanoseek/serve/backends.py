"""Where generation happens: the seam between the generation core and an engine.

    backend = LocalBackend(AsyncEngine(llm))           # this process's engine (`nanoseek serve`)
    backend = RemotePool(["http://10.0.0.2:8001"])      # OpenAI-compatible workers (gateway.py)
    await backend.start()
    async for update in backend.generate(job, keepalive_s=5.0):   # Update, or None while waiting
        ...
    await backend.shutdown()

Both yield the engine's `Update` objects, which core.py absorbs into the job the same way: the
local engine's deltas carry token ids, a remote backend's carry text and the backend's own token
counts (`num_prompt_tokens`, `num_cached_tokens`, `num_output_tokens`). A refusal the client caused
raises ValueError (400); a backend that cannot answer raises BackendError with its HTTP status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Protocol

if TYPE_CHECKING:
    from nanoseek.engine.async_engine import AsyncEngine, Update
    from nanoseek.engine.sampling import SamplingParams


class BackendError(Exception):
    """No backend could serve the request (503), or one failed while serving it (502)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BackendJob(Protocol):
    """What a backend reads from core.Job."""

    id: str
    kind: str
    prompt_ids: list[int]
    params: "SamplingParams"
    body: dict | None
    cache_salt: str | None


class Backend(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def problem(self) -> str | None:
        """Why the backend cannot serve now (GET /health answers 503 with it), or None."""

    def render_metrics(self) -> bytes:
        """Its own Prometheus metrics, appended to GET /metrics (b"" when none)."""

    def generate(self, job: BackendJob, keepalive_s: float | None = None) -> AsyncIterator["Update | None"]:
        """The job's updates; None while waiting longer than keepalive_s. Closing it aborts the job."""


class LocalBackend:
    """The engine in this process, driven by its AsyncEngine thread."""

    def __init__(self, engine: "AsyncEngine"):
        self.engine = engine

    async def start(self) -> None:
        self.engine.start()

    async def shutdown(self) -> None:
        self.engine.shutdown()

    def problem(self) -> str | None:
        return None if self.engine.error is None else f"engine thread stopped: {self.engine.error!r}"

    def render_metrics(self) -> bytes:
        return b""  # the engine's gauges are in ServeMetrics

    def generate(self, job: BackendJob, keepalive_s: float | None = None) -> AsyncIterator["Update | None"]:
        prompt = {"prompt_token_ids": job.prompt_ids}
        if job.cache_salt is not None:  # the tenant's own prefix-cache namespace
            prompt["cache_salt"] = job.cache_salt
        return self.engine.generate(job.id, prompt, job.params, keepalive_s=keepalive_s)
