"""Tools through the real openai client on a live server with a random tiny model: forced calls
always carry schema-valid arguments, streamed deltas rebuild the same call, a full round trip, and
400s that name the parameter."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import jsonschema
import openai
import pytest

from tests.serve.test_app import CORPUS, MODEL, start_server

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6},
    "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def build_model_dir(folder):
    """test_app's tiny model with a longer context: tool definitions take room in the prompt."""
    import os

    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model
    from tests.conftest import tiny_v2

    tok = train_tokenizer(CORPUS, vocab_size=300, out_dir=folder)
    assert tok.tool_ids is not None
    cfg = tiny_v2(vocab_size=tok.vocab_size, eos_token_id=None, bos_token_id=tok.bos_id,
                  max_position_embeddings=1024)
    save_model(build_model(cfg, seed=7), folder,
               extra_files={f: folder / f for f in os.listdir(folder) if f.startswith("tokenizer")})
    return folder


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    folder = tmp_path_factory.mktemp("tools")
    sheet = derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10")
    server = start_server(build_model_dir(folder / "model"), f"sqlite:///{folder / 'accounts.db'}", sheet)
    yield server
    server.stop()
    server.state.accounts.close()


@pytest.fixture(scope="module")
def client(live):
    _, secret = live.state.accounts.create_key("tools", Decimal("100"))
    return live.client(secret)


def ask(client, seed, messages=None, **kw):
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(
        model=MODEL, messages=messages or [{"role": "user", "content": "what is the weather"}],
        tools=TOOLS, temperature=1.0, seed=seed, **kw)


def assert_valid_calls(choice, names=("get_weather", "add")):
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice, names", [
    ("required", ("get_weather", "add")),
    ({"type": "function", "function": {"name": "add"}}, ("add",)),
])
def test_forced_calls_always_validate(client, tool_choice, names):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: ask(client, s, tool_choice=tool_choice, parallel_tool_calls=False),
                                range(30)))
    for r in replies:
        assert_valid_calls(r.choices[0], names)
        assert len(r.choices[0].message.tool_calls) == 1


def test_parallel_calls_that_complete_validate(client):
    r = ask(client, 2, tool_choice="required", max_tokens=200, n=2)
    for c in r.choices:
        assert c.message.tool_calls and c.finish_reason in ("tool_calls", "length")
        for call in c.message.tool_calls:  # a call cut by max_tokens is left out, the rest are whole
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_streamed_tool_call_deltas_rebuild_the_same_call(client):
    whole = ask(client, 4, tool_choice="required", parallel_tool_calls=False).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in ask(client, 4, tool_choice="required", parallel_tool_calls=False, stream=True):
        if not chunk.choices:
            continue
        reasons.append(chunk.choices[0].finish_reason)
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            c["id"] = c["id"] or d.id
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(c["id"] for c in calls.values()) and reasons[-1] == "tool_calls"


def test_round_trip_call_result_answer(client, live):
    first = ask(client, 7, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert_valid_calls(first.choices[0], ("get_weather",))
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": "what is the weather"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    final = ask(client, 7, messages=messages, tool_choice="none", max_tokens=5)
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.tool_calls is None
    alone = ask(client, 7, messages=messages[:1], tool_choice="none", max_tokens=5)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result are in it
    tok = live.state.tokenizer
    prompt = tok.apply_chat_template([{**m, "content": m["content"] or ""} for m in messages])
    assert "<|tool_output_begin|>" in prompt and '"temp": 21' in prompt and "get_weather<|tool_sep|>" in prompt


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}]}, "tools.0.function.parameters"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "x", "reasoning_content": "hmm"},
                   {"role": "user", "content": "go on"}]}, "messages.1.reasoning_content"),
])
def test_bad_tool_requests_name_the_parameter(client, live, kw, param):
    args = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 4}
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param, e.value.body
    assert live.state.limiter.in_flight == 0


def test_stop_strings_with_tools_cut_streamed_text_as_they_cut_the_reply(client):
    # a seed whose reply under tool_choice auto is text (the random model rarely opens a call)
    for seed in range(20):
        free = ask(client, seed, max_tokens=40).choices[0]
        text = free.message.content or ""
        if not free.message.tool_calls and len(text) >= 12 and text[6:9].strip():
            break
    else:
        pytest.fail("no seed gave a text reply under tool_choice auto")
    stop = text[6:9]
    whole = ask(client, seed, max_tokens=40, stop=["\x00never", stop]).choices[0]
    assert whole.finish_reason == "stop" and whole.message.content == text[:text.index(stop)]
    chunks = [c for c in ask(client, seed, max_tokens=40, stop=["\x00never", stop], stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # no stop string: text held back for none, the whole text streams
    chunks = [c for c in ask(client, seed, max_tokens=40, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
