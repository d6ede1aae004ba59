"""The fused CPU decode step (one C++ op per token) equals the model's own decode step: greedy tokens and
logprobs, through prefix hits, chunked prefill, preemption, parallel sampling and a disk-cache
restart; its weights are packed without a second copy; it is chosen by measurement only."""

import re

import pytest
import torch

from nanoseek.engine import fused_decode as fd
from nanoseek.engine.backends.reference import ReferenceBackend
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams, sample
from nanoseek.model import cpu_kernels, linear as lin
from nanoseek.model.backend import DenseCache
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_llama, tiny_v2

WHY = cpu_kernels.unsupported()
# where the host can build the kernels, the build must succeed: only a host without AVX2/FMA or a compiler skips
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"nanoseek's CPU kernels do not apply here: {WHY}")

VARIANTS = {  # what the fused step covers: plain V2; q_lora + YaRN; normalised top-K; scaled weights
    "v2": dict(),
    "q_lora_yarn": dict(q_lora_rank=24, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                          beta_fast=32, beta_slow=1, mscale=0.707,
                                                          mscale_all_dim=0.707)),
    "norm_topk": dict(norm_topk_prob=True, num_experts_per_tok=3, first_k_dense_replace=0),
    "scaled": dict(routed_scaling_factor=2.5, n_shared_experts=None),
    # V3's rule (deepseek_v3 with softmax + greedy): normalised weights are still scaled
    "v3_rule": dict(model_type="deepseek_v3", norm_topk_prob=True, routed_scaling_factor=2.5),
    "v2_grouped": "v2_grouped",  # full V2: group-limited greedy over 4 groups, q_lora, YaRN
    "v3": "v3",  # sigmoid scores, noaux_tc over groups with a score-correction bias, q_lora, YaRN
}


def model_of(**kw):
    if kw.get("variant"):  # a whole tiny config of another family (conftest.TINY)
        from tests.conftest import TINY

        model = build_model(TINY[kw.pop("variant")](eos_token_id=None, **kw), seed=3).eval()
        set_router_bias(model, lambda b: b.copy_(torch.randn_like(b) * 0.3))  # V3's bias moves the choice
        return model
    return build_model(tiny_v2(eos_token_id=None, **kw), seed=3).eval()


def set_router_bias(model, fill) -> None:
    """fill(bias) on every router's e_score_correction_bias (V3's; other routers have none)."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                fill(m.e_score_correction_bias)


def variant_model(variant):
    v = VARIANTS[variant]
    return model_of(variant=v) if isinstance(v, str) else model_of(**v)


def generate(model, prompts, decode_kernel, n=1, seed=None, params=None, **kw):
    kw = {**dict(block_size=4, num_blocks=64, max_num_seqs=4, attention_backend="cpu"), **kw}
    engine = LLMEngine(model, decode_kernel=decode_kernel, **kw)
    assert isinstance(engine.decode_step, fd.FusedDecode) == (decode_kernel == "fused")
    calls = []
    if engine.decode_step is not None:  # count the op's calls: the comparison must not be the model twice
        op = engine.decode_step.op
        engine.decode_step.op = lambda *a: calls.append(1) or op(*a)
    params = params or SamplingParams(temperature=0 if seed is None else 1.0, max_tokens=8, logprobs=2,
                                      ignore_eos=True, n=n, seed=seed)
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    seqs = [c.seq for _, c in engine._children.values()]
    while engine.has_unfinished_requests():
        engine.step()
    assert [r.error for r in reqs] == [None] * len(reqs)
    generate.preemptions = sum(s.num_preemptions for s in seqs)
    generate.disk_hits = engine.disk.hits if engine.disk is not None else 0
    assert bool(calls) == (decode_kernel == "fused")
    return [(o.token_ids, o.logprobs) for r in reqs for o in r.outputs]


def assert_same(got, want, tol=1e-4):
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        for a, b in zip(lps, ref_lps, strict=True):
            assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < tol


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_equals_model_step(variant):
    model = variant_model(variant)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 96, (9,), generator=g).tolist()
    # B = 4: two prompts share a 9-token prefix (prefix hits), the others are distinct lengths
    prompts = [shared + [5, 6], shared + [7], torch.randint(2, 96, (13,), generator=g).tolist(), [3, 4]]
    want = generate(model, prompts, "model")
    assert_same(generate(model, prompts, "fused"), want)


def test_fused_through_chunked_prefill_preemption_and_parallel_sampling():
    model = model_of()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (30, 17, 6)]
    # 16 blocks of 4 cannot hold all three growing sequences: some are preempted and recomputed;
    # chunks of 8 tokens split the prompts
    tight = dict(num_blocks=16, max_num_batched_tokens=8)
    want = generate(model, prompts, "model", **tight)
    assert_same(generate(model, prompts, "fused", **tight), want)
    assert generate.preemptions > 0, "the tight cache must preempt"
    # n = 3 samples per prompt fork its blocks; seeded sampling must draw the same tokens
    assert_same(generate(model, prompts[1:], "fused", n=3, seed=7), generate(model, prompts[1:], "model", n=3, seed=7))


def test_plain_greedy_rows_take_the_ops_argmax(monkeypatch):
    """Greedy rows with nothing to apply take the op's argmax, without sample(); rows still inside
    min_tokens go through sample(), which masks their stop ids. Both give the model step's tokens."""
    import nanoseek.engine.runner as runner_mod

    model = model_of()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (9, 5, 12)]
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = generate(model, prompts, "model", params=plain)
    sampled = []
    monkeypatch.setattr(runner_mod, "sample", lambda *a, **k: sampled.append(1) or sample(*a, **k))
    assert generate(model, prompts, "fused", params=plain) == want and not sampled
    # stop ids the greedy rows would emit early: masked until min_tokens, then they may end a row
    stops = sorted({t for toks, _ in want for t in toks[:3]})
    bounded = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, min_tokens=4, stop_token_ids=stops)
    got = generate(model, prompts, "fused", params=bounded)
    assert sampled and got == generate(model, prompts, "model", params=bounded)
    assert all(len(toks) >= 4 and not set(toks[:4]) & set(stops) for toks, _ in got)
    # the op's argmax is what the rows take: a wrong one shows in every decoded token
    real = fd.FusedDecode.op
    monkeypatch.setattr(fd.FusedDecode, "op", lambda self, *a, **k: (real(self, *a, **k)[0], [0] * len(a[0])))
    wrong = generate(model, prompts, "fused", params=plain)
    assert all(toks[1:] == [0] * 7 for toks, _ in wrong)  # the first token comes from the prefill


def test_fused_after_a_disk_cache_restart(tmp_path):
    model = model_of()
    prompt = [list(range(2, 40))]
    want = generate(model, prompt, "model")
    generate(model, prompt, "fused", cache_dir=tmp_path / "kv")  # fills the disk cache
    assert_same(generate(model, prompt, "fused", cache_dir=tmp_path / "kv"), want)
    assert generate.disk_hits > 0  # the second engine read the prompt's blocks from disk


SHAPES = {  # q_lora; 6 heads (a short last group of 4) with widths that are not multiples of 8; no experts;
    # V3's routing (sigmoid, noaux_tc with a bias) and V2's group-limited one over 16 experts in 4 groups
    "q_lora": dict(q_lora_rank=24),
    "v3_routing": dict(model_type="deepseek_v3", q_lora_rank=24, topk_method="noaux_tc", scoring_func="sigmoid",
                       n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_routed_experts=16,
                       num_experts_per_tok=3),
    "v2_grouped": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                       n_routed_experts=16, num_experts_per_tok=3),
    "odd": dict(num_attention_heads=6, kv_lora_rank=36, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=12,
                moe_intermediate_size=20, hidden_size=72),
    "dense": dict(n_routed_experts=None, first_k_dense_replace=0, num_experts_per_tok=None),
}


@pytest.mark.parametrize("row_kernel, B", [("stream", 3), ("stream", 6), ("blocks", 3)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_op_logits_and_latents_equal_the_model_forward(shape, threads, row_kernel, B):
    """One step of the op against CausalLM.forward over a DenseCache: logits to 1e-5 and the same
    latent written for the new token (checked in the pool), at 1 and 3 threads (more than some
    phases have tasks), with either row kernel: 3 rows (experts get 1-3 of them), or 6 (a block of
    4 and 2 more)."""
    cfg = tiny_v2(**SHAPES[shape])
    model = build_model(cfg, seed=5).eval()
    set_router_bias(model, lambda b: b.copy_(torch.randn_like(b) * 0.3))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    T, bs = 7, 4
    ids = torch.randint(2, 96, (B, T + 1), generator=torch.Generator().manual_seed(2))
    dense = DenseCache(cfg, batch_size=B, max_len=16)
    with torch.inference_mode():
        model(ids[:, :T], attn_metadata=dense.step(T))
        want = model.compute_logits(model(ids[:, T:], attn_metadata=dense.step(1, absorb=True))[:, 0])  # [B, V]
    cache = PagedKVCache(cfg, num_blocks=B * 2 + 1, block_size=bs)
    step = fd.FusedDecode(model, cache, row_kernel=row_kernel)
    tables = [[2 * b + 1, 2 * b + 2] for b in range(B)]  # two blocks per row, not in row order
    for layer, pool in enumerate(cache.pools):  # the prompt's latents, copied from the dense cache
        for b in range(B):
            pool.view(-1, pool.shape[-1])[[tables[b][p // bs] * bs + p % bs for p in range(T)]] = \
                dense.buffers[layer][b, :T]
    try:
        got, top = step(ids[:, T].tolist(), [(tables[b], T) for b in range(B)], list(range(B)))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert top == got.argmax(dim=-1).tolist()  # the op's argmax is torch's
    for layer, pool in enumerate(cache.pools):
        for b in range(B):
            slot = tables[b][T // bs] * bs + T % bs
            torch.testing.assert_close(pool.view(-1, pool.shape[-1])[slot], dense.buffers[layer][b, T],
                                       atol=1e-5, rtol=1e-5)
    if shape == "v3_routing":  # the bias moves the choice: without it the step must differ
        set_router_bias(model, torch.Tensor.zero_)
        unbiased, _ = step(ids[:, T].tolist(), [(tables[b], T) for b in range(B)], list(range(B)))
        assert not torch.allclose(unbiased, got, atol=1e-3)


def test_packing_keeps_one_copy_and_the_model_unchanged():
    model = model_of()
    x = torch.randint(2, 96, (2, 5))
    with torch.inference_mode():
        before = model.compute_logits(model(x))
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    step = fd.FusedDecode(model, cache)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1 and step.copied_bytes == 0  # every weight now lives in the one buffer
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(model(x)), before, atol=0, rtol=0)
    again = fd.FusedDecode(model, cache)  # a second engine on the same model does not copy again
    assert {w.data_ptr() for w in again.weights if w.numel()} == {w.data_ptr() for w in step.weights if w.numel()}


def test_column_major_weights_are_copied_then_released():
    model = model_of()
    w = model.lm_head.weight
    w.data = lin.to_layout(w.data, "col")  # as linear.tune lays a weight out for F.linear
    step = fd.FusedDecode(model, PagedKVCache(model.config, num_blocks=8, block_size=4))
    assert step.copied_bytes == w.numel() * 4 and lin.layout_of(model.lm_head.weight) == "col"
    step.release_copies()
    assert step.copied_bytes == 0 and model.lm_head.weight.is_contiguous()
    assert model.lm_head.weight.data_ptr() == step.weights[-1].data_ptr()


@pytest.mark.parametrize("make_cfg, why", [(tiny_llama, "not an MLA model"),
                                           (lambda: tiny_v2(q_lora_rank=24, attention_bias=True), "no biases")])
def test_unsupported_models_say_why_and_take_the_model_step(make_cfg, why):
    model = build_model(make_cfg(), seed=0).eval()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    assert why in fd.unsupported(model, cache)
    assert fd.choose_decode_step(model, cache, None, "auto") == (None, {})
    with pytest.raises(ValueError, match=re.escape(why)):
        fd.choose_decode_step(model, cache, None, "fused")
    bf16 = model_of().to(torch.bfloat16)
    assert "fp32" in fd.unsupported(bf16, PagedKVCache(bf16.config, 8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown decode step 'fast'"):
        fd.choose_decode_step(model, cache, None, "fast")


@pytest.mark.parametrize("faster", ["model", "fused:stream", "fused:blocks"])
def test_the_slower_step_is_never_chosen(faster, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    model = model_of()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    calls = []

    def timer(name, fn):
        fn()  # each candidate really runs
        calls.append(name)
        return 1e-3 if name == faster else 2e-3

    backend = ReferenceBackend(cache)
    step, timings = fd.choose_decode_step(model, cache, backend, "auto", max_num_seqs=4, timer=timer)
    assert set(calls) == {"model", "fused:stream", "fused:blocks"}
    assert timings[faster] == min(timings.values()) and max(timings.values()) > timings[faster]
    kernel, _, rows = faster.partition(":")
    assert isinstance(step, fd.FusedDecode) == (kernel == "fused")
    if step is not None:
        assert step.row_kernel == rows
    assert fd.cached_decode_choices(model.config)[(4, "reference")]["kernel"] == kernel  # kept for this host
    calls.clear()
    again, _ = fd.choose_decode_step(model, cache, backend, "auto", max_num_seqs=4, timer=timer)
    assert calls == []  # the cached choice, not timed again
    assert (again.row_kernel if again is not None else None) == (rows or None)
    forced, _ = fd.choose_decode_step(model, cache, backend, "fused", max_num_seqs=4, timer=timer)
    assert calls == [] and forced.row_kernel == (rows or "stream")  # "fused" takes the measured row kernel


def test_an_entry_timed_before_the_row_kernels_is_timed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    model = model_of()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    key = f"{fd.decode_key_prefix(model.config)}4|reference"
    lin.save_host_cache({key: {"kernel": "model", "us": {"model": 1.0, "fused": 2.0}}})  # an older entry
    calls = []
    step, _ = fd.choose_decode_step(model, cache, ReferenceBackend(cache), "auto", max_num_seqs=4,
                                    timer=lambda name, fn: calls.append(name) or (1e-3 if name == "fused:stream"
                                                                                  else 2e-3))
    assert set(calls) == {"model", "fused:stream", "fused:blocks"} and step.row_kernel == "stream"


def test_more_timing_rows_than_a_block_holds(tmp_path, monkeypatch):
    """max_num_seqs above the block size: the fused step's timing rows still get distinct slots."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    model = model_of()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    _, timings = fd.choose_decode_step(model, cache, ReferenceBackend(cache), "auto", max_num_seqs=9)
    assert set(timings) == {"model", "fused:stream", "fused:blocks"} and min(timings.values()) > 0


def test_row_kernel_names_are_checked():
    model = model_of()
    step = fd.FusedDecode(model, PagedKVCache(model.config, num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="row_kernel='rows'"):
        step.row_kernel = "rows"


def test_bad_inputs_name_the_problem():
    model = model_of()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    step = fd.FusedDecode(model, cache)
    with pytest.raises(RuntimeError, match="token id 96 outside"):
        step([96], [([0], 0)], [0])
    with pytest.raises(RuntimeError, match="block id 9 outside"):
        step.run(torch.tensor([1]), torch.tensor([6]), torch.tensor([1]), torch.tensor([[0, 9]]))
    with pytest.raises(RuntimeError, match="slot 99 outside the pool"):
        step.run(torch.tensor([1]), torch.tensor([1]), torch.tensor([99]), torch.tensor([[0]]))
    with pytest.raises(RuntimeError, match="slot 3 is given to more than one row"):
        step.op([1, 2], [1, 1], [3, 3], [0, 0])
    with pytest.raises(RuntimeError, match="block_tables"):
        step.op([1, 2], [1, 1], [3, 4], [0])
    with pytest.raises(RuntimeError, match="row 0 has 0 keys"):
        step.run(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]), torch.tensor([[0]]))
    step.dims[11:14] = [1, 3, 2]  # group-limited over 3 groups: 8 experts do not split
    with pytest.raises(RuntimeError, match="8 experts cannot take n_group=3, topk_group=2"):
        step([1], [([0], 0)], [0])
    step.dims[11:14] = [2, 4, 2]  # noaux_tc without a bias
    with pytest.raises(RuntimeError, match="needs its gate.e_score_correction_bias"):
        step([1], [([0], 0)], [0])
    step.dims[11:14] = [0, 1, 1]
    step.weights[1] = step.weights[1][:, :-1].contiguous()  # layer 0's q_proj, one input column short
    with pytest.raises(RuntimeError, match="layer 0's q_proj has shape"):
        step([1], [([0], 0)], [0])


def test_non_finite_activations_give_non_finite_logits_not_a_crash():
    """A NaN reaching the router must not pick an expert id outside [0, E) (it would write out of bounds)."""
    model = model_of()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    step = fd.FusedDecode(model, cache)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")  # the packed buffer: the op reads the same memory
    logits, top = step([7, 8], [([0], 0), ([1], 0)], [0, 1])
    assert torch.isnan(logits[0]).all() and torch.isfinite(logits[1]).all()
    assert top == logits.argmax(dim=-1).tolist() == [0, top[1]]  # as torch: a NaN row's first NaN
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = 0.5
        model.lm_head.weight[5] = float("nan")  # one NaN logit per row, the others finite
    logits, top = step([7, 8], [([0], 0), ([1], 0)], [0, 1])
    assert top == logits.argmax(dim=-1).tolist() == [5, 5]


def test_the_ops_argmax_is_torchs_on_ties():
    """A greedy row takes the op's argmax instead of torch's, so they must agree where values tie:
    the first maximum."""
    model = model_of()
    step = fd.FusedDecode(model, PagedKVCache(model.config, num_blocks=8, block_size=4))
    rows = [([0], 0), ([1], 0), ([2], 0)]
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the first token
    logits, top = step([7, 8, 9], rows, [2, 0])
    assert logits.shape[0] == 2 and (logits == 0).all() and top == [0, 0]
    with torch.no_grad():
        model.lm_head.weight[[3, 4]] = torch.randn(model.config.hidden_size)  # tokens 3 and 4 tie, the rest 0
    logits, top = step([7, 8, 9], rows, [0, 1, 2])
    assert torch.equal(logits[:, 3], logits[:, 4])
    assert top == logits.argmax(dim=-1).tolist() == [3 if x > 0 else 0 for x in logits[:, 3].tolist()]
