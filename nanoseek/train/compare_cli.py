"""`nanoseek compare`: dense Llama vs MLA+MoE at equal training FLOPs (see nanoseek/train/compare.py).

    nanoseek compare --data runs/data --out runs/compare
    nanoseek compare --dense-steps 100 --out runs/compare-short     # a smaller budget

Prints the Markdown table; the run folder gets compare.json, compare.md, compare.png and the two
training runs (dense/, mla_moe/). Rerunning with the same settings reuses finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses

HELP = {
    "data": "data dir written by `nanoseek data prepare`",
    "out": "run folder for both runs and the table/plot",
    "dense_config": "the dense (Llama) model config",
    "moe_config": "the MLA+MoE model config (match its active parameters to the dense one's)",
    "flop_budget": "training FLOPs per model; 0: what --dense-steps steps of the dense model cost",
    "dense_steps": "steps of the dense model that set the budget when --flop-budget is 0",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "lr": "peak learning rate (warmup + cosine to 10%)",
    "warmup_steps": "linear warmup steps",
    "evals": "validations per run",
    "eval_batches": "validation batches per validation",
    "seed": "seed of the weights and the data order (the same for both models)",
    "threads": "torch CPU threads; 0: torch's default",
    "peak_flops": "peak FLOP/s for the MFU column of the metrics; 0: measure the fp32 matmul rate",
    "progress": "progress bars",
}


def register(subparsers) -> None:
    from nanoseek.train.compare import CompareConfig

    p = subparsers.add_parser("compare", help="dense Llama vs MLA+MoE at equal training FLOPs: table + plot",
                              description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(CompareConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{HELP[f.name]} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default, help=help_)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.compare import CompareConfig, compare, markdown

    cc = CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)})
    summary = compare(cc)
    print(markdown(summary), end="")
    print(f"wrote {cc.out}/compare.json, compare.md, compare.png")
    return 0
