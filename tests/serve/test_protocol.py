"""API schemas: requests ignore unknown fields and name bad ones; the `openai` client's own types
parse every response we build."""

from __future__ import annotations

import json
from decimal import Decimal as D

import openai.types as oai
import pytest
from openai.types.chat import ChatCompletion as OaiChatCompletion
from openai.types.chat import ChatCompletionChunk as OaiChatCompletionChunk
from pydantic import ValidationError

from nanoseek.serve.pricing import format_money
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body, validation_error_body
from nanoseek.serve.responses import (SSE_DONE, ChatCompletion, ChatCompletionChunk, ChoiceLogprobs, ChunkChoice,
                                      Completion, CompletionChoice, Delta, ModelCard, ModelList, TokenLogprob,
                                      TopLogprob, Usage, UserBalance, sse)


def chat(**kw):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def bad_param(model, body) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    err = validation_error_body(e.value)["error"]
    assert err["type"] == "invalid_request_error"
    return err["param"], err["message"]


def test_chat_request_defaults_and_unknown_fields():
    r = chat(logit_bias={"1": 5}, stop="\n", stream=True,
             stream_options={"include_usage": True}, max_completion_tokens=7,
             messages=[{"role": "system", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert r.stop_list == ["\n"] and r.include_usage and r.max_tokens == 7 and r.n == 1
    assert [m.text for m in r.messages] == ["be brief", "ab"]
    assert r.tools is None and r.tool_mode == "none" and not hasattr(r, "logit_bias")
    assert chat(stream_options={"include_usage": True}).include_usage is False  # needs stream


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 2.5, "temperature"),
    ("top_p", 0, "top_p"),
    ("top_k", -2, "top_k"),
    ("max_tokens", 0, "max_tokens"),
    ("presence_penalty", 3, "presence_penalty"),
    ("frequency_penalty", -2.1, "frequency_penalty"),
    ("n", 0, "n"),
    ("top_logprobs", 21, "top_logprobs"),
    ("stop", [""], "stop"),
    ("stop", ["x"] * 17, "stop"),
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("tools", [{"type": "function"}], "tools.0.function"),
    ("tool_choice", "sometimes", "tool_choice"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages.0.role"),
    ("messages", [{"role": "user"}], "messages.0"),
    ("model", "", "model"),
    ("seed", "abc", "seed"),
])
def test_chat_request_bad_values_name_the_parameter(field, value, param):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], field: value}
    got, message = bad_param(ChatCompletionRequest, body)
    assert got == param and param.split(".")[0] in message


def test_cross_field_rules():
    got, message = bad_param(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                     "top_logprobs": 3})
    assert "top_logprobs needs logprobs=true" in message
    assert chat(logprobs=True, top_logprobs=3).top_logprobs == 3


def test_completion_request_prompt_forms():
    base = {"model": "demo"}
    assert CompletionRequest.model_validate({**base, "prompt": "def f(", "suffix": "\n"}).prompts == ["def f("]
    assert CompletionRequest.model_validate({**base, "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert CompletionRequest.model_validate({**base, "prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert CompletionRequest.model_validate({**base, "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    for bad in ("", [], [-1], [[]]):
        assert bad_param(CompletionRequest, {**base, "prompt": bad})[0].startswith("prompt")
    assert bad_param(CompletionRequest, {**base, "prompt": "x", "logprobs": 6})[0] == "logprobs"
    assert bad_param(CompletionRequest, {"prompt": "x"})[0] == "model"


def usage():
    return Usage.from_counts(hit=64, miss=10, output=5)


def roundtrip(model):
    return json.loads(model.model_dump_json())


def test_openai_parses_chat_completion():
    lp = ChoiceLogprobs(content=[TokenLogprob(token="Hi", logprob=-0.1, bytes=[72, 105],
                                              top_logprobs=[TopLogprob(token="Hi", logprob=-0.1)])])
    ours = ChatCompletion.build(id="chatcmpl-1", model="demo", text="Hi there", finish_reason="length",
                                usage=usage(), logprobs=lp)
    theirs = OaiChatCompletion.model_validate(roundtrip(ours))
    assert theirs.choices[0].message.content == "Hi there" and theirs.choices[0].finish_reason == "length"
    assert theirs.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.1
    u = theirs.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (74, 5, 79)
    assert u.prompt_tokens_details.cached_tokens == 64
    assert (u.prompt_cache_hit_tokens, u.prompt_cache_miss_tokens) == (64, 10)  # DeepSeek's extras


def test_openai_parses_chat_chunks_and_final_usage_chunk():
    chunks = [
        ChatCompletionChunk(id="c", model="demo", choices=[ChunkChoice(index=0, delta=Delta(role="assistant", content=""))]),
        ChatCompletionChunk(id="c", model="demo", choices=[ChunkChoice(index=0, delta=Delta(content="Hel"))]),
        ChatCompletionChunk(id="c", model="demo", choices=[ChunkChoice(index=0, delta=Delta(), finish_reason="stop")]),
        ChatCompletionChunk(id="c", model="demo", choices=[], usage=usage()),
    ]
    events = [sse(c) for c in chunks] + [SSE_DONE]
    assert all(e.startswith("data: ") and e.endswith("\n\n") and e.count("\n") == 2 for e in events)
    parsed = [OaiChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events[:-1]]
    assert [p.choices[0].delta.content if p.choices else None for p in parsed] == ["", "Hel", None, None]
    assert parsed[2].choices[0].finish_reason == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage.prompt_tokens_details.cached_tokens == 64
    assert events[-1] == "data: [DONE]\n\n"


def test_openai_parses_completion():
    ours = Completion(id="cmpl-1", model="demo", usage=usage(),
                      choices=[CompletionChoice(index=0, text=" return 1", finish_reason="stop")])
    theirs = oai.Completion.model_validate(roundtrip(ours))
    assert theirs.object == "text_completion" and theirs.choices[0].text == " return 1"
    assert theirs.usage.total_tokens == 79


def test_models_balance_and_errors():
    models = oai.Model.model_validate(roundtrip(ModelList(data=[ModelCard(id="demo")])) ["data"][0])
    assert models.id == "demo" and models.object == "model"
    bal = roundtrip(UserBalance.from_available(D("4.750000000")))
    assert bal == {"is_available": True, "balance_infos": [{"currency": "USD", "total_balance": "4.75",
                                                            "granted_balance": "0.00", "topped_up_balance": "4.75"}]}
    assert roundtrip(UserBalance.from_available(D(0)))["is_available"] is False
    assert (format_money(D("0.000012")), format_money(D(3)), format_money(D("0E-9"))) == ("0.000012", "3.00", "0.00")
    assert error_body("too many", "rate_limit_error", code="rate_limit_exceeded") == {
        "error": {"message": "too many", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}


def test_union_errors_point_at_the_branch_that_matched():
    param, message = bad_param(CompletionRequest, {"model": "demo", "prompt": [5, -1]})
    assert param == "prompt.1" and message.startswith("invalid request: prompt.1: Input should be greater")


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": True}, "max_tokens"),            # a boolean is not a number
    ({"n": True}, "n"),
    ({"temperature": True}, "temperature"),
    ({"stream": 1}, "stream"),                       # nor a number a boolean
    ({"max_tokens": 2 ** 31}, "max_tokens"),
    ({"top_k": 9223372036854775808}, "top_k"),       # would overflow in the engine
    ({"seed": 2 ** 64}, "seed"),                     # beyond what torch.Generator takes
    ({"seed": -2 ** 63 - 1}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_numbers_are_bounded_and_strictly_typed(body, param):
    got, message = bad_param(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                     **body})
    assert got == param and param in message
    assert chat(seed=2 ** 64 - 1, top_k=2 ** 31 - 1, temperature=1).seed == 2 ** 64 - 1
    assert chat(temperature=1).temperature == 1.0    # an int is a fine float


def test_prompt_token_ids_are_bounded():
    param, _ = bad_param(CompletionRequest, {"model": "demo", "prompt": [5, 9223372036854775808]})
    assert param == "prompt.1"
    param, _ = bad_param(CompletionRequest, {"model": "demo", "prompt": [5, True]})
    assert param.startswith("prompt")


def test_error_for_status_uses_openai_words():
    from nanoseek.serve.protocol import error_for_status

    assert error_for_status(429, "slow down")["error"] == {
        "message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    assert error_for_status(401, "bad key")["error"]["code"] == "invalid_api_key"
    assert error_for_status(400, "prompt has 9000 tokens, context is 4096", "messages")["error"]["param"] == "messages"
    assert error_for_status(599, "odd")["error"]["type"] == "server_error"
