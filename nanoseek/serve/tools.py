"""Tool calls: the grammar that tool_choice asks for, and the model's output parsed into calls.

    grammar = tool_grammar(tools, "required", tokenizer.tool_ids)   # StructuredOutputs (lark) or None
    content, calls, complete = parse_output(token_ids, tokenizer)   # calls: [(name, arguments)]
    stream = ToolStream(tokenizer, stop=["\n\n"])                   # streaming: one per output
    for piece in stream.feed(token_ids): ...                        # ("text", s) | ("call", name) | ("args", s)
    for piece in stream.finish(): ...                               # text held back for the stop strings

What the model writes (nanoseek.data.tokenizer.TOOL_TOKENS; DeepSeek-V3's names work too):
    text <|tool_calls_begin|> (<|tool_call_begin|> NAME <|tool_sep|> JSON <|tool_call_end|>)+ <|tool_calls_end|>
Under tool_choice "required" or a named function the grammar forces that shape from the first
token; under "auto" any text is allowed and the grammar takes over once <|tool_calls_begin|> is
sampled, so arguments always validate against the function's schema. A model must be trained on
turns of this shape (and on tool outputs rendered by the chat template) to call tools well; an
untrained model still produces valid calls, just not sensible ones.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Iterable, Sequence

from .state import ApiError

if TYPE_CHECKING:
    from nanoseek.engine.structured import StructuredOutputs

    from .protocol import Tool

# the same JSON layout as response_format (structured.JSON_OPTIONS), set inside each schema
X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def function_schema(tool: "Tool") -> dict:
    schema = tool.function.parameters
    schema = dict(schema) if schema else {"type": "object"}
    schema.setdefault("x-guidance", X_GUIDANCE)
    return schema


def tool_grammar(tools: list["Tool"], mode: str, named: str | None, tokenizer,
                 parallel: bool = True) -> "StructuredOutputs | None":
    """The lark grammar for tool_choice `mode` (auto | required | named); None for none. One call
    only for a named function or parallel=False."""
    from nanoseek.engine.structured import StructuredOutputs

    if mode == "none":
        return None
    t = {part: f"<[{i}]>" for part, i in tokenizer.tool_ids.items()}  # llguidance's token-id syntax
    chosen = [x for x in tools if mode != "named" or x.function.name == named]
    rules = [f"fn{i}: {json.dumps(x.function.name)} {t['sep']} %json {json.dumps(function_schema(x))}"
             for i, x in enumerate(chosen)]
    call = f"call: {t['call_begin']} ({' | '.join(f'fn{i}' for i in range(len(chosen)))}) {t['call_end']}"
    calls = f"{t['calls_begin']} call{'+' if parallel and mode != 'named' else ''} {t['calls_end']}"
    start = f"start: TEXT | TEXT {calls}\nTEXT: /(?s:.*)/" if mode == "auto" else f"start: {calls}"
    return StructuredOutputs(lark="\n".join([start, call, *rules]))


def check_tools(tools: list["Tool"] | None, mode: str, named: str | None, tokenizer, n: int) -> None:
    """400s naming the parameter: tools without tool tokens, a named tool that is absent."""
    if mode == "none" or not tools:
        if mode in ("required", "named"):
            raise ApiError(400, f"tool_choice={mode!r} needs tools", "tool_choice")
        return
    if tokenizer.tool_ids is None:
        raise ApiError(400, "tools: this model's tokenizer has no tool-call tokens (it was trained before "
                            "tools); send the request without tools", "tools")
    names = [x.function.name for x in tools]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise ApiError(400, f"tools: function names must be unique, {dupes} repeat", "tools")
    if mode == "named" and named not in names:
        raise ApiError(400, f"tool_choice names function {named!r}, which is not among tools {names}",
                       "tool_choice")


def schema_params(tools: list["Tool"]) -> Iterable[tuple[str, "StructuredOutputs"]]:
    """Each tool's schema as its own grammar, to find which one a compile error is about."""
    from nanoseek.engine.structured import StructuredOutputs

    for i, x in enumerate(tools):
        yield f"tools.{i}.function.parameters", StructuredOutputs(json=function_schema(x))


# ---------------------------------------------------------------------------- reading the output
class ToolStream:
    """Turns one output's token ids, as they come, into pieces: ("text", s), ("call", name) when a
    call's name is complete, ("args", s) for argument text. Text never splits a UTF-8 character.

    With stop strings, text is cut where the first one begins (as the engine cuts its own text),
    and text that could be the start of one is held back until it cannot: call finish() when the
    output ends to release what is still held."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        ids = tokenizer.tool_ids or {}
        self.part_of = {i: part for part, i in ids.items()}
        self.mode = "text"           # text | calls | name | args | done
        self.name_ids: list[int] = []
        self.num_calls = 0
        self.stop = [x for x in stop if x]
        self._hold = max((len(x) for x in self.stop), default=1) - 1
        self._pending = ""           # text not yet released: it may begin a stop string
        self._step = tokenizer.stream_decoder(skip_special_tokens=True)

    def _text(self, s: str, out: list[tuple[str, str]]) -> None:
        self._pending += s
        hits = [i for i in (self._pending.find(x) for x in self.stop) if i >= 0]
        if hits:  # the engine stops here too: nothing after the stop string is the reply
            out += [("text", self._pending[:min(hits)])] if min(hits) else []
            self._pending, self.mode = "", "done"
            return
        cut = len(self._pending) - self._hold
        if cut > 0:
            out.append(("text", self._pending[:cut]))
            self._pending = self._pending[cut:]

    def finish(self) -> list[tuple[str, str]]:
        """The text still held back (the output ended without completing a stop string)."""
        out = [("text", self._pending)] if self._pending else []
        self._pending = ""
        return out

    def feed(self, token_ids: Iterable[int]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for t in token_ids:
            part = self.part_of.get(t)
            if part is None:
                if self.mode == "name":
                    self.name_ids.append(t)
                elif self.mode in ("text", "args"):
                    s = self._step(t)
                    if s and self.mode == "text":
                        self._text(s, out)
                    elif s:
                        out.append((self.mode, s))
                continue
            if part == "calls_begin" and self.mode == "text":
                out += self.finish()
                self.mode = "calls"
            elif part == "call_begin" and self.mode == "calls":
                self.mode, self.name_ids = "name", []
            elif part == "sep" and self.mode == "name":
                self.mode = "args"
                self.num_calls += 1
                out.append(("call", self.tok.decode(self.name_ids, skip_special_tokens=True)))
                self._step = self.tok.stream_decoder(skip_special_tokens=True)
            elif part == "call_end" and self.mode == "args":
                self.mode = "calls"
            elif part == "calls_end" and self.mode == "calls":
                self.mode = "done"
        return out


def parse_output(token_ids: list[int], tokenizer, stop: Sequence[str] = ()) -> tuple[str, list[tuple[str, str]], bool]:
    """(content, [(name, arguments)], complete): complete is False when the calls were cut short;
    content ends before the first stop string."""
    stream = ToolStream(tokenizer, stop)
    content, calls = [], []
    for kind, s in stream.feed(token_ids) + stream.finish():
        if kind == "text":
            content.append(s)
        elif kind == "call":
            calls.append([s, ""])
        else:
            calls[-1][1] += s
    complete = stream.mode in ("text", "done")
    if stream.mode == "args":
        calls.pop()  # its arguments were cut off
    return "".join(content), [(n, a) for n, a in calls], complete
