"""Two live servers on one accounts database (SQLite file and PostgreSQL): a server starting or
stopping beside another never frees the other's live reservations; the other's in-flight stream
ends with usage and [DONE] and is billed in full."""

from __future__ import annotations

import json
import threading
from decimal import Decimal

import httpx

from tests.serve.test_app import MODEL, model_dir, sheet, start_server, wait_until  # noqa: F401 (fixtures)


def stream_in_thread(server, secret: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    out: dict = {"lines": []}

    def run():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hold on"}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {secret}"}) as r:
            out["id"] = r.headers.get("x-request-id")
            out["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def finish_frozen(server, thread, out, key, max_tokens: int) -> None:
    """Let the frozen server's engine go; its stream must end whole and be billed in full."""
    server.state.engine.engine_lock.release()
    thread.join(120)
    assert not thread.is_alive()
    assert out["lines"][-1] == "data: [DONE]", out["lines"][-3:]
    usage = json.loads(out["lines"][-2][6:])["usage"]
    assert usage["completion_tokens"] == max_tokens
    assert server.state.accounts.ledger_row(out["id"]).output_tokens == max_tokens


def test_neither_of_two_servers_frees_the_others_live_holds(model_dir, db_url, sheet):  # noqa: F811
    a = start_server(model_dir, db_url, sheet)
    key, secret = a.state.accounts.create_key("erin", Decimal("5"))
    servers = [a]
    try:
        # a is mid-request (its engine frozen after the reservation) when b starts beside it
        a.state.engine.engine_lock.acquire()
        thread, out = stream_in_thread(a, secret, 6)
        wait_until(lambda: a.state.accounts.get_key(key.id).held > 0, "a's reservation")
        b = start_server(model_dir, db_url, sheet)
        servers.append(b)
        assert b.state.accounts.get_key(key.id).held > 0
        finish_frozen(a, thread, out, key, 6)

        # now b is mid-request while a stops and a new server starts (a blue/green restart)
        b.state.engine.engine_lock.acquire()
        thread, out = stream_in_thread(b, secret, 5)
        wait_until(lambda: b.state.accounts.get_key(key.id).held > 0, "b's reservation")
        a.stop()
        servers.remove(a)
        c = start_server(model_dir, db_url, sheet)
        servers.append(c)
        assert c.state.accounts.get_key(key.id).held > 0
        finish_frozen(b, thread, out, key, 5)
        k = c.state.accounts.get_key(key.id)
        assert k.held == 0 and len(c.state.accounts.ledger(key)) == 2 and c.state.accounts.audit() == []
    finally:
        for s in servers:
            if s.state.engine.engine_lock.locked():
                s.state.engine.engine_lock.release()
            s.stop()
            s.state.accounts.close()
