"""Pydantic v2 schemas of what the OpenAI/DeepSeek HTTP API answers, and Server-Sent Events framing.

    from nanoseek.serve.responses import ChatCompletion, Usage, sse, SSE_DONE

    usage = Usage.from_counts(hit=512, miss=64, output=100)
    resp = ChatCompletion.build(id="chatcmpl-1", model="demo", text="hi", finish_reason="stop",
                                usage=usage)
    yield sse(chunk); yield SSE_DONE                      # Server-Sent Events framing

Responses forbid unknown fields (a typo in our own code fails a test, not a client). Usage carries
DeepSeek's fields (prompt_cache_hit_tokens / prompt_cache_miss_tokens) beside OpenAI's
prompt_tokens_details.cached_tokens, so both kinds of client read cache hits. What clients send is
in protocol.py.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .pricing import format_money

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def from_counts(cls, hit: int, miss: int, output: int) -> "Usage":
        return cls(prompt_tokens=hit + miss, completion_tokens=output, total_tokens=hit + miss + output,
                   prompt_cache_hit_tokens=hit, prompt_cache_miss_tokens=miss,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=hit))


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(ResponseModel):
    name: str
    arguments: str


class ResponseToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


def _now() -> int:
    return int(time.time())


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def build(cls, id: str, model: str, text: str, finish_reason: FinishReason, usage: Usage,
              logprobs: ChoiceLogprobs | None = None) -> "ChatCompletion":
        choice = ChatChoice(index=0, message=AssistantMessage(content=text), logprobs=logprobs,
                            finish_reason=finish_reason)
        return cls(id=id, model=model, choices=[choice], usage=usage)


class DeltaFunctionCall(ResponseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    """A fragment of a streamed tool call: the first one of a call has id, type and name; the rest
    carry pieces of its arguments, which concatenate to the whole JSON text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(ResponseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None            # only on the final usage chunk (choices == [])
    system_fingerprint: str | None = None


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None   # None only inside a stream


class Completion(ResponseModel):
    """Both the whole response and each streamed chunk of /v1/completions."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "nanoseek"
    max_model_len: int | None = None  # the context in tokens (vLLM's field); None on a gateway


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BalanceInfo(ResponseModel):
    currency: str
    total_balance: str
    granted_balance: str
    topped_up_balance: str


class UserBalance(ResponseModel):
    """DeepSeek's GET /user/balance: amounts as strings, as DeepSeek sends them."""

    is_available: bool
    balance_infos: list[BalanceInfo]

    @classmethod
    def from_available(cls, available: Decimal, currency: str = "USD") -> "UserBalance":
        amount = format_money(available)
        return cls(is_available=available > 0,
                   balance_infos=[BalanceInfo(currency=currency, total_balance=amount,
                                              granted_balance="0.00", topped_up_balance=amount)])


# ---------------------------------------------------------------------------- server-sent events
SSE_DONE = "data: [DONE]\n\n"
SSE_KEEP_ALIVE = ": keep-alive\n\n"


def sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"
