"""One optimizer step and one evaluation, as functions: the trainer and the distributed tests call these.

    opt = make_optimizer(model, tcfg, extra=mtp)
    metrics = train_step(model, [(x, y)], opt, tcfg, step=0, mtp=mtp)   # {"loss": ..., "lr": ..., ...}
    val = evaluate(model, val_batches)                                  # mean next-token CE

train_step: for each micro-batch, CE + MoE balance losses (balance.py) + lambda * MTP loss, scaled
by 1/len(batches) and backpropagated; a non-finite loss raises NonFiniteLoss naming the step before
any update. Then gradient clipping, AdamW at lr_at(step), and for V3 routers the aux-loss-free bias
update from the step's observed expert load (averaged over ranks by `all_reduce_mean` when given).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import MoE
from nanoseek.train import balance
from nanoseek.train.parallelize import unwrap
from nanoseek.train.schedule import lr_at


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; `step` is the 1-based step (as in metrics and checkpoints) it happened at."""

    def __init__(self, step: int, value: float, part: str):
        super().__init__(f"{part} loss is {value} at step {step}; stopped before the update "
                         "(lower lr, clip gradients, or check the data)")
        self.step = step


def balance_weights(tcfg) -> balance.BalanceWeights:
    return balance.BalanceWeights(expert=tcfg.expert_balance_alpha, device=tcfg.device_balance_alpha,
                                  comm=tcfg.comm_balance_alpha, devices=tcfg.balance_devices,
                                  max_devices=tcfg.balance_max_devices, seq=tcfg.seq_balance_alpha)


def make_optimizer(model: nn.Module, tcfg, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2 dims) only; fused where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        params += [p for p in extra.parameters() if p.requires_grad]
    seen, unique = set(), []
    for p in params:  # tied embeddings appear twice
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    groups = [{"params": [p for p in unique if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0}]
    kw = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    if tcfg.fused_adamw != "off":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            if tcfg.fused_adamw == "on":
                raise
    return torch.optim.AdamW(groups, foreach=True, **kw)


def moe_routers(model: nn.Module, mtp: nn.Module | None = None) -> list[nn.Module]:
    """The routers in the order their RouterStats come out: main layers, then MTP layers."""
    base = unwrap(model)
    blocks = list(base.model.layers) + (list(mtp.layers) if mtp is not None else [])
    return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]




def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tcfg, *, mtp: nn.Module | None = None,
                 autocast_dtype: torch.dtype | None = None):
    """(total loss, {"ce", "aux", "mtp", balance parts...} as floats, router stats) of one micro-batch."""
    base = unwrap(model)
    model_cfg = base.config
    device_type = x.device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        hidden, stats = model(x, return_router_stats=True)  # [B, T, C]
        logits = base.compute_logits(hidden)  # [B, T, V]
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        parts: dict[str, float] = {"ce": float(ce.detach())}
        total = ce
        if mtp is not None and tcfg.mtp_lambda > 0:
            mtp_loss, per_depth, mtp_stats = mtp(base, hidden, y)
            total = total + tcfg.mtp_lambda * mtp_loss
            parts["mtp"] = float(mtp_loss.detach())
            stats = stats + mtp_stats
        if stats:
            aux, bal = balance.balance_losses(stats, model_cfg, balance_weights(tcfg),
                                                      batch_size=x.shape[0])
            total = total + aux
            parts["aux"] = float(aux.detach())
            parts.update(bal)
    return total, parts, stats


def train_step(model: nn.Module, batches, optimizer: torch.optim.Optimizer, tcfg, *, step: int,
               mtp: nn.Module | None = None, autocast_dtype: torch.dtype | None = None,
               all_reduce_mean=None, clip_grad_norm=None) -> dict:
    """One optimizer update over the micro-batches `batches` [(x, y), ...]; returns the step's metrics.

    all_reduce_mean(tensor) -> tensor: averages over ranks (the MTP gradients, which no DDP wrapper
    sees, and the V3 expert load); None in one process. clip_grad_norm(max_norm) -> norm: a
    replacement for torch's clipping over the optimizer's parameters (expert parallel needs the
    norm over every rank's expert slice: nanoseek.train.distributed.clip_grad_norm)."""
    lr = lr_at(step, tcfg.schedule, max_lr=tcfg.lr, warmup=tcfg.warmup_steps, total=tcfg.max_steps,
               min_ratio=tcfg.min_lr_ratio, decay_fraction=tcfg.decay_fraction)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    sums: dict[str, float] = {}
    loads: list[torch.Tensor] | None = None
    tokens = 0
    for i, (x, y) in enumerate(batches):
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss, parts, stats = compute_loss(model, x, y, tcfg, mtp=mtp, autocast_dtype=autocast_dtype)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(step + 1, value, "training")
            (loss / n).backward()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v / n
        step_loads = [balance.expert_load(s) for s in stats]
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
        tokens += y.numel()
    if all_reduce_mean is not None and sums:  # log the global batch's losses, not this rank's
        keys = sorted(sums)
        avg = all_reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=x.device))
        sums = dict(zip(keys, avg.tolist()))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all_reduce_mean is not None and mtp is not None:
        for p in mtp.parameters():
            if p.grad is not None:
                p.grad.copy_(all_reduce_mean(p.grad))
    max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
    if clip_grad_norm is not None:
        grad_norm = float(clip_grad_norm(max_norm))
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteLoss(step + 1, grad_norm, "gradient-norm")
    optimizer.step()
    metrics = {"step": step + 1, "loss": sums.get("ce", 0.0), "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, **{k: v for k, v in sums.items() if k != "ce"}}
    if loads:
        if all_reduce_mean is not None:
            loads = [all_reduce_mean(load) for load in loads]
        metrics["load_max_mean"] = [round(balance.load_imbalance(load), 4) for load in loads]
        routers = moe_routers(model, mtp)
        with torch.no_grad():
            for router, load in zip(routers, loads):
                if router.e_score_correction_bias is not None and tcfg.bias_update_speed > 0:
                    b = router.e_score_correction_bias
                    b.copy_(balance.bias_update(b, load, tcfg.bias_update_speed))
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean next-token cross-entropy of the main model over `batches` [(x, y), ...]."""
    total, count = 0.0, 0
    for x, y in batches:
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            logits = unwrap(model).compute_logits(model(x))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / max(1, count)
