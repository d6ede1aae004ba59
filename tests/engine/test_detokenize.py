"""Incremental detokenization with a real byte-level BPE trained here on CJK and emoji text."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.engine.detokenize import IncrementalDetokenizer, held_suffix_len

CORPUS = ["こんにちは世界、今日はいい天気ですね。", "東京は日本の首都です。", "你好，世界！今天天气很好。",
          "我喜欢学习中文和日本語。", "Emoji 🎉🚀👩‍👩‍👧 party 🇯🇵 flags", "hello world, the quick brown fox"]
TEXTS = ["こんにちは世界🎉さようなら", "你好，世界！今天天气很好。🚀🚀", "family 👩‍👩‍👧 in 東京 🇯🇵!",
         "plain ascii only", "語"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    # a small vocabulary, so that most CJK characters and emoji are split into byte tokens
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 10, trainer)
    return t


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def stream(tok, ids, prompt_ids=(), stop=()):
    detok = IncrementalDetokenizer(decoder(tok), prompt_ids, stop=stop)
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.finished:
            break
    deltas.append(detok.flush())
    return detok, deltas


def test_the_corpus_really_splits_characters(tok):
    ids = tok.encode(TEXTS[0]).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_hold_half_a_character(tok, text):
    ids = tok.encode(text).ids
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    # text comes out as soon as a character is whole: one delta per completed character run
    assert sum(1 for d in deltas if d) > 1 or len(text) == 1


def test_prompt_context_is_not_repeated(tok):
    prompt = tok.encode("東京は日本の").ids
    ids = tok.encode("首都です。🎉").ids
    _, deltas = stream(tok, ids, prompt_ids=prompt)
    assert "".join(deltas) == "首都です。🎉"


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("こんにちは世界🎉さようなら").ids
    for cut in range(1, len(ids)):
        head = tok.decode(ids[:cut])
        if head.endswith("\ufffd"):
            break
    else:
        pytest.fail("no token boundary inside a character")
    _, deltas = stream(tok, ids[cut:], prompt_ids=ids[:cut])
    full = tok.decode(ids)
    whole_head = head.rstrip("\ufffd")
    # the character the prompt started is emitted whole, once, in the output
    assert "".join(deltas) == full[len(whole_head):]
    assert not any("\ufffd" in d for d in deltas)


def tokens_spanned(tok, text, sub):
    """How many tokens of text's encoding overlap the first occurrence of sub."""
    enc = tok.encode(text)
    start = len(text[:text.index(sub)].encode())
    end = start + len(sub.encode())
    byte_offsets, pos = [], 0
    for i in enc.ids:
        n = len(tok.id_to_token(i))       # byte-level BPE: one symbol per byte
        byte_offsets.append((pos, pos + n))
        pos += n
    return sum(1 for a, b in byte_offsets if a < end and b > start)


@pytest.mark.parametrize("text, stop", [
    ("こんにちは世界🎉さようなら", "🎉さよう"),
    ("你好，世界！今天天气很好。🚀🚀", "天气很"),
    ("family 👩‍👩‍👧 in 東京 🇯🇵!", "‍👧 in"),
])
def test_stop_string_across_tokens_never_leaks(tok, text, stop):
    assert tokens_spanned(tok, text, stop) >= 2
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(decoder(tok), (), stop=["never-there", stop])
    shown = ""
    for t in ids:
        shown += detok.add(t)
        assert text.startswith(shown) and len(shown) <= text.index(stop)
        if detok.finished:
            break
    shown += detok.flush()
    assert shown == text[:text.index(stop)] == detok.text
    assert detok.stop_reason == stop
    assert detok.add(ids[-1]) == ""                 # finished: nothing more comes out


def test_text_that_only_starts_a_stop_string_is_released_at_the_end(tok):
    text = "今日はいい天気です"
    detok, deltas = stream(tok, tok.encode(text).ids, stop=["ですよ"])
    assert "".join(deltas) == text and detok.stop_reason is None
    assert deltas[-1] == "です"                     # held back until the sequence ended


def test_earliest_of_several_stop_strings_wins(tok):
    text = "hello world, the quick brown fox"
    detok, deltas = stream(tok, tok.encode(text).ids, stop=["quick", "world"])
    assert "".join(deltas) == "hello " and detok.stop_reason == "world"


def test_stop_at_the_very_start(tok):
    detok, deltas = stream(tok, tok.encode("你好，世界").ids, stop=["你好"])
    assert "".join(deltas) == "" and detok.stop_reason == "你好"


def test_held_suffix_len():
    assert held_suffix_len("abc wor", ["world"]) == 3
    assert held_suffix_len("abc w", ["world", "xw"]) == 1
    assert held_suffix_len("abc", ["world"]) == 0
    assert held_suffix_len("ab", ["abc", "bcd"]) == 2


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match=r"stop=\[''\] must be a list of non-empty strings"):
        IncrementalDetokenizer(decoder(tok), (), stop=[""])
