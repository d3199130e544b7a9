import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill.read import _split_lines, load_parsed_local, read_parsed
from pairmill.pairs import decode_line, pair_id, validate_records
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
    # valid JSON, but not text Arrow can hold: an escaped lone surrogate (web and social-media dumps)
    (b'{"query": "a\\ud800b", "passage": "p"}', "invalid_unicode"),
    (b'{"query": "q", "passage": "\\udfff"}', "invalid_unicode"),
    (b'{"query": "q", "passage": "p", "negatives": ["ok", "x\\ud83d"]}', "invalid_unicode"),
    (b'{"id": "r\\ud800", "query": "q", "passage": "p"}', "invalid_unicode"),
    (b'{"query": "q", "passage": "p", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too_deep"),
    (b'{"query": "q", "passage": "p", "n": ' + b"1" * 5000 + b"}", "invalid_json"),  # int over 4,300 digits
    (b'{"query": "\\u0000\\u0000 \\u200b", "passage": "p"}', "empty_text"),  # NULs and a zero-width space only
    (b'{"id": 1e999, "query": "q", "passage": "p"}', "bad_id"),
    (b'{"id": true, "query": "q", "passage": "p"}', "bad_id"),
    (b'{"id": [1], "query": "q", "passage": "p"}', "bad_id"),
    (b'{"query": "q", "passage": "p", "group": 1.5}', "bad_group"),
    (b'{"query": "q", "passage": "p", "group": false}', "bad_group"),
    (b'{"query": "q", "passage": "p", "group": ["a"]}', "bad_group"),
    (b'{"query": "q", "passage": "p", "group": " "}', "bad_group"),
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
        {"id": float("nan"), "q": "a", "p": "b", "source": ["web", 2]},
        {"id": 10**40, "q": "a", "p": "b"},
        {"id": True, "q": "a", "p": "b"},
        {"id": 2.5, "q": "a", "p": "b"},
    ]
    table = validate_records(rows, ["x"] * len(rows), query_field="q", passage_field="p").to_pylist()
    # integers are their decimal string; absent, empty and NaN ids are a hash of the texts
    assert [r["id"] for r in table[:5]] == ["7", pair_id("a", "b"), pair_id("a", "b"), pair_id("a", "b"), str(10**40)]
    assert [r["reason"] for r in table] == [None] * 5 + ["bad_id", "bad_id"]  # never silently re-keyed
    assert table[2]["negatives"] == ["n1", "n2"]
    assert table[2]["source"] == "3" and table[3]["source"] == '["web", 2]'  # kept, as JSON


def test_a_group_is_a_string_or_an_integer_and_optional():
    rows = [{"query": "a", "passage": "b", "group": g} for g in ("faq-7", 7, "7", None, float("nan"))] + [{"query": "a", "passage": "b"}]
    table = validate_records(rows, ["x"] * len(rows)).to_pylist()
    assert [r["reason"] for r in table] == [None] * 6
    assert [r["group"] for r in table] == ["faq-7", "7", "7", None, None, None]  # 7 and "7" are one group


def test_control_characters_inside_a_text_are_kept():
    table = validate_records([{"query": "a\x00b", "passage": "line\u2028two\r\n"}], ["x"]).to_pylist()
    assert table[0]["reason"] is None and table[0]["query"] == "a\x00b" and table[0]["passage"] == "line\u2028two\r\n"


def test_a_lone_surrogate_in_a_parquet_row_is_rejected_with_a_readable_raw():
    table = validate_records([{"query": "x\ud800", "passage": "p", "extra": "y\udc00"}], ["f.parquet"])
    row = table.to_pylist()[0]  # building the Arrow table at all is the point: it used to raise
    assert row["reason"] == "invalid_unicode" and "\\ud800" in row["raw"] and "\\udc00" in row["raw"]


def test_reject_reasons_are_the_documented_table():
    from pathlib import Path

    from pairmill.pairs import REJECT_REASONS

    readme = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()  # "Rejection reasons", linked from the README
    table = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    assert set(REJECT_REASONS) <= table, set(REJECT_REASONS) - table


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


def test_a_utf8_bom_is_not_part_of_the_first_line():
    data = b"\xef\xbb\xbf" + b'{"query": "q", "passage": "p"}\n{"query": "r", "passage": "s"}\n'
    for size in (1, 2, 3, 4, 100):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        lines = list(_split_lines(chunks))
        assert lines[0] == b'{"query": "q", "passage": "p"}' and len(lines) == 2, size
    assert list(_split_lines([b"\xef\xbb"])) == [b"\xef\xbb"]  # shorter than a BOM: left as it is
    assert list(_split_lines([b"a\xef\xbb\xbfb\n"])) == [b"a\xef\xbb\xbfb"]  # only at the start of the stream

def _bad_file(path, gz=False):
    # a BOM, CRLF endings, and a U+2028 inside a JSON string (a line separator to str.splitlines)
    good = [json.dumps(GOOD).encode(), json.dumps({**GOOD, "query": "x\u2028y"}, ensure_ascii=False).encode(),
            json.dumps({**GOOD, "query": "z"}).encode()]
    body = b"\xef\xbb\xbf" + b"\r\n".join(good + [line for line, _ in BAD_LINES]) + b"\r\n"
    (gzip.open if gz else open)(path, "wb").write(body)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_ray_read_matches_local_read(ray_session, tmp_path, gz):
    path = _bad_file(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), gz)
    on_ray = read_parsed(str(path)).to_arrow_refs()
    on_ray = pa.concat_tables(ray_session.get(on_ray)).to_pylist()
    local = load_parsed_local(path).to_pylist()
    assert len(on_ray) == 3 + len(BAD_LINES)
    assert [r["query"] for r in local[:3]] == ["what is unix", "x\u2028y", "z"]
    key = lambda r: r["origin"]  # noqa: E731
    assert sorted(on_ray, key=key) == sorted(local, key=key)
    assert sorted(r["reason"] for r in local if r["reason"]) == sorted(reason for _, reason in BAD_LINES)


def test_later_copies_of_an_id_are_rejected_on_ray(ray_session, tmp_path):
    """The first valid row with an id keeps it (by file, then line: 'f:10' comes after 'f:9');
    rejected rows and rows with distinct ids pass through; every row stays counted."""
    import pyarrow.compute as pc

    from pairmill.read import count_input_rows
    from pairmill.groups import read_unique

    rows = [{"id": f"r{i}", "query": f"q{i}", "passage": f"p{i}"} for i in range(12)]
    rows[10] = {"id": "r9", "query": "other", "passage": "text"}  # line 11 repeats line 10's id
    rows[3] = {"id": "r9", "query": "first", "passage": "copy"}  # line 4 has it first
    rows.append({"query": "q0", "passage": "p0"})  # no id: a hash of the texts, not "r0"
    rows.append({"id": "r5"})  # rejected (no query): not a duplicate, whatever its id
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    table = pa.concat_tables(ray_session.get(read_unique(str(path)).to_arrow_refs()))
    assert table.num_rows == count_input_rows(str(path)) == 14
    dups = table.filter(pc.equal(table["reason"], "duplicate_id")).to_pylist()
    assert sorted(r["origin"].rsplit(":", 1)[1] for r in dups) == ["10", "11"]
    assert all(r["query"] is None and '"id": "r9"' in r["raw"] for r in dups)
    kept = table.filter(pc.is_null(table["reason"]))
    assert kept.num_rows == 11 and len(set(kept["id"].to_pylist())) == 11
    assert {"first"} == {r["query"] for r in kept.to_pylist() if r["id"] == "r9"}
    assert table.filter(pc.equal(table["reason"], "missing_query")).num_rows == 1


def test_a_sorted_job_folder_is_validated_in_a_seeded_random_order(ray_session, tmp_path):
    """A filter's output comes cluster by cluster and its ids are known unique (no groupby reorders
    it): training's validated copy (shuffle_seed) must mix the topics, the same way for one seed,
    with every row kept; without a seed the order stays the input's."""
    from pairmill.groups import write_validated

    rows = [{"id": f"t{i // 100}-{i}", "query": f"topic {i // 100} query {i}", "passage": f"passage {i}"} for i in range(400)]
    folder = tmp_path / "filtered"
    (folder / "kept").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "kept" / "part-0.parquet")
    (folder / "stats.json").write_text('{"unique_ids": true}')
    (folder / "_SUCCESS").write_text("")

    def order(out, seed):
        write_validated(str(folder), tmp_path / out, shuffle_seed=seed)
        return pq.read_table(tmp_path / out, columns=["id"])["id"].to_pylist()

    as_is, first, again, other = order("as-is", None), order("a", 1), order("b", 1), order("c", 2)
    assert as_is == [r["id"] for r in rows]
    assert sorted(first) == sorted(as_is) and first == again and first != other
    assert {i.split("-")[0] for i in first[:32]} == {"t0", "t1", "t2", "t3"}  # one batch's worth sees every topic


def test_a_sorted_raw_file_is_validated_in_a_seeded_random_order_in_the_id_checks_pass(ray_session, tmp_path):
    """Raw input pays the id check's hash shuffle; with a seed its buckets are random subsets of the
    rows and each is permuted, so the same pass mixes the topics (no second all-to-all shuffle), the
    same way for one seed and another way for another, and a repeated id is still rejected once."""
    from pairmill.groups import write_validated

    rows = [{"id": f"t{i // 100}-{i}", "query": f"topic {i // 100} query {i}", "passage": f"passage {i}"} for i in range(400)]
    rows.append({"id": "t0-5", "query": "a later row reusing an id", "passage": "its own passage"})
    raw = write_jsonl(tmp_path / "sorted.jsonl", rows)

    def read(out, seed):
        write_validated(str(raw), tmp_path / out, shuffle_seed=seed)
        return pq.read_table(tmp_path / out).to_pylist()

    first, again, other = read("a", 1), read("b", 1), read("c", 2)
    ids = [r["id"] for r in first]
    assert ids == [r["id"] for r in again] and ids != [r["id"] for r in other]
    assert [r["reason"] for r in first].count("duplicate_id") == 1 and len(first) == 401
    kept = [i for i, r in zip(ids, first) if r["reason"] is None]
    assert sorted(kept) == sorted(r["id"] for r in rows[:400])
    assert {i.split("-")[0] for i in kept[:32]} == {"t0", "t1", "t2", "t3"}  # one batch's worth sees every topic
    assert kept[:100] != sorted(kept[:100], key=lambda i: int(i.split("-")[1]))  # not in input order within a bucket


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
