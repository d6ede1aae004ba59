"""Every attention backend equals the reference: greedy tokens and logprobs through prefix hits, chunked
prefill, preemption and a restart from the disk cache; the choice between them is measured."""

import pytest
import torch

from nanoseek.engine.backends import choose_backend
from nanoseek.engine.backends.cpu import block_latent_attention
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.backend import causal_mask, sdpa_latent
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2, tiny_v3

from nanoseek.model import cpu_kernels

# the C++ backend wherever nanoseek's CPU kernels can build (then they must: see test_cpu_kernels.py)
CPU_BACKENDS = ["cpu"] + (["cpu-kernel"] if cpu_kernels.unsupported() is None else [])


def scenario(model, backend: str, tmp_path, **engine_kw):
    """Shared prefixes, prompts longer than the token budget, a cache too small for all four
    sequences (preemption), logprobs; then a restarted engine served from the disk cache."""
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(2, 96, (8,), generator=g).tolist()
    prompts = [prefix + torch.randint(2, 96, (n,), generator=g).tolist() for n in (2, 3, 4, 5)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    kw = dict(block_size=4, num_blocks=9, max_num_seqs=4, max_num_batched_tokens=8,
              attention_backend=backend, **engine_kw)
    engine = LLMEngine(model, cache_dir=tmp_path / f"kv-{backend}", **kw)
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished_requests():
        engine.step()
    restarted = LLMEngine(model, cache_dir=tmp_path / f"kv-{backend}", **kw)
    again = restarted.add_request("again", {"prompt_token_ids": prompts[3]}, params)
    while restarted.has_unfinished_requests():
        restarted.step()
    assert again.num_cached_tokens >= 8  # served from disk
    assert sum(r.num_cached_tokens for r in reqs) > 0  # prefix hits in memory
    return [(r.outputs[0].token_ids, r.outputs[0].logprobs) for r in reqs + [again]]


def assert_same(got, want):
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        assert tokens == ref_tokens
        for a, b in zip(lps, ref_lps):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) < 1e-5


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_equals_reference_through_hits_chunks_preemption_and_restart(make_cfg, backend, tmp_path):
    model = build_model(make_cfg(eos_token_id=None), seed=3).eval()
    want = scenario(model, "reference", tmp_path)
    assert_same(scenario(model, backend, tmp_path), want)


def test_preemption_happens_in_the_scenario():
    """The scenario's cache really is too small (so the comparison above covers re-prefill)."""
    model = build_model(tiny_v2(eos_token_id=None), seed=3).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=9, max_num_seqs=4, max_num_batched_tokens=8)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(2, 96, (8,), generator=g).tolist()
    for i, n in enumerate((2, 3, 4, 5)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prefix + torch.randint(2, 96, (n,), generator=g).tolist()},
                           SamplingParams(temperature=0, max_tokens=12))
    preempted = []
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        preempted += out.preempted
        sampled = engine.runner.execute(out, lambda s: engine._children[s][1].seq.params, lambda s: None)
        engine.scheduler.update(out, {k: v.token_id for k, v in sampled.items()})
        for s in [s for s in engine._children if engine._children[s][1].seq.is_finished]:
            rid, _ = engine._children.pop(s)
            engine._requests.pop(rid, None)
    assert preempted


def test_block_latent_attention_equals_sdpa_with_padding():
    g = torch.Generator().manual_seed(0)
    bs, D, H, L = 4, 12, 3, 8
    pool = torch.randn(10, bs, D, generator=g)
    tables = torch.tensor([[3, 1, 7], [2, 0, 0], [9, 9, 9]])  # row 1 uses one block; the rest is padding
    lens = torch.tensor([11, 3, 1])
    q = torch.randn(3, H, D, generator=g)
    got = block_latent_attention(pool, q, tables, lens, 0.3, L)  # [B, H, L]
    S = tables.shape[1] * bs
    kv = pool[tables].reshape(3, S, D)
    want = sdpa_latent(q[:, None], kv, causal_mask(lens, 1, S), 0.3, L)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(cpu_kernels.unsupported() is not None, reason=f"no CPU kernels: {cpu_kernels.unsupported()}")
@pytest.mark.parametrize("heads", [3, 8])
def test_paged_latent_decode_op_equals_the_block_attention(heads):
    assert cpu_kernels.load(), cpu_kernels.why_unavailable()
    g = torch.Generator().manual_seed(heads)
    bs, D, L = 4, 20, 16
    pool = torch.randn(10, bs, D, generator=g)
    tables = torch.tensor([[3, 1, 7], [2, 0, 0], [9, 9, 9]])  # row 1 uses one block; the rest is padding
    lens = torch.tensor([11, 3, 1])
    q = torch.randn(3, heads, D, generator=g)
    want = block_latent_attention(pool, q, tables, lens, 0.3, L)
    torch.testing.assert_close(torch.ops.nanoseek.paged_latent_decode(pool, q, tables, lens, 0.3, L), want,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="block id 10 outside the pool's 10"):
        torch.ops.nanoseek.paged_latent_decode(pool, q, torch.tensor([[3, 10, 7]] * 3), lens, 0.3, L)
    with pytest.raises(RuntimeError, match="row 0 has 13 keys, its block table holds 12"):
        torch.ops.nanoseek.paged_latent_decode(pool, q, tables, torch.tensor([13, 3, 1]), 0.3, L)
    # every tail of the register blocks: keys not a multiple of 3, D not of 8, values not of 16 or 8
    bs, D, L = 16, 92, 45
    pool = torch.randn(12, bs, D, generator=g)
    tables = torch.randperm(12, generator=g)[:10].view(2, 5)
    lens = torch.tensor([77, 32])
    q = torch.randn(2, heads, D, generator=g)
    torch.testing.assert_close(torch.ops.nanoseek.paged_latent_decode(pool, q, tables, lens, 0.1, L),
                               block_latent_attention(pool, q, tables, lens, 0.1, L), rtol=1e-5, atol=1e-6)


def test_auto_takes_the_faster_backend_by_injected_timings():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=8, block_size=4)
    slow_cpu = lambda b, c, B, ctx: 2.0 if b.name == "cpu" else 1.0  # noqa: E731
    fast_cpu = lambda b, c, B, ctx: 0.5 if b.name == "cpu" else 1.0  # noqa: E731
    assert choose_backend(cache, cfg, "auto", 4, timer=slow_cpu)[0].name == "reference"
    assert choose_backend(cache, cfg, "auto", 4, timer=fast_cpu)[0].name == "cpu"
    assert choose_backend(cache, cfg, "reference")[0].name == "reference"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        choose_backend(cache, cfg, "flash")
    with pytest.raises(ValueError, match="needs a CUDA cache"):
        choose_backend(cache, cfg, "cuda")
