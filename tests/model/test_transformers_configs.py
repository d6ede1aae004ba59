"""A config.json written by transformers means the same model in nanoseek, key by key.

transformers leaves out of config.json what its config class does not have (its V3 has no
topk_method or scoring_func: it always routes with sigmoid scores and noaux_tc) and, with
`use_diff`, what equals its defaults. Each absent key must mean in nanoseek what it means there.
"""

import json

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model.checkpoint import load_model

transformers = pytest.importorskip("transformers")  # installed by the `test` extra; never skipped in CI

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
           kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
HF_CONFIGS = {
    "deepseek_v2": lambda **kw: transformers.DeepseekV2Config(**SMALL, **MOE, **kw),
    "deepseek_v3": lambda **kw: transformers.DeepseekV3Config(**SMALL, **{**MOE, "n_group": 4, "topk_group": 2}, **kw),
    "llama": lambda **kw: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, **kw),
}
# what transformers computes rather than reads, or names differently (rope_interleave: None means
# the family's layout here, compared through rope_is_interleaved below)
NOT_COMPARED = {"head_dim", "rope_scaling", "rope_theta", "rope_interleave", "torch_dtype", "extra"}


def assert_means_the_same(cfg: ModelConfig, hf) -> None:
    skip = NOT_COMPARED | ({"num_key_value_heads"} if cfg.is_mla else set())
    for name, value in vars(cfg).items():
        if name not in skip and hasattr(hf, name):
            assert getattr(hf, name) == value, \
                f"{cfg.model_type}: {name} is {getattr(hf, name)!r} in transformers, {value!r} in nanoseek"
    if cfg.is_mla:  # one latent shared by all heads: transformers' value (128 by default in V3) is unused
        assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.rope_is_interleaved == getattr(hf, "rope_interleave", cfg.model_type != "llama")
    if cfg.model_type == "deepseek_v3":  # transformers' V3 has no such keys: it always does this
        assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_a_config_without_its_default_keys_means_the_same(model_type):
    hf = HF_CONFIGS[model_type]()
    sparse = ModelConfig.from_dict({"model_type": model_type, **hf.to_diff_dict()})
    full = ModelConfig.from_dict(hf.to_dict())
    assert sparse.replace(extra={}) == full.replace(extra={})
    assert_means_the_same(sparse, hf)


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_an_absent_key_means_the_config_class_default(model_type):
    # transformers' V2 default has routed experts but no top-k, which no model can be built from
    given = {"num_experts_per_tok": 6} if model_type == "deepseek_v2" else {}
    hf = type(HF_CONFIGS[model_type]())(**given)
    assert_means_the_same(ModelConfig.from_dict({"model_type": model_type, **given}), hf)


def test_v3_checkpoint_saved_by_transformers_loads(tmp_path):
    """Regression: its config.json has no topk_method/scoring_func, and its gate has e_score_correction_bias."""
    hf_cfg = HF_CONFIGS["deepseek_v3"](rope_interleave=True)
    written = hf_cfg.to_dict()
    assert "topk_method" not in written and "scoring_func" not in written
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for mod in hf.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "topk_method" not in saved and "scoring_func" not in saved
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = load_model(tmp_path)
    assert (ours.config.topk_method, ours.config.scoring_func) == ("noaux_tc", "sigmoid")
    with torch.no_grad():
        assert (ours.compute_logits(ours(ids)) - hf(ids).logits).abs().max().item() <= 1e-4
