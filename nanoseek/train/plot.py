"""`nanoseek plot RUN_DIR...`: training curves from metrics.jsonl as one PNG (matplotlib, Agg).

    path = plot_runs(["runs/default"])                      # runs/default/curves.png
    path = plot_runs(["runs/a", "runs/b"], "ab.png", x="flops")

Four panels: train loss (and validation loss as markers), learning rate, tokens/s, and the worst
per-layer expert load max/mean (1.0 = balanced) for MoE runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanoseek.io import atomic_path

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, val records) of a run; errors name the file and line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} in {run_dir}: not a training run folder")
    train, val = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        (val if rec.get("kind") == "val" else train).append(rec)
    return train, val


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike | None = None, x: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(Path(r), *read_metrics(r)) for r in runs]
    if out is None:
        out = data[0][0] / "curves.png" if len(data) == 1 else Path("curves.png")
    out = Path(out)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_loss, ax_lr), (ax_rate, ax_load) = axes
    for run, train, val in data:
        label = run.name or str(run)
        xs = [r[x] for r in train]
        line, = ax_loss.plot(xs, [r["loss"] for r in train], lw=0.8, alpha=0.8, label=f"{label} train")
        if val:
            ax_loss.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                         ms=4, label=f"{label} val")
        ax_lr.plot(xs, [r["lr"] for r in train], label=label)
        ax_rate.plot(xs, [r.get("tok_s") for r in train], lw=0.8, label=label)
        loads = [(r[x], max(r["load_max_mean"])) for r in train if r.get("load_max_mean")]
        if loads:
            ax_load.plot(*zip(*loads), lw=0.8, label=label)
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate"), (ax_rate, "tokens/s"),
                      (ax_load, "expert load max/mean (worst layer)")):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if x == "flops":
        for ax in axes.flat:
            ax.set_xscale("log")
    return save_png(fig, out)


def save_png(fig, path: str | os.PathLike) -> Path:
    """Lay out `fig`, write it as a PNG atomically (temp + rename) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
