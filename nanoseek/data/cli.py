"""`nanoseek data prepare` and `nanoseek tokenizer train`.

    nanoseek data prepare                                  # Python stdlib → runs/data
    nanoseek data prepare --if-missing                     # no-op when runs/data is whole
    nanoseek data prepare --input corpus/ web.jsonl --out runs/web --vocab-size 16384
    nanoseek tokenizer train --input corpus/ --out runs/tok --vocab-size 8192
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build curated, tokenized training shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    p = data_sub.add_parser(
        "prepare", help="read → curate → train tokenizer → tokenize → pack",
        description="Turn folders of text/code, .txt, .jsonl and .parquet files (default: the Python "
                    "standard library) into deduplicated, tokenized shards with a curation report.")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", metavar="PATH", default=None,
                    help="files or folders (default: the running Python's standard library)")
    io.add_argument("--out", default="runs/data", help="output data dir (default: %(default)s)")
    io.add_argument("--text-field", default="text", help="field of .jsonl / column of .parquet records")
    io.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    io.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary incl. special tokens")
    tk.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="use this tokenizer (folder or tokenizer.json) instead of training one")
    tk.add_argument("--tokenizer-train-mb", type=float, default=None,
                    help="train the tokenizer on at most this many MB of the train split")
    cu = p.add_argument_group("curation")
    cu.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
    cu.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    cu.add_argument("--no-exact-dedup", action="store_true", help="skip exact-duplicate removal")
    cu.add_argument("--min-chars", type=int, default=64, help="drop documents with fewer non-blank chars")
    cu.add_argument("--max-line-chars", type=int, default=1000, help="drop documents with a longer line")
    cu.add_argument("--min-alnum-fraction", type=float, default=0.25, help="drop documents below it")
    cu.add_argument("--max-dup-line-fraction", type=float, default=0.5,
                    help="drop documents whose repeated lines exceed this share of characters")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--if-missing", action="store_true",
                     help="do nothing when --out already holds a finished dataset (for `make run`)")
    p.set_defaults(func=cmd_prepare)

    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tok_sub.required = True
    t = tok_sub.add_parser("train", help="train a byte-level BPE with special and chat tokens",
                           description="Train on files or folders (default: the Python standard "
                                       "library); writes tokenizer.json + tokenizer_config.json.")
    t.add_argument("--input", nargs="+", metavar="PATH", default=None, help="files or folders")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary incl. special tokens")
    t.add_argument("--text-field", default="text", help="field of .jsonl / column of .parquet records")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_prepare(args: argparse.Namespace) -> int:
    from nanoseek.data.curate import CurationConfig
    from nanoseek.data.prepare import PrepareError, format_report, prepare
    from nanoseek.data.shards import ShardError, read_meta
    from nanoseek.data.tokenizer import TokenizerError

    if args.if_missing:
        try:
            meta = read_meta(args.out)
            print(f"{args.out} is already prepared: " + ", ".join(
                f"{s} {e['tokens']:,} tokens" for s, e in meta["splits"].items()))
            return 0
        except ShardError:
            pass
    try:
        cfg = CurationConfig(
            min_chars=args.min_chars, max_line_chars=args.max_line_chars,
            min_alnum_fraction=args.min_alnum_fraction, max_dup_line_fraction=args.max_dup_line_fraction,
            exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
            near_dup_threshold=args.near_dup_threshold)
        train_bytes = None if args.tokenizer_train_mb is None else int(args.tokenizer_train_mb * 1e6)
        report = prepare(args.input, args.out, args.vocab_size, text_field=args.text_field,
                         val_fraction=args.val_fraction, curation=cfg, tokenizer=args.tokenizer,
                         tokenizer_train_bytes=train_bytes, shard_tokens=args.shard_tokens,
                         workers=args.workers, progress=not args.no_progress)
    except (PrepareError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"nanoseek data prepare: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {args.out}/meta.json, shards, tokenizer and report.json")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nanoseek.data.sources import Skipped, iter_documents
    from nanoseek.data.tokenizer import TokenizerError, train_tokenizer

    skipped: dict[str, int] = {}
    used = [0]

    def texts():
        for item in tqdm(iter_documents(args.input, args.text_field), desc="documents", unit="doc",
                         disable=args.no_progress):
            if isinstance(item, Skipped):
                skipped[item.reason] = skipped.get(item.reason, 0) + 1
            else:
                used[0] += 1
                yield item.text

    try:
        tok = train_tokenizer(texts(), args.vocab_size, args.out)
    except (TokenizerError, ValueError) as e:
        if used[0] == 0:
            e = f"no usable documents in {args.input or 'the standard library'} (skipped: {skipped or 'none'})"
        print(f"nanoseek tokenizer train: error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    sample = "def hello():\n    return '世界'"
    print(f"vocab_size={tok.vocab_size} bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id} "
          f"fim={tok.fim_prefix_id},{tok.fim_suffix_id},{tok.fim_middle_id}")
    print(f"{sample!r} → {len(tok.encode(sample))} tokens; wrote {args.out}/tokenizer.json")
    return 0
