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
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa

Mode = Literal["pairs", "text"]

# reason -> what it means; the README's table of rejections is this dict.
REJECT_REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not parseable JSON",
    "not_an_object": "the JSON value is not an object",
    "blank_line": "an empty or whitespace-only line inside a file",
    "missing_query": "no query field (or it is null)",
    "missing_passage": "no passage field (or it is null)",
    "missing_text": "no text field (or it is null)",
    "wrong_type": "a text field is not a string",
    "empty_text": "a text field is empty or whitespace only",
    "too_long": "a text exceeds read.max_chars and read.too_long=reject",
    "bad_negatives": "`negatives` is present but not a list of non-empty strings",
}

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


def _raw_repr(record: Any) -> str:
    if isinstance(record, str):
        return record
    return json.dumps(record, ensure_ascii=False, default=str)


def _row_id(given: Any) -> str | None:
    """The input's own id when it is a non-empty string or an integer, else None (hash instead)."""
    if isinstance(given, bool) or not isinstance(given, (str, int)) or given == "":
        return None
    return str(given)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_text(value: Any, missing_reason: str, max_chars: int, too_long: str) -> tuple[str | None, str | None, bool]:
    """(text, reason, truncated) for one text field."""
    if _is_missing(value):
        return None, missing_reason, False
    if not isinstance(value, str):
        return None, "wrong_type", False
    if not value.strip():
        return None, "empty_text", False
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
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        return None, "bad_negatives"
    return [v[:max_chars] for v in value], None


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
                truncated = t1 or t2
                rid = record.get(id_field)
                source = record.get("source")
                values = {
                    "id": _row_id(rid) or pair_id(query, passage),
                    "query": query,
                    "passage": passage,
                    "source": source if isinstance(source, str) else None,
                    "negatives": negatives,
                }
        else:
            text, reason, truncated = _check_text(record.get(text_field), "missing_text", max_chars, too_long)
            if reason is None:
                rid = record.get(id_field)
                values = {"id": _row_id(rid) or text_id(text), "text": text}
        for name in cols:
            cols[name].append(values.get(name))
        cols["reason"][-1] = reason
        cols["origin"][-1] = origin
        cols["truncated"][-1] = truncated
        cols["raw"][-1] = None if reason is None else (raw if raw is not None else _raw_repr(record))
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
    except (json.JSONDecodeError, RecursionError):
        return ("invalid_json", line)


# --- reading files ---------------------------------------------------------------------------

LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz", ".txt", ".txt.gz")


def _is_json_lines(path: str) -> bool:
    return not path.endswith((".txt", ".txt.gz"))


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Bytes chunks -> lines without their b'\\n' or b'\\r\\n'; a trailing newline makes no extra line."""
    tail = b""
    for chunk in chunks:
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
