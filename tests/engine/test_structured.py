"""Grammar-constrained decoding: the bitmask against a per-token reference, compile errors and the
cache, and a random tiny model whose every output follows its grammar (n > 1, stop strings,
preemption, prefix-cache hits)."""

import json

import jsonschema
import pytest
import torch

from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams, sample
from nanoseek.engine.structured import (Grammars, StructuredOutputError, StructuredOutputs,
                                        apply_token_bitmask, unpack_bitmask)
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2

CORPUS = ['{"name": "ada", "age": 36, "tags": ["x", "y"]}\n', "def add(a, b):\n    return a + b\n",
          "The quick brown fox jumps over the lazy dog.\n", '[1, 2, 3] {"ok": true, "v": null}\n'] * 30
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
        "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                 "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    from nanoseek.data.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


def make_engine(tok, **kw):
    model = build_model(tiny_v2(vocab_size=tok.vocab_size + 5, eos_token_id=None), seed=11).eval()
    return LLMEngine(model, tok, **{"block_size": 4, "num_blocks": 128, **kw})


def run(engine, prompts, params):
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished_requests():
        engine.step()
    return reqs


# ---------------------------------------------------------------------------- the bitmask
def test_unpack_bitmask_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(-2**31, 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    V = 117  # not a multiple of 32: the tail bits of the last word are ignored
    allowed = unpack_bitmask(mask, V)
    for b in range(3):
        for t in range(V):
            word = int(mask[b, t // 32]) & 0xFFFFFFFF
            assert bool(allowed[b, t]) == bool((word >> (t % 32)) & 1)
    logits = torch.randn(3, V, generator=g)
    out = apply_token_bitmask(logits, mask)
    assert torch.equal(out[allowed], logits[allowed]) and torch.isneginf(out[~allowed]).all()


def test_sample_never_draws_a_masked_token_and_the_grammar_outranks_min_tokens():
    V = 40
    mask = torch.zeros(2, 2, dtype=torch.int32)
    mask[0, 0] = 1 << 7          # row 0: only token 7
    mask[1, 1] = 1 << (33 - 32)  # row 1: only token 33, which min_tokens would ban as EOS
    params = [SamplingParams(temperature=1.0, max_tokens=4), SamplingParams(temperature=0, min_tokens=3)]
    for _ in range(5):
        out = sample(torch.randn(2, V), params, [[1], [1]], [[], []], eos_token_ids=[33],
                     allowed=unpack_bitmask(mask, V))
        assert out.token_ids.tolist() == [7, 33]


# ---------------------------------------------------------------------------- specs and compiling
def test_a_spec_names_exactly_one_kind_of_grammar():
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutputs(json={"type": "object"}, regex="a+")
    with pytest.raises(StructuredOutputError, match="choice"):
        StructuredOutputs(choice=[])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


@pytest.mark.parametrize("spec, param, words", [
    (StructuredOutputs(json={"type": "bogus"}), "json", "bogus"),
    (StructuredOutputs(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "json", "not"),
    (StructuredOutputs(json={"type": "integer", "minimum": "x"}), "json", "minimum"),
    (StructuredOutputs(regex="[a-z]+("), "regex", "unclosed group"),
    (StructuredOutputs(lark='start: <|no_such_token|> "x"'), "lark", "no_such_token"),
])
def test_bad_grammars_are_refused_naming_the_problem(tok, spec, param, words):
    grammars = Grammars(tok, tok.vocab_size)
    with pytest.raises(StructuredOutputError, match=words) as e:
        grammars.check(spec)
    assert e.value.param == param
    engine = make_engine(tok)
    with pytest.raises(StructuredOutputError):
        engine.add_request("bad", {"prompt_token_ids": [3, 4]}, SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests() and engine.scheduler.num_waiting == 0


def test_a_spec_compiles_once(tok):
    grammars = Grammars(tok, tok.vocab_size)
    a, b = grammars.start(StructuredOutputs(json=SCHEMA)), grammars.start(StructuredOutputs(json=dict(SCHEMA)))
    assert grammars.num_compiled == 1
    masks = torch.full((2, grammars.bitmask_width), -1, dtype=torch.int32)
    a.fill(masks[0])
    start = int(unpack_bitmask(masks[:1], tok.vocab_size)[0].nonzero()[0])
    assert a.advance(start)
    a.fill(masks[0])
    b.fill(masks[1])  # the states are separate: b still starts from nothing
    allowed = unpack_bitmask(masks, tok.vocab_size)
    assert allowed[1, start] and not allowed[0, start]


# ---------------------------------------------------------------------------- a random model obeys
def test_random_model_outputs_follow_the_schema_with_n_and_seeds(tok):
    engine = make_engine(tok)
    spec = StructuredOutputs(json=SCHEMA)
    prompts = [tok.encode("give me json:"), tok.encode("The quick")]
    reqs = run(engine, prompts, SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=80,
                                               structured_outputs=spec))
    for r in reqs:
        for o in r.outputs:
            assert o.finish_reason == "stop", o
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert engine.grammars.num_compiled == 1


@pytest.mark.parametrize("spec, check", [
    (StructuredOutputs(choice=["yes", "no", "maybe so"]), lambda s: s in ("yes", "no", "maybe so")),
    (StructuredOutputs(regex=r"[0-9]{3}-[a-c]{2}"), lambda s: len(s) == 6 and s[:3].isdigit() and s[3] == "-"),
])
def test_choice_and_regex(tok, spec, check):
    engine = make_engine(tok)
    # greedy: the grammar alone decides where a random model's output ends
    for r in run(engine, [tok.encode("a")], SamplingParams(n=1, temperature=0, max_tokens=200,
                                                            structured_outputs=spec)):
        o = r.outputs[0]
        assert o.finish_reason == "stop" and check(o.text), o


def test_json_object_starts_an_object(tok):
    state = Grammars(tok, tok.vocab_size).start(StructuredOutputs(json_object=True))
    mask = torch.full((1, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)
    state.fill(mask[0])
    firsts = [tok.decode([t]) for t in unpack_bitmask(mask, tok.vocab_size)[0].nonzero().flatten().tolist()]
    assert firsts and all(t.startswith("{") for t in firsts), firsts


def test_preemption_and_prefix_hits_keep_the_grammar(tok):
    spec = StructuredOutputs(json=SCHEMA)
    params = SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=90, structured_outputs=spec)
    prompt = tok.encode("The quick brown fox jumps")
    roomy = run(make_engine(tok), [prompt], params)[0]
    # 30 blocks of 4 for 3 sequences that each grow to ~80 tokens: some must be preempted
    tight = make_engine(tok, num_blocks=30, max_num_seqs=3)
    reqs = [tight.add_request("r0", {"prompt_token_ids": prompt}, params),
            tight.add_request("r1", {"prompt_token_ids": prompt}, SamplingParams(
                temperature=1.0, seed=3, max_tokens=90, structured_outputs=spec))]
    seqs = [c.seq for _, c in tight._children.values()]
    while tight.has_unfinished_requests():
        tight.step()
    assert sum(s.num_preemptions for s in seqs) > 0, "the tight cache must preempt"
    for r in reqs:
        for o in r.outputs:
            assert o.finish_reason == "stop"
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert reqs[1].num_cached_tokens > 0  # the second shares the first's prompt blocks
    assert [o.text for o in reqs[0].outputs] == [o.text for o in roomy.outputs]


def test_stop_strings_still_cut_constrained_output(tok):
    engine = make_engine(tok)
    spec = StructuredOutputs(choice=["abc-def-ghi"])
    r = run(engine, [tok.encode("x")], SamplingParams(temperature=0, max_tokens=50, stop=["-g"],
                                                      structured_outputs=spec))[0]
    assert r.outputs[0].text == "abc-def" and r.outputs[0].finish_reason == "stop"
