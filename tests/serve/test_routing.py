"""The gateway's pure parts: prefix hashes, cache-aware routing with least-loaded fallback, health
backoff, the usage a backend reports, and the worker's refusal of public interfaces."""

from __future__ import annotations

import pytest

from nanoseek.serve.gateway import prompt_text, reported_usage
from nanoseek.serve.routing import BackendState, Router, prefix_hashes
from nanoseek.serve.worker import check_worker_host


def test_prefix_hashes_share_exactly_the_common_leading_blocks():
    a = prefix_hashes("x" * 64 * 3 + "tail one", block_chars=64)
    b = prefix_hashes("x" * 64 * 2 + "y" * 64 + "tail two", block_chars=64)
    assert len(a) == len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes("short") != prefix_hashes("shorT") and len(prefix_hashes("short")) == 1
    assert len(prefix_hashes("z" * 64 * 100, block_chars=64, max_blocks=5)) == 5


def test_router_sends_a_known_prefix_to_its_backend_and_new_ones_to_the_least_loaded():
    a, b = BackendState("http://a"), BackendState("http://b")
    r = Router([a, b], slack=2)
    h1 = prefix_hashes("system prompt " * 20 + "question 1")
    first, how = r.pick(h1)
    assert how == "least_loaded"
    r.record(h1, first)
    other = b if first is a else a
    # the same system prompt with another question: the longest shared prefix wins
    h2 = prefix_hashes("system prompt " * 20 + "question 2")
    assert r.pick(h2) == (first, "affinity")
    # a new prompt goes to the less loaded backend
    first.in_flight = 1
    assert r.pick(prefix_hashes("something else entirely")) == (other, "least_loaded")
    # affinity yields when its backend is busier than the least loaded by more than `slack`
    first.in_flight = 3
    assert r.pick(h2) == (other, "least_loaded")
    first.in_flight = 2
    assert r.pick(h2) == (first, "affinity")
    # down or excluded: the other one takes it
    first.healthy = False
    assert r.pick(h2) == (other, "least_loaded")
    first.healthy = True
    assert r.pick(h2, exclude={first.url}) == (other, "least_loaded")
    assert r.pick(h2, exclude={"http://a", "http://b"}) == (None, "none")


def test_router_forgets_the_least_recently_used_prefixes():
    a, b = BackendState("http://a"), BackendState("http://b")
    r = Router([a, b], memory=4)
    for i in range(10):
        r.record([bytes([i])], a)
    assert len(r._owner) == 4 and bytes([9]) in r._owner and bytes([0]) not in r._owner
    assert a.served == 10


def test_health_backoff_doubles_up_to_the_cap_and_resets_on_recovery():
    b = BackendState("http://a")
    waits = []
    for _ in range(6):
        b.failed(100.0, interval=1.0, max_backoff=10.0)
        waits.append(b.next_check - 100.0)
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0] and not b.healthy
    b.recovered(200.0, interval=1.0)
    assert b.healthy and b.failures == 0 and b.next_check == 201.0


def test_reported_usage_reads_openai_vllm_and_deepseek_shapes():
    assert reported_usage({"prompt_tokens": 10, "completion_tokens": 3,
                           "prompt_tokens_details": {"cached_tokens": 8}}) == (10, 8, 3)
    assert reported_usage({"prompt_tokens": 10, "completion_tokens": 3, "prompt_cache_hit_tokens": 4,
                           "prompt_cache_miss_tokens": 6}) == (10, 4, 3)
    # no cached count at all: billed as misses
    assert reported_usage({"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": None}) == (10, 0, 3)


def test_prompt_text_of_chat_and_completion_bodies():
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(chat) == "system\nbe brief\nuser\nhi\n"
    assert prompt_text({"prompt": "abc"}) == "abc" and prompt_text({"prompt": [1, 2]}) == "[1, 2]"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "10.1.2.3", "192.168.0.9", "172.16.0.1"])
def test_a_worker_binds_loopback_and_private_interfaces(host):
    check_worker_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8"])
def test_a_worker_refuses_a_public_interface_unless_allowed(host):
    with pytest.raises(ValueError, match="--allow-public"):
        check_worker_host(host)
    check_worker_host(host, allow_public=True)


def test_the_cli_refuses_a_public_worker_and_a_gateway_with_a_model(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["serve", "--model", str(tmp_path), "--worker", "--host", "0.0.0.0"]) == 2
    assert "--allow-public" in capsys.readouterr().err
    assert main(["serve", "--backend", "http://127.0.0.1:9", "--model", str(tmp_path)]) == 2
    assert "loads no model" in capsys.readouterr().err
    assert main(["serve", "--backend", "ftp://x", "--model-name", "m"]) == 2
    assert "http://" in capsys.readouterr().err
