"""``pairmill filter INPUT -o OUT``: raw pairs -> kept pairs, through exact dedup, the E5
consistency filter, decontamination and semantic dedup (SemDeDup), with an optional audit.

Design note. The steps are functions over in-memory batches (``pipelines.dedup``,
``.consistency``, ``.decontaminate``, ``.semdedup``, ``.audit``); this module wires them into Ray
passes. The result of each pass is materialised in Ray's object store (which spills to disk when
it fills), not gathered: the driver holds only per-reason counts and the k-means sample, the pool
lives in index actors. Materialising instead of writing parquet between passes matters on small
machines: re-reading a parquet folder cost ~3 s of fixed overhead per read on 2 loaded cores,
reading materialised blocks ~0.2 s. Each execution has a fixed cost, so stages are fused into as
few as the barriers allow:
1. read + validate -> ``groupby(dedup_bucket, num_partitions).map_groups`` (exact dedup: every copy
   of a pair meets in one group; a group holds a bucket of keys, ``pairmill.groups.GROUP_ROWS``) -> ``pairmill.groups.unique_ids`` (a survivor whose id an earlier
   row took is rejected as ``duplicate_id``; after exact dedup, so a copy of a pair is an
   ``exact_duplicate``, not a duplicate id) -> encode the survivors once (encoder actor pool) ->
   ``marked``. Every input row is in it: rejects, duplicates, and survivors with their embeddings.
2. stream a random sample of survivors' passage embeddings into a ``ShardedIndex`` (the
   consistency pool, ``min(N, pool_size)`` rows; a barrier, since every pair is scored against the
   whole pool), collecting the k-means sample on the way; fit k-means on the driver.
3. score (actor pool: consistency rank against the pool, decontamination, k-means cluster; with
   ``audit`` the corrupted pairs ride along) -> ``groupby(cluster).map_groups(semdedup)`` ->
   ``final``.
4. write ``kept/``, ``dropped/`` (rows each stage removed), ``rejected/``.
Stage order: decontamination runs before semantic dedup (the issue lists it after), so a
semantic duplicate's ``dup_of`` always names a row in ``kept/``, and a row that is both
contaminated and a near-duplicate is reported as contaminated. Stage seconds in stats.json are
compute time measured inside the workers (``t_<stage>`` columns); ``passes`` holds wall time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairmill.cluster import LARGE_BYTES
from pairmill.config import EncoderConfig, FilterConfig, RayConfig, ReadConfig
from pairmill.encoder import EncodeBatch, encoder_stage
from pairmill.config import encoder_kwargs, read_kwargs
from pairmill.output import format_summary
from pairmill.vectors import to_matrix
from pairmill.groups import (
    PARTITION_BYTES,
    add_id_bucket,
    bucket_count,
    default_partitions,
    ids_known_unique,
    mark_duplicate_ids,
)
from pairmill.pairs import REJECT_COLUMNS, REJECT_REASONS, output_columns
from pairmill import storage
from pairmill.read import count_input_rows, input_bytes, read_parsed
from pipelines.audit import audit_from_counts, calibrate_k, corrupt_rows, rank_counts
from pipelines.consistency import INCONSISTENT, consistency_ranks, rank_depth
from pipelines.decontaminate import CONTAMINATED, contamination
from pipelines.dedup import EXACT_DUPLICATE, add_dedup_key, mark_exact_duplicates
from pipelines.semdedup import SEMANTIC_DUPLICATE, assign_clusters, dedup_vectors, default_n_clusters, fit_kmeans, semdedup_cluster

log = logging.getLogger(__name__)
PAIR_COLUMNS = output_columns("pairs")  # id, query, passage, source, negatives
EMBEDDING_COLUMNS = ["query_embedding", "passage_embedding"]
DROPPED_COLUMNS = PAIR_COLUMNS + ["reason", "dup_of", "rank", "origin"]
POOL_ROWS_PER_SHARD = 500_000  # 500k x 384 x 4 B = 0.77 GB of vectors per shard


# ---------------------------------------------------------------------------------------------
# Ray steps: callables over pyarrow batches.


def with_seconds(table: pa.Table, name: str, seconds: float) -> pa.Table:
    """Append a ``t_<stage>`` column: the batch's compute seconds spread over its rows (they sum back)."""
    return table.append_column(name, pa.array(np.full(len(table), seconds / max(len(table), 1))))


def with_status_columns(batch: pa.Table, buckets: int = 1) -> pa.Table:
    """Parsed rows -> + ``dedup_key``, ``dedup_bucket``, ``dup_of``, ``rank``: the columns every later pass carries."""
    batch = add_dedup_key(batch, buckets)
    return batch.append_column("rank", pa.nulls(len(batch), pa.int32()))


def dedup_group(group: pa.Table) -> pa.Table:
    """``map_groups`` step: ``mark_exact_duplicates``, timed."""
    t0 = time.perf_counter()
    return with_seconds(mark_exact_duplicates(group), "t_dedup", time.perf_counter() - t0)


def id_group(group: pa.Table) -> pa.Table:
    """``map_groups`` step: ``pairmill.groups.mark_duplicate_ids``, timed."""
    t0 = time.perf_counter()
    return with_seconds(mark_duplicate_ids(group), "t_ids", time.perf_counter() - t0)


class EmbedPairs:
    """``map_batches`` callable: rows -> the same rows + query_embedding, passage_embedding, computed
    for the rows still in (``reason`` null) and null for rejects and duplicates."""

    def __init__(self, encoder_kwargs: dict):
        self.encode = EncodeBatch("pairs", encoder_kwargs)
        self.dim = self.encode.encoder.dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        alive = np.array([r is None for r in batch.column("reason").to_pylist()], dtype=bool)
        embedded = self.encode(batch.filter(pa.array(alive))) if alive.any() else None
        for name in EMBEDDING_COLUMNS:
            matrix = np.zeros((len(batch), self.dim), np.float32)  # (B, D), zeros under the nulls
            if embedded is not None:
                matrix[alive] = to_matrix(embedded.column(name))
            values = pa.array(matrix.reshape(-1))
            batch = batch.append_column(name, pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~alive)))
        return with_seconds(batch, "t_encode", time.perf_counter() - t0)


class ScorePairs:
    """``map_batches`` callable: per-row stages on embedded rows.

    Adds ``reason`` (inconsistent / contaminated / null), ``dup_of`` (the eval id for contaminated
    rows), ``rank``, ``cluster``, ``centroid_sim``, ``audit`` (True on corrupted rows, appended at
    the end of the batch with only id, rank and reason filled) and the seconds each stage took
    per row (``t_consistency``, ``t_decontaminate``), so the job can report per-stage time.
    """

    def __init__(
        self,
        *,
        search=None,
        k: int = FilterConfig.k,
        near_eps: float = 0.0,
        eval_ref=None,
        decontaminate_eps: float = 0.0,
        centroids: np.ndarray | None = None,
        on: str = FilterConfig.on,
        audit: float = FilterConfig.audit,
        seed: int = FilterConfig.seed,
    ):
        import ray

        self.search = search  # ShardedIndex.search (or any kernel): the pool stays in the index
        self.k = k
        self.depth = rank_depth(k)
        self.near_eps = near_eps
        self.eval_texts = ray.get(eval_ref) if eval_ref is not None else None
        self.eps = decontaminate_eps
        self.centroids = centroids
        self.on = on
        self.audit = audit
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        embedded = "query_embedding" in batch.column_names
        q = to_matrix(batch.column("query_embedding")) if embedded else None  # (B, D)
        p = to_matrix(batch.column("passage_embedding")) if embedded else None  # (B, D)
        reasons = batch.column("reason").to_pylist()
        dup_of = batch.column("dup_of").to_pylist()
        ranks = batch.column("rank")
        seconds = {"t_consistency": 0.0, "t_decontaminate": 0.0}
        audit_rows = None
        if self.search is not None:
            t0 = time.perf_counter()
            rank = consistency_ranks(q, p, self.search, self.depth, self.near_eps)
            ranks = pa.array(rank, pa.int32())
            reasons = [INCONSISTENT if r > self.k else reason for r, reason in zip(rank, reasons)]
            if self.audit:
                audit_rows = self._audit_rows(batch, q, p)
            seconds["t_consistency"] = time.perf_counter() - t0
        if self.eval_texts is not None:
            t0 = time.perf_counter()
            hits = contamination(
                batch.column("query").to_pylist(), batch.column("passage").to_pylist(), q, p, self.eval_texts, self.eps
            )
            for i, hit in enumerate(hits):
                if hit is not None and reasons[i] is None:
                    reasons[i], dup_of[i] = CONTAMINATED, hit
            seconds["t_decontaminate"] = time.perf_counter() - t0
        if self.centroids is not None:
            cluster, centroid_sim = assign_clusters(dedup_vectors(q, p, self.on), self.centroids)
        else:
            cluster, centroid_sim = np.zeros(n, np.int32), np.zeros(n, np.float32)
        out = batch
        for name, values in (("reason", pa.array(reasons, pa.string())), ("dup_of", pa.array(dup_of, pa.string())), ("rank", ranks)):
            out = out.set_column(out.schema.get_field_index(name), name, values)
        extra = {
            "cluster": pa.array(cluster, pa.int32()),
            "centroid_sim": pa.array(centroid_sim, pa.float32()),
            "audit": pa.array(np.zeros(n, bool)),
            **{name: pa.array(np.full(n, s / max(n, 1))) for name, s in seconds.items()},
        }
        for name, values in extra.items():
            out = out.append_column(name, values)
        if audit_rows is not None and len(audit_rows):
            out = pa.concat_tables([out, _audit_table(out.schema, *audit_rows)])
        return out

    def _audit_rows(self, batch: pa.Table, q: np.ndarray, p: np.ndarray) -> tuple[list[str], np.ndarray]:
        ids = batch.column("id").to_pylist()
        query_rows, passage_rows = corrupt_rows(ids, batch.column("passage").to_pylist(), self.audit, self.seed)
        rank = consistency_ranks(q[query_rows], p[passage_rows], self.search, self.depth, self.near_eps)
        return [ids[i] for i in query_rows], rank


def _audit_table(schema: pa.Schema, ids: list[str], rank: np.ndarray) -> pa.Table:
    """Corrupted pairs as rows of the scored schema: id, rank, reason and audit=True; the rest null."""
    n = len(ids)
    filled = {
        "id": pa.array(ids, pa.string()),
        "rank": pa.array(rank, pa.int32()),
        "reason": pa.array(["audit"] * n, pa.string()),  # never null: no later filter takes it for a survivor
        "audit": pa.array(np.ones(n, bool)),
        "cluster": pa.array(np.full(n, -1), pa.int32()),  # a group key of their own, never deduplicated
    }
    return pa.table({f.name: filled.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def semdedup_group(group: pa.Table, *, eps: float, on: str, keep: str, seed: int) -> pa.Table:
    """``map_groups`` step: one cluster's rows -> the same rows, near-duplicates among those still in marked."""
    t0 = time.perf_counter()
    reasons = group.column("reason").to_pylist()
    dup_of = group.column("dup_of").to_pylist()
    alive = np.flatnonzero([r is None for r in reasons])
    if len(alive) > 1:
        rows = group.take(pa.array(alive))
        found = semdedup_cluster(
            to_matrix(rows.column("query_embedding")),
            to_matrix(rows.column("passage_embedding")),
            rows.column("id").to_pylist(),
            rows.column("centroid_sim").to_numpy(),
            eps=eps,
            on=on,
            keep=keep,
            seed=seed,
        )
        for i, d in zip(alive, found):
            if d is not None:
                reasons[i], dup_of[i] = SEMANTIC_DUPLICATE, d
    group = group.set_column(group.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    group = group.set_column(group.schema.get_field_index("dup_of"), "dup_of", pa.array(dup_of, pa.string()))
    return with_seconds(group, "t_semdedup", time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Driver-side helpers: small, streaming over parquet files one at a time.

# A pass's result stays in Ray's object store while it is small (at most HOLD_MAX_BYTES and at most
# this share of the store); a larger one is written to the job's staging folder instead (the output
# filesystem: on a cluster a bucket or a shared disk), because the object store spills to each
# node's local disk, a billion pairs' embeddings are terabytes, and a materialised pass is memory
# that grows with N (measured: 5.1 GB peak at 250k registry pairs, 9.4 GB at 886k, both held in
# memory). Re-reading parquet costs seconds of fixed overhead per pass, so small jobs (tests, the
# sample) keep the in-memory path.
OBJECT_STORE_SHARE = 0.5
HOLD_MAX_BYTES = LARGE_BYTES  # the size above which a job's data goes through disk (pairmill.cluster)


def embedded_dim(encoder: EncoderConfig) -> int:
    """The dimension of the encoder's vectors, from the model (loaded once here, on the CPU)."""
    from pairmill.encoder import load_sentence_transformer

    return int(load_sentence_transformer(encoder.model, "cpu").get_embedding_dimension())


def pass_bytes(input_path: str, rows: int, dim: int) -> int:
    """What one pass's rows weigh: the input (gzip counted as 4x) plus two float32 vectors a row."""
    return input_bytes(input_path) + rows * 2 * dim * 4


def hold(ds, folder: str | Path, estimate: int, filesystem=None):
    """``ds`` executed once and kept for the passes after it: materialised in the object store when
    ``estimate`` bytes are small (see HOLD_MAX_BYTES), else written to ``folder`` (parquet, on
    ``filesystem``: None for a local one) and read from there."""
    import ray

    capacity = ray.cluster_resources().get("object_store_memory", 0)
    if estimate <= min(HOLD_MAX_BYTES, OBJECT_STORE_SHARE * capacity):
        return ds.materialize()
    log.info(f"filter: a pass of ~{estimate / 2**30:.2f} GiB goes through {folder}, not memory")
    ds.write_parquet(str(folder), filesystem=filesystem)
    return ray.data.read_parquet(str(folder), filesystem=filesystem)


def check_eval_files(paths) -> None:
    for path in paths:
        if not storage.exists(path):
            hint = " (a key=value after --decontaminate is read as a file name: put settings before the flag)" if "=" in path else ""
            raise FileNotFoundError(f"filter.decontaminate: {path} does not exist{hint}")


def scan(ds, columns: list[str]):
    """Yield blocks of those ``columns`` a materialised dataset has: small columns only reach the driver."""
    names = ds.schema().names
    yield from ds.select_columns([c for c in columns if c in names]).iter_batches(batch_format="pyarrow", batch_size=None)


def tally(ds, seconds: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """({reason: rows}, {t_column: summed seconds}) of a materialised dataset; reason None = still in."""
    counts: dict = {}
    totals = dict.fromkeys(seconds, 0.0)
    for table in scan(ds, ["reason", *seconds]):
        for item in pc.value_counts(table.column("reason")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        for name in seconds:
            if name in table.column_names:
                totals[name] += float(pc.sum(table.column(name)).as_py() or 0.0)
    return counts, totals


def build_pool(alive, rows: int, options: FilterConfig, kmeans_rows: int):
    """Stream ``min(rows, pool_size)`` random passage embeddings into a ShardedIndex.

    Returns (index, pool rows, k-means sample (m, D')): the sample is drawn from the same stream.
    """
    from mining.index import ShardedIndex
    from pairmill.cluster import search_cpus

    target = min(rows, options.pool_size)
    ds = alive.select_columns(EMBEDDING_COLUMNS)
    if target < rows:
        ds = ds.random_sample(target / rows, seed=options.seed)
    rng = np.random.default_rng(options.seed)
    keep_share = min(1.0, kmeans_rows / max(1, target))
    shards = options.pool_shards or math.ceil(target / POOL_ROWS_PER_SHARD)
    index, sample, added = None, [], 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        q, p = to_matrix(batch.column("query_embedding")), to_matrix(batch.column("passage_embedding"))  # (B, D)
        if index is None:
            index = ShardedIndex.create(shards, p.shape[1], n_vectors=target, num_cpus=search_cpus(shards))
        # Ids are stream positions: the rank needs only the pool's scores, never which row scored.
        index.add_batches([(np.arange(added, added + len(p)), p)])
        added += len(p)
        if options.semdedup:
            sample.append(dedup_vectors(q, p, options.on)[rng.random(len(p)) < keep_share])
    return index, added, (np.concatenate(sample) if sample else None)


def kmeans_sample(alive, rows: int, options: FilterConfig) -> np.ndarray:
    """A random sample of the vectors k-means is fitted on (when no pool pass collects one)."""
    ds = alive.select_columns(EMBEDDING_COLUMNS)
    if options.kmeans_sample < rows:
        ds = ds.random_sample(options.kmeans_sample / rows, seed=options.seed)
    parts = [
        dedup_vectors(to_matrix(b.column("query_embedding")), to_matrix(b.column("passage_embedding")), options.on)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=4096)
    ]
    return np.concatenate(parts)


def fit_clusters(sample: np.ndarray, rows: int, options: FilterConfig) -> tuple[np.ndarray, int]:
    """k-means centroids, and the largest cluster expected (from the sample), warned about when too big."""
    n_clusters = options.n_clusters or default_n_clusters(rows, len(sample))
    centroids = fit_kmeans(sample, n_clusters, seed=options.seed)
    expected = int(np.bincount(assign_clusters(sample, centroids)[0]).max() * rows / len(sample))
    if expected > options.max_cluster_rows:
        warnings.warn(
            f"the largest k-means cluster will hold about {expected} rows (filter.max_cluster_rows="
            f"{options.max_cluster_rows}): its {expected} x {expected} similarity matrix needs "
            f"{expected**2 * 4 / 2**30:.1f} GiB on one worker. Raise filter.n_clusters (now {n_clusters})",
            stacklevel=3,
        )
    return centroids, n_clusters


# ---------------------------------------------------------------------------------------------
# The job.


def filter_pairs(
    input_path: str, out: str, *, options: FilterConfig, encoder: EncoderConfig, read: ReadConfig, ray: RayConfig
) -> dict:
    """Run the filter job; returns the stats written to ``OUT/stats.json``."""
    import ray as ray_lib
    from ray.data.expressions import col

    from pairmill.cluster import disk_shuffle, encoder_pool, init_ray
    from pairmill.output import count_by, open_job, parquet_rows

    check_eval_files(options.decontaminate)
    settings = options
    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    passes: dict[str, float] = {}
    semantic_decontam = bool(options.decontaminate) and options.decontaminate_eps > 0
    embedded = options.consistency or options.semdedup or semantic_decontam
    with open_job(out) as job:
        partitions = options.partitions or default_partitions(input_path)
        t0 = time.perf_counter()
        input_rows = count_input_rows(input_path)  # from the input itself: the commit checks the outputs against it
        buckets = bucket_count(input_rows, partitions)
        estimate = pass_bytes(input_path, input_rows, embedded_dim(encoder) if embedded else 0)
        disk_shuffle(estimate)
        passes["count"] = time.perf_counter() - t0

        # Pass 1: read, validate, exact dedup (a hash shuffle: no key set on any one process), encode.
        t0 = time.perf_counter()
        ds = read_parsed(input_path, "pairs", **read_kwargs(read)).map_batches(
            with_status_columns, fn_kwargs={"buckets": buckets}, batch_format="pyarrow", batch_size=None)
        if options.exact_dedup:
            ds = ds.groupby("dedup_bucket", num_partitions=partitions).map_groups(dedup_group, batch_format="pyarrow")
        check_ids = not ids_known_unique(input_path)
        if check_ids:
            ds = ds.map_batches(add_id_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow", batch_size=None)
            ds = ds.groupby("id_bucket", num_partitions=partitions).map_groups(id_group, batch_format="pyarrow")
        if embedded:
            pool = encoder_pool(ray.actors)
            log.info(f"filter: {pool}")
            ds = ds.map_batches(**encoder_stage(EmbedPairs, {"encoder_kwargs": encoder_kwargs(encoder)}, pool, encoder.batch_size))
        marked = hold(ds, job.work("marked"), estimate, job.filesystem)
        passes["read+dedup+encode"] = time.perf_counter() - t0
        counts, seconds = tally(marked, ("t_dedup", "t_ids", "t_encode", "truncated"))
        unique = counts.get(None, 0)
        valid = unique + counts.get(EXACT_DUPLICATE, 0) + counts.get("duplicate_id", 0)
        after_dedup = valid - counts.get(EXACT_DUPLICATE, 0)
        if options.exact_dedup:
            job.stage("exact_dedup", valid, after_dedup, seconds["t_dedup"])
        if check_ids:
            job.stage("unique_ids", after_dedup, unique, seconds["t_ids"])
        if embedded:
            job.stage("encode", unique, unique, seconds["t_encode"])
        log.info(f"filter: {input_rows} rows read, {valid} valid, {unique} after exact dedup"
                 + (f" and {counts['duplicate_id']} duplicate id(s) rejected" if counts.get("duplicate_id") else ""))
        alive = marked.filter(expr=col("reason").is_null())

        # Pass 2: the consistency pool (sharded index) and the k-means sample.
        index, pool_rows, sample, centroids, stats_extra = None, 0, None, None, {}
        t0 = time.perf_counter()
        if options.consistency and unique:
            index, pool_rows, sample = build_pool(alive, unique, options, min(unique, options.kmeans_sample))
            log.info(f"filter: consistency pool of {pool_rows} passages in {len(index.shards)} index shard(s)")
            stats_extra["consistency"] = {"k": options.k, "pool": pool_rows, "near_copy_eps": options.near_copy_eps}
            if options.k == "auto":
                auto = calibrate_k(alive, unique, index.search, options)
                options = dataclasses.replace(options, k=auto["k"])
                stats_extra["consistency"].update(k=auto["k"], auto=auto)
                share = auto["curve"][str(auto["k"])]
                looks = "" if auto["mismatched"] is None else f"up to {auto['mismatched']:.1%} of the pairs look mismatched; "
                log.info(f"filter: k=auto chose k={auto['k']} on {auto['clean']} rows ({looks}{auto['rule']}); there it "
                         f"keeps {share['clean_kept']:.1%} of the pairs and removes {share['corrupted_removed']:.1%} of "
                         f"{auto['corrupted']} corrupted ones")
        if options.semdedup and unique:
            if sample is None:
                sample = kmeans_sample(alive, unique, options)
            centroids, n_clusters = fit_clusters(sample, unique, options)
            stats_extra["semdedup"] = {"n_clusters": n_clusters, "eps": options.eps, "on": options.on, "keep": options.keep}
        passes["pool+kmeans"] = time.perf_counter() - t0

        eval_ref = None
        if options.decontaminate:
            from pipelines.decontaminate import load_eval_texts

            t0 = time.perf_counter()
            model = None
            if semantic_decontam:
                from pairmill.encoder import Encoder

                model = Encoder(**encoder_kwargs(encoder))
            eval_texts = load_eval_texts(list(options.decontaminate), read_kwargs(read), model)
            del model
            eval_ref = ray_lib.put(eval_texts)
            passes["eval_texts"] = time.perf_counter() - t0
            log.info(f"filter: decontaminating against {len(eval_texts.exact)} texts of {list(options.decontaminate)}")

        # Pass 3: per-row stages, then semantic dedup within clusters.
        final = None
        if (options.consistency or options.decontaminate or options.semdedup) and unique:
            t0 = time.perf_counter()
            ds = alive.map_batches(
                ScorePairs,
                fn_constructor_kwargs={
                    "search": index.search if index is not None else None,
                    "k": options.k,
                    "near_eps": options.near_copy_eps,
                    "eval_ref": eval_ref,
                    "decontaminate_eps": options.decontaminate_eps,
                    "centroids": centroids,
                    "on": options.on,
                    "audit": options.audit,
                    "seed": options.seed,
                },
                compute=ray_lib.data.ActorPoolStrategy(size=encoder_pool(ray.actors).size),
                num_cpus=1,
                batch_size=1024,
                batch_format="pyarrow",
            )
            if options.semdedup:
                row_bytes = 8 * sample.shape[1] + 1024  # two float32 embeddings and the texts
                ds = ds.groupby("cluster", num_partitions=max(partitions, math.ceil(unique * row_bytes / PARTITION_BYTES))).map_groups(
                    semdedup_group,
                    fn_kwargs={"eps": options.eps, "on": options.on, "keep": options.keep, "seed": options.seed},
                    batch_format="pyarrow",
                )
            final = hold(ds, job.work("final"), estimate, job.filesystem)
            passes["score+semdedup"] = time.perf_counter() - t0
            if index is not None:
                index.close()
            audit, largest = final_stats(job, final, unique, options, pool_rows)
            if options.semdedup:
                stats_extra["semdedup"]["largest_cluster"] = largest
            if options.audit:
                stats_extra["audit"] = audit

        # Pass 4: the job folder.
        t0 = time.perf_counter()
        kept_columns = PAIR_COLUMNS + (EMBEDDING_COLUMNS if embedded else [])
        (final or marked).filter(expr=col("reason").is_null()).select_columns(kept_columns).write_parquet(job.path("kept"), filesystem=job.filesystem)
        # Dropped rows keep their embeddings (null for exact duplicates, never encoded), so k or eps
        # can be re-tuned offline without encoding again.
        dropped_columns = DROPPED_COLUMNS + (EMBEDDING_COLUMNS if embedded else [])
        dropped = marked.filter(expr=col("reason") == EXACT_DUPLICATE).select_columns(dropped_columns)
        if final is not None:
            removed = final.filter(expr=col("reason").is_in([INCONSISTENT, CONTAMINATED, SEMANTIC_DUPLICATE]))
            dropped = dropped.union(removed.select_columns(dropped_columns))
        dropped.write_parquet(job.path("dropped"), filesystem=job.filesystem)
        rejects = marked.filter(expr=col("reason").is_in(list(REJECT_REASONS)))
        rejects.select_columns(REJECT_COLUMNS).write_parquet(job.path("rejected"), filesystem=job.filesystem)
        passes["write"] = time.perf_counter() - t0
        job.remove_work()

        stats = {
            "input_rows": input_rows,
            "kept": parquet_rows(job.path("kept")),
            "dropped": count_by(job.path("dropped"), "reason"),
            "rejected": count_by(job.path("rejected"), "reason"),
            "truncated": int(seconds["truncated"]),
            "unique_ids": True,  # kept/ rows have distinct ids: a job reading this folder need not check again
        }
        if embedded:
            stats["encoder"] = encoder_kwargs(encoder)
            stats["encoder_fingerprint"] = encoder.fingerprint()
        stats.update(stats_extra)
        stats["filter"] = dataclasses.asdict(settings)  # as configured (k may be "auto"; consistency.k is the k used)
        stats["passes"] = {name: round(s, 3) for name, s in passes.items()}
        stats["seconds"] = round(time.perf_counter() - started, 3)
        return job.commit(stats)


def final_stats(job, final, unique: int, options: FilterConfig, pool_rows: int) -> tuple[dict | None, int]:
    """Record the stages' rows and seconds from the ``final`` dataset; return (the audit's shares, the largest cluster)."""
    reasons, sizes = {}, {}
    clean_counts = corrupted_counts = rank_counts(np.empty(0), options.k)  # (max k + 2,) counts: no per-row state
    seconds = dict.fromkeys(("t_consistency", "t_decontaminate", "t_semdedup"), 0.0)
    for t in scan(final, ["reason", "audit", "rank", "cluster", *seconds]):
        is_audit = t.column("audit").to_numpy(zero_copy_only=False)
        if options.audit:
            rank = t.column("rank").to_numpy(zero_copy_only=False)
            clean_counts = clean_counts + rank_counts(rank[~is_audit], options.k)
            corrupted_counts = corrupted_counts + rank_counts(rank[is_audit], options.k)
        real = t.filter(pa.array(~is_audit))
        for item in pc.value_counts(real.column("reason")).to_pylist():
            reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
        entered = real.filter(pc.fill_null(pc.equal(real.column("reason"), SEMANTIC_DUPLICATE), True))  # semdedup's input
        for item in pc.value_counts(entered.column("cluster")).to_pylist():
            sizes[item["values"]] = sizes.get(item["values"], 0) + item["counts"]
        for name in seconds:
            seconds[name] += float(pc.sum(t.column(name)).as_py() or 0.0) if name in t.column_names else 0.0
    rows = unique
    for name, reason, on in (("consistency", INCONSISTENT, options.consistency), ("decontaminate", CONTAMINATED, bool(options.decontaminate)),
                             ("semdedup", SEMANTIC_DUPLICATE, options.semdedup)):
        if on:
            job.stage(name, rows, rows - reasons.get(reason, 0), seconds[f"t_{name}"])
            rows -= reasons.get(reason, 0)
    audit = None
    if options.audit:
        audit = audit_from_counts(clean_counts, corrupted_counts, options.k, pool_rows, options.audit)
    return audit, max(sizes.values(), default=0)


def main(args) -> int:
    """``pairmill filter INPUT -o OUT [--decontaminate FILE...] [--audit FRACTION] [--model M]``."""
    cfg = args.config_sections
    stats = filter_pairs(args.input, args.output, options=cfg["filter"], encoder=cfg["encoder"], read=cfg["read"], ray=cfg["ray"])
    print(format_summary(stats, args.output))
    if "audit" in stats:
        a = stats["audit"]
        print(
            f"    audit: {a['corrupted']} corrupted pairs, {a['corrupted_removed']:.1%} removed; "
            f"{a['clean']} clean pairs, {a['clean_kept']:.1%} kept (k={a['k']}, pool {a['pool']})"
        )
    return 0
