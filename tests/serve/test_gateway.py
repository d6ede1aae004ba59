"""The gateway as real processes on loopback: one `nanoseek serve --backend A --backend B` in front of
two `nanoseek serve --worker` processes on a tiny model, spoken to with the openai client.

Checked: the ledger matches the local engine's for the same requests (against an in-process local
server); repeated prefixes land on one worker and are billed as cache hits; after SIGKILL of a
worker, its in-flight stream ends with an error event and is billed for exactly what it delivered,
and new requests go to the other worker; the ledger audit stays clean throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from nanoseek.serve.pricing import Throughput, derive_price_sheet
from tests.serve.test_app import build_model_dir, free_port, start_server

SYSTEM = "You are a terse assistant. Answer in one word, and never explain the answer you give."


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{url} did not come up"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def metric(url: str, name: str, text: str | None = None, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels` (text: a /metrics page already fetched)."""
    total = 0.0
    for line in (text if text is not None else httpx.get(url + "/metrics").text).splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two workers, one gateway (SQLite ledger), and the local engine on a ledger of its own."""
    from nanoseek.serve.accounts import Accounts

    tmp = tmp_path_factory.mktemp("gateway")
    model_dir = build_model_dir(tmp / "model", context=1024)  # room for a stream long enough to kill
    sheet = derive_price_sheet(Throughput(2000, 20000, 100), "3.6")
    prices = sheet.save(tmp / "prices.json")
    engine_args = ["--model", str(model_dir), "--block-size", "4", "--max-num-seqs", "8",
                   "--max-num-batched-tokens", "256"]
    ports = [free_port(), free_port()]
    workers = [spawn(*engine_args, "--worker", "--port", str(p)) for p in ports]
    worker_urls = [f"http://127.0.0.1:{p}" for p in ports]
    gw_db = f"sqlite:///{tmp / 'gateway.db'}"
    gw_port = free_port()
    gateway = None
    local = None
    try:
        for proc, url in zip(workers, worker_urls):
            wait_healthy(proc, url)
        gateway = spawn("--backend", worker_urls[0], "--backend", worker_urls[1], "--db", gw_db,
                        "--prices", str(prices), "--port", str(gw_port), "--health-interval", "0.2",
                        "--model-name", "tiny")
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_healthy(gateway, gw_url)
        local_db = f"sqlite:///{tmp / 'local.db'}"
        local = start_server(model_dir, local_db, sheet)
        gw_acc, local_acc = Accounts(gw_db), Accounts(local_db)
        _, gw_secret = gw_acc.create_key("alice", Decimal("5"))
        _, local_secret = local_acc.create_key("alice", Decimal("5"))
        yield dict(workers=workers, worker_urls=worker_urls, gateway=gateway, gw_url=gw_url, gw_acc=gw_acc,
                   gw=openai.OpenAI(base_url=gw_url + "/v1", api_key=gw_secret, max_retries=0, timeout=60),
                   local=local.client(local_secret), local_acc=local_acc, gw_secret=gw_secret)
        gw_acc.close()
        local_acc.close()
    finally:
        if local is not None:
            local.stop()
        for p in [gateway, *workers]:
            if p is not None:
                stop(p)


def chat(client, question: str, stream: bool = False, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
        return r.id, [c.message.content for c in r.choices], r.usage
    text, usage, rid = {}, None, None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        rid = chunk.id
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
        usage = chunk.usage or usage
    return rid, [text[i] for i in sorted(text)], usage


def complete(client, prompt: str, stream: bool = False, **kw):
    if not stream:
        r = client.completions.create(model="tiny", prompt=prompt, temperature=0, **kw)
        return r.id, [c.text for c in r.choices], r.usage
    text, usage, rid = "", None, None
    for chunk in client.completions.create(model="tiny", prompt=prompt, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        rid = chunk.id
        text += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    return rid, [text], usage


REQUESTS = [  # (function, prompt, stream, kw)
    (chat, "What is a stack?", False, dict(max_tokens=5)),
    (chat, "What is a queue?", True, dict(max_tokens=4)),
    (complete, "The quick brown fox", False, dict(max_tokens=6)),
    (complete, "def add(a, b):", True, dict(max_tokens=3)),
    (chat, "What is a heap?", False, dict(max_tokens=3, n=2)),
]


def billed(acc, request_id: str):
    row = acc.ledger_row(request_id)
    return row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens, row.amount


def test_gateway_bills_exactly_what_the_local_engine_bills(cluster):
    for fn, prompt, stream, kw in REQUESTS:
        gid, gtext, gusage = fn(cluster["gw"], prompt, stream, **kw)
        lid, ltext, lusage = fn(cluster["local"], prompt, stream, **kw)
        assert gtext == ltext, (prompt, gtext, ltext)  # greedy on the same model: the same text
        assert gusage.model_dump() == lusage.model_dump(), prompt
        assert billed(cluster["gw_acc"], gid) == billed(cluster["local_acc"], lid), prompt
    # the system prompt is cached by the second chat on, on the gateway's workers as locally
    assert max(r.cache_hit_tokens for r in cluster["gw_acc"].ledger()) > 0
    assert cluster["gw_acc"].audit() == [] and cluster["gw_acc"].get_key("alice").held == 0
    sheet = httpx.get(cluster["gw_url"] + "/v1/pricing").json()
    assert "billed as cache misses" in sheet["cache_hits"]


def test_repeated_prefixes_go_to_one_worker_and_are_billed_as_cache_hits(cluster):
    gw, url = cluster["gw"], cluster["gw_url"]
    prefix = "Long shared context: " + "the lazy dog sleeps while the quick fox jumps. " * 3
    before = {w: metric(url, "nanoseek:backend_requests_total", backend=w) for w in cluster["worker_urls"]}
    affinity = metric(url, "nanoseek:backend_routed_total", how="affinity")
    ids = [complete(gw, prefix + f" Question {i}:", max_tokens=2)[0] for i in range(4)]
    after = {w: metric(url, "nanoseek:backend_requests_total", backend=w) for w in cluster["worker_urls"]}
    grew = [w for w in after if after[w] > before[w]]
    assert len(grew) == 1 and after[grew[0]] - before[grew[0]] == 4   # all four on one worker
    assert metric(url, "nanoseek:backend_routed_total", how="affinity") - affinity == 3
    rows = [cluster["gw_acc"].ledger_row(i) for i in ids]
    assert rows[0].cache_hit_tokens == 0 or rows[0].cache_hit_tokens < rows[1].cache_hit_tokens
    assert all(r.cache_hit_tokens > 20 for r in rows[1:])                 # the shared prefix, cached
    assert metric(url, "nanoseek:backend_cached_tokens_total", backend=grew[0]) > 0


def test_sigkill_of_a_worker_ends_its_streams_billed_for_what_was_delivered(cluster):
    gw_url, acc = cluster["gw_url"], cluster["gw_acc"]
    prompt = "class Stack:\n    def push(self, x):"
    # the worker must still be generating when the SIGKILL lands: with the fused decode step 200 tokens
    # finished before the kill under CI's load, so the stream is long in time (~seconds), not just tokens
    body = dict(model="tiny", prompt=prompt, max_tokens=960, temperature=0, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    headers = {"Authorization": f"Bearer {cluster['gw_secret']}"}
    requests_before = {w: metric(gw_url, "nanoseek:backend_requests_total", backend=w) for w in cluster["worker_urls"]}
    events, victim = [], None
    with httpx.stream("POST", gw_url + "/v1/completions", json=body, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if victim is None and len(events) == 2:  # the stream has begun: kill the worker serving it
                page = httpx.get(gw_url + "/metrics").text  # one scrape for every worker: kill soon
                now = {w: metric(gw_url, "nanoseek:backend_requests_total", text=page, backend=w)
                       for w in cluster["worker_urls"]}
                victim = next(i for i, w in enumerate(cluster["worker_urls"]) if now[w] > requests_before[w])
                cluster["workers"][victim].send_signal(signal.SIGKILL)
    assert victim is not None
    assert events[-1] != "[DONE]" and "error" in json.loads(events[-1]), events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    delivered = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert 2 <= len(delivered) < 960
    last_usage = chunks[-1]["usage"]          # what the client was told it had used so far
    row = acc.ledger_row(chunks[0]["id"])
    assert row.output_tokens == last_usage["completion_tokens"] >= len(delivered)
    assert (row.cache_hit_tokens, row.cache_miss_tokens) == (last_usage["prompt_cache_hit_tokens"],
                                                             last_usage["prompt_cache_miss_tokens"])
    # new requests, the same prompt included, go to the survivor
    survivor = cluster["worker_urls"][1 - victim]
    served_before = metric(gw_url, "nanoseek:backend_requests_total", backend=survivor)
    for i in range(3):
        _, text, usage = complete(cluster["gw"], prompt if i == 0 else f"Question {i}", max_tokens=2)
        assert usage.completion_tokens == 2
    assert metric(gw_url, "nanoseek:backend_requests_total", backend=survivor) - served_before == 3
    dead = cluster["worker_urls"][victim]
    assert metric(gw_url, "nanoseek:backend_healthy", backend=dead) == 0
    assert metric(gw_url, "nanoseek:backend_errors_total", backend=dead) >= 1
    assert acc.audit() == [] and acc.get_key("alice").held == 0
