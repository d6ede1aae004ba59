"""Routing against plain per-token reference code; vectorised dispatch against a token loop."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE, RouterStats, expert_ffn, route
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2, tiny_v2_grouped, tiny_v3


def reference_route(logits, cfg, bias=None):
    """One token at a time, written from the papers' description."""
    E, K = logits.shape[1], cfg.num_experts_per_tok
    weights, ids = [], []
    for row in logits:
        s = row.softmax(-1) if cfg.scoring_func == "softmax" else row.sigmoid()
        choice = s + (bias if bias is not None else 0)
        allowed = list(range(E))
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
            per = E // cfg.n_group
            groups = [choice[g * per:(g + 1) * per] for g in range(cfg.n_group)]
            gscore = [g.max().item() if cfg.topk_method == "group_limited_greedy"
                      else g.topk(2).values.sum().item() for g in groups]
            best = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[:cfg.topk_group]
            allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -choice[e].item())[:K]
        w = s[chosen]
        if cfg.norm_topk_prob and K > 1:
            w = w / w.sum()
            if cfg.model_type == "deepseek_v3":
                w = w * cfg.routed_scaling_factor
        else:
            w = w * cfg.routed_scaling_factor
        order = torch.tensor(chosen).argsort()
        ids.append(torch.tensor(chosen)[order])
        weights.append(w[order])
    return torch.stack(weights), torch.stack(ids)


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v2_grouped, tiny_v3,
                                      lambda: tiny_v2(norm_topk_prob=True, routed_scaling_factor=3.0)])
def test_route_matches_reference(make_cfg):
    cfg = make_cfg()
    logits = torch.randn(50, cfg.n_routed_experts, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(cfg.n_routed_experts) * 0.1 if cfg.topk_method == "noaux_tc" else None
    w, idx, scores = route(logits, cfg, bias)
    order = idx.argsort(-1)
    w, idx = w.gather(1, order), idx.gather(1, order)
    rw, ridx = reference_route(logits, cfg, bias)
    assert torch.equal(idx, ridx)
    assert torch.allclose(w, rw, atol=1e-6)
    assert scores.shape == (50, cfg.n_routed_experts)


def test_noaux_bias_changes_selection_not_weights():
    cfg = tiny_v3(norm_topk_prob=False, routed_scaling_factor=1.0)
    logits = torch.zeros(1, cfg.n_routed_experts)
    logits[0, 0] = 1.0  # expert 0 has the best raw score
    bias = torch.zeros(cfg.n_routed_experts)
    bias[5], bias[6] = 5.0, 5.0  # but the bias pushes experts 5 and 6
    w, idx, _ = route(logits, cfg, bias)
    assert sorted(idx[0].tolist()) == [5, 6]
    assert torch.allclose(w, torch.full_like(w, 0.5))  # sigmoid(0): the unbiased score


def loop_moe(moe, x):
    """Token by token, expert by expert: the obvious (slow) implementation."""
    flat = x.reshape(-1, x.shape[-1])
    w, idx, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    I = moe.experts.inter
    for n in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            gu = moe.experts.gate_up_proj[e]
            h = F.silu(gu[:I] @ flat[n]) * (gu[I:] @ flat[n])
            out[n] += w[n, k] * (moe.experts.down_proj[e] @ h)
    if moe.shared_experts is not None:
        out += moe.shared_experts(flat)
    return out.view_as(x)


@pytest.mark.parametrize("impl", ["loop", "grouped", "dense", "gather", "indexed"])
def test_vectorised_dispatch_matches_token_loop(impl):
    cfg = tiny_v2_grouped()
    model = build_model(cfg, seed=5)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if impl in ("loop", "grouped"):  # the sorted path through expert_ffn
            moe.experts.impl = impl
            y, stats = moe(x)
        else:
            flat = x.reshape(-1, cfg.hidden_size)
            w, idx, _ = moe.gate(flat)
            y = moe.experts(flat, idx, w, impl) + moe.shared_experts(flat)
            stats = RouterStats(scores=_, topk_idx=idx)
        ref = loop_moe(moe, x)
    assert (y.view_as(ref) - ref).abs().max() < 1e-5
    assert stats.tokens_per_expert().sum() == 18 * cfg.num_experts_per_tok


def test_router_scores_are_differentiable():
    cfg = tiny_v2()
    moe = build_model(cfg, seed=6).model.layers[1].mlp
    x = torch.randn(4, 5, cfg.hidden_size)
    _, stats = moe(x)
    stats.scores.mean(0).pow(2).sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_moe_layer_placement_follows_first_k_dense_and_freq():
    cfg = tiny_v2(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = build_model(cfg)
    kinds = [type(b.mlp).__name__ for b in model.model.layers]
    assert kinds == ["MLP", "MLP", "MoE", "MLP", "MoE", "MLP"]


def test_dispatch_tuning_takes_the_faster_impl_per_batch_size(tmp_path, monkeypatch):
    from nanoseek.model import moe as moe_mod

    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    moe_mod.clear_dispatch_choices()
    model = build_model(tiny_v2(), seed=5).eval()
    fake = {"sorted": lambda n: 1.0, "dense": lambda n: 0.5 if n >= 4 else 2.0, "gather": lambda n: 3.0,
            "indexed": lambda n: 4.0, "fused": lambda n: 5.0}
    report = moe_mod.tune_dispatch(model, max_rows=8, timer=lambda impl, e, x, *a: fake[impl](x.shape[0]))
    assert [(r["rows"], r["kernel"]) for r in report] == [(1, "sorted"), (2, "sorted"), (4, "dense"), (8, "dense")]
    for r in report:
        assert r["us"][r["kernel"]] == min(r["us"].values())
    calls = []
    monkeypatch.setitem(moe_mod.FIXED, "dense", lambda *a: calls.append("dense") or moe_mod.gather_experts(*a))
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        moe(torch.randn(1, 5, 64))  # 5 tokens: rows class 8, "dense"
        assert calls == ["dense"]
        moe(torch.randn(1, 2, 64))  # 2 tokens: "sorted"
        assert calls == ["dense"]
    moe_mod.clear_dispatch_choices()


def test_grouped_experts_under_bf16_autocast_match_the_loop_forward_and_backward():
    """The trainer's GPU mode: fp32 weights under bf16 autocast. The grouped path casts its operands
    as autocast would (torch._grouped_mm has no autocast rule); the loop gets autocast's casts. Here on
    the CPU (CPU autocast, CPU _grouped_mm), with an expert that receives no rows."""
    g = torch.Generator().manual_seed(7)
    E, C, inter = 4, 64, 32
    gate_up = (torch.randn(E, 2 * inter, C, generator=g) * 0.1).requires_grad_()
    down = (torch.randn(E, C, inter, generator=g) * 0.1).requires_grad_()
    counts = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(10, C, generator=g)
    dy = torch.randn(10, C, generator=g)
    outs = {}
    for impl in ("loop", "grouped"):
        x = xs.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = expert_ffn(x, gate_up, down, counts, impl)
        assert y.dtype == torch.bfloat16
        (y.float() * dy).sum().backward()
        outs[impl] = (y.float(), x.grad, gate_up.grad.clone(), down.grad.clone())
        gate_up.grad = down.grad = None
    for a, b in zip(outs["loop"], outs["grouped"]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert outs["grouped"][2][1].abs().sum() == 0  # expert 1 had no rows: no gradient
