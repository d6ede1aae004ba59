"""Pydantic v2 schemas of what clients send to the OpenAI/DeepSeek HTTP API, and its error bodies.

    from nanoseek.serve.protocol import ChatCompletionRequest, validation_error_body

    req = ChatCompletionRequest.model_validate(body)     # unknown fields ignored, bad values raise
    body = validation_error_body(exc)                    # 422 body naming the parameter

Requests ignore unknown fields, as OpenAI does; out-of-range values raise a ValidationError that
`validation_error_body` turns into `{"error": {"message", "type", "param", "code"}}`. Every number
is bounded here (token ids and top_k below 2**31, seed within a torch.Generator's range) and typed
strictly (`max_tokens: true` is not 1, `"stream": 1` is not true); what depends on the model
(vocabulary, context) is checked by the engine's `check_request`.
What we answer is in responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .responses import ResponseModel

MAX_TOOLS = 128
MAX_STOP = 16
MAX_N = 16
MAX_INT = 2 ** 31 - 1              # bound of token ids, top_k, max_tokens before the engine's own checks
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1   # what torch.Generator.manual_seed takes

# Strict: a JSON boolean is not a number and a number is not a boolean (floats take ints).
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_INT)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)




# ---------------------------------------------------------------------------- errors
class ErrorDetail(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(ResponseModel):
    error: ErrorDetail


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


# status -> (type, code) in the words OpenAI and DeepSeek clients expect
ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_balance", "insufficient_balance"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_overloaded", "server_overloaded"),
}


def error_for_status(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The error body for an HTTP status, e.g. error_for_status(402, str(InsufficientBalance(...)))."""
    type_, code = ERROR_KINDS.get(status, ("server_error", None))
    return error_body(message, type_, param, code)


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """OpenAI-shaped 422 body; param is the dotted path of the bad field (e.g. messages.0.role)."""
    errs = [(_clean_loc(e["loc"]), e) for e in exc.errors(include_url=False)]
    if not errs:
        return error_body(f"invalid request: {exc}", "invalid_request_error", None, "invalid_value")
    # a union (prompt: str | list[int] | ...) reports one error per branch; the branch whose
    # type matched and whose value did not says most, so prefer value errors, then the deepest
    loc, first = max(errs, key=lambda le: (not le[1]["type"].endswith("_type"), len(le[0])))
    param = ".".join(loc) or None
    seen, parts = set(), []
    for l, e in [(loc, first)] + errs:
        line = f"{'.'.join(l) or 'body'}: {e['msg']}"
        if line not in seen:
            seen.add(line)
            parts.append(line)
    return error_body("invalid request: " + "; ".join(parts[:4]), "invalid_request_error", param,
                      "invalid_value")


def _clean_loc(loc: tuple) -> list[str]:
    """Drop the union-branch tags pydantic puts in locations ("str", "list[int]", "constrained-str")."""
    return [str(p) for p in loc if not isinstance(p, str) or (p.isidentifier() and p not in _TYPE_NAMES)]


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


# ---------------------------------------------------------------------------- requests
class TextPart(_Request):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(_Request):
    name: FunctionName
    arguments: str                  # JSON text, as the model wrote it


class ToolCall(_Request):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON schema; None: any object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    prefix: Bool = False            # DeepSeek beta: continue this assistant message
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None     # an assistant turn that called tools
    tool_call_id: str | None = None              # a tool turn: the call it answers

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role}")
        return self


class StreamOptions(_Request):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False   # vLLM's: usage so far on every chunk (what a gateway asks)


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """text (default), json_object (any JSON object) or json_schema (this schema), enforced by the
    engine's grammar (nanoseek.engine.structured)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object {name, schema, strict}")
        return self


Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]


class _SamplingRequest(_Request):
    model: str = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: Temperature | None = None
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: Int | None = Field(default=None, ge=-1, le=MAX_INT)  # -1 and 0 mean "off", as in vLLM
    stop: str | list[str] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: Int = Field(default=1, ge=1, le=MAX_N)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
            if any(not s for s in stops):
                raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1, le=MAX_INT)  # OpenAI's newer name
    logprobs: Bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named (OpenAI's default: auto with tools, none without)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


Prompt = Union[Annotated[str, Field(min_length=1)],
               Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)],
               Annotated[list[TokenId], Field(min_length=1)],
               Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1)]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    suffix: str | None = None           # fill-in-the-middle: text that follows the completion
    logprobs: Int | None = Field(default=None, ge=0, le=5)
    echo: Bool = False

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each one text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], str):
            return list(p)
        if isinstance(p[0], int):
            return [list(p)]
        return [list(x) for x in p]
