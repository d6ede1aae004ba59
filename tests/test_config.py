import json
from pathlib import Path

import pytest

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.info import count_params, kv_cache_elements

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "bench-v2-small", "llama-3-8b"])
def test_published_configs_load_and_round_trip(name, tmp_path):
    cfg = ModelConfig.from_json(CONFIGS / f"{name}.json")
    cfg.to_json(tmp_path / "config.json")
    again = ModelConfig.from_json(tmp_path)
    assert again == cfg
    original = json.loads((CONFIGS / f"{name}.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():  # every published key survives with its value
        if key == "rope_scaling":
            assert {**value, "type": value["type"]} == written[key]
        else:
            assert written[key] == value, key


@pytest.mark.parametrize("name,total,active", [
    # DeepSeek-V2 paper (arXiv:2405.04434): 236B total, 21B active; V2-Lite: 15.7B, 2.4B;
    # DeepSeek-V3 report (arXiv:2412.19437): 671B, 37B; Llama 3 8B: 8.0B.
    ("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9), ("deepseek-v3", 671e9, 37e9),
    ("llama-3-8b", 8.0e9, None)])
def test_parameter_counts_match_the_papers(name, total, active):
    c = count_params(ModelConfig.from_json(CONFIGS / f"{name}.json"))
    assert abs(c.total - total) / total < 0.01
    if active is None:  # dense: every parameter is active
        assert c.active == c.total
        return
    # papers round active counts; V2-Lite's 2.4B leaves out the input embedding
    assert abs(c.active - c.embedding - active) / active < 0.03


def test_kv_cache_matches_v2_table_1():
    kv = kv_cache_elements(ModelConfig.from_json(CONFIGS / "deepseek-v2.json"))
    assert kv["this"] == (512 + 64) * 60
    assert kv["mha"] == 2 * 128 * 128 * 60
    assert kv["equivalent_gqa_groups"] == 2.25


def test_reads_transformers5_rope_parameters():
    cfg = ModelConfig.from_dict({
        "model_type": "deepseek_v3", "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
        "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_mtp_layers": 1,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}})
    assert cfg.rope_theta == 5000.0
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 40.0
    assert cfg.num_nextn_predict_layers == 1
    plain = ModelConfig.from_dict({"model_type": "llama", "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 500000.0}})
    assert plain.rope_theta == 500000.0 and plain.rope_scaling is None


def test_softmax_scale_carries_mscale_squared():
    cfg = ModelConfig.from_json(CONFIGS / "deepseek-v2.json")
    m = 0.1 * 0.707 * __import__("math").log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


@pytest.mark.parametrize("change,message", [
    (dict(n_routed_experts=10, n_group=4, topk_method="group_limited_greedy", topk_group=2),
     "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    (dict(model_type="mixtral"), "model_type='mixtral'"),
    (dict(topk_method="noaux_tc", n_group=2, topk_group=1), "scoring_func"),
    (dict(topk_method="best"), "topk_method='best'"),
    (dict(model_type="llama", num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(n_group=2, topk_group=3, topk_method="group_limited_greedy"), "topk_group=3"),
])
def test_impossible_combinations_are_rejected_by_name(change, message):
    base = dict(model_type="deepseek_v2", n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                hidden_size=64)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{**base, **change})


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_json(tmp_path)
