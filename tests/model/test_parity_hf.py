"""nanoseek and `transformers` give the same logits from the same checkpoint, in both directions.

transformers is a test-only dependency; tiny configs cover V2 (greedy, no q compression),
V2 (group_limited_greedy, q compression, YaRN), V3 (noaux_tc, sigmoid, groups, YaRN) and Llama.
"""

import pytest
import torch

from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.transformer import build_model
from tests.conftest import TINY

transformers = pytest.importorskip("transformers")  # installed by the `test` extra; never skipped in CI

TOL = 1e-4


def hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def ids_for(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY))
def test_saved_by_nanoseek_loaded_by_transformers(name, tmp_path):
    cfg = TINY[name]()
    model = build_model(cfg, seed=11).eval()
    for layer in model.model.layers:  # a nonzero V3 bias, so its use is checked too
        bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(layer.layer_idx)) * 0.05)
    save_model(model, tmp_path / "ck")
    ids = ids_for(cfg)
    with torch.no_grad():
        ours = model.compute_logits(model(ids))
    theirs = hf_logits(tmp_path / "ck", ids)
    assert ours.shape == theirs.shape == (2, 48, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(TINY))
def test_saved_by_transformers_loaded_by_nanoseek(name, tmp_path):
    cfg = TINY[name]()
    cfg.to_json(tmp_path / "config.json")
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(12)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for mod in hf.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ids = ids_for(cfg, seed=1)
    with torch.no_grad():
        theirs = hf(ids).logits
        m = load_model(tmp_path / "hf")
        ours = m.compute_logits(m(ids))
    assert (ours - theirs).abs().max().item() <= TOL
