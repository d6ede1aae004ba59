"""Sampling: validation, each filter, penalties, min_tokens, seeded reproducibility, logprobs."""

import math

import pytest
import torch

from nanoseek.engine.sampling import (
    SamplingParams, SamplingParamsError, apply_min_p, apply_penalties, apply_temperature,
    apply_top_k, apply_top_p, make_generator, random_sample, sample)

V = 12


@pytest.mark.parametrize("kwargs, msg", [
    ({"temperature": -0.5}, r"temperature=-0.5 must be a finite number >= 0"),
    ({"temperature": float("nan")}, r"temperature=nan"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"n": 0}, r"n=0 must be an integer >= 1"),
    ({"top_k": 0}, r"top_k=0 must be -1 \(off\) or an integer >= 1"),
    ({"top_k": -2}, r"top_k=-2"),
    ({"min_p": 1.2}, r"min_p=1.2 must be in \[0, 1\]"),
    ({"presence_penalty": 3}, r"presence_penalty=3 must be in \[-2, 2\]"),
    ({"frequency_penalty": -2.5}, r"frequency_penalty=-2.5 must be in \[-2, 2\]"),
    ({"repetition_penalty": 0}, r"repetition_penalty=0 must be > 0"),
    ({"max_tokens": 0}, r"max_tokens=0 must be an integer >= 1 or None"),
    ({"min_tokens": 5, "max_tokens": 3}, r"min_tokens=5 must be <= max_tokens=3"),
    ({"stop": ["ok", ""]}, r"stop=\['ok', ''\] must be a list of non-empty strings"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids=\[-1\]"),
    ({"logprobs": 21}, r"logprobs=21 must be None or an integer in \[0, 20\]"),
    ({"seed": 1.5}, r"seed=1.5 must be an integer"),
    ({"n": True}, r"n=True"),
])
def test_impossible_values_are_named(kwargs, msg):
    with pytest.raises(SamplingParamsError, match=msg):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="\n", stop_token_ids=None, temperature=0)
    assert p.stop == ["\n"] and p.stop_token_ids == [] and p.is_greedy
    assert not SamplingParams().is_greedy and SamplingParams().max_tokens == 16


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, seed=s) for s in (1, 2, 3)]
    out = sample(logits, params, [[]] * 3, [[]] * 3, [make_generator(p.seed) for p in params])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None


def test_temperature_scales_only_sampled_rows():
    logits = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    out = apply_temperature(logits, torch.tensor([0.5, 0.0]))
    assert torch.equal(out, torch.tensor([[4.0, -8.0], [2.0, -4.0]]))


def test_top_k_keeps_k_per_row():
    logits = torch.tensor([[5.0, 1.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    out = apply_top_k(logits, torch.tensor([2, -1, 1]))
    assert torch.isfinite(out).tolist() == [[True, False, False, True], [True] * 4,
                                            [False, False, False, True]]
    assert torch.equal(out[1], logits[1])


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.125, 0.25, 0.125], [0.5, 0.125, 0.25, 0.125],
                          [0.9, 0.05, 0.03, 0.02]])
    out = apply_top_p(probs.log(), torch.tensor([0.75, 1.0, 0.5]))
    assert torch.isfinite(out).tolist() == [[True, False, True, False], [True] * 4,
                                            [True, False, False, False]]


def reference_top_p(row, top_p):
    """The nucleus by a plain sort: the smallest most-likely set whose mass reaches top_p."""
    probs = row.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        keep.add(i)
        mass += probs[i]
    return keep


@pytest.mark.parametrize("spread", [8.0, 0.5])   # a peaked row (few candidates) and a flat one
def test_top_p_candidate_shortcut_agrees_with_a_full_sort(spread):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 3000, generator=g, dtype=torch.float64) * spread
    top_p = torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64)
    out = apply_top_p(logits, top_p)
    for r in range(3):
        kept = set(torch.isfinite(out[r]).nonzero().flatten().tolist())
        want = reference_top_p(logits[r], float(top_p[r])) if top_p[r] < 1 else set(range(3000))
        assert kept == want
    if spread == 0.5:
        assert len(set(torch.isfinite(out[0]).nonzero().flatten().tolist())) > 256


def test_min_p_is_relative_to_the_top_token():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.6, 0.25, 0.1, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.2, 0.0]))   # threshold 0.12 on row 0
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True] * 4]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 1.0]])
    prompt, output = [[0, 1]], [[2, 2, 3]]
    rep = apply_penalties(logits, prompt, [[]], [0], [0], [2])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 1.0, 1.0]]          # positive halved, negative doubled
    rep_out = apply_penalties(logits, [[]], output, [0], [0], [2])
    assert rep_out.tolist() == [[2.0, -2.0, 0.5, 0.5, 1.0]]      # output tokens count as seen too
    freq = apply_penalties(logits, prompt, output, [0], [0.5], [1])
    assert freq.tolist() == [[2.0, -2.0, 0.0, 0.5, 1.0]]         # output tokens only, by count
    pres = apply_penalties(logits, prompt, output, [0.5], [0], [1])
    assert pres.tolist() == [[2.0, -2.0, 0.5, 0.5, 1.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 1.0, 1.0]]       # pure: the input is untouched


def test_penalties_change_greedy_choice_in_the_batch_sampler():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0], [3.0, 2.5, 0.0, 0.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0)]
    out = sample(logits, params, [[], []], [[0], [0]])
    assert out.token_ids.tolist() == [1, 0]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 5.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=2)]
    out = sample(logits, params, [[]] * 3, [[3], [3], [3, 3]], eos_token_ids=[0])
    # row 0: EOS (0) and stop id 1 banned; row 1: ignore_eos keeps EOS; row 2: min_tokens reached
    assert out.token_ids.tolist() == [2, 0, 0]


def test_random_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).log_softmax(-1)
    p = SamplingParams(temperature=1.0, top_k=3, seed=123)
    g = make_generator(123)
    draws = torch.stack([sample(logits, [p], [[]], [[]], [g]).token_ids for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    want = torch.zeros(5)
    want[:3] = logits[0, :3].softmax(-1)
    assert freq[3:].sum() == 0                      # filtered tokens never drawn
    assert torch.allclose(freq, want, atol=0.03), (freq, want)


def test_seeded_row_is_independent_of_batch_composition():
    torch.manual_seed(0)
    steps = [torch.randn(6, V) for _ in range(12)]
    target = SamplingParams(temperature=0.9, top_p=0.9, seed=42)

    def run(row, others, target=target):
        params = others[:row] + [target] + others[row:]
        gens = [make_generator(p.seed) for p in params]
        got = []
        for logits in steps:
            lg = logits[:len(params)].clone()
            lg[row] = logits[5]                     # the target sees the same logits every run
            got.append(int(sample(lg, params, [[]] * len(params), [[]] * len(params),
                                  gens).token_ids[row]))
        return got

    alone = run(0, [])
    mixed = run(2, [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.3),
                    SamplingParams(temperature=0), SamplingParams(top_k=3, seed=42)])
    assert alone == mixed
    assert len(set(alone)) > 1                      # really sampled, not a constant
    assert run(0, [], SamplingParams(temperature=0.9, top_p=0.9, seed=43)) != alone


def test_random_sample_uses_only_each_rows_generator():
    probs = torch.full((2, V), 1.0 / V)
    g1, g2 = make_generator(5), make_generator(5)
    a = random_sample(probs, [g1, None])
    b = random_sample(probs[:1], [g2])
    assert a[0] == b[0]
    assert g1.get_state().equal(g2.get_state())


def test_zero_probability_tokens_are_never_drawn():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])   # unnormalised ok
    g = make_generator(0)
    draws = torch.cat([random_sample(probs, [g, None]) for _ in range(500)]).view(-1, 2)
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {4}


def test_logprobs_are_the_models_raw_log_softmax():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.8, logprobs=3, seed=1),
              SamplingParams(temperature=0, logprobs=0)]
    out = sample(logits, params, [[1, 2], [3]], [[4], []], [make_generator(1), None])
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (2, 3)          # the largest count asked in the batch
    top = raw.topk(3, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    assert torch.allclose(out.top_logprobs, top.values)
    assert math.isclose(float(out.top_logprobs[1, 0]), float(raw[1].max()), rel_tol=1e-6)


def test_batch_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="params has 1 rows, logits have 2"):
        sample(torch.zeros(2, V), [SamplingParams()], [[], []], [[], []])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_greedy_is_the_argmax_of_the_raw_logits(dtype):
    """The runner gives plain greedy rows the argmax of their logits without sample(): for those
    params sample() must choose exactly that, ties and NaN rows included."""
    from nanoseek.engine.structured import StructuredOutputs

    logits = torch.randn(4, V).to(dtype)
    logits[1, [3, 7]] = logits[1].max() + 1  # a tie: the first
    logits[2, 5] = float("nan")  # a NaN: the first NaN, as torch.argmax
    logits[3] = -math.inf
    plain = SamplingParams(temperature=0)
    assert plain.is_plain_greedy
    out = sample(logits, [plain] * 4, [[1]] * 4, [[]] * 4)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist() == [out.token_ids[0].item(), 3, 5, 0]
    for kw in (dict(temperature=0.5), dict(logprobs=0), dict(presence_penalty=0.5), dict(repetition_penalty=1.2),
               dict(structured_outputs=StructuredOutputs(regex="a+"))):
        assert not SamplingParams(**kw).is_plain_greedy, kw
