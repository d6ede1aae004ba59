"""MLA's naive and absorbed paths agree, with and without a cache; caches match full recompute."""

import pytest
import torch

from nanoseek.model.backend import AttentionMetadata, DenseCache, causal_mask, prefer_absorbed
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_llama, tiny_v2, tiny_v2_grouped, tiny_v3

MLA_CFGS = [tiny_v2, tiny_v2_grouped, tiny_v3]


def logits(model, ids, meta=None):
    return model.compute_logits(model(ids, attn_metadata=meta))


@pytest.mark.parametrize("make_cfg", MLA_CFGS)
def test_naive_and_absorbed_agree_without_cache(make_cfg):
    cfg = make_cfg()
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    absorbed_meta = AttentionMetadata.no_cache(2, 33)
    absorbed_meta.absorb = True
    with torch.no_grad():
        naive = logits(model, ids)
        absorbed = logits(model, ids, absorbed_meta)
    assert (naive - absorbed).abs().max() < 1e-4


@pytest.mark.parametrize("make_cfg", MLA_CFGS)
@pytest.mark.parametrize("absorb", [False, True])
def test_cached_prefill_and_decode_match_full_recompute(make_cfg, absorb):
    cfg = make_cfg()
    model = build_model(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = logits(model, ids)
        cache = DenseCache(cfg, batch_size=2, max_len=64)
        chunks = [logits(model, ids[:, :17], cache.step(17, absorb)),  # prefill a chunk
                  logits(model, ids[:, 17:30], cache.step(13, absorb))]  # a second chunk over the cache
        chunks += [logits(model, ids[:, t:t + 1], cache.step(1, absorb)) for t in range(30, 40)]  # decode
    assert cache.length == 40
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-4


def test_llama_cache_matches_full_recompute():
    cfg = tiny_llama()
    model = build_model(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = logits(model, ids)
        cache = DenseCache(cfg, batch_size=3, max_len=32)
        out = [logits(model, ids[:, :20], cache.step(20))]
        out += [logits(model, ids[:, t:t + 1], cache.step(1)) for t in range(20, 25)]
    assert (torch.cat(out, dim=1) - full).abs().max() < 1e-4


def test_causal_mask_follows_each_rows_length():
    """Row b's new token t sits at seq_lens[b] - T + t and sees keys up to it; padding keys never."""
    mask = causal_mask(torch.tensor([5, 2]), num_new=2, max_seq_len=6)  # [B, T, S]
    assert mask[0].tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]
    assert mask[1].tolist() == [[True] + [False] * 5, [True] * 2 + [False] * 4]


def test_cache_overflow_is_a_clear_error():
    cfg = tiny_v2()
    cache = DenseCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        cache.step(9)


def test_absorbed_is_preferred_for_few_queries_only():
    cfg = tiny_v2(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert prefer_absorbed(cfg, 1)
    assert not prefer_absorbed(cfg, 2048)


def test_a_bf16_model_keeps_its_rope_frequencies_in_fp32(tmp_path):
    """Module.to(bf16) would round inv_freq to 8 bits of mantissa: at position 4,000 the rotation
    of a pair would then be off by a third of a radian and more. Built, cast, moved or loaded in bf16, it stays fp32."""
    from nanoseek.model.checkpoint import load_model, save_model
    from nanoseek.model.rope import rope_cos_sin

    cfg = tiny_v2(max_position_embeddings=8192)
    fp32 = build_model(cfg, seed=1)
    save_model(fp32, tmp_path / "ck")
    for model in (build_model(cfg, seed=1, dtype=torch.bfloat16),
                  build_model(cfg, seed=1).to(torch.bfloat16).to(torch.float16),
                  load_model(tmp_path / "ck", dtype=torch.bfloat16)):
        assert model.inv_freq.dtype == torch.float32
        torch.testing.assert_close(model.inv_freq, build_model(cfg, seed=None).inv_freq, rtol=0, atol=0)
    pos = torch.tensor([[4000]])
    rounded = build_model(cfg, seed=None).inv_freq.to(torch.bfloat16).float()  # what a cast would leave
    assert (rope_cos_sin(rounded, pos)[0] - rope_cos_sin(fp32.inv_freq, pos)[0]).abs().max() > 0.1
