"""Dense Llama vs MLA+MoE at equal training FLOPs: two trainer runs, one table, one plot.

    from nanoseek.train.compare import CompareConfig, compare
    result = compare(CompareConfig(data="runs/data", out="runs/compare"))
    result["goal"]["flops_fraction"]      # MLA+MoE FLOPs to reach dense's final val loss / dense's FLOPs

    nanoseek compare --data runs/data --out runs/compare     # see compare_cli.py

Both models train through nanoseek.train.loop with the same data order, batch, sequence length,
optimizer and schedule; each gets as many steps as the FLOP budget buys at its own training FLOPs
per token (3 x forward, nanoseek.train.loop.train_flops_per_token), so the configs should match
*active* parameters per token. The run folder gets dense/ and mla_moe/ (ordinary training runs),
compare.json, compare.md and compare.png (validation loss against training FLOPs). A rerun with
the same settings reuses finished runs and resumes interrupted ones (the trainer's exact resume).

The table: total and active parameters, FLOPs per token, KV-cache bytes per token (bf16), steady
tokens/s, validation loss at 25/50/100% of the common FLOPs, final validation loss, and the FLOPs
at which each model's validation curve (linearly interpolated) first reaches the dense model's
final validation loss, as a fraction of the dense run's FLOPs. The goal asks for <= 0.6.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.io import atomic_write
from nanoseek.train.plot import save_png
from nanoseek.train.runs import experiment_run

GOAL_FRACTION = 0.6  # the target: MLA+MoE matches dense's final val loss with <= 60% of its FLOPs
FRACTIONS = (0.25, 0.5, 1.0)  # of the common FLOPs, for "val loss at equal FLOPs"
FRACTIONS_LABELS = [f"{int(100 * f)}%" for f in FRACTIONS]
KV_BYTES = 2  # bf16 cache elements
NAMES = ("dense", "mla_moe")


@dataclass
class CompareConfig:
    data: str = "runs/data"
    out: str = "runs/compare"
    dense_config: str = "configs/compare-llama.json"
    moe_config: str = "configs/compare-mla-moe.json"
    flop_budget: float = 0.0  # training FLOPs per model; 0: what dense_steps steps of the dense model cost
    dense_steps: int = 250
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 40
    evals: int = 10  # validations per run (evenly spaced, and at the end)
    eval_batches: int = 8
    seed: int = 0
    threads: int = 0
    peak_flops: float = 0.0  # for MFU; 0: the trainer measures the fp32 matmul rate
    progress: bool = True

    def validate(self) -> None:
        for name in ("dense_steps", "batch_size", "seq_len", "evals", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.flop_budget < 0:
            raise ValueError(f"flop_budget={self.flop_budget} must be >= 0 (0: dense_steps of the dense model)")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


# ---------------------------------------------------------------------- pure pieces
def model_facts(cfg, seq_len: int) -> dict:
    """Sizes and costs of one model config that need no training."""
    from nanoseek.info import count_params
    from nanoseek.train.loop import train_flops_per_token

    c = count_params(cfg)
    return {"model_type": cfg.model_type, "attention": "MLA" if cfg.is_mla else f"GQA({cfg.num_key_value_heads})",
            "ffn": (f"MoE {cfg.n_routed_experts}x top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts or 0} shared"
                    if cfg.is_moe else "dense"),
            "total_params": c.total, "active_params": c.active,
            "train_flops_per_token": train_flops_per_token(cfg, seq_len),
            "kv_bytes_per_token": cfg.kv_cache_dim * cfg.num_hidden_layers * KV_BYTES}


def steps_for_budget(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps that spend `budget` training FLOPs (at least one)."""
    return max(1, round(budget / (flops_per_token * tokens_per_step)))


def loss_at(curve: list[tuple[float, float]], flops: float) -> float | None:
    """Validation loss at `flops`, linearly interpolated between evaluations; None outside the curve."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    if curve and abs(curve[-1][0] - flops) <= 1e-9 * flops:
        return curve[-1][1]
    return None


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first FLOPs at which the interpolated curve is <= target; None if it never gets there."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target < l0:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def steady_rate(train_records: list[dict], skip: float = 0.1) -> float | None:
    """Median tokens/s over the steps after the first `skip` share (warm-up, first-touch allocations)."""
    rates = [r["tok_s"] for r in train_records if r.get("tok_s")]
    rates = rates[int(len(rates) * skip):] or rates
    return statistics.median(rates) if rates else None


def summarize(facts: dict[str, dict], curves: dict[str, list[tuple[float, float]]],
              rates: dict[str, float | None]) -> dict:
    """The comparison: one row per model and the goal's verdict. Pure: no files, no training."""
    common = min(c[-1][0] for c in curves.values())
    dense_final_flops, dense_final = curves["dense"][-1]
    rows = {}
    for name in curves:
        reach = flops_to_reach(curves[name], dense_final)
        rows[name] = {**facts[name], "tokens_per_s": rates.get(name),
                      "final_flops": curves[name][-1][0], "final_val_loss": curves[name][-1][1],
                      "val_loss_at": {f"{int(100 * f)}%": loss_at(curves[name], f * common) for f in FRACTIONS},
                      "flops_to_dense_final": reach,
                      "fraction_of_dense_flops": None if reach is None else reach / dense_final_flops}
    frac = rows["mla_moe"]["fraction_of_dense_flops"]
    goal = {"target_fraction": GOAL_FRACTION, "dense_final_val_loss": dense_final,
            "flops_fraction": frac, "met": frac is not None and frac <= GOAL_FRACTION}
    return {"common_flops": common, "models": rows, "goal": goal}


def _fmt_num(n: float | None, unit: str = "") -> str:
    if n is None:
        return "—"
    for suffix, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def markdown(summary: dict) -> str:
    """The table and the verdict as Markdown."""
    rows = summary["models"]
    cols = ["model", "attention / FFN", "total params", "active params", "train FLOPs/token", "KV bytes/token",
            "tokens/s"] + [f"val @ {k} FLOPs" for k in FRACTIONS_LABELS] + \
           ["final val", "FLOPs to dense final (share)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in rows.items():
        share = r["fraction_of_dense_flops"]
        reach = "not reached" if share is None else f"{_fmt_num(r['flops_to_dense_final'])} ({share:.0%})"
        cells = [name, f"{r['attention']} / {r['ffn']}", _fmt_num(r["total_params"]), _fmt_num(r["active_params"]),
                 _fmt_num(r["train_flops_per_token"]), f"{r['kv_bytes_per_token']:,}",
                 "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"]
        cells += ["—" if r["val_loss_at"][k] is None else f"{r['val_loss_at'][k]:.4f}" for k in FRACTIONS_LABELS]
        cells += [f"{r['final_val_loss']:.4f}", reach]
        lines.append("| " + " | ".join(cells) + " |")
    g = summary["goal"]
    verdict = ("not reached within the budget" if g["flops_fraction"] is None
               else f"{g['flops_fraction']:.0%} of the dense FLOPs")
    lines += ["", f"Common FLOPs: {_fmt_num(summary['common_flops'])}. Goal: MLA+MoE reaches the dense final val "
                  f"loss {g['dense_final_val_loss']:.4f} with <= {g['target_fraction']:.0%} of the dense FLOPs; "
                  f"measured: {verdict} ({'met' if g['met'] else 'not met'})."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, curves: dict[str, list[tuple[float, float]]], train: dict[str, list[dict]],
         path: Path) -> Path:
    """Validation loss (and smoothed training loss) against training FLOPs, both models; atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        line, = ax_val.plot(*zip(*curve), "o-", ms=4, label=name)
        recs = train.get(name) or []
        if recs:
            k = max(1, len(recs) // 50)
            xs = [r["flops"] for r in recs][k - 1:]
            ys = [sum(r["loss"] for r in recs[i - k + 1:i + 1]) / k for i in range(k - 1, len(recs))]
            ax_train.plot(xs, ys, color=line.get_color(), lw=1, label=f"{name} (mean of {k} steps)")
    g = summary["goal"]
    dense_flops = summary["models"]["dense"]["final_flops"]
    ax_val.axhline(g["dense_final_val_loss"], color="gray", ls="--", lw=0.8, label="dense final val loss")
    ax_val.axvline(GOAL_FRACTION * dense_flops, color="gray", ls=":", lw=0.8,
                   label=f"goal: {GOAL_FRACTION:.0%} of dense FLOPs")
    for ax, title in ((ax_val, "validation loss"), (ax_train, "training loss")):
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


# ---------------------------------------------------------------------- the runs
def train_configs(cc: CompareConfig) -> dict[str, "object"]:
    """The two TrainConfigs: same data, batch, schedule shape and seed; steps from the FLOP budget."""
    from nanoseek.config import ConfigError, ModelConfig

    cfgs = {}
    for name, path in zip(NAMES, (cc.dense_config, cc.moe_config)):
        try:
            cfgs[name] = ModelConfig.from_json(path)
        except ConfigError as e:
            raise ValueError(f"{name} model config {path}: {e}") from None
    if cfgs["dense"].is_moe or not cfgs["mla_moe"].is_moe:
        raise ValueError(f"expected a dense model in {cc.dense_config} (got n_routed_experts="
                         f"{cfgs['dense'].n_routed_experts}) and an MoE model in {cc.moe_config} "
                         f"(got n_routed_experts={cfgs['mla_moe'].n_routed_experts})")
    tokens_per_step = cc.batch_size * cc.seq_len
    fpt = {n: model_facts(c, cc.seq_len)["train_flops_per_token"] for n, c in cfgs.items()}
    budget = cc.flop_budget or cc.dense_steps * fpt["dense"] * tokens_per_step
    out = {}
    for name, path in zip(NAMES, (cc.dense_config, cc.moe_config)):
        steps = steps_for_budget(budget, fpt[name], tokens_per_step)
        out[name] = experiment_run(cc, model_config=path, data=cc.data, out=Path(cc.out) / name, seed=cc.seed,
                                   steps=steps, warmup_steps=min(cc.warmup_steps, steps)
                                   ).replace(progress=cc.progress)
    return {"models": cfgs, "train": out, "budget": budget}


def compare(cc: CompareConfig) -> dict:
    """Train both models (or reuse finished runs), then write compare.{json,md,png}; returns the summary."""
    import shutil

    from nanoseek.train.loop import preflight, train
    from nanoseek.train.plot import read_metrics
    from nanoseek.train.runs import run_state

    cc.validate()
    plan = train_configs(cc)
    out = Path(cc.out)
    todo = {}
    for name, tcfg in plan["train"].items():
        state = run_state(tcfg)
        if state == "finished":
            continue
        if state == "other":
            raise ValueError(f"{tcfg.out} holds a different run; remove it or choose another --out")
        if state == "killed":  # this run, stopped before its first checkpoint: start it over
            shutil.rmtree(tcfg.out)
        tcfg = tcfg.replace(resume=state == "partial")  # an interrupted comparison continues
        preflight(tcfg)  # both models' data/config errors surface before either trains
        todo[name] = tcfg
    out.mkdir(parents=True, exist_ok=True)
    wall = {}
    for name, tcfg in todo.items():
        if cc.progress:
            how = "resuming" if tcfg.resume else "training"
            print(f"compare: {how} {name} ({tcfg.model_config}) for {tcfg.max_steps} steps", flush=True)
        t0 = time.perf_counter()
        summary = train(tcfg)
        wall[name] = round(time.perf_counter() - t0, 1)
        if summary["interrupted"]:  # the trainer saved a checkpoint; a rerun resumes from it
            raise KeyboardInterrupt(f"{summary['interrupted']} while training {name}; rerun to resume")
    facts, curves, rates, train_recs = {}, {}, {}, {}
    for name, tcfg in plan["train"].items():
        recs, val = read_metrics(tcfg.out)
        if not val:
            raise ValueError(f"{tcfg.out}/metrics.jsonl has no validation records")
        facts[name] = model_facts(plan["models"][name], cc.seq_len)
        curves[name] = [(float(v["flops"]), float(v["val_loss"])) for v in val]
        rates[name] = steady_rate(recs)
        train_recs[name] = recs
    summary = summarize(facts, curves, rates)
    summary.update(config=asdict(cc), budget=plan["budget"], steps={n: t.max_steps for n, t in plan["train"].items()},
                   wall_s=wall, curves={n: [list(p) for p in c] for n, c in curves.items()})
    atomic_write(out / "compare.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "compare.md", markdown(summary))
    plot(summary, curves, train_recs, out / "compare.png")
    return summary
