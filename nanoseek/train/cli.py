"""`nanoseek train` and `nanoseek plot`.

    nanoseek train --model-config configs/default.json --data runs/data --out runs/default
    nanoseek train --out runs/default --resume                   # continue where it stopped
    nanoseek train --out runs/default --resume --max-steps 4000  # ... and train longer
    nanoseek plot runs/default runs/other --out curves.png

Every flag of `train` is a TrainConfig field (nanoseek/train/config.py); the run folder records
them in train_config.json.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from nanoseek.train.config import add_arguments

    p = subparsers.add_parser("train", help="train a model (one process, or many under torchrun)",
                              description="Train a nanoseek model from a `nanoseek data prepare` folder. "
                                          "Flags map one to one onto TrainConfig.")
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    q = subparsers.add_parser("plot", help="PNG curves of one or more runs",
                              description="Plot train/val loss, learning rate and expert load from "
                                          "RUN_DIR/metrics.jsonl.")
    q.add_argument("runs", nargs="+", metavar="RUN_DIR")
    q.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png for one run, "
                                               "./curves.png for several)")
    q.add_argument("--x", choices=("step", "tokens", "flops"), default="step", help="x axis (default: step)")
    q.set_defaults(func=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    from nanoseek.train.config import from_args
    from nanoseek.train.loop import train

    summary = train(from_args(args))
    val = summary["val_loss"]
    if summary["is_main"] and summary["loss"] is None:
        print(f"{summary['run']} is already at step {summary['step']} (max_steps); nothing to do", file=sys.stderr)
    elif summary["is_main"]:
        print(f"step {summary['step']}: train loss {summary['loss']:.4f}"
              + (f", val loss {val:.4f}" if val is not None else "")
              + (f"; checkpoint {summary['checkpoint']}" if summary["checkpoint"] else ""), file=sys.stderr)
    if summary["interrupted"]:
        return 130 if summary["interrupted"] == "SIGINT" else 143
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from nanoseek.train.plot import plot_runs

    path = plot_runs(args.runs, args.out, x=args.x)
    print(path)
    return 0
