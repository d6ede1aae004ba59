"""The API against a live uvicorn on 127.0.0.1, spoken to with the official `openai` client:
chat and completions (streamed or not, with and without usage), errors as the client's own
exception classes, the ledger under parallel requests, a disconnect mid-stream, a restart."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from nanoseek.serve.pricing import Throughput, derive_price_sheet, request_cost

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
          "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"] * 40
MODEL = "tiny"


# ---------------------------------------------------------------------------- a live server
def build_model_dir(folder: Path, context: int = 256) -> Path:
    """Tokenizer + tiny V2 model in HF layout (context: max_position_embeddings). No EOS in the config:
    every request runs to max_tokens, so token counts are known exactly."""
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model
    from tests.conftest import tiny_v2

    tok = train_tokenizer(CORPUS, vocab_size=300, out_dir=folder)
    cfg = tiny_v2(vocab_size=tok.vocab_size, eos_token_id=None, bos_token_id=tok.bos_id,
                  max_position_embeddings=context)
    save_model(build_model(cfg, seed=7), folder,
               extra_files={f: folder / f for f in os.listdir(folder) if f.startswith("tokenizer")})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    state: object
    server: object
    thread: threading.Thread

    def client(self, key: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def start_server(model_dir: Path, db_url: str, sheet, engine: dict | None = None, wrap=None, **config) -> LiveServer:
    """uvicorn on a free loopback port over a tiny engine; `engine` overrides LLMEngine's arguments,
    `wrap` wraps the model (e.g. test_survival.FailsOnToken), `config` ServeConfig's fields."""
    import uvicorn

    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.engine.llm import LLMEngine
    from nanoseek.model.checkpoint import load_model
    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.app import ServeConfig, ServeState, create_app

    cfg = ServeConfig(model_dir=str(model_dir), model_name=MODEL, db=db_url, keepalive_s=0.1, **config)
    model = load_model(str(model_dir))
    llm = LLMEngine(model if wrap is None else wrap(model), load_tokenizer(str(model_dir)), **{
        "block_size": 4, "num_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 256, **(engine or {})})
    state = ServeState(llm, llm.tokenizer, Accounts(db_url), sheet, cfg)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", state, server, thread)


def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    """Poll for a state the server reaches asynchronously (not a timing assertion: the limit only
    turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def sheet():
    # miss 1.1, hit 0.11, output 2.2 per million tokens: cost 1.0 / 0.1 / 2.0 plus 10%
    return derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10")


@pytest.fixture
def live(model_dir, db_url, sheet):
    server = start_server(model_dir, db_url, sheet)
    yield server
    server.stop()
    server.state.accounts.close()


@pytest.fixture
def funded(live):
    key, secret = live.state.accounts.create_key("alice", Decimal("10"))
    return key, secret


def chat(client, content="hello", **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# ---------------------------------------------------------------------------- happy paths
def test_chat_non_streamed_returns_usage_and_debits_the_ledger(live, funded, sheet):
    key, secret = funded
    r = chat(live.client(secret), max_tokens=7)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    u = r.usage
    assert u.completion_tokens == 7 and u.total_tokens == u.prompt_tokens + 7 and u.prompt_tokens > 3
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    row = live.state.accounts.ledger_row(r.id)
    assert (row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens) == (
        extra["prompt_cache_hit_tokens"], extra["prompt_cache_miss_tokens"], 7)
    assert row.amount == request_cost(sheet.prices, row.cache_hit_tokens, row.cache_miss_tokens, 7) > 0
    after = live.state.accounts.get_key(key.id)
    assert after.balance == Decimal("10") - row.amount and after.held == 0
    # the same prompt again: its full blocks are prefix-cache hits, billed at the hit price
    again = chat(live.client(secret), max_tokens=7)
    assert again.usage.prompt_tokens_details.cached_tokens >= 4
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy: same text


def test_streamed_chat_matches_non_streamed_and_reports_usage_last(live, funded):
    _, secret = funded
    client = live.client(secret)
    whole = chat(client, "stream me", max_tokens=8)
    chunks = list(chat(client, "stream me", max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(chat(client, "stream me", max_tokens=8, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_completions_streamed_and_not_and_fill_in_the_middle(live, funded):
    _, secret = funded
    client = live.client(secret)
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=5, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    streamed = list(client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == 5
    tok = live.state.tokenizer
    fim = client.completions.create(model=MODEL, prompt="def add(a, b):\n", suffix="\n", max_tokens=4, temperature=0)
    expect = 1 + 1 + len(tok.encode("def add(a, b):\n")) + 1 + len(tok.encode("\n")) + 1  # bos + PSM tokens
    assert fim.usage.prompt_tokens == expect


def test_n_choices_seed_and_logprobs_on_chat(live, funded):
    _, secret = funded
    client = live.client(secret)
    r = chat(client, max_tokens=4, temperature=1.0, n=3, seed=11, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    assert all(len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 3 for c in r.choices)
    again = chat(client, max_tokens=4, temperature=1.0, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_models_balance_pricing_health_metrics(live, funded, sheet):
    _, secret = funded
    client = live.client(secret)
    cards = client.models.list().data
    assert [m.id for m in cards] == [MODEL]
    assert cards[0].max_model_len == live.state.llm.max_model_len > 0  # the context, as vLLM reports it
    chat(client, max_tokens=3)
    h = {"Authorization": f"Bearer {secret}"}
    bal = httpx.get(live.url + "/v1/user/balance", headers=h).json()
    key = live.state.accounts.get_key("alice")
    assert bal["is_available"] and Decimal(bal["balance_infos"][0]["total_balance"]) == key.available
    assert httpx.get(live.url + "/v1/user/balance").status_code == 401
    pricing = httpx.get(live.url + "/v1/pricing").json()
    assert Decimal(pricing["prices"]["output"]) == sheet.prices.output
    assert Decimal(pricing["derivation"]["margin"]) == Decimal("0.10")
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(live.url + "/metrics").text
    for name in ("nanoseek:num_requests_running", "nanoseek:num_requests_waiting", "nanoseek:kv_cache_usage_perc",
                 "nanoseek:time_to_first_token_seconds_bucket", "nanoseek:time_per_output_token_seconds_bucket",
                 "nanoseek:prefix_cache_hits_total"):
        assert name in metrics
    assert "nanoseek:generation_tokens_total 3.0" in metrics


# ---------------------------------------------------------------------------- errors
def test_errors_are_the_clients_own_exception_classes(live, funded):
    _, secret = funded
    with pytest.raises(openai.AuthenticationError) as e:
        chat(live.client("sk-" + "0" * 64))
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"

    _, poor = live.state.accounts.create_key("poor", Decimal("0.000001"))
    with pytest.raises(openai.APIStatusError) as e:
        chat(live.client(poor), max_tokens=100)
    assert e.value.status_code == 402 and "insufficient balance" in e.value.message
    assert live.state.accounts.ledger(live.state.accounts.get_key("poor")) == []

    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(live.client(secret), temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(live.client(secret), "word " * 300)
    assert "the prompt has" in e.value.message and "context is 256 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(live.client(secret), max_tokens=250)
    assert e.value.param == "max_tokens" and "max_tokens=250" in e.value.message
    # unknown parameters are ignored as OpenAI does; response_format types are OpenAI's
    ok = chat(live.client(secret), max_tokens=2, user="u-1", response_format={"type": "text"},
              extra_body={"no_such_parameter": 1})
    assert ok.usage.completion_tokens == 2
    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(live.client(secret), response_format={"type": "xml"})
    assert e.value.param == "response_format.type"
    with pytest.raises(openai.NotFoundError):
        live.client(secret).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_rate_limit_is_429_with_retry_after(live):
    from nanoseek.serve.key_admin import LimitsUpdate

    key, secret = live.state.accounts.create_key("limited", Decimal("1"))
    live.state.key_admin.set_limits(key.id, LimitsUpdate(requests_per_minute=2))  # the key's own limit
    client = live.client(secret)
    chat(client, max_tokens=2)
    chat(client, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        chat(client, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert len(live.state.accounts.ledger(key)) == 2


# ---------------------------------------------------------------------------- accounts under load
def test_parallel_requests_ledger_sums_to_the_balance_change(live, funded):
    key, secret = funded
    client = live.client(secret)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: chat(client, f"request {i} " * (i + 1), max_tokens=3 + i % 4,
                                               stream=i % 2 == 1), range(12)))
    for r in results:
        if not hasattr(r, "usage"):
            list(r)  # drain the streams
    rows = live.state.accounts.ledger(key)
    assert len(rows) == 12 and len({r.request_id for r in rows}) == 12
    after = live.state.accounts.get_key(key.id)
    assert Decimal("10") - after.balance == sum(r.amount for r in rows) and after.held == 0
    assert live.state.accounts.audit() == []


def test_disconnect_mid_stream_stops_generation_frees_blocks_and_bills_what_was_produced(live, funded, sheet):
    key, secret = funded
    llm = live.state.llm
    # the engine runs 5 steps (5 tokens), then stalls until released: the client leaves meanwhile
    gate, steps, real_step = threading.Event(), [0], llm.step

    def gated_step():
        if steps[0] >= 5:
            gate.wait()
        steps[0] += 1
        return real_step()

    llm.step = gated_step
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", live.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as resp:
                assert resp.status_code == 200
                rid = resp.headers["x-request-id"]
                for line in resp.iter_lines():  # the role chunk, then the first content
                    if line.startswith("data: ") and '"content":"' in line and '"role":"assistant"' not in line:
                        break
            # leaving the block closes the connection while the request still runs
        wait_until(lambda: live.state.accounts.ledger_row(rid) is not None, "the disconnected request's bill")
    finally:
        gate.set()
    wait_until(lambda: not llm.has_unfinished_requests(), "the engine to drop the request")
    del llm.step
    assert steps[0] <= 7  # aborted at the next step, not run to max_tokens
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    row = live.state.accounts.ledger_row(rid)
    assert 1 <= row.output_tokens <= 5
    assert row.amount == request_cost(sheet.prices, row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens)
    # the handler frees its concurrency slot after it settles the bill: a moment after the row exists
    wait_until(lambda: live.state.limiter.in_flight == 0, "the disconnected request's concurrency slot")
    assert live.state.accounts.get_key(key.id).held == 0


def test_a_queued_stream_gets_keepalives_a_full_queue_503_and_a_disconnect_before_any_token_costs_nothing(live, funded):
    key, secret = funded
    body = {"model": MODEL, "messages": [{"role": "user", "content": "wait"}], "max_tokens": 5, "stream": True}
    live.state.limiter.max_queue = 1
    live.state.engine.engine_lock.acquire()  # the request waits: the engine cannot take it
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", live.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as resp:
                rid = resp.headers["x-request-id"]
                seen, lines = [], resp.iter_lines()  # held: a dropped iterator closes the connection
                while seen.count(": keep-alive") < 2:
                    seen.append(next(lines))
                # the queue (max_queue=1) is full while this request waits: the next one gets 503
                with pytest.raises(openai.InternalServerError) as e:
                    chat(live.client(secret), max_tokens=2)
                assert e.value.status_code == 503 and "at capacity" in e.value.message
                assert int(e.value.response.headers["retry-after"]) >= 1
        assert '"role":"assistant"' in seen[0]
        wait_until(lambda: live.state.limiter.in_flight == 0, "the abandoned request to be released")
    finally:
        live.state.engine.engine_lock.release()
    wait_until(lambda: not live.state.llm.has_unfinished_requests(), "the engine to drop the request")
    assert live.state.accounts.ledger_row(rid) is None
    k = live.state.accounts.get_key(key.id)
    assert k.balance == Decimal("10") and k.held == 0


def test_restart_keeps_balances_and_ledger_and_releases_stale_holds(model_dir, db_url, sheet):
    first = start_server(model_dir, db_url, sheet)
    key, secret = first.state.accounts.create_key("bob", Decimal("5"))
    r = chat(first.client(secret), max_tokens=4)
    balance = first.state.accounts.get_key(key.id).balance
    # a crash mid-request leaves a hold behind; the next server must give it back
    first.state.accounts.reserve(key, "crashed-request", Decimal("1"), sheet.prices)
    first.stop()
    first.state.accounts.close()
    second = start_server(model_dir, db_url, sheet)
    try:
        k = second.state.accounts.get_key(key.id)
        assert k.balance == balance < Decimal("5") and k.held == 0
        assert second.state.accounts.ledger_row(r.id).output_tokens == 4
        bal = httpx.get(second.url + "/v1/user/balance", headers={"Authorization": f"Bearer {secret}"}).json()
        assert Decimal(bal["balance_infos"][0]["total_balance"]) == balance
        chat(second.client(secret), max_tokens=2)
        assert len(second.state.accounts.ledger(key)) == 2 and second.state.accounts.audit() == []
    finally:
        second.stop()
        second.state.accounts.close()


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_a_compiled_server_compiles_its_decode_step_before_it_listens(model_dir, sheet, tmp_path, monkeypatch,
                                                                      enforce_eager):
    """--no-enforce-eager: load_state warms up every decode bucket (LLMEngine.warmup_decode) before the
    app exists, so no request waits for a compile; eager servers skip it."""
    from nanoseek.engine.compile import CompiledDecode
    from nanoseek.engine.llm import LLMEngine
    from nanoseek.serve.app import ServeConfig, load_state

    warmed = []
    monkeypatch.setattr(LLMEngine, "warmup_decode", lambda self, context_tokens=None: warmed.append(self) or {})
    state = load_state(ServeConfig(model_dir=str(model_dir), model_name=MODEL, db=f"sqlite:///{tmp_path}/a.db",
                                   enforce_eager=enforce_eager), sheet=sheet)
    llm = state.engine.engine  # the LLMEngine inside the server's AsyncEngine
    assert warmed == ([] if enforce_eager else [llm])
    assert isinstance(llm.decode_step, CompiledDecode) == (not enforce_eager)
