"""The engine with every fast path on (measured kernels and weight layouts, the indexed MoE dispatch,
the fused ops, the CPU decode backend) gives the reference engine's greedy tokens and logprobs."""

import pytest
import torch

from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import fast, linear as lin, moe as moe_mod
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2, tiny_v3


def generate(model, **kw):
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 9, 3)]
    engine = LLMEngine(model, block_size=4, num_blocks=40, max_num_seqs=4, **kw)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished_requests():
        engine.step()
    return [(r.outputs[0].token_ids, r.outputs[0].logprobs) for r in reqs]


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v3])
def test_fast_engine_equals_reference_engine(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))  # the injected timings stay here
    model = build_model(make_cfg(eos_token_id=None), seed=11).eval()
    lin.clear_choices()
    moe_mod.clear_dispatch_choices()
    with fast.reference():
        want = generate(model, tune_kernels=False, attention_backend="reference")
    # the fast choices forced by injected timings: column-major weights, small_rows, indexed experts
    monkeypatch.setattr(lin, "time_kernel", lambda fn, x2, w: (0.5 if lin.layout_of(w) == "col" else 1.0)
                        * (0.5 if fn is lin.KERNELS["dense"]["small_rows"] and x2.shape[0] == 2 else 1.0))
    monkeypatch.setattr(moe_mod, "_dispatch_timer", lambda impl, *a: 0.1 if impl == "indexed" else 1.0)
    try:
        got = generate(model, attention_backend="cpu", decode_kernel="model")  # the model's fast paths
        assert lin.layout_of(model.lm_head.weight) == "col"
        assert lin.layout_of(model.model.layers[1].mlp.experts.gate_up_proj[0]) == "col"
        assert "indexed" in moe_mod._DISPATCH_CHOICE.values()
    finally:
        lin.clear_choices()
        moe_mod.clear_dispatch_choices()
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        assert tokens == ref_tokens
        for a, b in zip(lps, ref_lps):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) < 1e-5
