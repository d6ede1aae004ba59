"""No request can stop the engine: poison values are refused before anything reads them, a step that
raises fails its own requests and the engine goes on, and prefix caches are isolated by salt."""

import asyncio

import pytest
import torch

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.engine.async_engine import AsyncEngine
from nanoseek.engine.llm import LLMEngine, RequestFailed
from nanoseek.engine.sampling import SamplingParams, SamplingParamsError
from nanoseek.engine.scheduler import RequestRejected
from nanoseek.model.transformer import build_model
from tests.conftest import CORPUS, tiny_v2

GREEDY = SamplingParams(temperature=0, max_tokens=4)
POISON = 77  # the token id the failing model cannot run


class FailsOnToken(torch.nn.Module):
    """A model that raises whenever a prompt chunk holds POISON: a stand-in for a kernel or memory error
    that hits one batch (wraps the real model; nothing patched)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, input_ids, **kw):
        if input_ids.shape[-1] > 1 and (input_ids == POISON).any():  # prompts only: sampling may pick it
            raise RuntimeError("simulated kernel failure at 0xdeadbeef")  # an internal the server must not show
        return self.inner(input_ids, **kw)

    def compute_logits(self, hidden, indices=None):
        return self.inner.compute_logits(hidden, indices)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def make_engine(tokenizer=None, wrap=None, **kw):
    vocab = tokenizer.vocab_size if tokenizer is not None else 96
    model = build_model(tiny_v2(vocab_size=vocab, eos_token_id=None), seed=3).eval()
    if wrap is not None:
        model = wrap(model)
    kw.setdefault("num_blocks", 64)
    return LLMEngine(model, tokenizer, block_size=4, **kw)


def drain(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


# ---------------------------------------------------------------------------- values at the edge
def test_out_of_range_values_are_refused_naming_the_field_before_anything_reads_them(tokenizer):
    engine = make_engine(tokenizer)
    vocab = tokenizer.vocab_size
    cases = [({"prompt_token_ids": [5, 2 ** 63]}, GREEDY, "prompt", "outside the vocabulary"),
             ({"prompt_token_ids": [5, vocab]}, GREEDY, "prompt", "outside the vocabulary"),
             ({"prompt_token_ids": [5, 6]}, SamplingParams(temperature=1, top_k=2 ** 63, max_tokens=2),
              "top_k", "larger than the vocabulary"),
             ({"prompt_token_ids": [5, 6]}, SamplingParams(stop_token_ids=[vocab + 3], max_tokens=2),
              "stop_token_ids", "outside the vocabulary")]
    for prompt, params, param, msg in cases:
        with pytest.raises(RequestRejected, match=msg) as e:
            engine.add_request("bad", prompt, params)
        assert e.value.param == param
        with pytest.raises(RequestRejected, match=msg):
            engine.check_request(prompt["prompt_token_ids"], params)
    assert not engine.has_unfinished_requests()
    with pytest.raises(SamplingParamsError, match="seed=18446744073709551616"):
        SamplingParams(seed=2 ** 64)
    # the largest seed works, and its n > 1 siblings wrap around instead of overflowing
    engine.add_request("ok", {"prompt_token_ids": [5, 6]},
                       SamplingParams(n=2, seed=2 ** 64 - 1, max_tokens=2))
    assert all(o.finish_reason == "length" for r in drain(engine) for o in r.outputs if r.finished)


# ---------------------------------------------------------------------------- a failing step
def test_a_step_that_raises_fails_its_requests_and_the_engine_recovers():
    engine = make_engine(wrap=FailsOnToken, max_num_batched_tokens=64)
    engine.add_request("good", {"prompt_token_ids": [3, 4, 5, 6, 7, 8, 9, 10, 11]}, GREEDY)
    engine.add_request("bad", {"prompt_token_ids": [20, 21, 22, 23, POISON, 8, 9, 10, 11]}, GREEDY)
    outs = engine.step()  # both prefills run in this step; the poisoned one raises
    assert sorted(r.request_id for r in outs) == ["bad", "good"]
    assert all(r.finished and "simulated kernel failure" in r.error for r in outs)
    assert not engine.has_unfinished_requests()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm._pending
    # nothing of the failed step is findable as a prefix, and the next request runs normally
    after = engine.add_request("after", {"prompt_token_ids": [3, 4, 5, 6, 7, 8, 9, 10, 11]}, GREEDY)
    drain(engine)
    assert after.error is None and after.num_cached_tokens == 0 and len(after.outputs[0].token_ids) == 4


def test_async_engine_survives_poison_requests_and_failing_steps(tokenizer):
    async def main():
        engine = AsyncEngine(make_engine(tokenizer, wrap=FailsOnToken)).start()
        try:
            async def collect(rid, prompt, params=GREEDY):
                toks = []
                async for u in engine.generate(rid, prompt, params):
                    toks += [t for d in u.deltas for t in d.token_ids]
                return toks

            with pytest.raises(RequestRejected):
                await collect("ids", {"prompt_token_ids": [5, 2 ** 63]})
            with pytest.raises(RequestRejected, match="top_k"):
                await collect("topk", {"prompt_token_ids": [5, 6]},
                              SamplingParams(temperature=1, top_k=2 ** 63, max_tokens=2))
            with pytest.raises(RequestFailed, match="simulated kernel failure"):
                await collect("step", {"prompt_token_ids": [5, POISON, 6]})
            assert engine.alive and engine.error is None and engine.num_failed_steps == 1
            assert len(await collect("fine", {"prompt_token_ids": [5, 6, 7]})) == 4
            assert engine.last_step_age_s is not None
        finally:
            engine.shutdown()
        assert not engine.alive

    asyncio.run(main())


# ---------------------------------------------------------------------------- tenants
def test_cache_salt_isolates_prefix_hits_in_memory_and_on_disk(tmp_path):
    prompt = list(range(2, 30))
    engine = make_engine(cache_dir=tmp_path / "kv")

    def cached(eng, rid, salt):
        p = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        r = eng.add_request(rid, p, GREEDY)
        drain(eng)
        return r.num_cached_tokens

    assert cached(engine, "a1", "tenant-a") == 0
    assert cached(engine, "b1", "tenant-b") == 0     # B cannot see A's prefix
    assert cached(engine, "n1", None) == 0           # nor can unsalted requests
    assert cached(engine, "a2", "tenant-a") == 24    # A still hits its own
    restarted = make_engine(cache_dir=tmp_path / "kv")  # only the disk cache remains
    assert cached(restarted, "c1", "tenant-c") == 0
    assert cached(restarted, "a3", "tenant-a") == 24
