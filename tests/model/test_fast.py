"""Every inference fast path equals its reference: rope as a complex multiply, the fused RMSNorm, the
absorbed attention as bmm, the indexed MoE dispatch, and the whole model through a cached decode."""

import pytest
import torch

from nanoseek.model import fast, moe as moe_mod
from nanoseek.model.attention import RMSNorm
from nanoseek.model.backend import DenseCache
from nanoseek.model.moe import MoE
from nanoseek.model.rope import apply_rope, apply_rope_complex, complex_view_ok, rope_cis
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_llama, tiny_v2, tiny_v2_grouped, tiny_v3
from tests.model.test_moe import loop_moe


def test_fast_paths_are_off_for_training_and_in_reference_mode():
    with torch.no_grad():
        assert fast.enabled()
        with fast.reference():
            assert not fast.enabled()
        assert fast.enabled()
    assert not fast.enabled()  # grad enabled: training takes the reference


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (2, 5, 8)])
def test_complex_rope_equals_reference(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], 40, generator=g)[..., 8:16]  # a strided slice, as q_pe / k_pe are
    pos = torch.randint(0, 500, shape[:2], generator=g)
    angles = pos[..., None].float() * torch.rand(4, generator=g)
    cos, sin = angles.cos() * 1.3, angles.sin() * 1.3  # with a YaRN-like attention factor
    assert complex_view_ok(x)
    got = apply_rope_complex(x, rope_cis(cos, sin))
    want = apply_rope(x, cos, sin, interleaved=True)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-6
    assert not complex_view_ok(torch.randn(3, 9)[:, 1:7])  # odd offset: the reference path is taken


def test_fused_rmsnorm_equals_reference():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
        x = torch.randn(3, 7, 64) * 3
        got = norm(x)
        with fast.reference():
            want = norm(x)
    assert (got - want).abs().max() < 1e-6


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v2_grouped, tiny_v3, tiny_llama])
@pytest.mark.parametrize("absorb", [False, True])
def test_model_fast_equals_reference_through_cached_decode(make_cfg, absorb):
    """Prefill a chunk, a second chunk over the cache, then decode: logits of every step agree."""
    cfg = make_cfg()
    model = build_model(cfg, seed=7).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))

    def run():
        cache = DenseCache(cfg, batch_size=2, max_len=32)
        out = [model.compute_logits(model(ids[:, :10], attn_metadata=cache.step(10, absorb))),
               model.compute_logits(model(ids[:, 10:16], attn_metadata=cache.step(6, absorb)))]
        out += [model.compute_logits(model(ids[:, t:t + 1], attn_metadata=cache.step(1, absorb)))
                for t in range(16, 24)]
        return torch.cat(out, dim=1)

    with torch.no_grad():
        got = run()
        with fast.reference():
            want = run()
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("make_cfg", [tiny_v2_grouped, tiny_v3])
@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_indexed_dispatch_onto_the_shared_experts_equals_the_token_loop(make_cfg, tokens):
    cfg = make_cfg()
    model = build_model(cfg, seed=5).eval()
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(1, tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
    key = moe_mod.choice_key(tokens, moe.experts.gate_up_proj)
    moe_mod.clear_dispatch_choices()
    moe_mod._DISPATCH_CHOICE[key] = "indexed"
    try:
        with torch.no_grad():
            assert moe_mod.dispatch_impl(tokens, moe.experts.gate_up_proj) == "indexed"
            y, stats = moe(x)
            ref = loop_moe(moe, x)
    finally:
        moe_mod.clear_dispatch_choices()
    assert (y - ref).abs().max() < 1e-5
    assert stats.topk_idx.shape == (tokens, cfg.num_experts_per_tok)
