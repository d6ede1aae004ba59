"""Benchmark: the default corpus (Python stdlib source) end to end, MB/s per stage.

    .venv/bin/python bench/data.py                      # all cores, 8k vocab, into a temp dir
    .venv/bin/python bench/data.py --workers 1 --out runs/bench-data --keep

Stages: read + curate (quality filters, exact and MinHash near dedup), tokenizer training,
tokenize + pack; then the loader's batches/s. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.data.prepare import format_report, prepare  # noqa: E402
from nanoseek.data.shards import ShardLoader  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default=None, help="data dir (default: a temp dir, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep --out after the run")
    ap.add_argument("--loader-batches", type=int, default=200, help="batches to time the loader on")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="nanoseek-bench-data-"))
    load_before = os.getloadavg()[0]  # the CPU is shared: a busy machine stretches every stage
    try:
        t0 = time.perf_counter()
        report = prepare(None, out, args.vocab_size, workers=args.workers, progress=True)
        wall = time.perf_counter() - t0
        loader = ShardLoader(out, batch_size=16, seq_len=512)
        t1 = time.perf_counter()
        for _ in range(args.loader_batches):
            next(loader)
        loader_s = time.perf_counter() - t1
    finally:
        if not args.keep or args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    print(format_report(report))
    workers = args.workers or os.cpu_count()
    print(f"\n{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, "
          f"workers={workers}, vocab={report['tokenizer']['vocab_size']}\n")
    print("| stage | seconds | MB in | MB/s |")
    print("|---|---:|---:|---:|")
    for name, s in report["stages"].items():
        print(f"| {name} | {s['seconds']:.1f} | {s['MB']:.1f} | {s['MB_per_s']:.1f} |")
    print(f"| **end to end** | **{wall:.1f}** | {report['stages']['read_curate']['MB']:.1f} | "
          f"{report['stages']['read_curate']['MB'] / wall:.1f} |")
    tokens = report["splits"]["train"]["tokens"] + report["splits"]["val"]["tokens"]
    print(f"\ntokens: {tokens:,} ({report['splits']['train']['tokens']:,} train), "
          f"kept {report['curation']['kept']['docs']} of "
          f"{sum(v['docs'] for v in report['curation'].values())} docs; "
          f"loader: {args.loader_batches / loader_s:.0f} batches/s of 16x512")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MB main process, {peak_child:.0f} MB largest worker")
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"CPU time: {own.ru_utime + own.ru_stime:.1f} s main process (incl. tokenizers threads), "
          f"{kids.ru_utime + kids.ru_stime:.1f} s workers; load average before the run: {load_before:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
