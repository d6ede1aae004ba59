"""Learning-rate schedules as pure functions of the step: nothing to save, so resume is exact.

    lr = lr_at(step, "cosine", max_lr=3e-4, warmup=100, total=2000, min_ratio=0.1)
    lr = lr_at(step, "wsd", max_lr=3e-4, warmup=100, total=2000, min_ratio=0.0, decay_fraction=0.2)

`step` counts optimizer updates from 0 (the first update uses step 0). Every schedule warms up
linearly from max_lr/warmup to max_lr over `warmup` steps, then:
- cosine: half a cosine from max_lr down to min_ratio * max_lr at step `total`;
- wsd (warmup-stable-decay, as in MiniCPM, arXiv:2404.06395): hold max_lr, then decay linearly
  to min_ratio * max_lr over the last `decay_fraction` of the steps; a run can be extended from
  any stable-phase checkpoint;
- constant: hold max_lr.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warmup: (step + 1) / warmup for the first `warmup` steps, then 1."""
    return 1.0 if step >= warmup else (step + 1) / warmup


def cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return warmup_factor(step, warmup)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_factor(step: int, warmup: int, total: int, min_ratio: float, decay_fraction: float) -> float:
    if step < warmup:
        return warmup_factor(step, warmup)
    decay_steps = max(1, round(decay_fraction * total))
    decay_start = max(warmup, total - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress


def lr_at(step: int, schedule: str, *, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1,
          decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer update `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if schedule == "cosine":
        f = cosine_factor(step, warmup, total, min_ratio)
    elif schedule == "wsd":
        f = wsd_factor(step, warmup, total, min_ratio, decay_fraction)
    elif schedule == "constant":
        f = warmup_factor(step, warmup)
    else:
        raise ValueError(f"schedule={schedule!r} is not supported; expected one of {SCHEDULES}")
    return max_lr * f
