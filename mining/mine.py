"""``pairmill mine PAIRS -o OUT [--corpus C]``: hard negatives for every pair, from a sharded index.

Design note.
- Corpus: the distinct passages of the pairs plus an optional extra corpus. Texts equal after
  normalisation (NFKC, collapsed whitespace) are one corpus row, keyed by a 63-bit hash of the
  normalised text. That makes "text-identical to the positive" the same test as "is the
  positive": both are the positive's key, and ``select_negatives`` removes it.
- Positives of a query: the keys of every pair whose normalised query is the same (a groupby on a
  bucket of the query key: ``pairmill.groups.GROUP_ROWS``), so a passage of another pair with the same query is never a negative. A query with
  up to ``INLINE_POSITIVES`` distinct passages (nearly all of them) carries its positive keys in
  each of its rows, and is searched in batches deep enough to skip them. A query repeated with
  more (a generic "A small example package" over 100k rows) keeps one copy of its keys in the
  ``PositiveStore`` actors, and is searched once per batch with its positives excluded inside
  FAISS: memory stays linear in the rows and the search depth stays ``range_max + INLINE_POSITIVES``
  whatever the largest group (FAISS GPU refuses k above 2048).
- Embeddings are computed once: by the encoder actor pool (queries and passages of every pair), or
  taken from a filter job folder whose stats.json names the same encoder fingerprint. The encoded
  pairs go to ``OUT/work/`` (deleted at the end) and are read back by the passes that need them,
  rather than re-encoded or held in the object store.
- Passes: encode pairs -> work/; distinct passages (groupby passage key) [+ encoded extra corpus]
  streamed into a ``ShardedIndex`` (``OUT/index``, with the texts, so a negative's text comes back
  from the shard that holds it); groupby query key attaches positives, then ``map_batches``
  searches, selects and looks up texts. Shards restart from their saved files, so a shard that
  dies mid-mining costs a wait, not a different result.
- Identical query vectors in a batch are searched once.
- Cost: encode 2N texts (+ extra corpus); two hash shuffles of the pairs; search the distinct
  queries x (range_max + up to INLINE_POSITIVES) over the corpus; one fetch of the chosen
  negatives' texts and vectors per batch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mining.negatives import select_negatives
from pairmill.config import INLINE_POSITIVES, MineConfig
from pairmill.groups import bucket_count, key_buckets
from pairmill.pairs import text_key

log = logging.getLogger(__name__)

NEAR_DUPLICATE = 0.95  # cosine between a negative and its positive above which it is counted as a near-duplicate
PASSAGES_PER_SHARD = 2_000_000
# INLINE_POSITIVES (from the config, whose checks need it): distinct passages of one query carried
# in each of its rows and searched past in a batch; a query with more uses the PositiveStore.
MINED_COLUMNS = ["negatives", "negative_ids", "negative_scores", "positive_score", "padded_negatives",
                 "margin_filtered", "near_duplicate_negatives"]


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


def first_passage(group: pa.Table) -> pa.Table:
    """``map_groups`` step over a bucket of passage keys: one row per key (one corpus entry per text)."""
    return first_rows(group, "passage_key").select(["passage_key", "passage", "passage_embedding"])


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


def pad_random(ids: np.ndarray, positives: list[set[int]], pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill the -1 slots of ``ids`` (Q, n) with ids from ``pool`` that are neither a positive nor
    already chosen for that query. Returns (ids, padded per query (Q,)); a slot stays -1 when the
    pool runs out."""
    ids = ids.copy()
    padded = np.zeros(len(ids), dtype=np.int64)
    for i, row in enumerate(ids):
        taken = set(row.tolist()) | positives[i]
        fill = [int(c) for c in pool if int(c) not in taken]
        for slot in np.flatnonzero(row < 0)[: len(fill)]:
            row[slot] = fill.pop(0)
            padded[i] += 1
    return ids, padded


def mine_batch(batch: pa.Table, index, selection: dict, keep: list[str], pad: str = MineConfig.pad,
               store: PositiveStore | None = None) -> pa.Table:
    """``map_batches`` step: search the index for a batch of pairs and choose their negatives."""
    from pairmill.vectors import to_matrix

    queries = to_matrix(batch.column("query_embedding"))  # (B, D)
    passages = to_matrix(batch.column("passage_embedding"))  # (B, D)
    positive_scores = np.einsum("bd,bd->b", queries, passages)  # (B,) cosine: embeddings are unit length
    inline = batch.column("positive_keys").to_pylist()
    big = np.array([keys is None for keys in inline], dtype=bool)  # positives in the store, not in the row
    query_keys = batch.column("query_key").to_numpy()
    stored = store.get(query_keys[big].tolist()) if big.any() else {}
    range_max = selection["range_max"]
    # Rows with inline positives: one batched search, deep enough to skip the deepest row's positives.
    depth = range_max + max((len(keys) for keys in inline if keys is not None), default=0)
    scores = np.full((len(batch), depth), -np.inf, dtype=np.float32)  # (B, depth)
    ids = np.full((len(batch), depth), -1, dtype=np.int64)  # (B, depth)
    small = np.flatnonzero(~big)
    if len(small):  # identical query vectors (a repeated query) are searched once
        unique, inverse = np.unique(queries[small], axis=0, return_inverse=True)
        found_scores, found_ids = index.search(unique, depth)
        scores[small], ids[small] = found_scores[inverse.reshape(-1)], found_ids[inverse.reshape(-1)]
    if big.any():
        # Rows whose query has too many positives to search past: each distinct (query key, vector)
        # once, with that query's positives excluded inside the index (two keys can share a vector:
        # texts an uncased model cannot tell apart, each with its own positives).
        groups: dict[tuple, list[int]] = {}
        for r in np.flatnonzero(big):
            groups.setdefault((int(query_keys[r]), queries[r].tobytes()), []).append(int(r))
        members = list(groups.values())
        found_scores, found_ids = index.search(np.stack([queries[m[0]] for m in members]), range_max,
                                               exclude=[stored[int(query_keys[m[0]])] for m in members])
        for j, m in enumerate(members):
            scores[m, :range_max], ids[m, :range_max] = found_scores[j], found_ids[j]
    # Excluded searches never return a positive: those rows need no second check against 100k keys.
    positives = [set() if keys is None else set(keys) for keys in inline]
    chosen = select_negatives(ids, scores, positive_scores, positives, **selection)
    neg_ids, neg_scores, padded = chosen.ids, chosen.scores, np.zeros(batch.num_rows, dtype=np.int64)
    if pad == "random" and chosen.short:
        # Asked for: short queries get random corpus passages, appended after the mined ones and
        # counted per row in `padded_negatives`. Seeded by the batch's first id: reruns agree.
        full = [set(stored[int(k)].tolist()) if b else p for b, k, p in zip(big, query_keys, positives)]
        seed = text_key(batch.column("id")[0].as_py())
        pool_size = int((neg_ids < 0).sum()) + 4 * min(max(len(p) for p in full), 1024) + 16
        neg_ids, padded = pad_random(neg_ids, full, index.sample_ids(pool_size, seed))
    texts, negative_vectors = index.fetch(neg_ids)  # (B, n) object, None where no negative; (B, n, D), NaN there
    if padded.any():
        neg_scores = np.einsum("bnd,bd->bn", negative_vectors, queries).astype(np.float32)  # same as the index's scores
    to_positive = np.einsum("bnd,bd->bn", negative_vectors, passages)  # (B, n) cosine negative-positive
    valid = neg_ids >= 0
    rows = range(batch.num_rows)
    out = batch.select([c for c in keep if c in batch.column_names])
    columns = {
        "negatives": pa.array([list(texts[i][valid[i]]) for i in rows], pa.list_(pa.string())),
        "negative_ids": pa.array([neg_ids[i][valid[i]].tolist() for i in rows], pa.list_(pa.int64())),
        "negative_scores": pa.array([neg_scores[i][valid[i]].tolist() for i in rows], pa.list_(pa.float32())),
        "positive_score": pa.array(positive_scores, pa.float32()),
        "padded_negatives": pa.array(padded, pa.int64()),  # trailing random negatives (pad="random" only)
        # candidates in the rank window the positive-aware filter removed, and negatives within cosine
        # NEAR_DUPLICATE of the positive: per row, so stats.json's totals come from kept/ itself
        "margin_filtered": pa.array(chosen.filtered, pa.int64()),
        "near_duplicate_negatives": pa.array(((to_positive >= NEAR_DUPLICATE) & valid).sum(axis=1), pa.int64()),
    }
    if "negatives" in out.column_names:  # mined negatives replace the ones the input carried
        out = out.drop_columns(["negatives"])
    for name, column in columns.items():
        out = out.append_column(name, column)
    return out


def mine_pairs(pairs, index, selection: dict, *, batch_size: int = MineConfig.query_batch, keep: list[str] | None = None,
               pad: str = MineConfig.pad, store: PositiveStore | None = None):
    """Ray Dataset of pairs (with embeddings, ``query_key`` and ``positive_keys``) -> the same pairs
    with ``MINED_COLUMNS``.
    ``store`` holds the positives of rows whose ``positive_keys`` is null (see ``attach_positives``)."""
    from pairmill.pairs import output_columns

    return pairs.map_batches(
        mine_batch,
        fn_kwargs={"index": index, "selection": selection, "keep": keep or output_columns("pairs"), "pad": pad,
                   "store": store},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=0.5,  # the search itself runs in the shard actors
    )


def selection_kwargs(mine_cfg) -> dict:
    """The ``select_negatives`` arguments of a MineConfig."""
    return {
        "num_negatives": mine_cfg.num_negatives,
        "range_min": mine_cfg.range_min,
        "range_max": mine_cfg.range_max,
        "margin_ratio": mine_cfg.margin_ratio,
        "max_score": mine_cfg.max_score,
        "sampling": mine_cfg.sampling,
        "seed": mine_cfg.seed,
    }


def reusable_embeddings(pairs_path: str, fingerprint: str) -> str | list[str] | None:
    """The ``kept/`` rows of a finished pairmill job whose rows carry embeddings made with this
    encoder fingerprint (the folder; on object storage the files its manifest lists), else None."""
    import json

    import pyarrow.parquet as pq

    from pairmill import storage
    from pairmill.output import finished_files, is_finished

    stats = storage.join(pairs_path, "stats.json")
    if not is_finished(pairs_path) or not storage.exists(stats):
        return None
    saved = json.loads(storage.read_text(stats)).get("encoder_fingerprint")
    if saved != fingerprint:
        if saved:
            log.info(f"mine: {pairs_path} was encoded with encoder {saved}, not {fingerprint}: encoding again")
        return None
    remote = storage.is_remote(pairs_path)
    files = finished_files(pairs_path, "kept") if remote else sorted((Path(pairs_path) / "kept").glob("*.parquet"))
    if not files:
        return None
    fs, first = storage.split(files[0])
    if not {"query_embedding", "passage_embedding"} <= set(pq.read_schema(first, filesystem=fs).names):
        return None
    return files if remote else str(Path(pairs_path) / "kept")


def partitions(rows: int) -> int:
    """Hash-shuffle partitions: Ray's default of 200 costs seconds per pass on small data."""
    return max(2, min(512, math.ceil(rows / 200_000)))


def mine(
    pairs_path: str,
    out: str,
    *,
    corpus_path: str | None,
    encoder,
    read,
    mine_cfg,
    ray,
) -> dict:
    """Run the mine job; returns the stats written to ``OUT/stats.json``."""
    import ray as ray_lib
    from ray.data.aggregate import Count, Sum
    from ray.data.expressions import col

    from pairmill.cluster import disk_shuffle, encoder_pool, init_ray
    from pairmill.encoder import EncodeBatch
    from pairmill.config import encoder_kwargs, read_kwargs
    from pairmill import storage
    from pairmill.output import PARTS, count_by, open_job, parquet_bytes, parquet_rows
    from pairmill.pairs import REJECT_COLUMNS, output_columns
    from pairmill.read import count_input_rows, read_parsed
    from pairmill.groups import write_validated

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    fingerprint = encoder.fingerprint()
    pool = encoder_pool(ray.actors)
    encode_args = encode_pool_args(pool, encoder.batch_size)
    with open_job(out, PARTS + ("index",)) as job:  # on object storage the index is part of the attempt
        fs, work = job.filesystem, job.work  # work("pairs"): the job's scratch folders
        # -- 1. pairs with embeddings, written once to work/pairs -----------------------------
        t0 = time.perf_counter()
        reuse = reusable_embeddings(pairs_path, fingerprint)
        if reuse is not None:
            log.info(f"mine: reusing the embeddings in {pairs_path}/kept (encoder {fingerprint})")
            pairs = ray_lib.data.read_parquet(reuse, filesystem=storage.split(reuse[0])[0] if isinstance(reuse, list) else None)
        else:
            validated = write_validated(pairs_path, work("validated"), "pairs", **read_kwargs(read))
            parsed = ray_lib.data.read_parquet(str(validated), filesystem=fs)
            parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS).write_parquet(
                job.path("rejected"), filesystem=fs
            )
            log.info(f"mine: encoding pairs on {pool.size} actor(s)")
            valid = parsed.filter(expr=col("reason").is_null()).select_columns(output_columns("pairs"))
            pairs = valid.map_batches(
                EncodeBatch, fn_constructor_kwargs={"mode": "pairs", "encoder_kwargs": encoder_kwargs(encoder),
                                                    "keep_columns": True}, **encode_args
            )
        pairs.map_batches(add_keys, batch_format="pyarrow").write_parquet(work("pairs"), filesystem=fs)
        valid_rows = parquet_rows(work("pairs"))
        disk_shuffle(parquet_bytes(work("pairs")))
        rejected = count_by(job.path("rejected"), "reason")
        input_rows = count_input_rows(pairs_path)  # from the input itself: the commit checks the outputs against it
        job.stage("read+encode", input_rows, valid_rows, time.perf_counter() - t0)

        # -- 2. the corpus: distinct passages (+ the extra corpus) into the sharded index -------
        t0 = time.perf_counter()
        corpus = ray_lib.data.read_parquet(work("pairs"), filesystem=fs).select_columns(["passage_key", "passage", "passage_embedding"])
        extra_stats = None
        if corpus_path:
            extra_parsed = read_parsed(corpus_path, "text", **read_kwargs(read))
            extra_parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS).write_parquet(
                work("corpus_rejected"), filesystem=fs
            )
            extra = (
                extra_parsed.filter(expr=col("reason").is_null())
                .select_columns(output_columns("text"))
                .map_batches(
                    EncodeBatch,
                    fn_constructor_kwargs={"mode": "text", "encoder_kwargs": encoder_kwargs(encoder),
                                           "keep_columns": True, "text_kind": "passage"},
                    **encode_args,
                )
                .map_batches(_as_corpus_rows, batch_format="pyarrow")
            )
            extra.write_parquet(work("corpus"), filesystem=fs)
            extra_stats = {
                "path": str(corpus_path),
                "rows": parquet_rows(work("corpus")),
                "rejected": count_by(work("corpus_rejected"), "reason"),
            }
            corpus = corpus.union(ray_lib.data.read_parquet(work("corpus"), filesystem=fs))
        distinct = (
            corpus.map_batches(with_bucket, fn_kwargs={"column": "passage_key",
                                                        "buckets": bucket_count(valid_rows, partitions(valid_rows))},
                               batch_format="pyarrow")
            .groupby("bucket", num_partitions=partitions(valid_rows))
            .map_groups(first_passage, batch_format="pyarrow")
        )
        distinct.write_parquet(work("distinct"), filesystem=fs)
        corpus_rows = parquet_rows(work("distinct"))
        index = build_index(work("distinct"), corpus_rows, mine_cfg, job.path("index"),
                            {"encoder_fingerprint": fingerprint, "encoder": encoder_kwargs(encoder)})
        num_shards, shard_devices = len(index.shards), {"devices": index.devices, "warnings": index.device_warnings}
        try:
            log.info(f"mine: index {index.spec!r} over {corpus_rows} passages in {num_shards} shard(s)")
            job.stage("index", valid_rows, corpus_rows, time.perf_counter() - t0)

            # -- 3. positives per query, search, select, look up texts ------------------------
            t0 = time.perf_counter()
            write_mined(work("pairs"), valid_rows, index, mine_cfg, job.path("kept"))
        finally:
            index.close()
        totals = (  # from kept/ itself: small columns only, one read
            ray_lib.data.read_parquet(job.path("kept"), filesystem=fs)
            .select_columns(["negative_ids", "positive_score", "negative_scores", "padded_negatives", "margin_filtered",
                             "near_duplicate_negatives"])
            .map_batches(_row_counts, batch_format="pyarrow", fn_kwargs={"asked": mine_cfg.num_negatives})
            .aggregate(Count(), Sum("n"), Sum("short"), Sum("none"), Sum("margin"), Sum("near"), Sum("padded"),
                       Sum("positive_score"), Sum("negative_score_sum"))
        )
        kept_rows = parquet_rows(job.path("kept"))
        job.stage("mine", valid_rows, kept_rows, time.perf_counter() - t0)
        job.remove_work()
        negatives = int(totals["sum(n)"] or 0)
        stats = job.commit(
            {
                "input_rows": input_rows,
                "kept": kept_rows,
                "dropped": {},
                "rejected": rejected,
                "negatives": {
                    "asked_per_pair": mine_cfg.num_negatives,
                    "total": negatives,
                    "short_pairs": int(totals["sum(short)"] or 0),
                    "padded_random": int(totals["sum(padded)"] or 0),
                    "pairs_without_negatives": int(totals["sum(none)"] or 0),
                    "filtered_by_margin": int(totals["sum(margin)"] or 0),
                    "near_duplicates": int(totals["sum(near)"] or 0),
                    "near_duplicate_rate": round(int(totals["sum(near)"] or 0) / max(1, negatives), 5),
                    "mean_positive_score": round(float(totals["sum(positive_score)"] or 0) / max(1, kept_rows), 5),
                    "mean_negative_score": round(float(totals["sum(negative_score_sum)"] or 0) / max(1, negatives), 5),
                },
                "selection": selection_kwargs(mine_cfg),
                "corpus": {"passages": corpus_rows, "extra": extra_stats},
                "index": {"spec": index.spec, "shards": num_shards, "nprobe": index.nprobe, "folder": "index",
                          **shard_devices},
                "unique_ids": True,
                "reused_embeddings": reuse is not None,
                "encoder": encoder_kwargs(encoder),
                "encoder_fingerprint": fingerprint,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    return stats


def encode_pool_args(pool, batch_size: int | None) -> dict:
    """``map_batches`` arguments of an encoder actor pool of ``pool`` (a ``PoolSize``)."""
    import ray

    return {
        "compute": ray.data.ActorPoolStrategy(size=pool.size),
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        # Many rows per call: the encoder sorts them by length, so padding shrinks.
        "batch_size": max(1024, 8 * (batch_size or 32)),
        "batch_format": "pyarrow",
    }


def build_index(distinct: str | Path, rows: int, mine_cfg, folder: str | Path, manifest_extra: dict):
    """A ShardedIndex (home ``folder``) over a parquet folder of distinct passages
    (``passage_key``, ``passage``, ``passage_embedding``), trained first when IVF."""
    import ray

    from mining.index import ShardedIndex

    from pairmill import storage
    from pairmill.cluster import search_cpus

    shards = mine_cfg.shards or max(1, math.ceil(rows / PASSAGES_PER_SHARD))
    index = ShardedIndex.create(
        shards,
        _dimension(distinct),
        mine_cfg.index_spec,
        n_vectors=rows,
        nprobe=mine_cfg.nprobe,
        num_cpus=mine_cfg.shard_cpus or search_cpus(shards),
        num_gpus=mine_cfg.shard_gpus,
        folder=str(folder),
        manifest_extra=manifest_extra,
    )
    try:
        ds = ray.data.read_parquet(str(distinct), filesystem=storage.split(distinct)[0])
        if index.nlist is not None:
            index.train(_training_sample(ds, rows, index.nlist))
        index.add_dataset(ds, "passage_key", "passage_embedding", text_column="passage")
    except BaseException:
        index.close()
        raise
    return index


def write_mined(pairs: str | Path, rows: int, index, mine_cfg, out: str, columns: list[str] | None = None) -> None:
    """Encoded pairs with keys (a parquet folder) -> their mined rows (see ``mine_pairs``; only
    ``columns`` when given) written to the parquet folder ``out``. The positives of repeated
    queries live in a ``PositiveStore`` for the length of the write."""
    import ray

    from pairmill import storage

    store = PositiveStore.create(max(1, math.ceil(rows / 10_000_000)))
    try:
        with_positives = (
            ray.data.read_parquet(str(pairs), filesystem=storage.split(pairs)[0])
            .map_batches(with_bucket, fn_kwargs={"column": "query_key", "buckets": bucket_count(rows, partitions(rows))},
                         batch_format="pyarrow")
            .groupby("bucket", num_partitions=partitions(rows))
            .map_groups(attach_positives, fn_kwargs={"store": store}, batch_format="pyarrow")
        )
        mined = mine_pairs(with_positives, index, selection_kwargs(mine_cfg), batch_size=mine_cfg.query_batch,
                           pad=mine_cfg.pad, store=store)
        (mined.select_columns(columns) if columns else mined).write_parquet(out, filesystem=storage.split(out)[0])
    finally:
        store.close()


def _as_corpus_rows(batch: pa.Table) -> pa.Table:
    texts = batch.column("text").to_pylist()
    return pa.table(
        {
            "passage_key": pa.array([text_key(t) for t in texts], pa.int64()),
            "passage": batch.column("text"),
            "passage_embedding": batch.column("embedding"),
        }
    )


def _row_counts(batch: pa.Table, asked: int) -> pa.Table:
    n = np.array([len(ids) for ids in batch.column("negative_ids").to_pylist()], dtype=np.int64)
    mined = n - batch.column("padded_negatives").to_numpy()  # short and none count mined negatives, not padding
    score_sums = [float(sum(s)) for s in batch.column("negative_scores").to_pylist()]
    return pa.table(
        {
            "n": n,
            "short": (mined < asked).astype(np.int64),
            "none": (mined == 0).astype(np.int64),
            "margin": batch.column("margin_filtered"),
            "padded": batch.column("padded_negatives"),
            "near": batch.column("near_duplicate_negatives"),
            "positive_score": batch.column("positive_score").cast(pa.float64()),
            "negative_score_sum": pa.array(score_sums, pa.float64()),
        }
    )


def _dimension(folder: str | Path) -> int:
    import pyarrow.parquet as pq

    from pairmill import storage
    from pairmill.output import parquet_files

    files = parquet_files(folder)
    if not files:
        raise ValueError("the corpus is empty: no valid pairs (see rejected/) and no extra corpus")
    fs, first = storage.split(files[0])
    return pq.read_schema(first, filesystem=fs).field("passage_embedding").type.list_size


def _training_sample(ds, rows: int, nlist: int) -> np.ndarray:
    """About 64 vectors per IVF list (FAISS wants >= 39), drawn uniformly from the corpus."""
    from pairmill.vectors import to_matrix

    want = min(rows, 64 * nlist)
    sample = ds.random_sample(min(1.0, 1.2 * want / rows), seed=0).select_columns(["passage_embedding"])
    table = pa.concat_tables(
        [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
         for b in sample.iter_batches(batch_format="pyarrow", batch_size=65536)]
    )
    return to_matrix(table.column("passage_embedding"))[:want]


def format_summary(stats: dict, out: str) -> str:
    from pairmill.output import format_summary as job_summary

    neg = stats["negatives"]
    return "\n".join(
        [
            job_summary(stats, out),
            f"    corpus passages     {stats['corpus']['passages']} in {stats['index']['shards']} shard(s), "
            f"index {stats['index']['spec']}",
            f"    negatives           {neg['total']} ({neg['asked_per_pair']} asked per pair); "
            f"{neg['short_pairs']} pairs short, {neg['pairs_without_negatives']} with none",
            f"    scores              positive {neg['mean_positive_score']:.3f}, negative {neg['mean_negative_score']:.3f}; "
            f"{neg['filtered_by_margin']} candidates over the margin; near-duplicates {neg['near_duplicate_rate']:.2%}",
        ]
    )


def main(args) -> int:
    """``pairmill mine PAIRS -o OUT [--corpus C]``."""
    cfg = args.config_sections
    stats = mine(
        args.input,
        args.output,
        corpus_path=args.extra_corpus,
        encoder=cfg["encoder"],
        read=cfg["read"],
        mine_cfg=cfg["mine"],
        ray=cfg["ray"],
    )
    print(format_summary(stats, args.output))
    return 0
