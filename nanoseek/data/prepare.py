"""The data pipeline end to end: read → curate → train a tokenizer → tokenize → pack into shards.

    from nanoseek.data.prepare import prepare
    report = prepare(None, "runs/data")                 # the Python standard library, 8k vocab
    report = prepare(["docs/", "web.jsonl"], "out", vocab_size=16384, val_fraction=0.01)
    report["curation"]["kept"]                          # {"docs": ..., "bytes": ...}
    meta = ensure_prepared("runs/data")                 # `make run`: build the default corpus once

Memory stays flat whatever the corpus size: documents stream through a bounded window of worker
tasks, kept ones are staged on disk (out_dir/.staging, removed at the end) for the tokenizer and
the tokenization passes, and only hashes (exact dedup) and MinHash signatures (LSH) stay in memory.
Curation and tokenization run in `workers` processes; the keep/drop decisions are taken in input
order in this process, so the output does not depend on the number of workers.

Atomicity: meta.json is removed first and written last (see nanoseek.data.shards), shards are
renamed from .tmp names only once complete, so an interrupted run leaves no dataset that a loader
accepts. Also written: report.json (what `report` returns) and the tokenizer files.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import shutil
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nanoseek.data import curate, sources
from nanoseek.data.curate import CurationConfig, CurationReport
from nanoseek.data.shards import META, SPLITS, ShardWriter, token_dtype, write_meta
from nanoseek.io import atomic_write

STAGING = ".staging"
_LEN = struct.Struct("<Q")


class PrepareError(ValueError):
    """Nothing usable to build a dataset from (every input missing, empty or filtered out)."""


# ---------------------------------------------------------------------- staging files
def write_staged(f, text: str) -> None:
    raw = text.encode("utf-8")
    f.write(_LEN.pack(len(raw)))
    f.write(raw)


def iter_staged(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        while head := f.read(_LEN.size):
            yield f.read(_LEN.unpack(head)[0]).decode("utf-8")


# ---------------------------------------------------------------------- worker tasks
def _analyze_batch(texts: list[str], cfg: CurationConfig) -> list:
    return [curate.analyze(t, cfg) for t in texts]


_WORKER_TOKENIZER = None


def _init_tokenizer_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    import tokenizers

    _WORKER_TOKENIZER = tokenizers.Tokenizer.from_str(tokenizer_json)


def _tokenize_batch(texts: list[str], eos_id: int, dtype: str) -> np.ndarray:
    """Token ids of `texts` back to back, each document followed by EOS."""
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we would throw away
    encode = getattr(_WORKER_TOKENIZER, "encode_batch_fast", _WORKER_TOKENIZER.encode_batch)
    out = []
    for enc in encode(texts, add_special_tokens=False):
        out.append(np.asarray(enc.ids, dtype=dtype))
        out.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(out) if out else np.empty(0, dtype=dtype)


class _Executor:
    """Ordered map with at most `window` tasks in flight: in-process when workers <= 1."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.pool = None
        self.window = 4 * max(workers, 1)
        if workers > 1:
            # tokenizers disables its threads in a forked child, with a warning unless told to
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self.pool = mp.get_context("fork").Pool(workers, initializer, initargs)
            finally:
                if saved is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        elif initializer is not None:
            initializer(*initargs)

    def map(self, fn: Callable, tasks: Iterator[tuple], extra: tuple = ()) -> Iterator[tuple]:
        """Yields (task, fn(*task[0:1], *extra)) in task order; task[0] is the argument, the rest rides along."""
        if self.pool is None:
            for task in tasks:
                yield task, fn(task[0], *extra)
            return
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append((task, self.pool.apply_async(fn, (task[0], *extra))))
            if len(pending) >= self.window:
                t, r = pending.popleft()
                yield t, r.get()
        while pending:
            t, r = pending.popleft()
            yield t, r.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _batches(items: Iterator, on_skip: Callable, max_docs: int = 64, max_bytes: int = 1 << 20):
    """Groups Documents into ([texts], [docs]) batches; Skipped items go to on_skip as they pass."""
    texts, docs, size = [], [], 0
    for item in items:
        if isinstance(item, sources.Skipped):
            on_skip(item)
            continue
        texts.append(item.text)
        docs.append(item)
        size += item.nbytes
        if len(docs) >= max_docs or size >= max_bytes:
            yield texts, docs
            texts, docs, size = [], [], 0
    if docs:
        yield texts, docs


def _bar(progress: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                disable=not progress, dynamic_ncols=True, smoothing=0.1)


def _stage(report: dict, name: str, seconds: float, nbytes: int, docs: int) -> None:
    report["stages"][name] = {"seconds": round(seconds, 3), "MB": round(nbytes / 1e6, 3), "docs": docs,
                              "MB_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 2)}


# ---------------------------------------------------------------------- the pipeline
def prepare(inputs: list[str] | None, out_dir: str | os.PathLike, vocab_size: int = 8192, *,
            text_field: str = "text", val_fraction: float = 0.01, curation: CurationConfig | None = None,
            tokenizer: str | os.PathLike | None = None, tokenizer_train_bytes: int | None = None,
            shard_tokens: int = 1 << 24, workers: int | None = None, progress: bool = True) -> dict:
    """Build a data dir from `inputs` (None: the standard library); returns the report (also report.json).

    tokenizer: use this tokenizer (folder or tokenizer.json) instead of training one.
    tokenizer_train_bytes: train the tokenizer on at most this many bytes of the train split.
    """
    cfg = curation or CurationConfig()
    sources.split_of("", val_fraction)  # validates val_fraction before any work
    workers = (os.cpu_count() or 1) if workers is None else workers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # the old dataset stops being whole from here on
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    t_start = time.perf_counter()
    report: dict = {"inputs": [str(i) for i in inputs] if inputs else ["<python stdlib>"],
                    "out_dir": str(out), "curation_config": asdict(cfg), "stages": {}}
    writers: list[ShardWriter] = []
    try:
        staged = _read_and_curate(inputs, text_field, cfg, val_fraction, staging, workers, progress, report)
        tok = _get_tokenizer(tokenizer, vocab_size, tokenizer_train_bytes, staging, staged, out, progress, report)
        dtype = token_dtype(tok.vocab_size)
        writers = [ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS]
        _tokenize_and_pack(tok, writers, staging, staged, workers, progress, report)
        splits = {w.split: {**w.finish(), "bytes": staged[w.split]["bytes"]} for w in writers}
        writers = []
        _remove_stale_shards(out, splits)
        report["splits"] = {s: {"docs": e["docs"], "tokens": e["tokens"], "bytes": e["bytes"],
                                "shards": len(e["shards"])} for s, e in splits.items()}
        report["total_seconds"] = round(time.perf_counter() - t_start, 3)
        _write_report(out, report)
        write_meta(out, {  # last: from here on the dataset is whole
            "dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "tokenizer": "tokenizer.json", "val_fraction": val_fraction,
            "inputs": report["inputs"], "splits": splits})
        return report
    finally:
        for w in writers:
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)


def _read_and_curate(inputs, text_field: str, cfg: CurationConfig, val_fraction: float, staging: Path,
                     workers: int, progress: bool, report: dict) -> dict:
    """Stage 1: decide keep/drop per document in input order; kept ones go to staging/<split>.docs."""
    cur = CurationReport()
    skipped_examples: list[str] = []
    staged = {s: {"docs": 0, "bytes": 0} for s in SPLITS}
    files = {s: open(staging / f"{s}.docs", "wb") for s in SPLITS}
    exact = curate.ExactDedup() if cfg.exact_dedup else None
    near = curate.NearDedup(cfg) if cfg.near_dedup else None
    t0 = time.perf_counter()
    bar = _bar(progress, sources.total_input_bytes(inputs), "read+curate")

    def on_skip(item: sources.Skipped) -> None:
        cur.add(item.reason, item.nbytes)
        bar.update(item.nbytes)
        if len(skipped_examples) < 20:
            skipped_examples.append(f"{item.reason}: {item.detail or item.doc_id}")

    ex = _Executor(workers)
    try:
        tasks = _batches(sources.iter_documents(inputs, text_field), on_skip)
        for (_, docs), results in ex.map(_analyze_batch, tasks, (cfg,)):
            for doc, (reason, key, sig) in zip(docs, results):
                if reason is None and exact is not None:
                    reason = exact.check(key)
                if reason is None and near is not None:
                    reason = near.check(doc.doc_id, sig)
                if reason is None:
                    split = sources.split_of(doc.doc_id, val_fraction)
                    write_staged(files[split], doc.text)
                    staged[split]["docs"] += 1
                    staged[split]["bytes"] += doc.nbytes
                cur.add(reason or "kept", doc.nbytes)
                bar.update(doc.nbytes)
            bar.set_postfix(docs=cur.total_docs, kept=cur.docs.get("kept", 0),
                            docs_per_s=f"{cur.total_docs / max(time.perf_counter() - t0, 1e-9):.0f}",
                            refresh=False)
    finally:
        ex.close()
        bar.close()
        for f in files.values():
            f.close()
    _stage(report, "read_curate", time.perf_counter() - t0, cur.total_bytes, cur.total_docs)
    report["curation"] = cur.to_dict()
    report["skipped_examples"] = skipped_examples
    if staged["train"]["docs"] == 0:
        dropped = ", ".join(f"{k}={v['docs']}" for k, v in cur.to_dict().items() if k != "kept")
        raise PrepareError(f"nothing usable remains in {report['inputs']}: {cur.total_docs} documents read, "
                           f"{staged['val']['docs']} kept for val, 0 for train (dropped: {dropped or 'none'})")
    return staged


def _get_tokenizer(tokenizer, vocab_size: int, train_bytes: int | None, staging: Path, staged: dict,
                   out: Path, progress: bool, report: dict):
    """Stage 2: load the given tokenizer, or train one on the staged train split; saved into `out`."""
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer

    t0 = time.perf_counter()
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok.save(out)
        report["tokenizer"] = {"source": str(tokenizer), "trained": False}
        used = 0
    else:
        bar = _bar(progress, train_bytes or staged["train"]["bytes"], "tokenizer")
        seen = [0]  # not bar.n: a disabled bar counts nothing

        def train_texts() -> Iterator[str]:
            for text in iter_staged(staging / "train.docs"):
                if train_bytes is not None and seen[0] >= train_bytes:
                    return
                n = len(text.encode("utf-8"))
                seen[0] += n
                bar.update(n)
                yield text

        with bar:
            tok = train_tokenizer(train_texts(), vocab_size, out)
        used = seen[0]
        report["tokenizer"] = {"source": "trained", "trained": True, "train_bytes": used}
    report["tokenizer"]["vocab_size"] = tok.vocab_size
    if tok.eos_id is None:
        raise PrepareError(f"tokenizer {tokenizer} has no EOS token to separate documents with")
    _stage(report, "tokenizer", time.perf_counter() - t0, used, 0)
    return tok


def _tokenize_and_pack(tok, writers: list[ShardWriter], staging: Path, staged: dict, workers: int,
                       progress: bool, report: dict) -> None:
    """Stage 3: tokenize the staged documents in worker processes, append them (EOS after each) to shards."""
    t0 = time.perf_counter()
    total_bytes = sum(e["bytes"] for e in staged.values())
    bar = _bar(progress, total_bytes, "tokenize")
    ex = _Executor(workers, _init_tokenizer_worker, (tok.tok.to_str(),))
    try:
        for w in writers:
            docs_in = (sources.Document(w.split, t, len(t.encode("utf-8")))
                       for t in iter_staged(staging / f"{w.split}.docs"))
            for (_, docs), ids in ex.map(_tokenize_batch, _batches(docs_in, on_skip=None),
                                         (tok.eos_id, w.dtype.str)):
                w.add(ids, docs=len(docs))
                bar.update(sum(d.nbytes for d in docs))
                done = sum(x.docs for x in writers)
                bar.set_postfix(docs=done, tokens=sum(x.tokens for x in writers),
                                docs_per_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
    finally:
        ex.close()
        bar.close()
    _stage(report, "tokenize_pack", time.perf_counter() - t0, total_bytes,
           sum(e["docs"] for e in staged.values()))


def ensure_prepared(out_dir: str | os.PathLike = "runs/data", inputs: list[str] | None = None, **kw) -> dict:
    """meta.json of `out_dir`, running `prepare(inputs, out_dir, **kw)` first unless it is whole already."""
    from nanoseek.data.shards import ShardError, read_meta

    try:
        return read_meta(out_dir)
    except ShardError:
        prepare(inputs, out_dir, **kw)
        return read_meta(out_dir)


def _remove_stale_shards(out: Path, splits: dict) -> None:
    """Shards of an earlier, larger prepare into the same dir: not listed, so only clutter."""
    listed = {s["file"] for e in splits.values() for s in e["shards"]}
    for split in SPLITS:
        for f in out.glob(f"{split}_*.bin"):
            if f.name not in listed:
                f.unlink()


def _write_report(out: Path, report: dict) -> None:
    import json

    atomic_write(out / "report.json", json.dumps(report, indent=2) + "\n")


def format_report(report: dict) -> str:
    """The printed summary: the curation table, then splits and stage speeds."""
    cur = CurationReport()
    for k, v in report["curation"].items():
        cur.docs[k], cur.nbytes[k] = v["docs"], v["bytes"]
    lines = [cur.table(), ""]
    for split, e in report.get("splits", {}).items():
        lines.append(f"{split:<6} {e['docs']:>8} docs {e['bytes'] / 1e6:>9.2f} MB {e['tokens']:>12,} tokens"
                     f" in {e['shards']} shard(s)")
    for name, s in report["stages"].items():
        lines.append(f"{name:<14} {s['seconds']:>8.2f} s {s['MB']:>9.2f} MB {s['MB_per_s']:>8.2f} MB/s")
    if "total_seconds" in report:
        lines.append(f"{'total':<14} {report['total_seconds']:>8.2f} s")
    return "\n".join(lines)
