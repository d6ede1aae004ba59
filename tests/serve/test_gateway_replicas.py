"""Two gateway replicas on one accounts database (PostgreSQL, and a SQLite file): a replica that
restarts (twice) beside a live one never frees the live one's holds; the live one's streams, held
open by their backend, then end whole and are billed in full.

The backend is a real OpenAI-compatible HTTP server on loopback (asyncio streams, no framework)
that sends one token and then waits for the test to let it finish: a request frozen mid-stream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from decimal import Decimal

import httpx
import pytest

from nanoseek.serve.pricing import Throughput, derive_price_sheet
from tests.serve.test_app import free_port, wait_until

TOKENS = 5
CLIENTS = 4      # live requests on the replica that stays up


class FrozenBackend:
    """Streams TOKENS one-token chunks (with usage so far on each) of every chat request; after the
    first it waits until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.requests = 0            # chat requests received
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = threading.Event()
        self.thread.start()
        assert self.started.wait(30)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)
            self.started.set()
            async with self.server:
                await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    async def _conn(self, reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length")), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if path in ("/health", "/v1/models"):
                    data = b'{"status":"ok","data":[{"id":"frozen"}]}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
                    await writer.drain()
                    continue
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                n = min(TOKENS, body.get("max_tokens", TOKENS))
                for i in range(n):
                    if i == 1:
                        while not self.release.is_set():
                            await asyncio.sleep(0.02)
                    usage = {"prompt_tokens": 7, "completion_tokens": i + 1, "total_tokens": 8 + i,
                             "prompt_tokens_details": {"cached_tokens": 3}}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "frozen",
                             "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                          "finish_reason": "length" if i == n - 1 else None}],
                             "usage": usage}
                    writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    await writer.drain()
                writer.write(b"data: [DONE]\n\n")
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self):
        self.release.set()
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)


class Replica:
    """A gateway (in-process uvicorn) in front of the backend, on the shared database."""

    def __init__(self, backend_url: str, db_url: str, sheet):
        import uvicorn

        from nanoseek.serve.accounts import Accounts
        from nanoseek.serve.app import ServeConfig, ServeState, create_app
        from nanoseek.serve.gateway import RemotePool

        cfg = ServeConfig(model_name="frozen", db=db_url)
        self.state = ServeState(None, None, Accounts(db_url), sheet, cfg,
                                backend=RemotePool([backend_url], health_interval_s=0.2))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.state.accounts.close()


def test_a_restarting_gateway_replica_never_frees_a_live_replicas_holds(db_url):
    sheet = derive_price_sheet(Throughput(2000, 20000, 100), "3.6")
    backend = FrozenBackend()
    replicas = []
    try:
        a = Replica(backend.url, db_url, sheet)
        replicas.append(a)
        key, secret = a.state.accounts.create_key("dana", Decimal("5"))
        outs: list[dict] = [{} for _ in range(CLIENTS)]

        def stream(out: dict):
            body = {"model": "frozen", "messages": [{"role": "user", "content": "hold on"}],
                    "max_tokens": TOKENS, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {secret}"}) as r:
                out["id"] = r.headers.get("x-request-id")
                out["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        clients = [threading.Thread(target=stream, args=(out,), daemon=True) for out in outs]
        for c in clients:
            c.start()
        # a hold is taken before its request goes upstream: CLIENTS requests there, CLIENTS live holds
        wait_until(lambda: backend.requests == CLIENTS, "a's requests at the backend")
        held = a.state.accounts.get_key(key.id).held
        assert held > 0
        # replica b starts, stops and starts again while a's request is live
        for _ in range(2):
            b = Replica(backend.url, db_url, sheet)
            replicas.append(b)
            assert b.state.accounts.get_key(key.id).held == held
            b.stop()
            replicas.remove(b)
        b = Replica(backend.url, db_url, sheet)
        replicas.append(b)
        assert b.state.accounts.get_key(key.id).held == held
        backend.release.set()
        spent = Decimal(0)
        for c, out in zip(clients, outs):
            c.join(60)
            assert not c.is_alive() and out["lines"][-1] == "data: [DONE]", out.get("lines", [])[-3:]
            usage = json.loads(out["lines"][-2][6:])["usage"]
            assert (usage["completion_tokens"], usage["prompt_cache_hit_tokens"],
                    usage["prompt_cache_miss_tokens"]) == (TOKENS, 3, 4)
            row = b.state.accounts.ledger_row(out["id"])
            assert (row.output_tokens, row.cache_hit_tokens, row.cache_miss_tokens) == (TOKENS, 3, 4)
            spent += row.amount
        k = b.state.accounts.get_key(key.id)
        assert k.held == 0 and k.balance == Decimal("5") - spent and b.state.accounts.audit() == []
    finally:
        backend.release.set()
        for r in replicas:
            r.stop()
        backend.stop()
