"""Decode threads chosen by measurement: the faster count is kept, the others re-tried, the choice
follows a change of load; the engine's results do not depend on it and its thread count is restored."""

import pytest
import torch

from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.threads import DecodeThreads
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2


def run(chooser: DecodeThreads, cost: dict[int, float], steps: int, key=8) -> list[int]:
    picks = []
    for _ in range(steps):
        n = chooser.pick(key)
        chooser.record(key, n, cost[n])
        picks.append(n)
    return picks


def test_the_faster_count_is_kept_and_the_other_retried():
    chooser = DecodeThreads([2, 1], window=8, min_samples=3, probe_every=32)
    picks = run(chooser, {2: 0.050, 1: 0.020}, 96)
    assert picks[:6].count(2) == 3 and picks[:6].count(1) == 3  # both measured first
    later = picks[6:]
    assert later.count(1) > 0.85 * len(later)  # the faster one, nearly always
    assert 2 in later  # but the slower one is re-tried now and then
    assert chooser.best(8) == 1
    assert chooser.summary()[8] == {2: 50.0, 1: 20.0}


def test_a_far_slower_count_costs_one_step_per_probe():
    chooser = DecodeThreads([2, 1], window=8, min_samples=3, probe_every=32)
    picks = run(chooser, {2: 0.007, 1: 0.011}, 96)
    assert picks[:4] == [2, 2, 2, 1]  # one step of 1 thread was enough to see it is far slower
    assert [i + 1 for i, n in enumerate(picks) if n == 1][1:] == [32, 64, 96]  # then one step per probe, not 3
    close = DecodeThreads([2, 1], window=8, min_samples=3, probe_every=32)
    assert run(close, {2: 0.010, 1: 0.012}, 6) == [2, 2, 2, 1, 1, 1]  # within 1.3x: measured in full


def test_the_choice_follows_a_change_of_load():
    chooser = DecodeThreads([2, 1], window=8, min_samples=3, probe_every=16)
    run(chooser, {2: 0.050, 1: 0.020}, 40)
    assert chooser.best(8) == 1
    run(chooser, {2: 0.010, 1: 0.020}, 64)  # the other core became free: two threads win again
    assert chooser.best(8) == 2
    assert chooser.best(1) == 2  # an unmeasured batch size starts from the first candidate


def test_bad_candidates_are_refused():
    with pytest.raises(ValueError, match="thread candidates"):
        DecodeThreads([0])
    with pytest.raises(ValueError, match="decode_threads"):
        LLMEngine(build_model(tiny_v2(), seed=0), num_blocks=8, block_size=4, decode_threads="fast",
                  tune_kernels=False)


def test_engine_results_do_not_depend_on_decode_threads():
    model = build_model(tiny_v2(eos_token_id=None), seed=2).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    before = torch.get_num_threads()
    outs = {}
    for mode in (None, 1, "auto"):
        engine = LLMEngine(model, block_size=4, num_blocks=16, decode_threads=mode, tune_kernels=False)
        reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
        while engine.has_unfinished_requests():
            engine.step()
            assert torch.get_num_threads() == before  # restored after every step
        outs[mode] = [(r.outputs[0].token_ids, r.outputs[0].logprobs) for r in reqs]
        if mode == 1:
            assert engine.decode_threads.summary() and all(set(v) == {1} for v in engine.decode_threads.summary().values())
    for mode in (1, "auto"):
        for (toks, lps), (ref_toks, ref_lps) in zip(outs[mode], outs[None]):
            assert toks == ref_toks
            for a, b in zip(lps, ref_lps):
                assert max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_a_probe_that_finds_a_faster_count_switches_at_once():
    chooser = DecodeThreads([2, 1], window=4, min_samples=3, probe_every=32)
    run(chooser, {2: 0.050, 1: 0.020}, 31)  # a busy host: 1 thread wins; the next probe is at step 32
    assert chooser.best(8) == 1
    picks = run(chooser, {2: 0.010, 1: 0.020}, 6)  # the other core is free again
    assert picks == [2] * 6  # the probe's 3 steps, then 2 threads at once (not at the next window)
