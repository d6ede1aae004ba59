"""`nanoseek compare` end to end on a tiny synthetic corpus, and the pure pieces of its table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.info import count_params
from nanoseek.train.compare import (CompareConfig, compare, flops_to_reach, loss_at, steps_for_budget,
                                    summarize, train_configs)
from nanoseek.train.loop import train
from tests.train.helpers import make_data

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


def tiny_pair(tmp: Path) -> tuple[Path, Path]:
    dense = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    moe = ModelConfig(model_type="deepseek_v2", vocab_size=VOCAB, hidden_size=32, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                      n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    dense.to_json(tmp / "dense.json")
    moe.to_json(tmp / "moe.json")
    return tmp / "dense.json", tmp / "moe.json"


def test_loss_interpolation_and_reach():
    curve = [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]
    assert loss_at(curve, 3.0) == pytest.approx(3.5)
    assert loss_at(curve, 4.0) == 3.0 and loss_at(curve, 0.5) is None and loss_at(curve, 5.0) is None
    assert flops_to_reach(curve, 4.5) == pytest.approx(1.5)
    assert flops_to_reach(curve, 6.0) == 1.0
    assert flops_to_reach(curve, 2.9) is None
    assert steps_for_budget(1000.0, 10.0, 4) == 25 and steps_for_budget(1.0, 10.0, 4) == 1


def test_summary_verdict_follows_the_curves():
    facts = {n: {"total_params": 1, "active_params": 1} for n in ("dense", "mla_moe")}
    dense = [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]
    fast = summarize(facts, {"dense": dense, "mla_moe": [(1.0, 4.0), (2.0, 3.0), (4.0, 2.5)]}, {})
    assert fast["goal"]["flops_fraction"] == pytest.approx(0.5) and fast["goal"]["met"]
    assert fast["models"]["mla_moe"]["val_loss_at"]["50%"] == pytest.approx(3.0)
    slow = summarize(facts, {"dense": dense, "mla_moe": [(1.0, 5.0), (2.0, 4.5), (4.0, 3.2)]}, {})
    assert slow["goal"]["flops_fraction"] is None and not slow["goal"]["met"]


def test_shipped_configs_match_active_parameters():
    dense = count_params(ModelConfig.from_json(ROOT / "configs/compare-llama.json"))
    moe_cfg = ModelConfig.from_json(ROOT / "configs/compare-mla-moe.json")
    moe = count_params(moe_cfg)
    assert moe_cfg.is_moe and moe.total > 1.5 * moe.active
    assert abs(moe.active - dense.active) / dense.active < 0.02


def test_compare_end_to_end(tmp_path, capsys):
    data = make_data(tmp_path / "data", vocab_size=VOCAB, train_tokens=30_000, val_tokens=3_000)
    dense_cfg, moe_cfg = tiny_pair(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data), "--out", str(out), "--dense-config", str(dense_cfg),
            "--moe-config", str(moe_cfg), "--dense-steps", "24", "--batch-size", "4", "--seq-len", "32",
            "--lr", "3e-3", "--warmup-steps", "2", "--evals", "4", "--eval-batches", "2", "--threads", "1",
            "--peak-flops", "1e11", "--no-progress"]
    # the dense run was interrupted at step 10 (checkpoint saved): compare resumes it
    plan = train_configs(CompareConfig(data=str(data), out=str(out), dense_config=str(dense_cfg),
                                       moe_config=str(moe_cfg), dense_steps=24, batch_size=4, seq_len=32,
                                       lr=3e-3, warmup_steps=2, evals=4, eval_batches=2, threads=1,
                                       peak_flops=1e11, progress=False))
    assert train(plan["train"]["dense"].replace(stop_after=10))["step"] == 10
    assert cli.main(argv[:-1]) == 0  # with progress: prints what it does
    printed = capsys.readouterr().out
    assert "resuming dense" in printed and "training mla_moe" in printed
    assert "| dense |" in printed and "| mla_moe |" in printed
    result = json.loads((out / "compare.json").read_text())
    rows = result["models"]
    for name, path in (("dense", dense_cfg), ("mla_moe", moe_cfg)):
        r = rows[name]
        counts = count_params(ModelConfig.from_json(path))
        assert (r["total_params"], r["active_params"]) == (counts.total, counts.active)
        # each run spent the budget to within one step
        assert abs(r["final_flops"] - result["budget"]) <= r["train_flops_per_token"] * 4 * 32
        # the models learned the cyclic sequence: below the uniform-guess loss ln(V)
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(VOCAB) - 0.3
        assert r["tokens_per_s"] > 0 and len(result["curves"][name]) >= 4
        flops = [f for f, _ in result["curves"][name]]
        assert flops == sorted(flops) and len(set(flops)) == len(flops)  # the resume left no duplicate evals
        assert all(r["val_loss_at"][k] is not None for k in ("50%", "100%"))
    assert rows["mla_moe"]["kv_bytes_per_token"] == (16 + 4) * 2 * 2  # (L + R) * layers * bf16
    assert rows["dense"]["kv_bytes_per_token"] == 2 * 2 * 8 * 2 * 2  # K+V * kv heads * D * layers * bf16
    goal = result["goal"]
    assert goal["dense_final_val_loss"] == rows["dense"]["final_val_loss"]
    assert goal["met"] == (goal["flops_fraction"] is not None and goal["flops_fraction"] <= 0.6)
    md = (out / "compare.md").read_text()
    assert md.startswith("| model |") and "\n| dense |" in md and "\n| mla_moe |" in md and "Goal:" in md
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a rerun with the same settings reuses both finished runs: same curves, no training
    again = compare(CompareConfig(data=str(data), out=str(out), dense_config=str(dense_cfg),
                                  moe_config=str(moe_cfg), dense_steps=24, batch_size=4, seq_len=32, lr=3e-3,
                                  warmup_steps=2, evals=4, eval_batches=2, threads=1, peak_flops=1e11,
                                  progress=False))
    assert again["curves"] == result["curves"] and again["wall_s"] == {}


def test_bad_input_fails_before_training(tmp_path, capsys):
    dense_cfg, moe_cfg = tiny_pair(tmp_path)
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--data", str(tmp_path / "missing"), "--out", str(out), "--dense-config",
                   str(dense_cfg), "--moe-config", str(moe_cfg), "--seq-len", "32", "--no-progress"])
    assert rc == 2 and "missing" in capsys.readouterr().err
    assert not (out / "dense" / "metrics.jsonl").exists()
    data = make_data(tmp_path / "data", vocab_size=VOCAB, train_tokens=5_000, val_tokens=2_000)
    with pytest.raises(ValueError, match="expected a dense model"):
        compare(CompareConfig(data=str(data), out=str(out), dense_config=str(moe_cfg), moe_config=str(moe_cfg),
                              seq_len=32))
    big = make_data(tmp_path / "big_vocab", vocab_size=VOCAB * 2, train_tokens=5_000, val_tokens=2_000)
    with pytest.raises(ValueError, match="vocab_size"):
        compare(CompareConfig(data=str(big), out=str(out), dense_config=str(dense_cfg), moe_config=str(moe_cfg),
                              seq_len=32, progress=False))
    assert not (out / "dense" / "metrics.jsonl").exists()
