"""Compute efficiency, measured properly: a FLOP-budget sweep with seeds, each run scheduled for its own budget.

    from nanoseek.train.sweep import SweepConfig, compute_experiment
    result = compute_experiment(SweepConfig(data="runs/data", out="runs/compare/compute"))
    result["match"]["mla_moe"]["ratio"]      # FLOPs at which MLA+MoE reaches dense's final loss / dense's

    nanoseek compare --experiment compute --data runs/data --out runs/compare     # see compare_cli.py

Three models (dense Llama; Llama attention (GQA) with the same MoE; MLA with the same MoE) train at
every budget in `budgets` (fractions of what `dense_steps` steps of the dense model cost), each with
3 seeds. Every run is an ordinary trainer run whose warmup + cosine schedule is sized to its own
step count, so a small budget is a finished run, not the early part of a long one. A model's
final validation losses against FLOPs (mean over seeds per budget) form its curve; the FLOPs at
which that curve reaches the dense model's final loss at the full budget (linear interpolation
between budgets) over the dense FLOPs is the headline ratio, per seed and as mean ± standard
deviation. The Llama+MoE row splits the saving into the FFN's (dense -> MoE, same attention)
and attention's (GQA -> MLA, same MoE).

Writes compute.json, compute.md and compute.png (val loss vs FLOPs, every run's curve, the
ratios printed on it) into `out`, and one run folder per (model, budget, seed). A rerun with the
same settings reuses finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.io import atomic_write
from nanoseek.train.compare import flops_to_reach, model_facts, steps_for_budget
from nanoseek.train.plot import save_png
from nanoseek.train.runs import curve_of, experiment_run, run_many

MODELS = ("dense", "llama_moe", "mla_moe")
LABELS = {"dense": "dense (GQA + SwiGLU)", "llama_moe": "Llama+MoE (GQA + MoE)", "mla_moe": "MLA+MoE"}


@dataclass
class SweepConfig:
    data: str = "runs/data"
    out: str = "runs/compare/compute"
    dense_config: str = "configs/compare-llama.json"
    llama_moe_config: str = "configs/compare-llama-moe.json"
    moe_config: str = "configs/compare-mla-moe.json"
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # fractions of the full budget
    seeds: int = 3
    dense_steps: int = 128  # the full budget: what this many dense steps cost
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup_fraction: float = 0.1  # of each run's own steps
    evals: int = 4  # validations per run (evenly spaced, and at the end)
    eval_batches: int = 8
    threads: int = 0
    workers: int = 1  # runs trained at once, each in its own process (runs.run_many)
    peak_flops: float = 1e11  # only for the MFU column of the metrics; a constant skips the probe
    progress: bool = True

    def validate(self) -> None:
        for name in ("seeds", "dense_steps", "batch_size", "seq_len", "evals", "eval_batches", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets) or 1.0 not in self.budgets:
            raise ValueError(f"budgets={self.budgets} must be fractions in (0, 1] that include 1.0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")


# ---------------------------------------------------------------------- pure pieces
def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def match_ratio(points: list[tuple[float, float]], target: float, reference_flops: float) -> float | None:
    """(FLOPs at which the final-loss-vs-budget curve `points` [(flops, loss)] first reaches `target`)
    / reference_flops, by linear interpolation between budgets; None if no budget gets there.
    A curve already below target at its smallest budget answers that budget (an upper bound)."""
    reach = flops_to_reach(sorted(points), target)
    return None if reach is None else reach / reference_flops


def summarize(finals: dict[str, dict[float, list[tuple[float, float]]]]) -> dict:
    """finals[model][budget] = [(flops, final val loss) per seed] -> the table and the ratios. Pure."""
    rows, match = {}, {}
    dense_full = finals["dense"][1.0]
    n_seeds = len(dense_full)
    for model, by_budget in finals.items():
        rows[model] = {f"{b:g}": {"flops": mean_sd([f for f, _ in runs])[0],
                                  "loss_mean": mean_sd([v for _, v in runs])[0],
                                  "loss_sd": mean_sd([v for _, v in runs])[1],
                                  "losses": [v for _, v in runs]} for b, runs in sorted(by_budget.items())}
    for model, by_budget in finals.items():
        per_seed = []
        for s in range(n_seeds):
            pts = [(runs[s][0], runs[s][1]) for _, runs in sorted(by_budget.items()) if s < len(runs)]
            per_seed.append(match_ratio(pts, dense_full[s][1], dense_full[s][0]))
        mean_pts = [(r["flops"], r["loss_mean"]) for r in rows[model].values()]
        target, ref = mean_sd([v for _, v in dense_full])[0], mean_sd([f for f, _ in dense_full])[0]
        found = [r for r in per_seed if r is not None]
        match[model] = {"ratio_of_means": match_ratio(mean_pts, target, ref), "per_seed": per_seed,
                        "mean": mean_sd(found)[0] if found else None,
                        "sd": mean_sd(found)[1] if found else None, "reached_in": len(found)}
    return {"rows": rows, "match": match, "dense_target": mean_sd([v for _, v in dense_full])}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    budgets = list(next(iter(result["rows"].values())))
    cols = ["model", "active params", "train FLOPs/token"] + [f"val @ {float(b):.0%} budget" for b in budgets] \
        + ["FLOPs to dense's final loss (share of dense)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" + "---:|" * (len(cols) - 1)]
    for model, by_budget in result["rows"].items():
        facts, m = result["facts"][model], result["match"][model]
        share = ("not reached" if m["mean"] is None else
                 f"**{m['mean']:.0%} ± {m['sd']:.0%}** ({m['reached_in']}/{len(m['per_seed'])} seeds)")
        cells = [LABELS.get(model, model), f"{facts['active_params'] / 1e6:.2f}M",
                 f"{facts['train_flops_per_token'] / 1e6:.1f}M"]
        cells += [f"{r['loss_mean']:.3f} ± {r['loss_sd']:.3f}" for r in by_budget.values()]
        lines.append("| " + " | ".join(cells + [share]) + " |")
    t, sd = result["dense_target"]
    lines += ["", f"Full budget {result['budget']:.3g} FLOPs ({result['config']['dense_steps']} dense steps of "
                  f"{result['config']['batch_size']} x {result['config']['seq_len']} tokens); "
                  f"{result['config']['seeds']} seeds per point, mean ± sd. Dense final val loss {t:.3f} ± {sd:.3f}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, curves: dict[str, list[list[tuple[float, float]]]], path: Path) -> Path:
    """Val loss vs FLOPs: every run's curve (thin), each model's final-loss-vs-budget means (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"dense": "tab:blue", "llama_moe": "tab:orange", "mla_moe": "tab:green"}
    for model, runs in curves.items():
        for c in runs:
            ax.plot(*zip(*c), "-", color=colors.get(model), lw=0.6, alpha=0.35)
        pts = [(r["flops"], r["loss_mean"], r["loss_sd"]) for r in result["rows"][model].values()]
        m = result["match"][model]
        label = LABELS.get(model, model) + ("" if model == "dense" or m["mean"] is None
                                            else f": {m['mean']:.0%} ± {m['sd']:.0%} of dense FLOPs")
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                    color=colors.get(model), lw=2, ms=5, capsize=3, label=label)
    ax.axhline(result["dense_target"][0], color="gray", ls="--", lw=0.8, label="dense final val loss")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("val loss vs training FLOPs; thin: every run's evaluations, thick: final loss per budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_png(fig, path)


# ---------------------------------------------------------------------- the runs
def train_configs(sc: SweepConfig) -> dict:
    """{(model, budget, seed): TrainConfig}, the model configs, and the full budget in FLOPs."""
    from nanoseek.config import ConfigError, ModelConfig

    paths = {"dense": sc.dense_config, "llama_moe": sc.llama_moe_config, "mla_moe": sc.moe_config}
    cfgs = {}
    for name, path in paths.items():
        try:
            cfgs[name] = ModelConfig.from_json(path)
        except ConfigError as e:
            raise ValueError(f"{name} model config {path}: {e}") from None
    if cfgs["dense"].is_moe or not (cfgs["llama_moe"].is_moe and cfgs["mla_moe"].is_moe):
        raise ValueError("expected a dense model as dense_config and MoE models as llama_moe_config and moe_config")
    if cfgs["llama_moe"].is_mla or cfgs["dense"].is_mla or not cfgs["mla_moe"].is_mla:
        raise ValueError("expected GQA attention in dense_config and llama_moe_config, MLA in moe_config")
    tokens_per_step = sc.batch_size * sc.seq_len
    facts = {n: model_facts(c, sc.seq_len) for n, c in cfgs.items()}
    full = sc.dense_steps * facts["dense"]["train_flops_per_token"] * tokens_per_step
    runs = {}  # seed-major: an interrupted sweep has whole seeds done (rerun with --seeds N to report them)
    for seed in range(sc.seeds):
        for name in MODELS:
            for b in sc.budgets:
                steps = steps_for_budget(b * full, facts[name]["train_flops_per_token"], tokens_per_step)
                runs[(name, b, seed)] = experiment_run(
                    sc, model_config=paths[name], data=sc.data, out=Path(sc.out) / f"{name}-b{b:g}-s{seed}",
                    seed=seed, steps=steps, warmup_steps=round(sc.warmup_fraction * steps))
    return {"runs": runs, "facts": facts, "budget": full}


def compute_experiment(sc: SweepConfig) -> dict:
    """Train (or reuse) every run of the sweep, then write compute.{json,md,png}; returns the result."""
    sc.validate()
    plan = train_configs(sc)
    out = Path(sc.out)
    wall = run_many(plan["runs"], progress=sc.progress, workers=sc.workers, desc="compute")
    finals: dict[str, dict[float, list[tuple[float, float]]]] = {}
    curves: dict[str, list[list[tuple[float, float]]]] = {}
    for (name, b, seed), tcfg in sorted(plan["runs"].items()):
        c = curve_of(tcfg.out)
        flops, _, loss = c[-1]
        finals.setdefault(name, {}).setdefault(b, []).append((flops, loss))
        curves.setdefault(name, []).append([(f, v) for f, _, v in c])
    result = summarize(finals)
    result.update(config={**asdict(sc), "budgets": list(sc.budgets)}, facts=plan["facts"], budget=plan["budget"],
                  wall_s=wall, curves=curves)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compute.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "compute.md", markdown(result))
    plot(result, curves, out / "compute.png")
    return result
