"""`nanoseek compare`: how much compute and data MLA+MoE and curation save (see compare.py, sweep.py,
data_experiment.py).

    nanoseek compare --data runs/data --out runs/compare                        # one budget, one seed
    nanoseek compare --experiment compute --data runs/data --out runs/compare   # the budget sweep, 3 seeds
    nanoseek compare --experiment all --workers 2 --threads 1 --data runs/data --out runs/compare  # 2 cores
    nanoseek compare --experiment data --data runs/data --out runs/compare      # raw vs curated site-packages
    nanoseek compare --experiment all --quick --out runs/compare-quick          # both, smoke-test size

Without --experiment: dense vs MLA+MoE at one FLOP budget, one seed (compare.json/md/png, dense/,
mla_moe/). With it: OUT/compute/compute.{json,md,png} and OUT/data/data.{json,md,png}. Every form
reuses finished runs and resumes interrupted ones when rerun with the same settings. Flags given
explicitly (e.g. --dense-steps, --batch-size, --lr, --threads) override the experiment's own
defaults; --quick shrinks everything to a smoke test (minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

HELP = {
    "data": "data dir written by `nanoseek data prepare` (the experiments' clean val set and tokenizer)",
    "out": "run folder for the runs, tables and plots",
    "dense_config": "the dense (Llama) model config",
    "moe_config": "the MLA+MoE model config (match its active parameters to the dense one's)",
    "flop_budget": "training FLOPs per model; 0: what --dense-steps steps of the dense model cost",
    "dense_steps": "steps of the dense model that set the (full) budget",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "lr": "peak learning rate (warmup + cosine to 10%%)",
    "warmup_steps": "linear warmup steps",
    "evals": "validations per run",
    "eval_batches": "validation batches per validation",
    "seed": "seed of the weights and the data order (the same for both models)",
    "threads": "torch CPU threads; 0: torch's default",
    "peak_flops": "peak FLOP/s for the MFU column of the metrics; 0: measure the fp32 matmul rate",
    "progress": "progress bars",
}
# CompareConfig fields that mean the same in the experiments' configs
SHARED = ("data", "dense_config", "moe_config", "dense_steps", "batch_size", "seq_len", "lr", "evals",
          "eval_batches", "threads", "peak_flops", "progress")


def register(subparsers) -> None:
    from nanoseek.train.compare import CompareConfig

    p = subparsers.add_parser("compare", help="compute and data efficiency: dense vs MoE vs MLA+MoE, raw vs "
                                              "curated data; tables + plots",
                              description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(CompareConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{HELP[f.name]} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_)
    x = p.add_argument_group("experiments")
    x.add_argument("--experiment", choices=("compute", "data", "all"), default=None,
                   help="compute: FLOP-budget sweep of dense, Llama+MoE and MLA+MoE with seeds; data: raw vs "
                        "curated site-packages code; all: both (default: the one-budget comparison)")
    x.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes, not an hour)")
    x.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3; --quick: 2)")
    x.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in its own process with cpu_count / workers threads unless "
                        "--threads says (default 1; on 2 cores, --workers 2 --threads 1 is the fastest layout)")
    x.add_argument("--llama-moe-config", default=None, help="the GQA + MoE model config "
                                                            "(default configs/compare-llama-moe.json)")
    x.add_argument("--corpus", default=None, help="the raw corpus folder (default: this Python's site-packages)")
    x.add_argument("--corpus-mb", type=float, default=None, help="MB of the raw corpus to sample (default 24)")
    x.add_argument("--data-steps", type=int, default=None, help="steps per data-experiment run (default 96)")
    p.set_defaults(func=run)


def quick_sweep(sc):
    return dataclasses.replace(sc, budgets=(0.5, 1.0), seeds=2, dense_steps=24, batch_size=4, seq_len=128, evals=2,
                               eval_batches=2)


def quick_data(dc):
    return dataclasses.replace(dc, corpus_mb=2.0, steps=24, seeds=2, batch_size=4, seq_len=128, evals=2,
                               eval_batches=2)


def experiment_configs(args: argparse.Namespace) -> dict:
    """{"compute": SweepConfig, "data": DataExperimentConfig} as the flags ask (only those run)."""
    from nanoseek.train.data_experiment import DataExperimentConfig
    from nanoseek.train.sweep import SweepConfig

    out = Path(getattr(args, "out", "runs/compare"))
    shared = {k: getattr(args, k) for k in SHARED if hasattr(args, k)}
    cfgs = {}
    if args.experiment in ("compute", "all"):
        sc = SweepConfig(out=str(out / "compute"))
        sc = quick_sweep(sc) if args.quick else sc
        extra = {"seeds": args.seeds, "llama_moe_config": args.llama_moe_config, "workers": args.workers}
        cfgs["compute"] = dataclasses.replace(sc, **shared, **{k: v for k, v in extra.items() if v is not None})
    if args.experiment in ("data", "all"):
        dc = DataExperimentConfig(out=str(out / "data"))
        dc = quick_data(dc) if args.quick else dc
        given = {k: v for k, v in shared.items() if k not in ("dense_config", "moe_config", "dense_steps")}
        if "moe_config" in shared:
            given["model_config"] = shared["moe_config"]
        extra = {"seeds": args.seeds, "corpus": args.corpus, "corpus_mb": args.corpus_mb, "steps": args.data_steps,
                 "workers": args.workers}
        cfgs["data"] = dataclasses.replace(dc, **given, **{k: v for k, v in extra.items() if v is not None})
    return cfgs


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.compare import CompareConfig, compare, markdown

    if args.experiment is None:
        cc = CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)
                              if hasattr(args, f.name)})
        summary = compare(cc)
        print(markdown(summary), end="")
        print(f"wrote {cc.out}/compare.json, compare.md, compare.png")
        return 0
    cfgs = experiment_configs(args)
    if "compute" in cfgs:
        from nanoseek.train import sweep

        result = sweep.compute_experiment(cfgs["compute"])
        print(sweep.markdown(result), end="")
        print(f"wrote {cfgs['compute'].out}/compute.json, compute.md, compute.png")
    if "data" in cfgs:
        from nanoseek.train import data_experiment

        result = data_experiment.data_experiment(cfgs["data"])
        print(data_experiment.markdown(result), end="")
        print(f"wrote {cfgs['data'].out}/data.json, data.md, data.png")
    return 0
