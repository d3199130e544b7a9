"""Exact dedup: one copy of each (query, passage) pair, compared after ``normalize_text``.

Design note. Each parsed row gets a ``dedup_key``: a hash of the normalised query and passage for a
valid row, and a per-row key for a rejected one (so rejects ride through the same shuffle and the
input is read once). The job groups on a bucket of the key with Ray's hash shuffle
(``groupby(dedup_bucket, num_partitions=P).map_groups(mark_exact_duplicates)``, a group holding
many keys: see ``pairmill.groups.GROUP_ROWS``): every copy of a pair meets in one group wherever it
was in the input, and no set of keys is ever held on the driver. Within a
group the copy with the smallest ``(id, origin)`` is kept (deterministic, independent of block
order); the others get ``reason=exact_duplicate`` and ``dup_of`` = the kept id.
Cost: one shuffle of the rows; memory per reduce task ~ input / P.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pairmill.pairs import normalize_text

EXACT_DUPLICATE = "exact_duplicate"


def dedup_key(query: str, passage: str) -> str:
    """Hash of the normalised pair: equal for pairs that differ only in whitespace or Unicode form."""
    h = hashlib.blake2b(digest_size=12)
    h.update(normalize_text(query).encode("utf-8", "surrogatepass"))
    h.update(b"\x1f")
    h.update(normalize_text(passage).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def add_dedup_key(batch: pa.Table, buckets: int | None = None) -> pa.Table:
    """Parsed rows -> the same rows plus ``dedup_key`` and an empty ``dup_of`` (and, with
    ``buckets``, ``dedup_bucket``: what the job groups on, see ``pairmill.groups.GROUP_ROWS``)."""
    keys = []
    for query, passage, reason, origin, raw in zip(
        *(batch.column(c).to_pylist() for c in ("query", "passage", "reason", "origin", "raw"))
    ):
        if reason is None:
            keys.append(dedup_key(query, passage))
        else:  # a reject: its own key, so it stays a singleton group (raw text and origin identify it)
            keys.append("reject:" + hashlib.blake2b(f"{origin}\x1f{raw}".encode("utf-8", "surrogatepass"), digest_size=12).hexdigest())
    batch = batch.append_column("dedup_key", pa.array(keys, pa.string()))
    if buckets is not None:  # the key is a hash already: its last 15 hex digits are a uniform integer
        bucket = np.fromiter((int(k[-15:], 16) % buckets for k in keys), dtype=np.int64, count=len(keys))
        batch = batch.append_column("dedup_bucket", pa.array(bucket, pa.int64()))
    return batch.append_column("dup_of", pa.nulls(len(keys), pa.string()))


def mark_exact_duplicates(group: pa.Table) -> pa.Table:
    """Rows (any mix of keys) -> the same rows with every copy but one marked ``exact_duplicate``.

    The survivor of a key is its valid row with the smallest ``(id, origin)``; rejected rows pass through.
    """
    keys = group.column("dedup_key").to_pylist()
    reasons = group.column("reason").to_pylist()
    ids = group.column("id").to_pylist()
    origins = group.column("origin").to_pylist()
    keeper: dict[str, int] = {}
    for i, (key, reason) in enumerate(zip(keys, reasons)):
        if reason is None and (key not in keeper or (ids[i], origins[i]) < (ids[keeper[key]], origins[keeper[key]])):
            keeper[key] = i
    dup_of = group.column("dup_of").to_pylist()
    for i, (key, reason) in enumerate(zip(keys, reasons)):
        if reason is None and keeper[key] != i:
            reasons[i] = EXACT_DUPLICATE
            dup_of[i] = ids[keeper[key]]
    group = group.set_column(group.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    return group.set_column(group.schema.get_field_index("dup_of"), "dup_of", pa.array(dup_of, pa.string()))
