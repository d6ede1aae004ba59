"""Pydantic v2 schemas of Anthropic's Messages API (POST /anthropic/v1/messages, DeepSeek's path).

    req = MessagesRequest.model_validate(body)        # unknown fields ignored, bad values raise
    reply = Message(id=..., model=..., content=[TextBlock(text="hi")], stop_reason="end_turn",
                    usage=AnthropicUsage(input_tokens=5, output_tokens=2, cache_read_input_tokens=0))
    yield event(MessageStop())                        # "event: message_stop\ndata: {...}\n\n"
    body = anthropic_error(429, "rate limit ...")     # {"type": "error", "error": {"type", "message"}}

Bounded as the OpenAI schemas are (protocol.py): strict numbers, token counts and top_k below
2**31, at most MAX_STOP stop sequences and MAX_TOOLS tools, function names as OpenAI's. What
depends on the model (context, vocabulary) is the engine's check. Usage follows Anthropic's
meaning: `input_tokens` are the prompt tokens not read from the cache, `cache_read_input_tokens`
those that were (so their sum is the prompt).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from .protocol import MAX_INT, MAX_STOP, MAX_TOOLS, Bool, Float, FunctionName, Int, _Request
from .responses import ResponseModel

# status -> Anthropic's error type; a full queue is their 529 "overloaded", a validation error 400
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    529: "overloaded_error",
}
STATUS_FOR = {422: 400, 503: 529}   # our status -> the one Anthropic uses for the same refusal


def anthropic_status(status: int) -> int:
    return STATUS_FOR.get(status, status)


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """The error body for an HTTP status (after anthropic_status)."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


# ---------------------------------------------------------------------------- requests
class TextIn(_Request):
    type: Literal["text"]
    text: str


class ToolUseIn(_Request):
    """An assistant turn's call, sent back with the conversation."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: FunctionName
    input: dict[str, Any]


class ToolResultIn(_Request):
    """A user turn's answer to a call (`tool_use_id` names it)."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextIn] | None = None
    is_error: Bool = False

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


Block = Annotated[Union[TextIn, ToolUseIn, ToolResultIn], Field(discriminator="type")]


class MessageIn(_Request):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(min_length=1)]

    @property
    def blocks(self) -> list[TextIn | ToolUseIn | ToolResultIn]:
        return [TextIn(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class ToolIn(_Request):
    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("input_schema")
    @classmethod
    def _object(cls, v: dict) -> dict:
        if v.get("type", "object") != "object":
            raise ValueError(f"a tool's input_schema must have type 'object', got {v.get('type')!r}")
        return v


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: Bool = False

    @model_validator(mode="after")
    def _name(self) -> "ToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice needs a name exactly when its type is 'tool'")
        return self


class MessagesRequest(_Request):
    model: str = Field(min_length=1)
    max_tokens: Int = Field(ge=1, le=MAX_INT)            # required, as Anthropic requires it
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextIn] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    stream: Bool = False
    temperature: Float | None = Field(default=None, ge=0.0, le=1.0)   # Anthropic's range
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: Int | None = Field(default=None, ge=1, le=MAX_INT)
    tools: list[ToolIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None

    @property
    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "".join(p.text for p in self.system) or None

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named, in OpenAI's words (tools.py); auto when tools are given."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[self.tool_choice.type]


# ---------------------------------------------------------------------------- responses
class TextBlock(ResponseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(ResponseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock | ToolUseBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


# ---------------------------------------------------------------------------- stream events
class MessageStart(ResponseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class BlockStart(ResponseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: TextBlock | ToolUseBlock


class TextDelta(ResponseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(ResponseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class BlockDelta(ResponseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class BlockStop(ResponseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(ResponseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDelta(ResponseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: AnthropicUsage          # the whole request's, final


class MessageStop(ResponseModel):
    type: Literal["message_stop"] = "message_stop"


class Ping(ResponseModel):
    type: Literal["ping"] = "ping"


def event(e: BaseModel) -> str:
    """Server-sent event framing as Anthropic sends it: the type as the event name, then the data."""
    return f"event: {e.type}\ndata: {e.model_dump_json()}\n\n"


def error_event(status: int, message: str) -> str:
    return f"event: error\ndata: {json.dumps(anthropic_error(status, message))}\n\n"
