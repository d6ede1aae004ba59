"""MLA's naive and absorbed paths agree, with and without a cache; caches match full recompute."""

import pytest
import torch

from nanoseek.model.transformer import DenseCache, build_model, prefer_absorbed
from tests.conftest import tiny_llama, tiny_v2, tiny_v2_grouped, tiny_v3

MLA_CFGS = [tiny_v2, tiny_v2_grouped, tiny_v3]


@pytest.mark.parametrize("make_cfg", MLA_CFGS)
def test_naive_and_absorbed_agree_without_cache(make_cfg):
    cfg = make_cfg()
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        naive = model(ids, absorb=False)
        absorbed = model(ids, absorb=True)
    assert (naive - absorbed).abs().max() < 1e-4


@pytest.mark.parametrize("make_cfg", MLA_CFGS)
@pytest.mark.parametrize("absorb", [False, True])
def test_cached_prefill_and_decode_match_full_recompute(make_cfg, absorb):
    cfg = make_cfg()
    model = build_model(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(cfg, batch_size=2, max_len=64)
        chunks = [model(ids[:, :17], cache=cache, absorb=absorb),  # prefill a chunk
                  model(ids[:, 17:30], cache=cache, absorb=absorb)]  # a second chunk over the cache
        chunks += [model(ids[:, t:t + 1], cache=cache, absorb=absorb) for t in range(30, 40)]  # decode
    assert cache.length == 40
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-4


def test_llama_cache_matches_full_recompute():
    cfg = tiny_llama()
    model = build_model(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = DenseCache(cfg, batch_size=3, max_len=32)
        out = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, 25)]
    assert (torch.cat(out, dim=1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("absorb", [False, True])
def test_explicit_mask_hides_padding(absorb):
    """Left-padded rows with positions and a key mask give the unpadded row's logits."""
    cfg = tiny_v3()
    model = build_model(cfg, seed=4).eval()
    ids = torch.randint(2, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)  # [1, 17]
    T = padded.shape[1]
    positions = (torch.arange(T) - pad).clamp(min=0)[None]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask[:, :pad] = False
    mask[:pad, :pad] = torch.eye(pad, dtype=torch.bool)  # padding rows see themselves (no NaN)
    with torch.no_grad():
        ref = model(ids)
        out = model(padded, positions=positions, mask=mask[None], absorb=absorb)
    assert (out[:, pad:] - ref).abs().max() < 1e-4


def test_cache_overflow_is_a_clear_error():
    cfg = tiny_v2()
    model = build_model(cfg).eval()
    cache = DenseCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_token_ids_outside_vocabulary_are_rejected():
    cfg = tiny_v2()
    model = build_model(cfg).eval()
    with pytest.raises(ValueError, match=r"token id 96 is outside the vocabulary \[0, 96\)"):
        model(torch.tensor([[3, 96]]))


def test_absorbed_is_preferred_for_few_queries_only():
    cfg = tiny_v2(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert prefer_absorbed(cfg, 1)
    assert not prefer_absorbed(cfg, 2048)
