"""MoE load balancing: DeepSeek-V2's auxiliary losses and DeepSeek-V3's auxiliary-loss-free bias.

    aux, parts = balance_losses(stats, model_cfg, BalanceWeights(), batch_size=B)   # add aux to the loss
    for layer_stats, bias in zip(stats, router_biases):                           # V3, after optimizer.step
        bias.copy_(bias_update(bias, expert_load(layer_stats), gamma=0.001))

All functions are pure and take one MoE layer's `RouterStats` (scores [N, E] fp32 and
differentiable, topk_idx [N, K]; N = B*T row-major over (B, T)). Notation of the papers:
N_r = E routed experts, K_r = K chosen per token, T tokens per sequence, D devices.

DeepSeek-V2 (arXiv:2405.04434, Sec. 2.2.3), each averaged over the B sequences of a batch:
- expert-level  L = a1 * sum_i f_i P_i,   f_i = E/(K T) * #{t: t picks expert i},  P_i = mean_t s_{i,t}
- device-level  L = a2 * sum_d f'_d P'_d, f'_d = mean_{j in E_d} f_j,            P'_d = sum_{j in E_d} P_j
- communication L = a3 * sum_d f''_d P''_d, f''_d = D/(M T) * #{t: t is sent to d}, P''_d = P'_d
  with experts split into D equal contiguous groups E_d (as expert parallelism places them) and M
  the most devices a token may reach. V2's values: a1 = 0.003, a2 = 0.05, a3 = 0.02 (Sec. 3.1.2).
DeepSeek-V3 (arXiv:2412.19437, Sec. 2.1.2):
- expert choice uses score + b_i; after each step b_i moves by gamma towards balance:
  b_i -= gamma if expert i is overloaded (load above the mean), += gamma if underloaded (gamma = 0.001).
- a small sequence-wise loss  L = a * sum_i f_i P_i with P_i over normalised affinities
  s'_{i,t} = s_{i,t} / sum_j s_{j,t} (a = 0.0001).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model.moe import RouterStats
from nanoseek.train.config import V2_COMM_ALPHA, V2_DEVICE_ALPHA, V2_EXPERT_ALPHA, V3_SEQ_ALPHA


@dataclass
class BalanceWeights:
    expert: float = V2_EXPERT_ALPHA  # V2 a1
    device: float = V2_DEVICE_ALPHA  # V2 a2
    comm: float = V2_COMM_ALPHA  # V2 a3
    devices: int = 0  # D; 0: n_group of the model (1 without groups: device losses off)
    max_devices: int = 0  # M; 0: topk_group of the model, else D
    seq: float = V3_SEQ_ALPHA  # V3 sequence-wise a


def _per_sequence(stats: RouterStats, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, T, E] and a one-hot of the choices [B, T, E] (B = 1 when seq_len is None)."""
    N, E = stats.scores.shape
    T = N if seq_len is None else seq_len
    if N % T:
        raise ValueError(f"router stats cover N={N} tokens, not a multiple of seq_len={T}")
    chosen = torch.zeros(N, E, device=stats.scores.device).scatter_(1, stats.topk_idx, 1.0)
    return stats.scores.view(N // T, T, E), chosen.view(N // T, T, E)


def _fraction_and_prob(scores: torch.Tensor, chosen: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f [B, E] = E/(K T) * picks, P [B, E] = mean over t of the scores."""
    _, T, E = scores.shape
    f = chosen.sum(1) * (E / (K * T))
    P = scores.mean(1)
    return f, P


def expert_balance_loss(stats: RouterStats, seq_len: int | None = None) -> torch.Tensor:
    """V2 expert-level balance sum_i f_i P_i (unweighted), mean over sequences. 1.0 when uniform."""
    scores, chosen = _per_sequence(stats, seq_len)
    f, P = _fraction_and_prob(scores, chosen, stats.topk_idx.shape[1])
    return (f * P).sum(-1).mean()


def _group(x: torch.Tensor, devices: int) -> torch.Tensor:
    """[..., E] -> [..., D, E/D]: contiguous experts per device."""
    E = x.shape[-1]
    if E % devices:
        raise ValueError(f"n_routed_experts={E} cannot be split evenly over devices={devices}")
    return x.view(*x.shape[:-1], devices, E // devices)


def device_balance_loss(stats: RouterStats, devices: int, seq_len: int | None = None) -> torch.Tensor:
    """V2 device-level balance sum_d f'_d P'_d (unweighted), mean over sequences."""
    scores, chosen = _per_sequence(stats, seq_len)
    f, P = _fraction_and_prob(scores, chosen, stats.topk_idx.shape[1])
    f_dev = _group(f, devices).mean(-1)  # [B, D]
    P_dev = _group(P, devices).sum(-1)  # [B, D]
    return (f_dev * P_dev).sum(-1).mean()


def comm_balance_loss(stats: RouterStats, devices: int, max_devices: int,
                      seq_len: int | None = None) -> torch.Tensor:
    """V2 communication balance sum_d f''_d P''_d (unweighted), mean over sequences."""
    scores, chosen = _per_sequence(stats, seq_len)
    T = scores.shape[1]
    sent = (_group(chosen, devices).sum(-1) > 0).float()  # [B, T, D] token t reaches device d
    f_comm = sent.sum(1) * (devices / (max_devices * T))  # [B, D]
    P_dev = _group(scores.mean(1), devices).sum(-1)  # [B, D]
    return (f_comm * P_dev).sum(-1).mean()


def sequence_balance_loss(stats: RouterStats, seq_len: int | None = None) -> torch.Tensor:
    """V3 sequence-wise balance sum_i f_i P_i over normalised affinities (unweighted), mean over sequences."""
    scores, chosen = _per_sequence(stats, seq_len)
    normed = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    f, P = _fraction_and_prob(normed, chosen, stats.topk_idx.shape[1])
    return (f * P).sum(-1).mean()


def expert_load(stats: RouterStats) -> torch.Tensor:
    """[E] float: (token, expert) assignments per expert."""
    return stats.tokens_per_expert().float()


def load_imbalance(load: torch.Tensor) -> float:
    """max/mean of an expert load vector: 1.0 is perfect balance, E/K means all tokens on K experts."""
    mean = load.float().mean()
    return float(load.max() / mean) if mean > 0 else 0.0


def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """V3 aux-loss-free step: b - gamma * sign(load - mean load). Returns a new tensor."""
    load = load.to(bias.device, torch.float32)
    return bias - gamma * torch.sign(load - load.mean()).to(bias.dtype)


def resolve_devices(w: BalanceWeights, n_group: int | None, topk_group: int | None) -> tuple[int, int]:
    """(D, M) after the 0 = 'from the model' defaults."""
    D = w.devices or (n_group or 1)
    M = w.max_devices or (topk_group if (not w.devices and topk_group) else D)
    if not 1 <= M <= D:
        raise ValueError(f"balance max_devices={M} must be in [1, devices={D}]")
    return D, M


def balance_losses(stats: list[RouterStats], model_cfg, w: BalanceWeights,
                   batch_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum over MoE layers of the losses that apply to this router, and each part.

    batch_size: sequences in the batch; each layer's tokens are split into that many sequences
    (MTP layers see shorter ones). None: the whole batch counts as one sequence.
    noaux_tc routers (V3) get the sequence-wise loss only (their balance comes from the bias);
    the others get V2's expert-, device- and communication-level losses (device ones when D > 1)."""
    if not stats:
        return torch.zeros(()), {}
    device = stats[0].scores.device
    total = torch.zeros((), device=device)
    parts: dict[str, float] = {}

    def add(name: str, alpha: float, value: torch.Tensor) -> None:
        nonlocal total
        if alpha:
            total = total + alpha * value
            parts[name] = parts.get(name, 0.0) + float(value.detach())

    def seq_len(s: RouterStats) -> int | None:
        return None if batch_size is None else s.scores.shape[0] // batch_size

    if model_cfg.topk_method == "noaux_tc":
        for s in stats:
            add("seq_balance", w.seq, sequence_balance_loss(s, seq_len(s)))
        return total, parts
    D, M = resolve_devices(w, model_cfg.n_group, model_cfg.topk_group)
    for s in stats:
        add("expert_balance", w.expert, expert_balance_loss(s, seq_len(s)))
        if D > 1:
            add("device_balance", w.device, device_balance_loss(s, D, seq_len(s)))
            add("comm_balance", w.comm, comm_balance_loss(s, D, M, seq_len(s)))
    return total, parts
