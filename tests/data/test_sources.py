from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from nanoseek.data.sources import (Document, classify_bytes, default_corpus_files, iter_documents,
                                   split_of, total_input_bytes)


def _by_reason(items):
    out = {}
    for it in items:
        key = "doc" if isinstance(it, Document) else it.reason
        out.setdefault(key, []).append(it)
    return out


def test_directory_walk_counts_bad_files_with_reasons(corpus_dir):
    got = _by_reason(iter_documents([corpus_dir]))
    ids = {d.doc_id for d in got["doc"]}
    assert f"{corpus_dir.name}/code/mod_00.py" in ids
    assert not any("/.git/" in i for i in ids)
    assert [s.doc_id.split("/")[-1] for s in got["binary"]] == ["image.png"]
    assert [s.doc_id.split("/")[-1] for s in got["invalid_utf8"]] == ["latin1.txt"]
    assert [s.doc_id.split("/")[-1] for s in got["empty"]] == ["empty.txt"]
    assert [s.doc_id.split("/")[-1] for s in got["unreadable"]] == ["dangling.txt"]
    assert got["binary"][0].nbytes > 0


def test_walk_order_is_deterministic(corpus_dir):
    a = [(i.doc_id, type(i)) for i in iter_documents([corpus_dir])]
    assert a == [(i.doc_id, type(i)) for i in iter_documents([corpus_dir])]


def test_missing_path_is_skipped_not_raised(tmp_path):
    items = list(iter_documents([tmp_path / "nope", tmp_path / "nope.jsonl"]))
    assert [i.reason for i in items] == ["missing", "missing"]
    assert "nope" in items[0].detail


def test_jsonl_field_and_bad_lines(tmp_path):
    f = tmp_path / "web.jsonl"
    lines = [json.dumps({"body": "first document"}), "{not json", json.dumps({"other": 1}),
             json.dumps({"body": "  "}), "", json.dumps({"body": "日本語の文書"})]
    f.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    got = _by_reason(iter_documents([f], text_field="body"))
    assert [d.text for d in got["doc"]] == ["first document", "日本語の文書"]
    assert got["doc"][1].nbytes == len("日本語の文書".encode())
    assert [s.doc_id for s in got["bad_json"]] == ["web.jsonl:2"]
    assert len(got["no_text_field"]) == 1 and "'body'" in got["no_text_field"][0].detail
    assert len(got["empty"]) == 1 and len(got["invalid_utf8"]) == 1


def test_parquet_streams_column_and_names_missing_column(tmp_path):
    f = tmp_path / "books.parquet"
    texts = [f"book number {i} " * 5 for i in range(2500)] + [None, ""]
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), f, row_group_size=700)
    got = _by_reason(iter_documents([f]))
    assert [d.text for d in got["doc"]] == texts[:2500]
    assert got["doc"][7].doc_id == "books.parquet:7"
    assert len(got["empty"]) == 2
    items = list(iter_documents([f], text_field="body"))
    assert len(items) == 1 and items[0].reason == "no_text_field" and "'body'" in items[0].detail


def test_not_parquet_is_unreadable(tmp_path):
    f = tmp_path / "fake.parquet"
    f.write_text("this is not parquet")
    items = list(iter_documents([f]))
    assert [i.reason for i in items] == ["unreadable"]


def test_classify_bytes():
    assert classify_bytes(b"") == "empty"
    assert classify_bytes(b"ab\x00cd") == "binary"
    assert classify_bytes(b"\xc3\x28") == "invalid_utf8"
    assert classify_bytes("ok 世界".encode()) is None


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    (doc,) = iter_documents([f])
    assert doc.text == "hello"


def test_split_is_deterministic_and_near_fraction():
    ids = [f"doc/{i}.py" for i in range(4000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 300 < splits.count("val") < 500
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])


def test_default_corpus_is_the_stdlib_source():
    files = default_corpus_files()
    names = {f.name for f in files}
    assert {"os.py", "textwrap.py", "argparse.py"} <= names
    assert not any("site-packages" in f.parts for f in files)
    assert total_input_bytes(None) > 5_000_000
