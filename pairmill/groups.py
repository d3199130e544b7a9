"""Rows grouped by a key on Ray (exact dedup, one row per id): hash buckets, shuffle partitions,
and ``read_unique`` / ``write_validated``, which every job reads its input with."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairmill.pairs import DUPLICATE_ID, Mode, parsed_schema, raw_repr
from pairmill import storage
from pairmill.output import is_finished
from pairmill.read import count_input_rows, input_bytes, read_parsed


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
    return max(2, math.ceil(input_bytes(input_path) / PARTITION_BYTES))


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
    stats = storage.join(path, "stats.json")
    if not is_finished(path) or not storage.exists(stats):
        return False
    return bool(json.loads(storage.read_text(stats)).get("unique_ids"))


def add_id_bucket(batch: pa.Table, buckets: int, salt: str = "") -> pa.Table:
    """+ ``id_bucket``: a hash bucket of the id of a valid row (``salt`` + id: every row of an id still
    meets in one bucket, and each salt draws other random subsets of the ids as buckets); of a random
    key for a rejected row (whose id is null), so rejects spread over the buckets instead of meeting in one."""
    ids = batch.column("id").to_pylist()
    reasons = batch.column("reason").to_pylist()
    keys = [salt + rid if reason is None else uuid.uuid4().hex for rid, reason in zip(ids, reasons)]
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
    payload = [c for c in ("id", "query", "passage", "text", "source", "negatives", "group") if c in group.column_names]
    columns = {c: group.column(c).to_pylist() for c in payload + ["origin", "raw"]}
    queries = columns.get("query") or [""] * len(ids)
    for rows in repeated:
        order = sorted(rows, key=lambda i: (_input_position(columns["origin"][i]), queries[i] or "", columns[text][i]))
        for i in order[1:]:
            columns["raw"][i] = raw_repr({c: columns[c][i] for c in payload})
            reasons[i] = DUPLICATE_ID
            for c in payload:
                columns[c][i] = None
    for name, values in list(columns.items()) + [("reason", reasons)]:
        index = group.schema.get_field_index(name)
        group = group.set_column(index, group.schema.field(index), pa.array(values, group.schema.field(index).type))
    return group


def mark_duplicate_ids_in_random_order(group: pa.Table, seed: int) -> pa.Table:
    """``mark_duplicate_ids``, then the bucket's rows in an order drawn from ``seed`` and the bucket
    (after sorting them by input position and text: the order rows reach a reduce task varies from run to run)."""
    rng = np.random.default_rng([seed, int(group.column("id_bucket")[0].as_py())])
    group = mark_duplicate_ids(group)
    sort_keys = [c for c in ("origin", "id", "query", "passage", "text") if c in group.column_names]
    group = group.take(pc.sort_indices(group, [(c, "ascending") for c in sort_keys]))
    return group.take(pa.array(rng.permutation(group.num_rows)))


def unique_ids(ds, partitions: int, rows: int, shuffle_seed: int | None = None):
    """A Ray Dataset of parsed rows -> the same rows, later copies of an id rejected as ``duplicate_id``.

    ``shuffle_seed``: the rows also come out in a random order, in the same pass. The id buckets are
    then hashed with the seed, so each is a random subset of the rows whatever the input's order, and
    each bucket's rows are permuted: the output is buckets of randomly drawn rows, one after another,
    each shuffled. What training's local shuffle buffer needs (no batch from one topic), for the cost of
    the one hash shuffle the id check pays anyway, where Ray Data's ``random_shuffle`` after it was a
    second all-to-all pass over every row."""
    salt, step = ("", mark_duplicate_ids) if shuffle_seed is None else \
        (f"{shuffle_seed}:", partial(mark_duplicate_ids_in_random_order, seed=shuffle_seed))
    keyed = ds.map_batches(add_id_bucket, fn_kwargs={"buckets": bucket_count(rows, partitions), "salt": salt},
                           batch_format="pyarrow", batch_size=None)
    return keyed.groupby("id_bucket", num_partitions=partitions).map_groups(step, batch_format="pyarrow")


def read_unique(path: str | Path, mode: Mode = "pairs", shuffle_seed: int | None = None, **validate_kwargs):
    """``read_parsed`` whose valid rows have distinct ids: what every job reads its input with.
    ``shuffle_seed``: in a random order too (``unique_ids``'s seeded buckets, or Ray Data's
    all-to-all ``random_shuffle`` for a job folder, whose ids need no check)."""
    from pairmill.cluster import disk_shuffle

    parsed = read_parsed(path, mode, **validate_kwargs)
    if ids_known_unique(path):
        return parsed if shuffle_seed is None else parsed.random_shuffle(seed=shuffle_seed)
    disk_shuffle(input_bytes(path))  # a large input shuffles through disk, as the filter's and mine's groupbys do
    return unique_ids(parsed, default_partitions(path), count_input_rows(path), shuffle_seed)


def write_validated(path: str | Path, folder: str | Path, mode: Mode = "pairs", shuffle_seed: int | None = None,
                    **validate_kwargs) -> Path | str:
    """``read_unique`` once into a parquet folder (``parsed_schema(mode)``, every input row): the
    passes of a job (rejects, counts, the work) read it back instead of parsing and shuffling the
    input again. An input without rows leaves one empty file, so the folder always reads.

    ``shuffle_seed``: write the rows in a random order (``read_unique``'s): training streams them with
    only a local shuffle buffer, and an input sorted by topic (a filter's output is written cluster by
    cluster) would otherwise fill each batch from one topic."""
    import pyarrow.parquet as pq

    rows = read_unique(path, mode, shuffle_seed, **validate_kwargs)
    if storage.is_remote(folder):  # a prefix on object storage: returned as given
        fs, inner = storage.split(folder)
        rows.write_parquet(str(folder), filesystem=fs)
        if not storage.list_files(str(folder)):
            pq.write_table(parsed_schema(mode).empty_table(), f"{inner}/empty.parquet", filesystem=fs)
        return folder
    folder = Path(folder)
    rows.write_parquet(str(folder))
    if not any(folder.glob("*.parquet")):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(parsed_schema(mode).empty_table(), folder / "empty.parquet")
    return folder
