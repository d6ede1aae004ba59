"""The Anthropic Messages API (/anthropic/v1/messages) through the real `anthropic` client on a live
server with a random tiny model: text, streaming (its event sequence), a tool_use / tool_result
round trip, stop sequences, errors as the client's exception classes, and the same bill as the
OpenAI chat endpoint for the same tokens."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import jsonschema
import pytest

from tests.serve.test_app import MODEL, start_server
from tests.serve.test_tools import ADD, WEATHER, build_model_dir

TOOLS = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER},
         {"name": "add", "input_schema": ADD}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    folder = tmp_path_factory.mktemp("anthropic")
    sheet = derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10")
    server = start_server(build_model_dir(folder / "model"), f"sqlite:///{folder / 'accounts.db'}", sheet)
    yield server
    server.stop()
    server.state.accounts.close()


def claude(live, secret: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url + "/anthropic", api_key=secret, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def secret(live):
    return live.state.accounts.create_key("claude", Decimal("100"))[1]


@pytest.fixture(scope="module")
def client(live, secret):
    return claude(live, secret)


def sampling(temperature: float = 0.0, **kw) -> dict:
    """Sampling fields ride in extra_body: recent `anthropic` clients dropped temperature, top_p and
    top_k from create()'s arguments, but the API (and DeepSeek's) still reads them."""
    return {"extra_body": {"temperature": temperature, **kw}}


def ask(client, content="hello", temperature=0.0, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("model", MODEL)
    return client.messages.create(messages=[{"role": "user", "content": content}], **sampling(temperature), **kw)


def test_text_reply_shape_and_usage(live, client):
    r = ask(client, system="be brief", max_tokens=7)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None  # the model has no EOS
    assert r.usage.output_tokens == 7
    tok = live.state.tokenizer
    prompt = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(prompt)
    row = live.state.accounts.ledger_row(r.id)
    assert (row.cache_hit_tokens, row.cache_miss_tokens, row.output_tokens) == (
        r.usage.cache_read_input_tokens, r.usage.input_tokens, 7)
    again = ask(client, system=[{"type": "text", "text": "be brief"}], max_tokens=7)   # system as blocks
    assert again.usage.cache_read_input_tokens > 0 and again.content[0].text == r.content[0].text


def test_stop_sequences_stop_and_say_which(client):
    text = ask(client, "stop me", max_tokens=24).content[0].text
    stop = text[6:9]
    assert stop.strip(), text
    r = ask(client, "stop me", max_tokens=24, stop_sequences=["\x00never", stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == text[:text.index(stop)]


def test_stream_matches_whole_with_anthropics_event_sequence(live, client, secret):
    whole = ask(client, "stream me", max_tokens=8)
    with client.messages.stream(model=MODEL, max_tokens=8, **sampling(),
                                messages=[{"role": "user", "content": "stream me"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    # the raw events, in Anthropic's order
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "raw"}]}
    with httpx.stream("POST", live.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": secret}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in resp.iter_lines() if x]
    names = [x.split(": ", 1)[1] for x in lines if x.startswith("event: ") and x != "event: ping"]
    datas = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    delta = next(d for d in datas if d["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5


def test_tool_use_then_tool_result_round_trip(live, client):
    first = ask(client, "what is the weather", max_tokens=120, tools=TOOLS,
                tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER)
    # streamed, the same call arrives as input_json_delta pieces the client reassembles
    with client.messages.stream(model=MODEL, max_tokens=120, **sampling(), tools=TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "what is the weather"}]) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [("get_weather", uses[0].input)]
    # the call and its result go back in; tool_choice none lets the model answer in text
    messages = [{"role": "user", "content": "what is the weather"},
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                              "content": '{"temp": 21}'}, {"type": "text", "text": "so?"}]}]
    final = client.messages.create(model=MODEL, max_tokens=5, **sampling(), tools=TOOLS,
                                   tool_choice={"type": "none"}, messages=messages)
    assert final.stop_reason == "max_tokens" and [b.type for b in final.content] == ["text"]
    alone = ask(client, "what is the weather", max_tokens=5, tools=TOOLS, tool_choice={"type": "none"})
    grown = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert grown > alone.usage.input_tokens + alone.usage.cache_read_input_tokens + 20
    from nanoseek.serve.protocol_anthropic import MessagesRequest
    from nanoseek.serve.routes_anthropic import chat_messages

    req = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 5, "messages": [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], (str, list)) and not hasattr(
            m["content"][0], "model_dump") else [b.model_dump() for b in m["content"]]} for m in messages]})
    prompt = live.state.tokenizer.apply_chat_template(chat_messages(req, live.state.tokenizer))
    assert "get_weather<|tool_sep|>" in prompt and '<|tool_output_begin|>{"temp": 21}<|tool_output_end|>' in prompt
    assert prompt.index("<|tool_output_end|>") < prompt.index("so?")


def test_any_tool_choice_forces_a_valid_call(client):
    for content in ("add", "weather", "either"):
        r = ask(client, content, max_tokens=120, tools=TOOLS,
                tool_choice={"type": "any", "disable_parallel_tool_use": True})
        assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"], r
        jsonschema.validate(r.content[0].input, {"get_weather": WEATHER, "add": ADD}[r.content[0].name])


def test_keys_by_x_api_key_or_bearer_and_a_bad_key_is_401(live, secret):
    assert ask(claude(live, None, auth_token=secret)).usage.output_tokens == 6   # Authorization: Bearer
    with pytest.raises(anthropic.AuthenticationError) as e:
        ask(claude(live, "sk-" + "0" * 64))
    assert e.value.status_code == 401
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in e.value.body["error"]["message"]


@pytest.mark.parametrize("kw, param", [
    (sampling(1.5), "temperature"),
    (sampling(top_k=0), "top_k"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": {"not": {}}}}}]},
     "tools.0.input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema"),
    ({"stop_sequences": [""]}, "stop_sequences.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]},
     "messages.0.content.0"),
])
def test_bad_requests_are_400_naming_the_parameter(live, client, kw, param):
    args = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**args)
    err = e.value.body["error"]
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith(param) or f" {param}:" in err["message"], err
    assert live.state.limiter.in_flight == 0


def test_max_tokens_is_required_and_a_wrong_model_is_404(live, secret):
    r = httpx.post(live.url + "/anthropic/v1/messages", headers={"x-api-key": secret},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        ask(claude(live, secret), model="claude-x")
    assert e.value.body["error"]["type"] == "not_found_error" and "model" in e.value.body["error"]["message"]


def test_billing_equals_the_chat_endpoints_for_the_same_tokens(live):
    accounts = live.state.accounts
    a, a_secret = accounts.create_key("via-openai", Decimal("5"))
    b, b_secret = accounts.create_key("via-anthropic", Decimal("5"))
    oa = live.client(a_secret).chat.completions.create(
        model=MODEL, max_tokens=9, temperature=0, messages=[{"role": "system", "content": "terse"},
                                                            {"role": "user", "content": "bill me"}])
    an = ask(claude(live, b_secret), "bill me", max_tokens=9, system="terse")
    assert an.content[0].text == oa.choices[0].message.content   # the same prompt ids, greedy
    assert oa.usage.prompt_tokens == an.usage.input_tokens + an.usage.cache_read_input_tokens
    assert oa.usage.completion_tokens == an.usage.output_tokens == 9
    ra, rb = accounts.ledger_row(oa.id), accounts.ledger_row(an.id)
    assert (ra.cache_hit_tokens, ra.cache_miss_tokens, ra.output_tokens, ra.amount) == \
        (rb.cache_hit_tokens, rb.cache_miss_tokens, rb.output_tokens, rb.amount)
    assert rb.amount > 0
    spent_a, spent_b = Decimal("5") - accounts.get_key(a.id).balance, Decimal("5") - accounts.get_key(b.id).balance
    assert spent_a == spent_b == rb.amount and accounts.get_key(b.id).held == 0


def test_stop_sequences_with_tools_cut_the_streamed_text_as_the_reply(client):
    for content in ("hello", "what now", "tell me", "go on", "stack"):  # greedy: a prompt that answers in text
        free = ask(client, content, max_tokens=30, tools=TOOLS)
        if free.stop_reason == "max_tokens" and [b.type for b in free.content] == ["text"] \
                and free.content[0].text[6:9].strip():
            break
    else:
        pytest.fail("no prompt gave a text reply under tool_choice auto")
    text = free.content[0].text
    stop = text[6:9]
    whole = ask(client, content, max_tokens=30, tools=TOOLS, stop_sequences=[stop])
    assert whole.stop_reason == "stop_sequence" and whole.stop_sequence == stop
    assert whole.content[0].text == text[:text.index(stop)]
    with client.messages.stream(model=MODEL, max_tokens=30, **sampling(), tools=TOOLS, stop_sequences=[stop],
                                messages=[{"role": "user", "content": content}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == whole.content[0].text and final.stop_reason == "stop_sequence" and final.stop_sequence == stop
