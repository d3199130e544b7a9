import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill.pairs import (
    _split_lines,
    decode_line,
    load_parsed_local,
    pair_id,
    read_parsed,
    validate_records,
)
from tests.conftest import write_jsonl

GOOD = {"query": "what is unix", "passage": "an operating system", "source": "t"}

# (line as bytes, expected reason) for every kind of bad row pair IO names
BAD_LINES = [
    (b'{"query": "cut off', "invalid_json"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b"   ", "blank_line"),
    (b'{"passage": "no query"}', "missing_query"),
    (b'{"query": "no passage"}', "missing_passage"),
    (b'{"query": null, "passage": "p"}', "missing_query"),
    (b'{"query": "q", "passage": ""}', "empty_text"),
    (b'{"query": "  \\t ", "passage": "p"}', "empty_text"),
    (b'{"query": 42, "passage": "p"}', "wrong_type"),
    (b'{"query": "q", "passage": ["a", "b"]}', "wrong_type"),
    (b'{"query": "q", "passage": "p", "negatives": "n"}', "bad_negatives"),
    (b'{"query": "q", "passage": "p", "negatives": ["ok", 3]}', "bad_negatives"),
    (b'{"query": "caf\xe9", "passage": "latin-1 bytes"}', "invalid_utf8"),
]


def _validate(lines, **kw):
    records = [decode_line(line, True, "text") for line in lines]
    raws = [None if isinstance(r, tuple) else line.decode() for r, line in zip(records, lines)]
    return validate_records(records, [f"f:{i}" for i in range(len(lines))], raws=raws, **kw)


def test_every_bad_row_gets_its_reason_and_raw_text():
    lines = [json.dumps(GOOD).encode()] + [line for line, _ in BAD_LINES]
    table = _validate(lines).to_pylist()
    assert table[0]["reason"] is None and table[0]["query"] == "what is unix"
    assert table[0]["id"] == pair_id("what is unix", "an operating system")
    for row, (line, reason) in zip(table[1:], BAD_LINES):
        assert row["reason"] == reason, line
        assert row["raw"] == line.decode("utf-8", "backslashreplace")
        assert row["query"] is None and row["id"] is None


def test_ids_fields_and_negatives():
    rows = [
        {"id": 7, "q": "a", "p": "b"},
        {"id": "", "q": "a", "p": "b"},
        {"q": "a", "p": "b", "negatives": ["n1", "n2"], "source": 3},
        {"id": True, "q": "a", "p": "b"},
    ]
    table = validate_records(rows, ["x"] * 4, query_field="q", passage_field="p").to_pylist()
    assert [r["id"] for r in table] == ["7", pair_id("a", "b"), pair_id("a", "b"), pair_id("a", "b")]
    assert table[2]["negatives"] == ["n1", "n2"] and table[2]["source"] is None


def test_too_long_truncates_by_default_or_rejects():
    rows = [{"query": "q", "passage": "x" * 1000}]
    kept = validate_records(rows, ["x"], max_chars=100).to_pylist()[0]
    assert kept["reason"] is None and kept["truncated"] and len(kept["passage"]) == 100
    rejected = validate_records(rows, ["x"], max_chars=100, too_long="reject").to_pylist()[0]
    assert rejected["reason"] == "too_long" and len(rejected["raw"]) > 1000


def test_text_mode():
    table = validate_records([{"text": "hello"}, {"text": 1}, {"body": "x"}], ["x"] * 3, mode="text").to_pylist()
    assert [r["reason"] for r in table] == [None, "wrong_type", "missing_text"]
    assert table[0]["text"] == "hello"


def test_split_lines_across_chunk_boundaries():
    data = b"ab\ncd\n\nef"
    for size in (1, 2, 3, 100):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert list(_split_lines(chunks)) == [b"ab", b"cd", b"", b"ef"]
    assert list(_split_lines([b"a\n"])) == [b"a"]  # a trailing newline is not a row
    assert list(_split_lines([b"a\r", b"\nb\r\n"])) == [b"a", b"b"]  # CRLF files, split mid-ending


def _bad_file(path, gz=False):
    body = b"\n".join([json.dumps(GOOD).encode()] * 3 + [line for line, _ in BAD_LINES]) + b"\n"
    (gzip.open if gz else open)(path, "wb").write(body)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_ray_read_matches_local_read(ray_session, tmp_path, gz):
    path = _bad_file(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), gz)
    on_ray = read_parsed(str(path)).to_arrow_refs()
    on_ray = pa.concat_tables(ray_session.get(on_ray)).to_pylist()
    local = load_parsed_local(path).to_pylist()
    assert len(on_ray) == 3 + len(BAD_LINES)
    key = lambda r: r["origin"]  # noqa: E731
    assert sorted(on_ray, key=key) == sorted(local, key=key)
    assert sorted(r["reason"] for r in local if r["reason"]) == sorted(reason for _, reason in BAD_LINES)


def test_parquet_and_hf_inputs(ray_session, tmp_path):
    rows = [dict(GOOD, id=str(i)) for i in range(5)] + [{"id": "bad", "query": None, "passage": "p", "source": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    parsed = read_parsed(str(tmp_path / "in.parquet")).take_all()
    assert sorted(r["reason"] or "ok" for r in parsed) == ["missing_query"] + ["ok"] * 5

    import datasets

    datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": ""}]).save_to_disk(
        str(tmp_path / "hf")
    )
    parsed = read_parsed(str(tmp_path / "hf"), query_field="question", passage_field="answer").take_all()
    assert sorted(r["reason"] or "ok" for r in parsed) == ["empty_text", "ok"]


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_parsed_local(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown input type"):
        load_parsed_local(tmp_path / "x.csv")
    write_jsonl(tmp_path / "d" / "a.jsonl" if (tmp_path / "d").mkdir() is None else None, [GOOD])
    pq.write_table(pa.Table.from_pylist([GOOD]), tmp_path / "d" / "b.parquet")
    with pytest.raises(ValueError, match="found 1 parquet and 1 JSONL"):
        load_parsed_local(tmp_path / "d")
