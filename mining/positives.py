"""Who is a positive of whom, for mining: the text keys of pairs, their hash buckets, and the
positive passages of each query.

Design note. Corpus rows are keyed by a 63-bit hash of the normalised text (``pairmill.pairs.text_key``),
so "text-identical to the positive" and "is the positive" are one test. The positives of a query are
the keys of every pair whose normalised query is the same: a groupby on a bucket of the query key
(``pairmill.groups.GROUP_ROWS``), so a passage of another pair with the same query is never a
negative. A query with up to ``INLINE_POSITIVES`` distinct passages (nearly all of them) carries its
positive keys in each of its rows, and is searched in batches deep enough to skip them. A query
repeated with more (a generic "A small example package" over 100k rows) keeps one copy of its keys in
the ``PositiveStore`` actors, and is searched once per batch with its positives excluded inside the
index: memory stays linear in the rows and the search depth stays ``range_max + INLINE_POSITIVES``
whatever the largest group (FAISS GPU refuses k above 2048).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from pairmill.config import INLINE_POSITIVES
from pairmill.groups import key_buckets
from pairmill.pairs import text_key


def add_keys(batch: pa.Table) -> pa.Table:
    """``map_batches`` step: ``query_key`` and ``passage_key`` (int64) of each pair."""
    queries = [text_key(t) for t in batch.column("query").to_pylist()]
    passages = [text_key(t) for t in batch.column("passage").to_pylist()]
    return batch.append_column("query_key", pa.array(queries, pa.int64())).append_column(
        "passage_key", pa.array(passages, pa.int64())
    )


def with_bucket(batch: pa.Table, column: str, buckets: int) -> pa.Table:
    """``map_batches`` step: + ``bucket``, the int64 key ``column`` modulo ``buckets``: what the
    key's groupby groups on (a group per bucket of keys, not per key: ``pairmill.groups.GROUP_ROWS``)."""
    return batch.append_column("bucket", key_buckets(batch.column(column).to_numpy(), buckets))


def first_rows(group: pa.Table, key: str) -> pa.Table:
    """The first row of each distinct ``key`` in a group (any mix of keys)."""
    _, first = np.unique(group.column(key).to_numpy(), return_index=True)
    return group.take(pa.array(np.sort(first)))


def partitions(rows: int) -> int:
    """Hash-shuffle partitions: Ray's default of 200 costs seconds per pass on small data."""
    return max(2, min(512, math.ceil(rows / 200_000)))


class PositiveShard:
    """query key -> its distinct positive passage keys, for queries with too many to inline."""

    def __init__(self):
        self.keys: dict[int, np.ndarray] = {}

    def put(self, query_key: int, keys: np.ndarray) -> None:
        self.keys[int(query_key)] = np.asarray(keys, dtype=np.int64)

    def get(self, query_keys: list[int]) -> list[np.ndarray]:
        return [self.keys[int(k)] for k in query_keys]


class PositiveStore:
    """The positive keys of the queries with more than ``INLINE_POSITIVES`` distinct passages, over
    ``num_shards`` actors (0 CPUs: bookkeeping only), routed by query key. Picklable: it travels
    into the ``map_groups`` step that fills it and the ``map_batches`` step that reads it. Memory:
    one int64 per (big query, distinct passage)."""

    def __init__(self, shards: list):
        self.shards = shards

    @classmethod
    def create(cls, num_shards: int = 1) -> "PositiveStore":
        import ray

        actor = ray.remote(num_cpus=0)(PositiveShard)
        return cls([actor.remote() for _ in range(num_shards)])

    def put(self, query_key: int, keys: list[int]) -> None:
        import ray

        ray.get(self.shards[int(query_key) % len(self.shards)].put.remote(int(query_key), np.asarray(keys, np.int64)))

    def get(self, query_keys: list[int]) -> dict[int, np.ndarray]:
        import ray

        slots: dict[int, list[int]] = {}
        for key in set(int(k) for k in query_keys):
            slots.setdefault(key % len(self.shards), []).append(key)
        answers = ray.get([self.shards[s].get.remote(keys) for s, keys in slots.items()])
        return {k: v for keys, values in zip(slots.values(), answers) for k, v in zip(keys, values)}

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)
        self.shards = []


def attach_positives(group: pa.Table, store: PositiveStore | None = None) -> pa.Table:
    """``map_groups`` step over a bucket of query keys (any mix): every row gets ``positive_count``
    (its query's distinct passages) and ``positive_keys``: the keys themselves when there are at most
    ``INLINE_POSITIVES`` (or no store), else null, the keys going once into ``store``. Drops ``bucket``."""
    query_keys = group.column("query_key").to_numpy()
    distinct = np.unique(np.stack([query_keys, group.column("passage_key").to_numpy()], axis=1), axis=0)  # (q, p) pairs
    queries, starts, counts = np.unique(distinct[:, 0], return_index=True, return_counts=True)
    positives: dict[int, list[int] | None] = {}
    for query, start, count in zip(queries.tolist(), starts, counts):
        keys = distinct[start : start + count, 1]  # sorted: np.unique sorts the pairs
        if store is not None and count > INLINE_POSITIVES:
            store.put(query, keys)
            positives[query] = None
        else:
            positives[query] = keys.tolist()
    count_of = dict(zip(queries.tolist(), counts.tolist()))
    group = group.drop_columns([c for c in ("bucket",) if c in group.column_names])
    inline = pa.array([positives[q] for q in query_keys.tolist()], pa.list_(pa.int64()))
    return group.append_column("positive_keys", inline).append_column(
        "positive_count", pa.array([count_of[q] for q in query_keys.tolist()], pa.int64()))
