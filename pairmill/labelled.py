"""Labelled texts (``text``, ``label``) for pairmill setfit and classify, read in this process
(few-shot sets are small) with the rules every job reads pairs by: a bad row is a counted
rejection with its reason and raw text, never a crash (``pairmill.pairs.validate_records`` checks
the text and the id, as ``pairmill embed --text-field`` does), and the first valid row with an id
keeps it (``duplicate_id`` after). The label is one more field: a non-empty string, or an integer
(read as its decimal string, as ids are); ``required=False`` (classify) lets a row have none.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from pairmill.config import ReadConfig
from pairmill.pairs import REJECT_COLUMNS, decode_line, is_missing, raw_repr, reject_repeated_ids, validate_records
from pairmill.read import _is_json_lines, _load_hf, detect_format, read_arrow_file, read_lines

# reason -> what it means, beside pairmill.pairs.REJECT_REASONS (the README's table has both)
LABEL_REJECT_REASONS = {
    "missing_label": "a labelled row (setfit) without its label field (or it is null)",
    "bad_label": "a label that is not a non-empty string or an integer (a float, a boolean, a list, an object)",
}
LABELLED_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])


def records_of(path: str | Path, text_field: str = ReadConfig.text_field) -> tuple[list, list[str], list[str | None]]:
    """(records, origins, raws) of every input row: dicts, or ``(reason, raw)`` for a line that is
    not one (``pairmill.pairs.decode_line``); raws are the lines as read (None for columnar rows)."""
    fmt, files = detect_format(path)
    records, origins, raws = [], [], []
    for f in files:
        if fmt == "lines":
            for number, raw in enumerate(read_lines(f), start=1):
                record = decode_line(raw, _is_json_lines(f), text_field)
                records.append(record)
                origins.append(f"{f}:{number}")
                raws.append(None if isinstance(record, tuple) else raw.decode("utf-8"))
            continue
        if fmt == "parquet":
            import pyarrow.parquet as pq

            from pairmill import storage

            fs, inner = storage.split(f)
            rows = pq.read_table(inner, filesystem=fs).to_pylist()
        elif fmt == "arrow":  # a saved HF dataset's file on object storage
            rows = read_arrow_file(f).to_pylist()
        else:
            rows = _load_hf(f).to_list()
        records += rows
        origins += [f"{f}:{i}" for i in range(1, len(rows) + 1)]
        raws += [None] * len(rows)
    return records, origins, raws


def _label(value) -> tuple[str | None, str | None]:
    if is_missing(value):
        return None, "missing_label"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, "bad_label"
    text = str(value).strip()
    return (text, None) if text else (None, "bad_label")


def validate_labelled(records: list, origins: list[str], raws: list[str | None] | None = None, *,
                      label_field: str = ReadConfig.label_field, required: bool = True, text_field: str = ReadConfig.text_field,
                      id_field: str = ReadConfig.id_field, max_chars: int = ReadConfig.max_chars,
                      too_long: str = ReadConfig.too_long) -> tuple[pa.Table, pa.Table, int]:
    """(valid rows ``LABELLED_SCHEMA``, rejected rows ``REJECT_COLUMNS``, truncated texts)."""
    parsed = validate_records(records, origins, mode="text", text_field=text_field, id_field=id_field,
                              max_chars=max_chars, too_long=too_long, raws=raws)
    reasons = parsed.column("reason").to_pylist()
    labels = []
    for i, record in enumerate(records):
        label = None
        if reasons[i] is None and isinstance(record, dict):
            label, reason = _label(record.get(label_field))
            if reason is not None and (required or reason != "missing_label"):
                reasons[i] = reason
        labels.append(label if reasons[i] is None else None)
    ids = parsed.column("id").to_pylist()
    reject_repeated_ids(ids, reasons)  # rows are in input order: the first valid row with an id keeps it
    keep = [i for i, r in enumerate(reasons) if r is None]
    rejected_rows = [i for i, r in enumerate(reasons) if r is not None]
    raw_texts = parsed.column("raw").to_pylist()
    texts = parsed.column("text").to_pylist()
    valid = pa.table({"id": [ids[i] for i in keep], "text": [texts[i] for i in keep], "label": [labels[i] for i in keep]},
                     schema=LABELLED_SCHEMA)
    rejected = pa.table({
        "reason": [reasons[i] for i in rejected_rows],
        "raw": [raw_texts[i] if raw_texts[i] is not None else (raws[i] if raws and raws[i] is not None else raw_repr(records[i]))
                for i in rejected_rows],
        "origin": [origins[i] for i in rejected_rows],
    }, schema=pa.schema([(c, pa.string()) for c in REJECT_COLUMNS]))
    truncated = sum(bool(parsed.column("truncated")[i].as_py()) for i in keep)
    return valid, rejected, truncated


def read_labelled(path: str | Path, *, label_field: str = ReadConfig.label_field, required: bool = True,
                  **validate_kwargs) -> tuple[pa.Table, pa.Table, int, int]:
    """(valid rows, rejected rows, truncated texts, input rows) of a labelled file or folder."""
    records, origins, raws = records_of(path, validate_kwargs.get("text_field", ReadConfig.text_field))
    valid, rejected, truncated = validate_labelled(records, origins, raws, label_field=label_field, required=required,
                                                   **validate_kwargs)
    return valid, rejected, truncated, len(records)


def reject_counts(rejected: pa.Table) -> dict[str, int]:
    return label_counts(rejected.column("reason").to_pylist())


def write_rows(table: pa.Table, folder: str | Path, name: str = "part-0.parquet") -> None:
    """``folder/name`` as one Parquet file; ``folder`` local or a prefix on object storage."""
    import pyarrow.parquet as pq

    from pairmill import storage

    fs, inner = storage.split(folder)
    if fs is None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, f"{inner}/{name}", filesystem=fs)


def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))
