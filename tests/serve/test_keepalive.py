"""Keep-alive while a request waits in a full queue (one sequence at a time, a long request ahead):
a non-streamed request gets status 200 and blank lines before its JSON, which the openai and
anthropic clients parse; an Anthropic stream gets `ping` events; a failure found after the blank
lines arrives as the error JSON in the 200 body."""

from __future__ import annotations

import contextlib
import json
import threading
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from tests.engine.test_survival import POISON, FailsOnToken
from tests.serve.test_app import MODEL, start_server, wait_until
from tests.serve.test_tools import build_model_dir

# the blocker asks for most of the context: thousands of decode steps, never done before we release it
BLOCKER = {"model": MODEL, "max_tokens": 1000, "stream": True, "prompt": [5, 6, 7]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("keepalive") / "model")


def serve(model_dir, folder, **kw):
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    sheet = derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10")
    return start_server(model_dir, f"sqlite:///{folder / 'accounts.db'}", sheet, engine={"max_num_seqs": 1},
                        whole_keepalive_s=0.1, **kw)


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    server = serve(model_dir, tmp_path_factory.mktemp("db"))
    yield server
    server.stop()
    server.state.accounts.close()


@pytest.fixture(scope="module")
def secret(live):
    return live.state.accounts.create_key("waiter", Decimal("100"))[1]


@contextlib.contextmanager
def queue_held(live, secret):
    """The engine's one sequence slot held by a long streamed request until the block exits (the
    client closes it, so the server aborts it)."""
    with httpx.stream("POST", live.url + "/v1/completions", json=BLOCKER, timeout=60,
                      headers={"Authorization": f"Bearer {secret}"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: dropping a started iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first and '"error"' not in first, first  # it is generating
        yield
        del lines
    wait_until(lambda: live.state.engine.num_streams == 0, "the blocker to be aborted")


class HeadersSeen:
    """An httpx response hook: set when a response's status and headers arrive (its body may not)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, response: httpx.Response) -> None:
        self.event.set()


def wait_in_queue(live, secret, call):
    """Run call(hook) in a thread while the queue is held; release the queue once the waiting
    request's headers arrived (the server committed to 200 while it could not yet generate)."""
    seen, out = HeadersSeen(), {}

    def run():
        try:
            out["result"] = call(seen)
        except BaseException as e:  # noqa: BLE001  re-raised in the test
            out["error"] = e
            seen.event.set()

    with queue_held(live, secret):
        thread = threading.Thread(target=run)
        thread.start()
        assert seen.event.wait(60), "no response headers while the queue was held"
        assert "error" not in out, out.get("error")
    thread.join(60)
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_a_non_streamed_chat_in_a_full_queue_gets_blank_lines_then_json(live, secret):
    def call(hook):
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=secret, max_retries=0, timeout=60,
                               http_client=openai.DefaultHttpxClient(event_hooks={"response": [hook]}))
        return client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "wait for it"}])

    raw = wait_in_queue(live, secret, call)
    body = raw.http_response.content
    assert raw.http_response.status_code == 200 and body.startswith(b"\n"), body[:40]
    blanks = len(body) - len(body.lstrip(b"\n"))
    assert blanks >= 1 and body.lstrip(b"\n").startswith(b"{")
    r = raw.parse()   # the openai client's own parse of the whole body
    assert r.object == "chat.completion" and r.usage.completion_tokens == 8
    assert live.state.accounts.ledger_row(r.id).output_tokens == 8


def test_anthropic_non_streamed_parses_and_its_stream_gets_pings(live, secret):
    def call(hook):
        client = anthropic.Anthropic(base_url=live.url + "/anthropic", api_key=secret, max_retries=0, timeout=60,
                                     http_client=anthropic.DefaultHttpxClient(event_hooks={"response": [hook]}))
        return client.messages.with_raw_response.create(model=MODEL, max_tokens=6,
                                                        messages=[{"role": "user", "content": "wait"}])

    raw = wait_in_queue(live, secret, call)
    assert raw.http_response.content.startswith(b"\n")
    m = raw.parse()
    assert m.type == "message" and m.usage.output_tokens == 6 and m.stop_reason == "max_tokens"

    body = {"model": MODEL, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "wait"}]}
    with queue_held(live, secret):
        with httpx.stream("POST", live.url + "/anthropic/v1/messages", json=body, timeout=60,
                          headers={"x-api-key": secret}) as resp:
            lines = resp.iter_lines()
            assert next(x for x in lines if x.startswith("event: ")) == "event: ping"
            resp.close()  # leave: the queued request is aborted, nothing billed


def test_a_failure_after_the_blank_lines_is_the_error_json_in_the_200_body(model_dir, tmp_path):
    poisoned = serve(model_dir, tmp_path, wrap=FailsOnToken)   # fails on prompts holding POISON
    try:
        secret = poisoned.state.accounts.create_key("victim", Decimal("10"))[1]

        def call(hook):
            with httpx.Client(event_hooks={"response": [hook]}, timeout=60) as client:
                return client.post(poisoned.url + "/v1/completions", headers={"Authorization": f"Bearer {secret}"},
                                   json={"model": MODEL, "prompt": [5, POISON, 6], "max_tokens": 4})

        r = wait_in_queue(poisoned, secret, call)
        assert r.status_code == 200 and r.content.startswith(b"\n")
        err = json.loads(r.content)["error"]
        assert err["type"] == "server_error" and r.headers["x-request-id"] in err["message"]
        assert "simulated" not in r.text
        wait_until(lambda: poisoned.state.limiter.in_flight == 0, "the blocker and the failed request to close")
        assert poisoned.state.accounts.ledger_row(r.headers["x-request-id"]) is None   # it produced nothing
    finally:
        poisoned.stop()
        poisoned.state.accounts.close()


def test_a_quick_reply_keeps_its_own_status(live, secret):
    r = httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    bad = httpx.post(live.url + "/anthropic/v1/messages", headers={"x-api-key": secret}, timeout=60,
                     json={"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and not bad.content.startswith(b"\n")


def test_leaving_during_the_blank_lines_aborts_the_queued_request_unbilled(live, secret):
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "bye"}]}
    with queue_held(live, secret):
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status_code == 200 and next(resp.iter_bytes()).startswith(b"\n")
            rid = resp.headers["x-request-id"]
    wait_until(lambda: live.state.limiter.in_flight == 0, "the queued request to be closed")
    assert live.state.accounts.ledger_row(rid) is None and live.state.engine.num_streams == 0
    assert live.state.accounts.get_key("waiter").held == 0
