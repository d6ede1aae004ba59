"""Balance losses against per-token loop references written from the papers' formulas."""

import pytest
import torch

from nanoseek.model.moe import RouterStats, route
from nanoseek.train import balance
from tests.conftest import tiny_v2, tiny_v3


def random_stats(N=24, E=8, K=2, seed=0, sigmoid=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g, requires_grad=True)
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    idx = scores.detach().topk(K, dim=-1).indices
    return logits, RouterStats(scores=scores, topk_idx=idx)


def ref_f_P(scores, idx, E, K):
    """f_i = E/(K T) * #{t picks i}, P_i = mean_t s_{i,t}, by loops over tokens."""
    T = scores.shape[0]
    f = [0.0] * E
    for t in range(T):
        for k in range(K):
            f[int(idx[t, k])] += E / (K * T)
    P = [float(scores[:, i].sum()) / T for i in range(E)]
    return f, P


def per_seq(stats, seq_len):
    N = stats.scores.shape[0]
    return [(stats.scores[b * seq_len:(b + 1) * seq_len].detach(), stats.topk_idx[b * seq_len:(b + 1) * seq_len])
            for b in range(N // seq_len)]


def test_expert_level_matches_the_formula_per_sequence():
    _, s = random_stats()
    E, K, T = 8, 2, 6
    want = 0.0
    for sc, ix in per_seq(s, T):
        f, P = ref_f_P(sc, ix, E, K)
        want += sum(a * b for a, b in zip(f, P)) / 4
    assert balance.expert_balance_loss(s, seq_len=T).item() == pytest.approx(want, rel=1e-5)


def test_expert_level_is_one_when_uniform_and_larger_when_collapsed():
    E, K, N = 8, 2, 16
    uniform = RouterStats(scores=torch.full((N, E), 1 / E),
                          topk_idx=torch.arange(N * K).view(N, K) % E)
    assert balance.expert_balance_loss(uniform).item() == pytest.approx(1.0)
    scores = torch.full((N, E), 0.02)
    scores[:, :2] = 0.44
    collapsed = RouterStats(scores=scores, topk_idx=torch.tensor([[0, 1]] * N))
    assert balance.expert_balance_loss(collapsed).item() > 3.0


def test_device_and_communication_levels_match_the_formulas():
    _, s = random_stats(N=12, E=8, K=3, seed=1)
    E, K, D, M = 8, 3, 4, 2
    groups = [list(range(d * 2, d * 2 + 2)) for d in range(D)]
    f, P = ref_f_P(s.scores.detach(), s.topk_idx, E, K)
    dev = sum((sum(f[j] for j in g) / len(g)) * sum(P[j] for j in g) for g in groups)
    assert balance.device_balance_loss(s, D).item() == pytest.approx(dev, rel=1e-5)
    T = 12
    sent = [sum(1 for t in range(T) if any(int(e) in g for e in s.topk_idx[t])) for g in groups]
    comm = sum(D / (M * T) * sent[d] * sum(P[j] for j in groups[d]) for d in range(D))
    assert balance.comm_balance_loss(s, D, M).item() == pytest.approx(comm, rel=1e-5)


def test_v3_sequence_wise_uses_normalised_affinities():
    _, s = random_stats(sigmoid=True, seed=2)
    E, K, T = 8, 2, 8
    want = 0.0
    for sc, ix in per_seq(s, T):
        f, P = ref_f_P(sc / sc.sum(-1, keepdim=True), ix, E, K)
        want += sum(a * b for a, b in zip(f, P)) / 3
    assert balance.sequence_balance_loss(s, seq_len=T).item() == pytest.approx(want, rel=1e-5)


def test_losses_push_probability_away_from_overloaded_experts():
    logits, s = random_stats(seed=3)
    balance.expert_balance_loss(s).backward()
    load = balance.expert_load(s)
    busiest, idlest = int(load.argmax()), int(load.argmin())
    # gradient descent lowers the busiest expert's logit relative to the idlest's
    assert float(logits.grad[:, busiest].sum()) > float(logits.grad[:, idlest].sum())


def test_bias_update_moves_by_gamma_against_the_load():
    bias = torch.zeros(4)
    new = balance.bias_update(bias, torch.tensor([8.0, 2.0, 5.0, 5.0]), gamma=0.01)
    assert new.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert bias.tolist() == [0.0] * 4  # pure


def test_bias_updates_balance_a_skewed_v3_router():
    cfg = tiny_v3()
    g = torch.Generator().manual_seed(0)
    E = cfg.n_routed_experts
    skew = torch.linspace(2.0, -2.0, E)  # the router prefers low-numbered experts
    logits = torch.randn(512, E, generator=g) * 0.5 + skew
    bias = torch.zeros(E)
    _, idx, scores = route(logits, cfg, bias)
    before = balance.load_imbalance(balance.expert_load(RouterStats(scores, idx)))
    for _ in range(300):
        _, idx, scores = route(logits, cfg, bias)
        bias = balance.bias_update(bias, balance.expert_load(RouterStats(scores, idx)), gamma=0.01)
    after = balance.load_imbalance(balance.expert_load(RouterStats(scores, idx)))
    assert before > 2.0 and after < 1.3, (before, after)


def test_balance_losses_pick_the_router_family():
    logits, s = random_stats(N=16, E=8, K=2)
    w = balance.BalanceWeights()
    total, parts = balance.balance_losses([s, s], tiny_v2(), w, batch_size=2)
    assert set(parts) == {"expert_balance"}  # no groups: D = 1, device losses off
    assert total.item() == pytest.approx(2 * w.expert * parts["expert_balance"] / 2, rel=1e-5)
    grouped = tiny_v2(topk_method="group_limited_greedy", n_group=4, topk_group=2)
    _, parts = balance.balance_losses([s], grouped, w, batch_size=2)
    assert set(parts) == {"expert_balance", "device_balance", "comm_balance"}
    _, parts = balance.balance_losses([s], tiny_v3(), w, batch_size=2)
    assert set(parts) == {"seq_balance"}
    with pytest.raises(ValueError, match="devices=3"):
        balance.balance_losses([s], tiny_v2(), balance.BalanceWeights(devices=3), batch_size=2)
