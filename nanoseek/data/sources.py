"""Readers: turn input paths into a stream of documents, one at a time, in constant memory.

    for item in iter_documents(["corpus/", "notes.txt", "web.jsonl", "books.parquet"]):
        if isinstance(item, Skipped):
            print(item.doc_id, item.reason)      # missing, unreadable, binary, invalid_utf8, ...
        else:
            use(item.doc_id, item.text)

Inputs: a directory (walked recursively, sorted, dot-folders and __pycache__ skipped; every file is
a document, except .jsonl and .parquet files which hold one document per record), a text/code
file, a `.jsonl` file (field `text_field` of each line) or a `.parquet` file (column `text_field`).
With no inputs, `default_corpus()` is the source of the running Python's standard library.

A bad input never raises: it comes out as a `Skipped` with a reason and its size in bytes, so the
caller can count it. `split_of(doc_id, val_fraction)` assigns train/val by a hash of the id.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RECORD_SUFFIXES = (".jsonl", ".parquet")
SNIFF_BYTES = 8192  # a NUL byte this early means a binary file, as git and grep decide


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across machines: path relative to its input root (+ ":record")
    text: str
    nbytes: int  # UTF-8 size, for the byte counts of the report


@dataclass(frozen=True)
class Skipped:
    doc_id: str
    reason: str
    nbytes: int = 0
    detail: str = ""


Item = Document | Skipped


def default_corpus_root() -> Path:
    """The running Python's standard library folder (Lib/), present on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """Every `.py` file of the standard library (its tests included), not site-packages."""
    root = default_corpus_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _ignored_dir(d) and d != "site-packages")
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def default_corpus() -> Iterator[Item]:
    root = default_corpus_root()
    for path in default_corpus_files():
        yield _read_text_file(path, "stdlib/" + path.relative_to(root).as_posix())


def _ignored_dir(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def decode_bytes(raw: bytes) -> str | None:
    """UTF-8 text, or None when `raw` is not valid UTF-8. A leading BOM is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text[1:] if text.startswith("\ufeff") else text


def looks_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:SNIFF_BYTES]


def classify_bytes(raw: bytes) -> str | None:
    """The reason a file's bytes are not a text document, or None when they are."""
    if not raw.strip():
        return "empty"
    if looks_binary(raw):
        return "binary"
    if decode_bytes(raw) is None:
        return "invalid_utf8"
    return None


def _read_text_file(path: Path, doc_id: str) -> Item:
    try:
        raw = path.read_bytes()
    except OSError as e:
        return Skipped(doc_id, "unreadable", 0, f"{path}: {e.strerror or e}")
    reason = classify_bytes(raw)
    if reason is not None:
        return Skipped(doc_id, reason, len(raw), str(path))
    return Document(doc_id, decode_bytes(raw), len(raw))


def _read_jsonl(path: Path, doc_id: str, text_field: str) -> Iterator[Item]:
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Skipped(doc_id, "unreadable", 0, f"{path}: {e.strerror or e}")
        return
    with f:
        for lineno, line in enumerate(f, 1):
            rid = f"{doc_id}:{lineno}"
            if not line.strip():
                continue
            text = decode_bytes(line)
            if text is None:
                yield Skipped(rid, "invalid_utf8", len(line), f"{path} line {lineno}")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield Skipped(rid, "bad_json", len(line), f"{path} line {lineno}: {e.msg}")
                continue
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                yield Skipped(rid, "no_text_field", len(line),
                              f"{path} line {lineno}: no string field {text_field!r}")
            elif not value.strip():
                yield Skipped(rid, "empty", len(line))
            else:
                yield Document(rid, value, len(value.encode("utf-8")))


def _read_parquet(path: Path, doc_id: str, text_field: str, batch_rows: int = 1024) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        yield Skipped(doc_id, "unreadable", _size(path), f"{path}: {e}")
        return
    if text_field not in pf.schema_arrow.names:
        yield Skipped(doc_id, "no_text_field", _size(path),
                      f"{path}: no column {text_field!r}; columns are {pf.schema_arrow.names}")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                rid = f"{doc_id}:{row}"
                row += 1
                if not isinstance(value, str) or not value.strip():
                    yield Skipped(rid, "empty", 0)
                else:
                    yield Document(rid, value, len(value.encode("utf-8")))
    except Exception as e:
        yield Skipped(f"{doc_id}:{row}", "unreadable", 0, f"{path} after row {row}: {e}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_file(path: Path, doc_id: str, text_field: str) -> Iterator[Item]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, doc_id, text_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, doc_id, text_field)
    else:
        yield _read_text_file(path, doc_id)


def input_files(inputs: list[str | os.PathLike]) -> Iterator[tuple[Path, str] | Skipped]:
    """(path, doc_id) of every file under `inputs`, in a deterministic order; missing paths as Skipped."""
    for inp in inputs:
        root = Path(inp)
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not _ignored_dir(d))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    yield path, root.name + "/" + path.relative_to(root).as_posix()
        elif root.exists():
            yield root, root.name
        else:
            yield Skipped(str(inp), "missing", 0, f"{inp}: no such file or directory")


def iter_documents(inputs: list[str | os.PathLike] | None, text_field: str = "text") -> Iterator[Item]:
    """Every document of `inputs` (the default corpus when None or empty), skipped ones included."""
    if not inputs:
        yield from default_corpus()
        return
    for entry in input_files(inputs):
        if isinstance(entry, Skipped):
            yield entry
        else:
            yield from _read_file(entry[0], entry[1], text_field)


def total_input_bytes(inputs: list[str | os.PathLike] | None) -> int:
    """Bytes on disk under `inputs`: the total of the reading progress bar."""
    paths = default_corpus_files() if not inputs else [e[0] for e in input_files(inputs)
                                                      if not isinstance(e, Skipped)]
    return sum(_size(p) for p in paths)


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a fixed `val_fraction` of ids, chosen by hash: the same on every run and machine."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h / 2**64 < val_fraction else "train"
