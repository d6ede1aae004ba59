"""Checkpoint I/O: round trips, sharding, atomic saves, and clear errors for broken inputs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.config import ConfigError
from nanoseek.model.checkpoint import CheckpointError, load_model, save_model
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2, tiny_v3


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.compute_logits(model(ids))


def test_round_trip_single_file_uses_published_names(tmp_path):
    model = build_model(tiny_v3(), seed=7).eval()
    save_model(model, tmp_path / "ck")
    names = set(load_file(tmp_path / "ck" / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    again = load_model(tmp_path / "ck")
    assert torch.equal(logits(model), logits(again))


def test_sharded_round_trip_and_dtype(tmp_path):
    model = build_model(tiny_v2(), seed=8).eval()
    save_model(model, tmp_path / "ck", max_shard_size="40KB")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "ck" / s).exists() for s in shards)
    again = load_model(tmp_path / "ck")
    assert torch.equal(logits(model), logits(again))
    half = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_save_replaces_atomically_and_failure_keeps_the_old_checkpoint(tmp_path):
    a, b = build_model(tiny_v2(), seed=1).eval(), build_model(tiny_v2(), seed=2).eval()
    save_model(a, tmp_path / "ck")
    save_model(b, tmp_path / "ck")
    assert torch.equal(logits(load_model(tmp_path / "ck")), logits(b))

    class Boom(Exception):
        pass

    def bad_items(*args, **kw):
        raise Boom

    import nanoseek.model.checkpoint as ck
    orig, ck.save_file = ck.save_file, bad_items
    try:
        with pytest.raises(Boom):
            save_model(a, tmp_path / "ck")
    finally:
        ck.save_file = orig
    assert torch.equal(logits(load_model(tmp_path / "ck")), logits(b))  # still the last whole save
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left behind


def _saved(tmp_path):
    save_model(build_model(tiny_v2(), seed=3), tmp_path / "ck")
    return tmp_path / "ck", tmp_path / "ck" / "model.safetensors"


def _drop_expert(state):
    del state["model.layers.2.mlp.experts.3.up_proj.weight"]


def _add_stray(state):
    state["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(3, 3)


def _reshape(state):
    state["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(10, 32)


@pytest.mark.parametrize("edit,message", [
    (_drop_expert, r"missing.*model\.layers\.2\.mlp\.experts\.gate_up_proj"),
    (_add_stray, r"unexpected.*q_a_proj"),
    (_reshape, r"kv_b_proj\.weight has shape \(10, 32\).*\(128, 32\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_tensor_is_named(tmp_path, edit, message):
    folder, f = _saved(tmp_path)
    state = load_file(f)
    edit(state)
    save_file(state, f)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_truncated_and_corrupt_files(tmp_path):
    folder, f = _saved(tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(folder)


def test_unknown_model_type_and_missing_weights(tmp_path):
    folder, f = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
    with pytest.raises(ConfigError, match="model_type='qwen3'"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)


def test_v3_mtp_layers_are_skipped_with_a_warning(tmp_path, caplog):
    cfg = tiny_v3(num_nextn_predict_layers=1)
    model = build_model(cfg, seed=4).eval()
    folder = save_model(model, tmp_path / "ck")
    state = load_file(folder / "model.safetensors")
    n = cfg.num_hidden_layers  # MTP layer as published V3 stores it
    state.update({f"model.layers.{n}.enorm.weight": torch.ones(64), f"model.layers.{n}.hnorm.weight": torch.ones(64),
                  f"model.layers.{n}.eh_proj.weight": torch.zeros(64, 128)})
    save_file(state, folder / "model.safetensors")
    with caplog.at_level("WARNING", logger="nanoseek"):
        again = load_model(folder)
    assert "skipped 3 tensors" in caplog.text and "multi-token prediction" in caplog.text
    assert torch.equal(logits(model), logits(again))


def test_fp8_block_scaled_weights_are_dequantised(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    model = build_model(tiny_v3(), seed=5).eval()
    folder = save_model(model, tmp_path / "ck")
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"  # [128, 32]: one 128x128 block row
    w = state[name]
    scale = w.abs().max() / 448.0
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(state, folder / "model.safetensors")
    again = load_model(folder)
    got = again.model.layers[0].self_attn.kv_b_proj.weight
    assert (got - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 keeps ~2 significant bits
    assert not torch.equal(got, w)
