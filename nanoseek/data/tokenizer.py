"""Byte-level BPE tokenizer: train one on our data, or load a published one (DeepSeek's included).

    tok = train_tokenizer(texts, vocab_size=8192, out_dir="runs/data")   # writes tokenizer.json
    tok = load_tokenizer("runs/data")            # or a DeepSeek model folder, or a tokenizer.json
    ids = tok.encode("def f(x):\n    return x", add_bos=True)
    tok.decode(ids)                              # round-trips any UTF-8 text
    step = tok.stream_decoder(); "".join(step(i) for i in ids)   # incremental, for streaming APIs
    tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])   # the string transformers renders
    ids = tok.encode_chat([{"role": "user", "content": "x<|eos|>"}])  # ids; content stays text

What we train: GPT-4-style pre-splitting (letters, 1-3 digit groups, punctuation runs, whitespace
runs) over bytes, no normaliser, so every string maps to bytes and back unchanged. Special tokens
(BOS, EOS, PAD, chat roles, fill-in-the-middle) take ids 0..9. Saved as `tokenizer.json` plus a
`tokenizer_config.json` holding the special tokens and a Jinja chat template, so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it and renders the same prompts.

Untrusted text (what API clients send) is encoded with `split_special_tokens=True`: a special
token's text in it, such as "<|eos|>", stays that text instead of becoming the control token.
`encode_chat` does that for message content, so only the chat template writes control tokens.

Loading reads the special tokens from `tokenizer_config.json` when present (strings or DeepSeek's
{"content": ...} objects) and finds FIM tokens under our names or DeepSeek's (fim▁begin/hole/end).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import functools
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from nanoseek.io import atomic_write

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in CHAT_ROLES}
# Tool calls, in the spirit of DeepSeek-V3's template: an assistant turn may end in
#   <|tool_calls_begin|>(<|tool_call_begin|>NAME<|tool_sep|>JSON ARGS<|tool_call_end|>)+<|tool_calls_end|>
# and a tool's result comes back as <|tool_output_begin|>TEXT<|tool_output_end|>. Appended after
# the older special tokens, so tokenizers trained before them keep their ids (they have no tools).
TOOL_PARTS = ("calls_begin", "call_begin", "sep", "call_end", "calls_end", "output_begin", "output_end")
TOOL_TOKENS = {part: f"<|tool_{part}|>" for part in TOOL_PARTS}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values(), FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, *TOOL_TOKENS.values()]
# names of the FIM tokens in published tokenizers: ours, DeepSeek (Coder/V2/V3), StarCoder
FIM_NAMES = {
    "prefix": (FIM_PREFIX, "<｜fim▁begin｜>", "<fim_prefix>"),
    "suffix": (FIM_SUFFIX, "<｜fim▁hole｜>", "<fim_suffix>"),
    "middle": (FIM_MIDDLE, "<｜fim▁end｜>", "<fim_middle>"),
}
# the tool-call tokens: ours, then DeepSeek-V3's
TOOL_NAMES = {part: (TOOL_TOKENS[part], f"<｜tool▁{part.replace('_', '▁')}｜>") for part in TOOL_PARTS}
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
# Each turn is <|role|>content<|eos|>, so a model trained on it stops on EOS by itself. With `tools`
# (OpenAI's [{"type": "function", "function": {name, description, parameters}}]) a system turn lists
# them as JSON first; an assistant turn with tool_calls ends in the tool-call tokens; a "tool" turn is
# the tool's output between its own tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>Tools:' }}"
    "{% for tool in tools %}{{ '\n' ~ (tool['function'] if 'function' in tool else tool) | tojson }}{% endfor %}"
    "{{ eos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user, assistant or tool') }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|tool_output_begin|>' ~ message['content'] ~ '<|tool_output_end|>' }}"
    "{% else %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ (message['content'] or '') }}"
    "{% if message['tool_calls'] %}{{ '<|tool_calls_begin|>' }}"
    "{% for call in message['tool_calls'] %}{{ '<|tool_call_begin|>' ~ call['function']['name'] ~ '<|tool_sep|>' ~ "
    "call['function']['arguments'] ~ '<|tool_call_end|>' }}{% endfor %}"
    "{{ '<|tool_calls_end|>' }}{% endif %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be used."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the chat template the rest of nanoseek needs."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.bos_id = self._special_id("bos_token", BOS)
        self.eos_id = self._special_id("eos_token", EOS)
        self.pad_id = self._special_id("pad_token", PAD)
        if self.pad_id is None:  # DeepSeek pads with EOS; so do we when a tokenizer has no PAD
            self.pad_id = self.eos_id
        self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id = (
            self._first_id(FIM_NAMES[k]) for k in ("prefix", "suffix", "middle"))
        self.chat_template: str | None = self.config.get("chat_template")
        spec = json.loads(tok.to_str())
        self._byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        self._added_ids = {t["id"] for t in spec.get("added_tokens", [])}

    # ------------------------------------------------------------------ special tokens
    def _special_id(self, key: str, default: str) -> int | None:
        value = self.config.get(key, default)
        if isinstance(value, dict):  # published configs store AddedToken objects
            value = value.get("content")
        return self.tok.token_to_id(value) if isinstance(value, str) else None

    def _first_id(self, names: Iterable[str]) -> int | None:
        for name in names:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tok.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tok.id_to_token(self.eos_id)

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def _text_only(self) -> tokenizers.Tokenizer:
        """A copy that reads special-token text as plain text (a separate object: the flag is state
        on the tokenizer, and encodes run from several threads)."""
        tok = tokenizers.Tokenizer.from_str(self.tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def max_token_chars(self) -> int:
        """The longest token, in characters of its vocabulary entry (a byte-level token has one per
        byte, so at least as many as the text it encodes): a text of n characters encodes to at
        least n / max_token_chars tokens, which a server checks before it tokenizes anything."""
        return max(1, max(map(len, self.tok.get_vocab(with_added_tokens=True))))

    def encode(self, text: str, add_bos: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Token ids of text. With split_special_tokens, special-token text ("<|eos|>") is encoded
        as ordinary text, as for anything a user wrote (transformers' name for the switch)."""
        tok = self._text_only if split_special_tokens else self.tok
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> Callable[[int], str]:
        """For streaming: a function taking one id at a time and returning the text it completes.

        Byte-level tokens can end inside a UTF-8 character; the function returns '' until the
        character is whole, so the pieces always join to `decode(ids)`.
        """
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self.tok, token_id) or ""

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes of one token: a byte-level BPE token may be half a UTF-8 character, which
        decode() would turn into U+FFFD. Special (added) tokens are their text's UTF-8."""
        piece = self.tok.id_to_token(i)
        if piece is None:
            return b""
        if i in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return self.decode([i]).encode("utf-8")  # not byte-level: a token is whole characters

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    # ------------------------------------------------------------------ chat
    @property
    def tool_ids(self) -> dict[str, int] | None:
        """The ids of the tool-call tokens (TOOL_PARTS -> id), ours or DeepSeek's; None when this
        tokenizer has not all of them (trained before tools: it cannot call tools)."""
        ids = {part: self._first_id(names) for part, names in TOOL_NAMES.items()}
        return None if None in ids.values() else ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt string for `messages` ([{"role", "content"}], assistant turns may carry
        tool_calls) and `tools`, rendered as transformers does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"messages[{i}]={m!r}: expected a dict with 'role' and 'content'")
        return _compile_template(self.chat_template).render(
            messages=[{"tool_calls": None, **m} for m in messages], tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """The chat prompt's ids, with every message's content encoded as text: only the template
        writes control tokens, so content such as "x<|eos|><|system|>" cannot forge a turn.

        The template is rendered with each content replaced by a marker (so a huge content costs
        no template time); the template's own text is encoded with special tokens, each content
        without. The markers are padded with whitespace and lower-case, so a template that trims,
        escapes or re-cases content breaks them; then the whole rendering is encoded, after refusing
        content that holds special-token text. Other string fields of a message (names, tool-call
        arguments) must hold no special-token text either: TokenizerError otherwise.
        """
        tag = "nsq" + secrets.token_hex(8)
        masked, contents = [], []
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                for key, value in _string_leaves(m, skip=("role", "content")):
                    if self._has_special_text(value):
                        raise TokenizerError(f"messages[{i}].{key} holds special-token text; it may "
                                             "only appear in content")
                c = m.get("content")
                if isinstance(c, str) and c:
                    m = {**m, "content": f" \n{tag}x{len(contents)}x{tag}\n "}
                    contents.append(c)
            masked.append(m)
        rendered = self.apply_chat_template(masked, add_generation_prompt, tools=tools)
        pieces = re.split(f" \n{tag}x(\\d+)x{tag}\n ", rendered)  # [template, index, template, ...]
        if sorted(int(p) for p in pieces[1::2]) != list(range(len(contents))) or tag in "".join(pieces[::2]):
            if any(self._has_special_text(c) for c in contents):
                raise TokenizerError("a message's content holds special-token text, which this "
                                     "chat template does not let us keep as text")
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools=tools))
        ids: list[int] = []
        for j, p in enumerate(pieces):
            if j % 2:
                ids += self.encode(contents[int(p)], split_special_tokens=True)
            elif p:
                ids += self.encode(p)
        return ids

    @cached_property
    def _special_texts(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.content)

    def _has_special_text(self, text: str) -> bool:
        """Whether encoding text with special tokens would find one in it."""
        return any(t in text for t in self._special_texts)

    # ------------------------------------------------------------------ io
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `out_dir` (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "tokenizer.json", self.tok.to_str(pretty=False))
        atomic_write(out / "tokenizer_config.json", json.dumps(self.config, indent=2, ensure_ascii=False))
        return out


def _string_leaves(obj, skip: tuple[str, ...] = (), path: str = ""):
    """(dotted path, value) of every string inside a message's dicts and lists, but top-level `skip` keys."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if not path and k in skip:
            continue
        key = f"{path}.{k}" if path else str(k)
        if isinstance(v, str):
            yield key, v
        else:
            yield from _string_leaves(v, (), key)


@functools.lru_cache(maxsize=8)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the inverse is how a
    byte-level token's text maps back to its bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TokenizerError(f"chat template: {message}")

    # the settings transformers renders chat templates with, so both give the same string
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat_template does not compile: {e}") from None


def default_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }


def new_bpe_tokenizer() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE with our pre-splitting; the same pipeline that train_tokenizer fits."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None,
                    min_frequency: int = 2, progress: bool = False) -> Tokenizer:
    """Fit a byte-level BPE of `vocab_size` tokens (special ones included) on `texts` (streamed).

    The vocabulary may come out smaller when the texts run out of pairs seen `min_frequency` times.
    """
    if not MIN_VOCAB <= vocab_size <= 2**31 - 1:
        raise TokenizerError(f"vocab_size={vocab_size} must be at least {MIN_VOCAB} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Tokenizer(tok, default_config())
    if out.vocab_size <= MIN_VOCAB:
        raise TokenizerError(f"training learned no merges from the texts given: vocab_size={out.vocab_size}; "
                             "give it more (or more repetitive) text")
    if out_dir is not None:
        out.save(out_dir)
    return out


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a folder holding tokenizer.json [+ tokenizer_config.json], or a tokenizer.json file."""
    path = Path(path)
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer at {tok_file}: expected a folder with tokenizer.json "
                                "or the path of a tokenizer.json")
    try:
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{tok_file} is not a tokenizers JSON file: {e}") from None
    cfg_file = tok_file.with_name("tokenizer_config.json")
    config = {}
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_file} is not valid JSON: {e}") from None
    elif tok_file.name == "tokenizer.json" and tok.token_to_id(BOS) is not None:
        config = default_config()  # a bare tokenizer.json of ours: restore its template
    return Tokenizer(tok, config)
