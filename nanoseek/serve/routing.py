"""Which backend serves a request: cache-aware by prompt prefix, least-loaded otherwise; health with
backoff. Pure bookkeeping, no I/O (gateway.py does the requests and the health checks).

    router = Router([BackendState("http://10.0.0.2:8001"), BackendState("http://10.0.0.3:8001")])
    hashes = prefix_hashes(prompt_text)                  # one per leading block of the prompt
    backend, how = router.pick(hashes)                   # how: "affinity" | "least_loaded"
    router.record(hashes, backend)                       # this prefix now lives there
    backend.failed(now); backend.recovered(now)          # health, with exponential backoff

A prompt's text is cut into blocks of `block_chars` characters; the hash of each leading run of
blocks (first block, first two, ...) names a prefix the backend that served it has cached. A new
request goes to the backend that served its longest known prefix, as SGLang's router does, unless
that backend is busier than the least-loaded one by more than `slack` requests; then, or when no
prefix is known, to the least-loaded healthy backend.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK_CHARS = 64        # about 16 tokens: one KV block of vLLM, SGLang and nanoseek's defaults
MAX_BLOCKS = 32         # prefixes longer than 2048 characters route by their first 2048


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> list[bytes]:
    """Hashes of the prompt's leading 1, 2, ... full blocks; a prompt shorter than one block is its
    own single block. Shortest prefix first."""
    data = text.encode("utf-8", "surrogatepass")
    step = block_chars
    h = hashlib.blake2b(digest_size=16)
    out = []
    full = min(len(data) // step, max_blocks)
    for i in range(full):
        h.update(data[i * step:(i + 1) * step])
        out.append(h.copy().digest())
    if not out:
        h.update(data)
        out.append(h.digest())
    return out


@dataclass(eq=False)
class BackendState:
    """One backend as the router sees it: health, load and its backoff."""

    url: str
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0            # consecutive failed checks or requests
    next_check: float = 0.0      # monotonic time of the next health check
    model: str | None = None     # the model id the backend serves (from its /v1/models)
    served: int = 0              # requests routed here, ever (breaks ties between equal loads)

    @property
    def name(self) -> str:
        return self.url

    def failed(self, now: float, interval: float, max_backoff: float) -> None:
        """Out of rotation; checked again after interval * 2^(failures-1), at most max_backoff."""
        self.healthy = False
        self.failures += 1
        self.next_check = now + min(interval * 2 ** (self.failures - 1), max_backoff)

    def recovered(self, now: float, interval: float) -> None:
        self.healthy, self.failures, self.next_check = True, 0, now + interval


@dataclass
class Router:
    backends: list[BackendState]
    slack: int = 4                       # an affinity backend may be this many requests busier
    memory: int = 100_000                # prefixes remembered (least recently used are forgotten)
    _owner: OrderedDict = field(default_factory=OrderedDict)

    def pick(self, hashes: list[bytes], exclude: set[str] = frozenset()) -> tuple[BackendState | None, str]:
        """The backend for a prompt with these prefix hashes, and how it was chosen; (None, "none")
        when no healthy backend is left outside `exclude`."""
        ok = [b for b in self.backends if b.healthy and b.url not in exclude]
        if not ok:
            return None, "none"
        least = min(ok, key=lambda b: (b.in_flight, b.served))
        for h in reversed(hashes):  # the longest known prefix first
            url = self._owner.get(h)
            if url is None:
                continue
            b = next((b for b in ok if b.url == url), None)
            if b is not None and b.in_flight <= least.in_flight + self.slack:
                return b, "affinity"
            break  # its owner is down or busy: the least-loaded backend takes it over
        return least, "least_loaded"

    def record(self, hashes: list[bytes], backend: BackendState) -> None:
        backend.served += 1
        for h in hashes:
            self._owner[h] = backend.url
            self._owner.move_to_end(h)
        while len(self._owner) > self.memory:
            self._owner.popitem(last=False)
