"""The `nanoseek` command line: argparse subcommands, each a thin call into a package function.

    nanoseek info configs/deepseek-v2.json
    nanoseek --help

Each module listed in COMMAND_MODULES has `register(subparsers)`, which adds its subcommand(s)
and sets `func` on them. Modules keep heavy imports (torch, fastapi) inside their functions so
that `nanoseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = [
    "nanoseek.engine.cli",
    "nanoseek.data.cli",
    "nanoseek.serve.keys_cli",
    "nanoseek.serve.cli",
    "nanoseek.info",
    "nanoseek.model.quant_cli",
    "nanoseek.train.cli",
    "nanoseek.train.compare_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="MLA + DeepSeekMoE end to end: data, training, inference engine, cost-plus API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("NANOSEEK_DEBUG"):
            raise
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
