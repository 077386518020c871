"""Readers: JSONL, parquet and saved `datasets` directories keep where each row came from."""

from __future__ import annotations

import json

import pytest

from rayapp.data.readers import DataFileError, Row, read_rows, write_jsonl_atomic

ROWS = [{"input_text": "a", "output_text": "b"}, {"input_text": "c", "output_text": "d"}]


def test_jsonl_lines_blank_lines_and_bad_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n[1, 2]\n" + json.dumps(ROWS[1]) + "\n")
    rows = list(read_rows(p))
    assert [r.line for r in rows] == [1, 3, 4, 5]  # the blank line 2 is not a row
    assert rows[0] == Row(str(p), 1, ROWS[0])
    assert rows[1].error.startswith("malformed JSON (") and rows[1].data == {}
    assert rows[2].error == "expected a JSON object, found list"
    assert rows[3].data == ROWS[1] and rows[3].where == f"{p}:5"
    assert [r.line for r in read_rows(p, max_rows=2)] == [1, 3]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    rows = list(read_rows(p))
    assert [(r.line, r.data, r.error) for r in rows] == [(1, ROWS[0], None), (2, ROWS[1], None)]


def test_saved_datasets_directory(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    assert [(r.line, r.data) for r in read_rows(d)] == [(1, ROWS[0]), (2, ROWS[1])]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(dd))
    assert [r.data for r in read_rows(dd)] == ROWS[:1]


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataFileError, match="file not found"):
        list(read_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataFileError, match=r"unknown data format '\.csv'"):
        list(read_rows(tmp_path / "d.csv"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataFileError, match="not a saved `datasets` directory"):
        list(read_rows(tmp_path / "plain"))


def test_write_jsonl_atomic_round_trip(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl_atomic(p, iter(ROWS + [{"t": "é"}])) == 3
    assert [r.data for r in read_rows(p)] == ROWS + [{"t": "é"}]
    assert [x.name for x in p.parent.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_jsonl_round_trip_keeps_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+0085 / U+2028 / U+2029 raw; str.splitlines would cut
    the line there (seen: a sampled teacher completion broke a batch shard)."""
    from rayapp.data.readers import read_jsonl, write_jsonl_atomic

    rows = [{"output_text": "a\u0085b"}, {"output_text": "c\u2028d\u2029e\x1cf"}, {"output_text": "plain"}]
    write_jsonl_atomic(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows
