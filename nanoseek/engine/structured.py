"""Grammar-constrained decoding: a per-sequence token bitmask from llguidance, applied before sampling.

    spec = StructuredOutputs(json={"type": "object", "properties": {...}})   # or json_object=True,
    params = SamplingParams(max_tokens=64, structured_outputs=spec)         #   regex=, choice=, lark=
    grammars = Grammars(tokenizer, vocab_size=V, eos_token_ids=[2])   # one per engine
    grammars.check(spec)                  # StructuredOutputError naming the problem, or nothing
    state = grammars.start(spec)          # one per sequence; the grammar was compiled once per spec
    state.fill(bitmask[row])              # bitmask [B, W] int32, W = ceil(V / 32): allowed tokens
    logits = apply_token_bitmask(logits, bitmask)   # disallowed -> -inf (rows without a grammar: all ones)
    state.advance(token_id); state.is_done          # done: the grammar admits nothing more

Why llguidance and not xgrammar (both measured on our byte-level BPE tokenizer, bench/RESULTS.md):
llguidance installs as one 8 MB wheel with no dependencies (xgrammar pulls in triton, ~1 GB, on a
CPU host), computes a mask about twice as fast here, keeps special tokens out of JSON strings, and
reads the tokenizer straight from its `tokenizer.json`.

The grammar state depends only on a sequence's output tokens. The scheduler keeps those tokens when
it preempts a sequence (it recomputes their KV, it does not resample them), so a preempted sequence
resumes with its state as it was; prefix-cache hits touch only the prompt. With n > 1 every output
has its own state over the one compiled grammar.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# JSON as a model is likely to have seen it (json.dumps' separators), and no free whitespace: a
# grammar that allows any run of blanks lets a weak model wander in them until max_tokens
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256          # compiled grammars kept (least recently used dropped first)
_SHIFTS = torch.arange(32, dtype=torch.int32)


class StructuredOutputError(ValueError):
    """A grammar that cannot be used; `param` names the part of the spec (e.g. "json")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: a JSON schema, any JSON object, a regex, a list of choices, a Lark grammar
    (llguidance's dialect; special tokens by name, e.g. <|eos|>)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    lark: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "lark") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise StructuredOutputError(f"structured_outputs needs exactly one of json, json_object, regex, "
                                        f"choice, lark; got {given or 'none'}", "structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise StructuredOutputError(f"choice={list(self.choice)!r} must be a non-empty list of non-empty "
                                        "strings", "choice")

    @property
    def key(self) -> str:
        """A canonical string for the cache: equal specs compile once."""
        return json.dumps([self.json, self.json_object, self.regex, self.choice, self.lark], sort_keys=True)

    @property
    def param(self) -> str:
        return next(k for k in ("json", "regex", "choice", "lark", "json_object") if getattr(self, k))

    def grammar(self) -> str:
        """llguidance's grammar text for this spec (not yet checked)."""
        from llguidance import LLMatcher

        if self.json is not None or self.json_object:
            schema = self.json if self.json is not None else {"type": "object"}
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise StructuredOutputError(f"json: not a JSON object: {e}", "json") from None
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.lark)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into row [W] (int32, contiguous, CPU)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; False if the grammar did not allow it (the state is then broken)."""
        return bool(self._m.consume_token(int(token_id)))

    def rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback of {num_tokens} tokens failed: {self._m.get_error()}")

    @property
    def is_done(self) -> bool:
        """Nothing but the end may follow: the sequence should stop here."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class Grammars:
    """Compiles each spec once (kept in an LRU of CACHE_SIZE) and starts states from the compiled
    copy. Thread-safe: the server checks specs on its own threads while the engine thread decodes."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()):
        from llguidance import LLTokenizer

        eos = list(eos_token_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if not eos:
            raise StructuredOutputError("structured output needs an end-of-sequence token; this model and "
                                        "tokenizer have none", "structured_outputs")
        self.vocab_size = vocab_size
        self._tokenizer = LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bitmask_width(self) -> int:
        return (self.vocab_size + 31) // 32

    def _compiled_matcher(self, spec: StructuredOutputs):
        from llguidance import LLMatcher

        with self._lock:
            m = self._compiled.get(spec.key)
            if m is not None:
                self._compiled.move_to_end(spec.key)
                return m
        grammar = spec.grammar()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise StructuredOutputError(f"{spec.param}: {messages[0].strip()}", spec.param)
        m = LLMatcher(self._tokenizer, grammar, log_level=0)
        if m.is_error():
            raise StructuredOutputError(f"{spec.param}: {m.get_error()}", spec.param)
        with self._lock:
            self._compiled[spec.key] = m
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return m

    def check(self, spec: StructuredOutputs) -> None:
        self._compiled_matcher(spec)

    def start(self, spec: StructuredOutputs) -> GrammarState:
        return GrammarState(self._compiled_matcher(spec).deep_copy())

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)


# ---------------------------------------------------------------------- the bitmask, as pure functions
def new_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """[B, W] int32, every token allowed (rows without a grammar stay like this)."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [B, W] int32 -> allowed [B, V] bool; bit j of word w is token 32 * w + j."""
    B, W = bitmask.shape
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1          # [B, W, 32]
    return bits.view(B, W * 32)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the disallowed tokens of each row set to -inf (a new tensor)."""
    return logits.masked_fill(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))


def fill_bitmask(states: Sequence[GrammarState | None], vocab_size: int) -> torch.Tensor | None:
    """The [B, W] bitmask of a batch whose rows have these grammar states; None when none has one."""
    if all(s is None for s in states):
        return None
    mask = new_bitmask(len(states), vocab_size)
    for row, s in enumerate(states):
        if s is not None:
            s.fill(mask[row])
    return mask
