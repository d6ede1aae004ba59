"""response_format through the real openai client on a live server: json_schema replies from a random
tiny model always parse and validate (the engine's grammar, not luck), bad schemas are 400s naming
the parameter."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import jsonschema
import openai
import pytest

from tests.serve.test_app import MODEL, build_model_dir, start_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "pet": {"enum": ["cat", "dog", "fox"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{4}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "pet", "scores", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    folder = tmp_path_factory.mktemp("rf")
    sheet = derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10")
    server = start_server(build_model_dir(folder / "model"), f"sqlite:///{folder / 'accounts.db'}", sheet)
    yield server
    server.stop()
    server.state.accounts.close()


@pytest.fixture(scope="module")
def client(live):
    _, secret = live.state.accounts.create_key("rf", Decimal("100"))
    return live.client(secret)


def ask(client, seed, **kw):
    kw.setdefault("max_tokens", 150)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a person as JSON"}],
                                          temperature=1.0, seed=seed, **kw)


def test_json_schema_replies_always_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: ask(client, s, response_format=fmt), range(30)))
    for r in replies:
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in replies}) > 20  # seeds differ, the model is random


def test_json_schema_streamed_equals_whole(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    whole = ask(client, 3, response_format=fmt).choices[0].message.content
    parts = ask(client, 3, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole


def test_a_reply_cut_by_max_tokens_says_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = ask(client, 1, response_format=fmt, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


@pytest.mark.parametrize("fmt, param, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
     "response_format.json_schema.schema", "bogus"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"not": {"type": "string"}}}}}}, "response_format.json_schema.schema", "not"),
    ({"type": "json_schema"}, "response_format", "json_schema"),
    ({"type": "xml"}, "response_format.type", "json_object"),
])
def test_bad_response_formats_are_refused_naming_the_parameter(live, client, fmt, param, words):
    with pytest.raises(openai.BadRequestError if "schema" in param and param != "response_format"
                       else openai.APIStatusError) as e:
        ask(client, 0, response_format=fmt)
    assert e.value.status_code in (400, 422)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
    assert live.state.limiter.in_flight == 0


def test_logprob_bytes_are_the_raw_token_bytes(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        c = ask(client, seed, response_format=fmt, logprobs=True, top_logprobs=2).choices[0]
        assert b"".join(bytes(t.bytes) for t in c.logprobs.content) == c.message.content.encode("utf-8")
        assert all(len(t.top_logprobs) == 2 and all(x.bytes is not None for x in t.top_logprobs)
                   for t in c.logprobs.content)


def test_json_object_replies_always_parse_unless_cut_by_max_tokens(client):
    """Every reply that ends parses as a JSON object. A random model opens strings it rarely closes
    (about 1 token in 300 is the quote), so some replies run to max_tokens: those say "length" and
    are cut JSON, as OpenAI documents; the grammar, not luck, makes the rest parse."""
    fmt = {"type": "json_object"}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: ask(client, s, response_format=fmt, max_tokens=200), range(30)))
    ended = [r.choices[0] for r in replies if r.choices[0].finish_reason == "stop"]
    for r in replies:
        if r.choices[0].finish_reason != "stop":
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 200
    for c in ended:
        assert isinstance(json.loads(c.message.content), dict), c.message.content
    assert len(ended) >= 10, [r.choices[0].finish_reason for r in replies]
