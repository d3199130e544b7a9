"""Reading inputs: JSONL (plain or .gz), text lines, Parquet and saved HF ``datasets`` folders, as
a Ray Dataset (or a local table) of rows validated by ``pairmill.pairs.validate_records``.

A saved HF dataset on object storage is read as what ``save_to_disk`` wrote: the Arrow stream
files its ``state.json`` lists (a DatasetDict's ``train`` split, as locally), by pyarrow through
the same filesystem as every other input (``ArrowStreamDatasource`` on Ray), rather than by
``datasets.load_from_disk``, which needs fsspec's s3fs/gcsfs and copies the whole dataset to local
disk first.

Ray's own ``read_json``/``read_text`` stop the whole job on one malformed line or one invalid UTF-8
byte, so JSONL and text files are read by ``LineDatasource``: it streams each file in 8 MiB chunks
and yields raw ``bytes`` lines with their line numbers; decoding and JSON parsing happen in the
validation step, where a failure is a row with a ``reason``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from pairmill import storage
from pairmill.config import ReadConfig
from pairmill.pairs import Mode, decode_line, parsed_schema, validate_records

log = logging.getLogger(__name__)

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
    """Lines of a local or remote file, gunzipped when it ends in .gz (for in-process readers)."""
    with storage.open_input(path) as f:
        yield from _split_lines(iter(lambda: f.read(chunk_bytes), b""))


def _line_datasource_class():
    # Imported lazily so that in-memory users of this module do not import Ray Data.
    from ray.data.datasource import FileBasedDatasource

    class LineDatasource(FileBasedDatasource):
        """Raw lines of text files as ``bytes`` with path and 1-based line number.

        Compression (.gz) is inferred from the extension by ``FileBasedDatasource``.
        """

        _FILE_EXTENSIONS = [s.lstrip(".") for s in LINE_SUFFIXES] + ["gz"]

        def __init__(self, paths, lines_per_block: int = 8192, scheme: str = "", **kwargs):
            super().__init__(paths, **kwargs)
            self.lines_per_block = lines_per_block
            self.scheme = scheme  # "s3://" etc.: Ray hands _read_stream the path without it

        def _read_stream(self, f, path: str):
            chunks = iter(lambda: f.read(8 << 20), b"")
            raws, numbers = [], []
            path = self.scheme + path
            for number, line in enumerate(_split_lines(chunks), start=1):
                raws.append(line)
                numbers.append(number)
                if len(raws) >= self.lines_per_block:
                    yield _line_block(raws, numbers, path)
                    raws, numbers = [], []
            if raws:
                yield _line_block(raws, numbers, path)

    return LineDatasource


def _arrow_stream_datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class ArrowStreamDatasource(FileBasedDatasource):
        """The record batches of Arrow IPC stream files (a saved HF dataset's ``data-*.arrow``)."""

        _FILE_EXTENSIONS = ["arrow"]

        def _read_stream(self, f, path: str):
            for batch in pa.ipc.open_stream(f):
                yield pa.Table.from_batches([batch])

    return ArrowStreamDatasource


def read_arrow_file(uri: str) -> pa.Table:
    """One Arrow IPC stream file (local or remote) as a table, read in this process."""
    with storage.open_input(uri) as f:
        return pa.ipc.open_stream(f).read_all()


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
        text_field = self.kwargs.get("text_field", ReadConfig.text_field)
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
    """('lines' | 'parquet' | 'hf' | 'arrow', files) for an input path or URI (files are URIs for a
    URI): 'hf' is a local saved HF dataset (its folder), 'arrow' one on object storage (its files).

    A pairmill job folder (with ``_SUCCESS`` and ``kept/``) reads as its ``kept/`` rows.
    """
    if storage.is_remote(path):
        return _detect_remote_format(path)
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
        return _folder_format(path, parquet, lines)
    return _file_format(str(p))


HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def _detect_remote_format(uri: str) -> tuple[str, list[str]]:
    """detect_format on object storage: a folder is a prefix, and a job folder is read only as far
    as its ``_SUCCESS`` manifest vouches (``pairmill.output.finished_files``)."""
    from pairmill.output import finished_files

    uri = uri.rstrip("/")
    files = [f for f, _ in storage.list_files(uri)]
    if not files:
        if not storage.exists(uri):
            raise FileNotFoundError(f"input {uri} does not exist")
        return _file_format(uri)
    names = {f[len(uri) + 1:] for f in files}
    if "_SUCCESS" in names or any(n.startswith("kept/") for n in names):
        return _folder_format(f"{uri}/kept", [f for f in finished_files(uri, "kept") if f.endswith(".parquet")], [])
    if names & set(HF_MARKERS):
        return "arrow", _remote_hf_files(uri, names)
    return _folder_format(uri, [f for f in files if f.endswith(".parquet")], [f for f in files if f.endswith(LINE_SUFFIXES)])


def _remote_hf_files(uri: str, names: set[str]) -> list[str]:
    """The Arrow files of a saved HF dataset on object storage, in its ``state.json``'s order; of a
    DatasetDict, its ``train`` split's (``_load_hf``'s rule)."""
    import json

    if "dataset_dict.json" in names:
        splits = json.loads(storage.read_text(f"{uri}/dataset_dict.json")).get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{uri} is a DatasetDict with splits {splits}; save the split you want on its own")
        log.info(f"{uri}: a DatasetDict; reading its 'train' split")
        uri = f"{uri}/train"
    state = f"{uri}/state.json"
    if not storage.exists(state):
        raise ValueError(f"{uri}: a saved HF dataset without state.json (save it with Dataset.save_to_disk)")
    files = [f"{uri}/{entry['filename']}" for entry in json.loads(storage.read_text(state)).get("_data_files", [])]
    missing = [f for f in files if not storage.exists(f)]
    if not files or missing:
        raise ValueError(f"{uri}: a saved HF dataset whose state.json lists {len(files)} data file(s), "
                         f"{len(missing)} of them missing ({missing[:3]}); save it again with Dataset.save_to_disk")
    return files


def _folder_format(path, parquet: list[str], lines: list[str]) -> tuple[str, list[str]]:
    if parquet and not lines:
        return "parquet", parquet
    if lines and not parquet:
        return "lines", lines
    raise ValueError(
        f"{path}: expected a folder of .parquet files, of JSONL files, a saved HF dataset, or a pairmill "
        f"job folder; found {len(parquet)} parquet and {len(lines)} JSONL/text files"
    )


def _file_format(name: str) -> tuple[str, list[str]]:
    if name.endswith(".parquet"):
        return "parquet", [name]
    if name.endswith(LINE_SUFFIXES):
        return "lines", [name]
    raise ValueError(f"{name}: unknown input type; use .jsonl[.gz], .txt[.gz], .parquet, or a folder of them")


def _load_hf(path: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}; save the split you want on its own")
        log.info(f"{path}: a DatasetDict; reading its 'train' split ({len(ds['train'])} rows)")
        ds = ds["train"]
    return ds


def read_raw(path: str | Path):
    """The unparsed Ray Dataset of an input path and its format (one row per input row)."""
    import ray.data

    fmt, files = detect_format(path)
    fs, _ = storage.split(files[0])  # None for local files: Ray's own default
    if fmt == "lines":
        scheme = files[0].split("://")[0] + "://" if fs is not None else ""
        return ray.data.read_datasource(_line_datasource_class()(files, filesystem=fs, scheme=scheme)), fmt
    if fmt == "parquet":
        return ray.data.read_parquet(files, filesystem=fs), fmt
    if fmt == "arrow":
        return ray.data.read_datasource(_arrow_stream_datasource_class()(files, filesystem=fs)), fmt
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

        tables = [ParseRows(mode, f, **validate_kwargs)(pq.read_table(inner, filesystem=fs))
                  for f in files for fs, inner in [storage.split(f)]]
    elif fmt == "arrow":
        tables = [ParseRows(mode, f, **validate_kwargs)(read_arrow_file(f)) for f in files]
    else:
        tables = [ParseRows(mode, files[0], **validate_kwargs)(_load_hf(files[0]).data.table)]
    return pa.concat_tables(tables) if tables else parsed_schema(mode).empty_table()


def input_bytes(path: str | Path) -> int:
    """Bytes of an input's files, gzip counted as 4x (what sizes shuffle partitions and passes)."""
    _, files = detect_format(path)
    if storage.is_remote(path):
        return sum(size * (4 if f.endswith(".gz") else 1) for f, size in zip(files, storage.sizes(files)))
    paths = [f for p in files for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file()]
    return sum(f.stat().st_size * (4 if f.suffix == ".gz" else 1) for f in paths)


def count_input_rows(path: str | Path) -> int:
    """Rows in the input itself, before any validation: lines of line files, rows of Parquet files
    (from their footers) or of an HF dataset. What a job's ``input_rows`` is, so the check
    ``input_rows == kept + dropped + rejected`` compares the outputs with something they did not make."""
    fmt, files = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(inner, filesystem=fs).num_rows for fs, inner in map(storage.split, files))
    if fmt == "hf":
        return len(_load_hf(files[0]))
    if fmt == "arrow":  # stream files (no footer): their batches, read one at a time
        rows = 0
        for f in files:
            with storage.open_input(f) as stream:
                rows += sum(batch.num_rows for batch in pa.ipc.open_stream(stream))
        return rows
    return int(read_raw(path)[0].count())
