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
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa

from pairmill.config import ReadConfig

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
    "bad_group": "`group` is present but not a non-empty string or an integer (a float, a boolean, a list, an object)",
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
        # optional: rows sharing a group are positives of each other under train.objective=supcon
        # with train.group_by=group (e.g. several phrasings of one question, one product's reviews)
        ("group", pa.string()),
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


def raw_repr(record: Any) -> str:
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
    if is_missing(given) or given == "":
        return None, None
    if isinstance(given, str):
        return (None, "invalid_unicode") if _has_surrogate(given) else (given, None)
    if isinstance(given, (int, np.integer)) and not isinstance(given, (bool, np.bool_)):
        try:
            return str(int(given)), None
        except ValueError:
            return None, "bad_id"
    return None, "bad_id"


def is_missing(value: Any) -> bool:
    """None or NaN: an absent id or text in a row, a metric Ray's results left unmeasured."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_text(value: Any, missing_reason: str, max_chars: int, too_long: str) -> tuple[str | None, str | None, bool]:
    """(text, reason, truncated) for one text field. NUL and other control characters inside a
    text are kept (they are the input's); a text made only of them is ``empty_text``."""
    if is_missing(value):
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
    if is_missing(value):
        return None, None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and not _NO_TEXT.fullmatch(v) for v in value):
        return None, "bad_negatives"
    if any(_has_surrogate(v) for v in value):
        return None, "invalid_unicode"
    return [v[:max_chars] for v in value], None


def _group(value: Any) -> tuple[str | None, str | None]:
    """(group, reason) for the optional ``group``: a non-empty string as it is, an integer as its
    decimal string (so 7 and "7" are one group), absent or null as None; anything else is
    ``bad_group``: a float or a boolean would silently merge or split groups."""
    if is_missing(value):
        return None, None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        group, bad = _row_id(value)  # an integer too long to print is bad_id there
        return (group, None) if bad is None else (None, "bad_group")
    if isinstance(value, str) and not _NO_TEXT.fullmatch(value):
        return (None, "invalid_unicode") if _has_surrogate(value) else (value, None)
    return None, "bad_group"


def _source(value: Any) -> str | None:
    """The optional ``source`` as a string: kept when it is one, written as JSON when it is another
    value (a number, a list), so the information is not lost."""
    if is_missing(value):
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return encodable(text)


def validate_records(
    records: Iterable[Any],
    origins: Iterable[str],
    *,
    mode: Mode = "pairs",
    query_field: str = ReadConfig.query_field,
    passage_field: str = ReadConfig.passage_field,
    text_field: str = ReadConfig.text_field,
    id_field: str = ReadConfig.id_field,
    max_chars: int = ReadConfig.max_chars,
    too_long: str = ReadConfig.too_long,
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
                group, reason = _group(record.get("group"))
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
                    "group": group,
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
        cols["raw"][-1] = None if reason is None else (encodable(raw) if raw is not None else raw_repr(record))
    return pa.Table.from_pydict(cols, schema=parsed_schema(mode))


def reject_repeated_ids(ids: list, reasons: list) -> None:
    """In input order, the first valid row (``reasons[i]`` None) with an id keeps it; later valid rows
    with that id become ``duplicate_id``, in ``reasons`` in place. For inputs read in this process
    (BEIR files, labelled sets); on Ray, ``pairmill.groups.mark_duplicate_ids`` per id bucket."""
    seen: set = set()
    for i, rid in enumerate(ids):
        if reasons[i] is None:
            if rid in seen:
                reasons[i] = DUPLICATE_ID
            seen.add(rid)


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
