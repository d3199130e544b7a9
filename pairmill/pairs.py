"""Pair IO: JSONL (plain or .gz), text lines, Parquet and saved HF ``datasets`` folders into a Ray
Dataset of validated rows, where a bad row becomes a counted rejection instead of a crash.

Design note. Validation is one pure function over records (``validate_records``), so tests and
the eval job call it on in-memory lists and the Ray path only wraps it in ``map_batches``.
Ray's own ``read_json``/``read_text`` stop the whole job on one malformed line or one invalid UTF-8
byte, so JSONL and text files are read by ``LineDatasource``: it streams each file in 8 MiB chunks
and yields raw ``bytes`` lines with their line numbers; decoding and JSON parsing happen in the
validation step, where a failure is a row with a ``reason``. Every parsed row carries ``reason``
(null when the row is good); jobs split on it into ``kept/`` and ``rejected/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa

Mode = Literal["pairs", "text"]

# reason -> what it means; the README's table of rejections is this dict (a test keeps them equal).
REJECT_REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not parseable JSON (also: an integer of more than 4,300 digits)",
    "too_deep": "the JSON nests deeper than Python's parser allows (about 1,000 levels)",
    "not_an_object": "the JSON value is not an object",
    "blank_line": "an empty or whitespace-only line inside a file",
    "missing_query": "no query field (or it is null)",
    "missing_passage": "no passage field (or it is null)",
    "missing_text": "no text field (or it is null)",
    "wrong_type": "a text field is not a string",
    "empty_text": "a text field is empty, or only whitespace and control characters (NUL, zero-width)",
    "invalid_unicode": "a string holds a lone UTF-16 surrogate (e.g. an escaped \\ud800 in JSON): not encodable as UTF-8",
    "too_long": "a text exceeds read.max_chars and read.too_long=reject",
    "bad_negatives": "`negatives` is present but not a list of non-empty strings",
    "bad_id": "the id is not a string or an integer (a float such as 1e999, a boolean, a list, an object)",
    "duplicate_id": "another valid row earlier in the input (by file, then line) has the same id",
    # BEIR folders (pairmill eval):
    "missing_id": "a BEIR corpus or queries row without `_id`",
    "bad_qrels_line": "a qrels line without three tab-separated fields or with a score that is not a number",
    "unknown_id": "a qrels line naming a query or document the folder does not hold (or that was rejected)",
}
DUPLICATE_ID = "duplicate_id"

PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("query", pa.string()),
        ("passage", pa.string()),
        ("source", pa.string()),
        ("negatives", pa.list_(pa.string())),
    ]
)
TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
# Columns every parsed block carries besides the pair/text columns.
STATUS_SCHEMA = pa.schema(
    [("reason", pa.string()), ("raw", pa.string()), ("origin", pa.string()), ("truncated", pa.bool_())]
)
REJECT_COLUMNS = ["reason", "raw", "origin"]


def parsed_schema(mode: Mode) -> pa.Schema:
    base = PAIR_SCHEMA if mode == "pairs" else TEXT_SCHEMA
    return pa.schema(list(base) + list(STATUS_SCHEMA))


def output_columns(mode: Mode) -> list[str]:
    return (PAIR_SCHEMA if mode == "pairs" else TEXT_SCHEMA).names


def normalize_text(text: str) -> str:
    """NFKC + collapsed whitespace: the form used for ids, dedup and text-equality tests."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_key(text: str) -> int:
    """63-bit int id of a normalised text: texts equal after ``normalize_text`` share it. The
    corpus key of mining and the false-negative id of training; int64 so FAISS can store it."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def pair_id(query: str, passage: str) -> str:
    """Stable id of a pair that came without one: a hash of its exact texts."""
    h = hashlib.blake2b(digest_size=10)
    h.update(query.encode("utf-8", "surrogatepass"))
    h.update(b"\x1f")
    h.update(passage.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def text_id(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def encodable(text: str) -> str:
    """``text`` as it can be stored (Arrow and Parquet hold UTF-8 only): a lone surrogate, which
    ``json.loads`` accepts from an escaped ``\\ud800`` and a file name may carry, becomes its
    ``\\ud800`` escape. For raw text and origins, which are kept for the user to read, never for a
    model to train on (a text field with a lone surrogate is rejected as ``invalid_unicode``)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _raw_repr(record: Any) -> str:
    if isinstance(record, str):
        return encodable(record)
    return encodable(json.dumps(record, ensure_ascii=False, default=str))


# Nothing but whitespace, C0/C1 control characters (NUL among them) and the zero-width marks: no
# text for a tokenizer to see (BERT's normaliser deletes control characters). fullmatch stops at
# the first other character, so normal text costs one step.
_NO_TEXT = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]*")


def _row_id(given: Any) -> tuple[str | None, str | None]:
    """(id, reason): the input's own id as a string when it is a non-empty string or an integer;
    (None, None) when it is absent, null, NaN or "" (the caller hashes the texts instead);
    (None, "bad_id") for any other value (a float such as 1e999, a boolean, a list, an object),
    and for an integer too long to print (Python refuses more than 4,300 digits)."""
    if _is_missing(given) or given == "":
        return None, None
    if isinstance(given, str):
        return (None, "invalid_unicode") if _has_surrogate(given) else (given, None)
    if isinstance(given, (int, np.integer)) and not isinstance(given, (bool, np.bool_)):
        try:
            return str(int(given)), None
        except ValueError:
            return None, "bad_id"
    return None, "bad_id"


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_text(value: Any, missing_reason: str, max_chars: int, too_long: str) -> tuple[str | None, str | None, bool]:
    """(text, reason, truncated) for one text field. NUL and other control characters inside a
    text are kept (they are the input's); a text made only of them is ``empty_text``."""
    if _is_missing(value):
        return None, missing_reason, False
    if not isinstance(value, str):
        return None, "wrong_type", False
    if _NO_TEXT.fullmatch(value):
        return None, "empty_text", False
    if _has_surrogate(value):
        return None, "invalid_unicode", False
    if len(value) > max_chars:
        if too_long == "reject":
            return None, "too_long", False
        return value[:max_chars], None, True
    return value, None, False


def _check_negatives(value: Any, max_chars: int) -> tuple[list[str] | None, str | None]:
    if _is_missing(value):
        return None, None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and not _NO_TEXT.fullmatch(v) for v in value):
        return None, "bad_negatives"
    if any(_has_surrogate(v) for v in value):
        return None, "invalid_unicode"
    return [v[:max_chars] for v in value], None


def _source(value: Any) -> str | None:
    """The optional ``source`` as a string: kept when it is one, written as JSON when it is another
    value (a number, a list), so the information is not lost."""
    if _is_missing(value):
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return encodable(text)


def validate_records(
    records: Iterable[Any],
    origins: Iterable[str],
    *,
    mode: Mode = "pairs",
    query_field: str = "query",
    passage_field: str = "passage",
    text_field: str = "text",
    id_field: str = "id",
    max_chars: int = 65536,
    too_long: str = "truncate",
    raws: Iterable[str | None] | None = None,
) -> pa.Table:
    """Validate parsed records into a table with ``parsed_schema(mode)``.

    ``records`` are dicts (or anything else, which is rejected); an entry may be a
    ``(reason, raw)`` tuple from an earlier step that already failed (bad UTF-8, bad JSON).
    ``raws`` is the raw text to keep for rejected rows (default: the record as JSON).
    """
    if too_long not in ("truncate", "reject"):
        raise ValueError(f"too_long={too_long!r}; valid: truncate, reject")
    cols: dict[str, list] = {name: [] for name in parsed_schema(mode).names}
    raws_iter = iter(raws) if raws is not None else None
    for record, origin in zip(records, origins):
        raw = next(raws_iter) if raws_iter is not None else None
        reason, truncated, values = None, False, {}
        if isinstance(record, tuple):  # (reason, raw) from the line decoder
            reason, raw = record
        elif not isinstance(record, dict):
            reason = "not_an_object"
        elif mode == "pairs":
            query, reason, t1 = _check_text(record.get(query_field), "missing_query", max_chars, too_long)
            if reason is None:
                passage, reason, t2 = _check_text(record.get(passage_field), "missing_passage", max_chars, too_long)
            if reason is None:
                negatives, reason = _check_negatives(record.get("negatives"), max_chars)
            if reason is None:
                rid, reason = _row_id(record.get(id_field))
            if reason is None:
                truncated = t1 or t2
                values = {
                    "id": rid or pair_id(query, passage),
                    "query": query,
                    "passage": passage,
                    "source": _source(record.get("source")),
                    "negatives": negatives,
                }
        else:
            text, reason, truncated = _check_text(record.get(text_field), "missing_text", max_chars, too_long)
            if reason is None:
                rid, reason = _row_id(record.get(id_field))
            if reason is None:
                values = {"id": rid or text_id(text), "text": text}
        for name in cols:
            cols[name].append(values.get(name))
        cols["reason"][-1] = reason
        cols["origin"][-1] = encodable(origin)
        cols["truncated"][-1] = truncated
        cols["raw"][-1] = None if reason is None else (encodable(raw) if raw is not None else _raw_repr(record))
    return pa.Table.from_pydict(cols, schema=parsed_schema(mode))


def decode_line(raw: bytes, as_json: bool, text_field: str) -> Any:
    """bytes of one line -> a record dict, or a ``(reason, raw_text)`` tuple."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ("invalid_utf8", raw.decode("utf-8", "backslashreplace"))
    if not line.strip():
        return ("blank_line", line)
    if not as_json:
        return {text_field: line}
    try:
        return json.loads(line)
    except RecursionError:
        return ("too_deep", line)
    except ValueError:  # JSONDecodeError, and an integer literal of more than 4,300 digits
        return ("invalid_json", line)


# --- reading files ---------------------------------------------------------------------------

LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz", ".txt", ".txt.gz")


def _is_json_lines(path: str) -> bool:
    return not path.endswith((".txt", ".txt.gz"))


UTF8_BOM = b"\xef\xbb\xbf"


def _without_bom(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks of a stream without a UTF-8 byte-order mark at its start (Windows editors write
    one; ``json.loads`` refuses it), however the first bytes are split over chunks."""
    head: bytes | None = b""
    for chunk in chunks:
        if head is None:
            yield chunk
            continue
        head += chunk
        if len(head) < len(UTF8_BOM) and UTF8_BOM.startswith(head):
            continue  # too short to tell yet
        yield head[len(UTF8_BOM):] if head.startswith(UTF8_BOM) else head
        head = None
    if head:  # the whole stream was shorter than a BOM
        yield head


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Bytes chunks -> lines without their b'\\n' or b'\\r\\n'; a trailing newline makes no extra line.
    A UTF-8 byte-order mark at the start of the stream is not part of the first line. Only b'\\n'
    ends a line: U+2028 and other Unicode separators stay inside their JSON line, as JSONL wants."""
    tail = b""
    for chunk in _without_bom(chunks):
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        yield from (part.rstrip(b"\r") for part in parts)
    if tail:
        yield tail.rstrip(b"\r")


def read_lines(path: str | Path, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
    """Lines of a local file, gunzipped when it ends in .gz (for in-process readers)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from _split_lines(iter(lambda: f.read(chunk_bytes), b""))


def _line_datasource_class():
    # Imported lazily so that in-memory users of this module do not import Ray Data.
    from ray.data.datasource import FileBasedDatasource

    class LineDatasource(FileBasedDatasource):
        """Raw lines of text files as ``bytes`` with path and 1-based line number.

        Compression (.gz) is inferred from the extension by ``FileBasedDatasource``.
        """

        _FILE_EXTENSIONS = [s.lstrip(".") for s in LINE_SUFFIXES] + ["gz"]

        def __init__(self, paths, lines_per_block: int = 8192, **kwargs):
            super().__init__(paths, **kwargs)
            self.lines_per_block = lines_per_block

        def _read_stream(self, f, path: str):
            chunks = iter(lambda: f.read(8 << 20), b"")
            raws, numbers = [], []
            for number, line in enumerate(_split_lines(chunks), start=1):
                raws.append(line)
                numbers.append(number)
                if len(raws) >= self.lines_per_block:
                    yield _line_block(raws, numbers, path)
                    raws, numbers = [], []
            if raws:
                yield _line_block(raws, numbers, path)

    return LineDatasource


def _line_block(raws: list[bytes], numbers: list[int], path: str) -> pa.Table:
    return pa.table(
        {"raw": pa.array(raws, pa.binary()), "line": pa.array(numbers, pa.int64()), "path": [path] * len(raws)}
    )


class ParseLines:
    """``map_batches`` step: raw line blocks -> validated rows."""

    def __init__(self, mode: Mode, **validate_kwargs):
        self.mode = mode
        self.kwargs = validate_kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        text_field = self.kwargs.get("text_field", "text")
        paths = batch.column("path").to_pylist()
        records = [
            decode_line(raw, _is_json_lines(path), text_field)
            for raw, path in zip(batch.column("raw").to_pylist(), paths)
        ]
        origins = [f"{p}:{n}" for p, n in zip(paths, batch.column("line").to_pylist())]
        raws = [
            None if isinstance(record, tuple) else raw.decode("utf-8")
            for record, raw in zip(records, batch.column("raw").to_pylist())
        ]
        return validate_records(records, origins, mode=self.mode, raws=raws, **self.kwargs)


class ParseRows:
    """``map_batches`` step: columnar rows (Parquet, HF) -> validated rows."""

    def __init__(self, mode: Mode, origin: str, **validate_kwargs):
        self.mode = mode
        self.origin = origin
        self.kwargs = validate_kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pylist()
        origins = [self.origin] * len(records)
        return validate_records(records, origins, mode=self.mode, **self.kwargs)


def detect_format(path: str | Path) -> tuple[str, list[str]]:
    """('lines' | 'parquet' | 'hf', files) for an input path.

    A pairmill job folder (with ``_SUCCESS`` and ``kept/``) reads as its ``kept/`` rows.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {path!s} does not exist")
    if p.is_dir():
        if (p / "_SUCCESS").exists() and (p / "kept").is_dir():
            return detect_format(p / "kept")
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "hf", [str(p)]
        parquet = sorted(str(f) for f in p.rglob("*.parquet"))
        lines = sorted(str(f) for f in p.rglob("*") if f.is_file() and str(f).endswith(LINE_SUFFIXES))
        if parquet and not lines:
            return "parquet", parquet
        if lines and not parquet:
            return "lines", lines
        raise ValueError(
            f"{path}: expected a folder of .parquet files, of JSONL files, a saved HF dataset, or a pairmill "
            f"job folder; found {len(parquet)} parquet and {len(lines)} JSONL/text files"
        )
    name = str(p)
    if name.endswith(".parquet"):
        return "parquet", [name]
    if name.endswith(LINE_SUFFIXES):
        return "lines", [name]
    raise ValueError(f"{path}: unknown input type; use .jsonl[.gz], .txt[.gz], .parquet, or a folder of them")


def _load_hf(path: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}; save the split you want on its own")
        print(f"[pairmill] {path}: a DatasetDict; reading its 'train' split ({len(ds['train'])} rows)")
        ds = ds["train"]
    return ds


def read_raw(path: str | Path):
    """The unparsed Ray Dataset of an input path and its format (one row per input row)."""
    import ray.data

    fmt, files = detect_format(path)
    if fmt == "lines":
        return ray.data.read_datasource(_line_datasource_class()(files)), fmt
    if fmt == "parquet":
        return ray.data.read_parquet(files), fmt
    return ray.data.from_huggingface(_load_hf(files[0])), fmt


def read_parsed(path: str | Path, mode: Mode = "pairs", **validate_kwargs):
    """Ray Dataset of validated rows (``parsed_schema(mode)``), one per input row."""
    raw, fmt = read_raw(path)
    if fmt == "lines":
        step = ParseLines(mode, **validate_kwargs)
    else:
        step = ParseRows(mode, str(path), **validate_kwargs)
    # A plain function over blocks (stateless), run as Ray tasks.
    return raw.map_batches(step, batch_format="pyarrow", batch_size=None)


def load_parsed_local(path: str | Path, mode: Mode = "pairs", **validate_kwargs) -> pa.Table:
    """The same rows as ``read_parsed``, read in this process (for small files such as eval sets)."""
    fmt, files = detect_format(path)
    tables = []
    if fmt == "lines":
        step = ParseLines(mode, **validate_kwargs)
        for f in files:
            raws = list(read_lines(f))
            tables.append(step(_line_block(raws, list(range(1, len(raws) + 1)), f)))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        tables = [ParseRows(mode, f, **validate_kwargs)(pq.read_table(f)) for f in files]
    else:
        tables = [ParseRows(mode, files[0], **validate_kwargs)(_load_hf(files[0]).data.table)]
    return pa.concat_tables(tables) if tables else parsed_schema(mode).empty_table()


# --- grouping rows by a key on Ray --------------------------------------------------------------
#
# Dedup by pair, by id, by passage and by query each need every row of a key in one place: a hash
# shuffle (``groupby(...).map_groups``). Ray calls ``map_groups`` once per distinct value of the
# group column, and a call costs tens of microseconds of Arrow work whatever its size, so grouping
# by the key itself (nearly every key once) spent minutes and gigabytes on singleton groups
# (measured: 250k rows grouped by id ran >10 minutes at 5.5 GB in one reduce task on 2 cores).
# Rows are grouped by a *bucket* of the key instead, a hash into ~rows / GROUP_ROWS values: every
# row of a key still meets in one group, and each step handles the keys of its bucket together.

PARTITION_BYTES = 128 << 20  # input bytes per shuffle partition (a reduce task holds one partition)
GROUP_ROWS = 4096  # rows per map_groups call, on average


def default_partitions(input_path: str | Path) -> int:
    """Hash-shuffle partitions for an input: one per PARTITION_BYTES (gzip counted as 4x), at least 2."""
    _, files = detect_format(input_path)
    paths = [f for p in files for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file()]
    size = sum(f.stat().st_size * (4 if f.suffix == ".gz" else 1) for f in paths)
    return max(2, math.ceil(size / PARTITION_BYTES))


def bucket_count(rows: int, partitions: int) -> int:
    """Buckets for ``rows`` rows: about GROUP_ROWS rows each, and at least one per partition."""
    return max(partitions, math.ceil(rows / GROUP_ROWS))


def key_buckets(keys: np.ndarray | Iterable[str], buckets: int) -> pa.Array:
    """int64 bucket of each key: integer keys (an integer numpy array) modulo ``buckets``, string keys
    by a hash of their text."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return pa.array(np.mod(keys.astype(np.int64), buckets), pa.int64())
    out = np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") % buckets
         for k in keys), dtype=np.int64)
    return pa.array(out, pa.int64())


# --- one row per id -----------------------------------------------------------------------------
#
# Jobs key rows by id (a semantic duplicate's ``dup_of``, the refresh's store of negatives), so the
# rows a job keeps must have distinct ids. An input may repeat an id (two sources merged, a row
# edited and appended): the first valid row with an id keeps it, by file and then line number; a
# later one is rejected as ``duplicate_id``. Every row of an id meets in one group of a hash
# shuffle by id bucket, so no set of ids is ever held in one process. Cost: one shuffle of the
# rows, skipped when the input is a pairmill job folder (whose rows were checked when it was
# written: its stats.json says ``"unique_ids": true``).


def ids_known_unique(path: str | Path) -> bool:
    """True for a finished pairmill job folder that checked its rows' ids when it wrote them."""
    folder = Path(path)
    if not (folder / "_SUCCESS").exists() or not (folder / "stats.json").exists():
        return False
    return bool(json.loads((folder / "stats.json").read_text()).get("unique_ids"))


def add_id_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    """+ ``id_bucket``: a hash bucket of the id of a valid row; of a random key for a rejected row
    (whose id is null), so rejects spread over the buckets instead of meeting in one."""
    ids = batch.column("id").to_pylist()
    reasons = batch.column("reason").to_pylist()
    keys = [rid if reason is None else uuid.uuid4().hex for rid, reason in zip(ids, reasons)]
    return batch.append_column("id_bucket", key_buckets(keys, buckets))


def _input_position(origin: str) -> tuple[str, int]:
    """("file", line) of an origin "file:line"; ("origin", -1) for rows without a line number."""
    path, _, line = origin.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (origin, -1)


def mark_duplicate_ids(group: pa.Table) -> pa.Table:
    """``map_groups`` step over one id bucket (any mix of ids): for each id, among its rows still
    valid (``reason`` null) the first by input position keeps it (ties, as in a Parquet file,
    broken by the texts); the others become ``duplicate_id`` rejections whose ``raw`` is the row as
    it was parsed. Rows already rejected or dropped pass through. Drops ``id_bucket``."""
    reasons = group.column("reason").to_pylist()
    ids = group.column("id").to_pylist()
    by_id: dict[str, list[int]] = {}
    for i, (rid, reason) in enumerate(zip(ids, reasons)):
        if reason is None:
            by_id.setdefault(rid, []).append(i)
    repeated = [rows for rows in by_id.values() if len(rows) > 1]
    group = group.drop_columns(["id_bucket"])
    if not repeated:
        return group
    text = "text" if "text" in group.column_names else "passage"
    payload = [c for c in ("id", "query", "passage", "text", "source", "negatives") if c in group.column_names]
    columns = {c: group.column(c).to_pylist() for c in payload + ["origin", "raw"]}
    queries = columns.get("query") or [""] * len(ids)
    for rows in repeated:
        order = sorted(rows, key=lambda i: (_input_position(columns["origin"][i]), queries[i] or "", columns[text][i]))
        for i in order[1:]:
            columns["raw"][i] = _raw_repr({c: columns[c][i] for c in payload})
            reasons[i] = DUPLICATE_ID
            for c in payload:
                columns[c][i] = None
    for name, values in list(columns.items()) + [("reason", reasons)]:
        index = group.schema.get_field_index(name)
        group = group.set_column(index, group.schema.field(index), pa.array(values, group.schema.field(index).type))
    return group


def unique_ids(ds, partitions: int, rows: int):
    """A Ray Dataset of parsed rows -> the same rows, later copies of an id rejected as ``duplicate_id``."""
    keyed = ds.map_batches(add_id_bucket, fn_kwargs={"buckets": bucket_count(rows, partitions)}, batch_format="pyarrow",
                           batch_size=None)
    return keyed.groupby("id_bucket", num_partitions=partitions).map_groups(mark_duplicate_ids, batch_format="pyarrow")


def read_unique(path: str | Path, mode: Mode = "pairs", **validate_kwargs):
    """``read_parsed`` whose valid rows have distinct ids: what every job reads its input with."""
    parsed = read_parsed(path, mode, **validate_kwargs)
    if ids_known_unique(path):
        return parsed
    return unique_ids(parsed, default_partitions(path), count_input_rows(path))


def count_input_rows(path: str | Path) -> int:
    """Rows in the input itself, before any validation: lines of line files, rows of Parquet files
    (from their footers) or of an HF dataset. What a job's ``input_rows`` is, so the check
    ``input_rows == kept + dropped + rejected`` compares the outputs with something they did not make."""
    fmt, files = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if fmt == "hf":
        return len(_load_hf(files[0]))
    return int(read_raw(path)[0].count())


def write_validated(path: str | Path, folder: str | Path, mode: Mode = "pairs", **validate_kwargs) -> Path:
    """``read_unique`` once into a parquet folder (``parsed_schema(mode)``, every input row): the
    passes of a job (rejects, counts, the work) read it back instead of parsing and shuffling the
    input again. An input without rows leaves one empty file, so the folder always reads."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    read_unique(path, mode, **validate_kwargs).write_parquet(str(folder))
    if not any(folder.glob("*.parquet")):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(parsed_schema(mode).empty_table(), folder / "empty.parquet")
    return folder
