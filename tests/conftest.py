"""Shared fixtures: tiny configs of each family, built in the test (no downloads)."""

from __future__ import annotations

import pytest

from nanoseek.config import ModelConfig

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_in_tmp(tmp_path_factory):
    """Kernel timings measured by engines in tests go to a throwaway folder, not ~/.cache."""
    import os

    old = os.environ.get("NANOSEEK_CACHE_DIR")
    os.environ["NANOSEEK_CACHE_DIR"] = str(tmp_path_factory.mktemp("nanoseek-cache"))
    yield
    if old is None:
        os.environ.pop("NANOSEEK_CACHE_DIR", None)
    else:
        os.environ["NANOSEEK_CACHE_DIR"] = old


def tiny_v2(**kw) -> ModelConfig:
    """V2, greedy softmax routing, no query compression."""
    base = dict(model_type="deepseek_v2", vocab_size=96, hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, max_position_embeddings=256, topk_method="greedy",
                bos_token_id=0, eos_token_id=1)
    return ModelConfig(**{**base, **kw})


def tiny_v2_grouped(**kw) -> ModelConfig:
    """V2, group_limited_greedy, query compression, YaRN."""
    return tiny_v2(**{**dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                            routed_scaling_factor=2.0, rope_scaling=YARN, max_position_embeddings=256), **kw})


def tiny_v3(**kw) -> ModelConfig:
    """V3: noaux_tc with sigmoid scores, groups, normalised weights, YaRN."""
    return tiny_v2(**{**dict(model_type="deepseek_v3", q_lora_rank=24, topk_method="noaux_tc",
                            scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                            routed_scaling_factor=2.5, n_shared_experts=1, rope_scaling=dict(YARN, mscale=1.0,
                            mscale_all_dim=1.0)), **kw})


def tiny_llama(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    return ModelConfig(**{**base, **kw})


TINY = {"v2": tiny_v2, "v2_grouped": tiny_v2_grouped, "v3": tiny_v3, "llama": tiny_llama}


@pytest.fixture(params=sorted(TINY))
def tiny_cfg(request) -> ModelConfig:
    return TINY[request.param]()


CORPUS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n",
          "こんにちは世界 — 你好，世界! 🙂", "The quick brown fox jumps over the lazy dog."] * 40


def make_model_dir(path, make_cfg=tiny_v2, vocab_size: int = 300, seed: int = 5):
    """A model folder as users have them: config.json + model.safetensors + tokenizer files."""
    import os

    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model

    tok_dir = f"{path}.tokenizer"
    tok = train_tokenizer(CORPUS, vocab_size=vocab_size, out_dir=tok_dir)
    cfg = make_cfg(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    files = {f: os.path.join(tok_dir, f) for f in os.listdir(tok_dir)}
    save_model(build_model(cfg, seed=seed), path, extra_files=files)
    return path, tok


@pytest.fixture
def model_dir(tmp_path):
    """A tiny V2 model folder with its tokenizer."""
    return make_model_dir(tmp_path / "model")
