"""``pairmill filter INPUT -o OUT``: raw pairs -> kept pairs, through exact dedup, the E5
consistency filter, decontamination and semantic dedup (SemDeDup), with an optional audit.

Design note. The steps are functions over in-memory batches (``pipelines.dedup``,
``.consistency``, ``.decontaminate``, ``.semdedup``, ``.audit``); this module wires them into Ray
passes. Every pass writes parquet into ``OUT``'s staging folder (``_work/``, deleted on commit), so
the next pass streams from disk: nothing grows with the input on the driver except per-reason
counts, and the pool and embeddings live on disk, in Ray's object store and in the index actors.
Passes (whole-dataset operations are expensive on small clusters, so they are few):
1. read + validate + ``dedup_key`` -> ``groupby(key, num_partitions).map_groups`` -> ``_work/marked``
   (every input row, rejects and exact duplicates marked).
2. encode the survivors once (encoder actor pool) -> ``_work/embedded``. Only when a stage needs
   embeddings; every later stage reuses these vectors, and ``kept/`` carries them for ``mine``.
3. stream a random sample of passage embeddings into a ``ShardedIndex`` (the consistency pool,
   ``min(N, pool_size)`` rows), collecting the k-means sample on the way; fit k-means.
4. score (actor pool): consistency rank against the pool, decontamination against the eval texts,
   k-means cluster; with ``audit``, corrupted pairs ride along -> ``_work/scored``.
5. ``groupby(cluster).map_groups(semdedup)`` over the rows still in -> ``_work/deduped``.
6. write ``kept/``, ``dropped/`` (a union of the rows each stage removed), ``rejected/``.
Stage order: decontamination runs in pass 4, before semantic dedup (the issue lists it after),
so a semantic duplicate's ``dup_of`` always names a row that is in ``kept/``, and a row that is
both contaminated and a near-duplicate is reported as contaminated.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairmill.config import EncoderConfig, FilterConfig, RayConfig, ReadConfig
from pairmill.embed import EncodeBatch, encoder_kwargs, format_summary, read_kwargs, to_matrix
from pairmill.pairs import REJECT_COLUMNS, REJECT_REASONS, output_columns, read_parsed
from pipelines.audit import audit_summary, corrupt_rows
from pipelines.consistency import INCONSISTENT, consistency_ranks, rank_depth
from pipelines.decontaminate import CONTAMINATED, contamination
from pipelines.dedup import EXACT_DUPLICATE, add_dedup_key, mark_exact_duplicates
from pipelines.semdedup import SEMANTIC_DUPLICATE, assign_clusters, dedup_vectors, default_n_clusters, fit_kmeans, semdedup_cluster

PAIR_COLUMNS = output_columns("pairs")  # id, query, passage, source, negatives
EMBEDDING_COLUMNS = ["query_embedding", "passage_embedding"]
DROPPED_COLUMNS = PAIR_COLUMNS + ["reason", "dup_of", "rank", "origin"]
PARTITION_BYTES = 128 << 20  # input bytes per shuffle partition (a reduce task holds one partition)
POOL_ROWS_PER_SHARD = 500_000  # 500k x 384 x 4 B = 0.77 GB of vectors per shard


# ---------------------------------------------------------------------------------------------
# Ray steps: callables over pyarrow batches.


def with_status_columns(batch: pa.Table) -> pa.Table:
    """Parsed rows -> + ``dedup_key``, ``dup_of``, ``rank``: the columns every later pass carries."""
    batch = add_dedup_key(batch)
    return batch.append_column("rank", pa.nulls(len(batch), pa.int32()))


class EmbedPairs:
    """``map_batches`` callable: pair rows -> the same rows + query_embedding, passage_embedding."""

    def __init__(self, encoder_kwargs: dict):
        self.encode = EncodeBatch("pairs", encoder_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        embedded = self.encode(batch)
        for name in EMBEDDING_COLUMNS:
            batch = batch.append_column(name, embedded.column(name))
        return batch


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
        k: int = 2,
        eval_ref=None,
        decontaminate_eps: float = 0.0,
        centroids: np.ndarray | None = None,
        on: str = "passage",
        audit: float = 0.0,
        seed: int = 0,
    ):
        import ray

        self.search = search  # ShardedIndex.search (or any kernel): the pool stays in the index
        self.k = k
        self.depth = rank_depth(k)
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
            rank = consistency_ranks(q, p, self.search, self.depth)
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
        rank = consistency_ranks(q[query_rows], p[passage_rows], self.search, self.depth)
        return [ids[i] for i in query_rows], rank


def _audit_table(schema: pa.Schema, ids: list[str], rank: np.ndarray) -> pa.Table:
    """Corrupted pairs as rows of the scored schema: id, rank, reason and audit=True; the rest null."""
    n = len(ids)
    filled = {
        "id": pa.array(ids, pa.string()),
        "rank": pa.array(rank, pa.int32()),
        "reason": pa.array(["audit"] * n, pa.string()),  # never null: no later filter takes it for a survivor
        "audit": pa.array(np.ones(n, bool)),
    }
    return pa.table({f.name: filled.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def semdedup_group(group: pa.Table, *, eps: float, on: str, keep: str, seed: int) -> pa.Table:
    """``map_groups`` step: one cluster's rows -> the same rows, near-duplicates marked."""
    dup_of = semdedup_cluster(
        to_matrix(group.column("query_embedding")),
        to_matrix(group.column("passage_embedding")),
        group.column("id").to_pylist(),
        group.column("centroid_sim").to_numpy(),
        eps=eps,
        on=on,
        keep=keep,
        seed=seed,
    )
    reasons = [SEMANTIC_DUPLICATE if d is not None else None for d in dup_of]
    group = group.set_column(group.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    return group.set_column(group.schema.get_field_index("dup_of"), "dup_of", pa.array(dup_of, pa.string()))


# ---------------------------------------------------------------------------------------------
# Driver-side helpers: small, streaming over parquet files.


def default_partitions(input_path: str) -> int:
    """One shuffle partition per PARTITION_BYTES of input (gzip counted as 4x), at least 2."""
    from pairmill.pairs import detect_format

    _, files = detect_format(input_path)
    paths = [f for p in files for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file()]
    size = sum(f.stat().st_size * (4 if f.suffix == ".gz" else 1) for f in paths)
    return max(2, math.ceil(size / PARTITION_BYTES))


def scan(folder: Path, columns: list[str]):
    """Yield tables of ``columns`` one parquet file at a time."""
    for f in sorted(folder.glob("*.parquet")):
        yield pq.read_table(f, columns=columns)


def reason_counts(folder: Path) -> dict:
    counts: dict = {}
    for table in scan(folder, ["reason"]):
        for value, n in zip(*np.unique(np.array(table.column("reason").to_pylist(), dtype=object).astype(str), return_counts=True)):
            counts[value] = counts.get(value, 0) + int(n)
    return {(None if k == "None" else k): v for k, v in counts.items()}


def embedding_dim(folder: Path) -> int:
    return pq.read_schema(next(folder.glob("*.parquet"))).field("passage_embedding").type.list_size


def build_pool(embedded, rows: int, options: FilterConfig, kmeans_rows: int):
    """Stream ``min(rows, pool_size)`` random passage embeddings into a ShardedIndex.

    Returns (index, pool rows, k-means sample (m, D')) — the sample is drawn from the same stream.
    """
    from mining.index import ShardedIndex

    target = min(rows, options.pool_size)
    ds = embedded.select_columns(EMBEDDING_COLUMNS)
    if target < rows:
        ds = ds.random_sample(target / rows, seed=options.seed)
    dim = None
    rng = np.random.default_rng(options.seed)
    keep_share = min(1.0, kmeans_rows / max(1, target))
    sample: list[np.ndarray] = []
    index = None
    offset = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        q, p = to_matrix(batch.column("query_embedding")), to_matrix(batch.column("passage_embedding"))
        if index is None:
            dim = p.shape[1]
            shards = options.pool_shards or math.ceil(target / POOL_ROWS_PER_SHARD)
            index = ShardedIndex.create(shards, dim, n_vectors=target, num_cpus=0.5)
        index.add_batches([(np.arange(offset, offset + len(p)), p)])
        offset += len(p)
        if options.semdedup:
            sample.append(dedup_vectors(q, p, options.on)[rng.random(len(p)) < keep_share])
    return index, offset, (np.concatenate(sample) if sample else None)


def kmeans_sample(embedded, rows: int, options: FilterConfig) -> np.ndarray:
    """A random sample of the vectors k-means is fitted on (when no pool pass collects one)."""
    ds = embedded.select_columns(EMBEDDING_COLUMNS)
    if options.kmeans_sample < rows:
        ds = ds.random_sample(options.kmeans_sample / rows, seed=options.seed)
    parts = [
        dedup_vectors(to_matrix(b.column("query_embedding")), to_matrix(b.column("passage_embedding")), options.on)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=4096)
    ]
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# The job.


def filter_pairs(
    input_path: str, out: str, *, options: FilterConfig, encoder: EncoderConfig, read: ReadConfig, ray: RayConfig
) -> dict:
    """Run the filter job; returns the stats written to ``OUT/stats.json``."""
    import ray as ray_lib
    from ray.data.expressions import col

    from pairmill.cluster import encoder_pool, init_ray
    from pairmill.output import JobFolder, count_by, parquet_rows

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    passes: dict[str, float] = {}
    semantic_decontam = bool(options.decontaminate) and options.decontaminate_eps > 0
    needs_embeddings = options.consistency or options.semdedup or semantic_decontam
    with JobFolder(out) as job:
        work = job.staging / "_work"
        partitions = options.partitions or default_partitions(input_path)
        read_work = lambda name: ray_lib.data.read_parquet(str(work / name))  # noqa: E731

        # Pass 1: read, validate, exact dedup (a hash shuffle, so no key set on any one process).
        t0 = time.perf_counter()
        parsed = read_parsed(input_path, "pairs", **read_kwargs(read)).map_batches(with_status_columns, batch_format="pyarrow", batch_size=None)
        if options.exact_dedup:
            parsed = parsed.groupby("dedup_key", num_partitions=partitions).map_groups(mark_exact_duplicates, batch_format="pyarrow")
        parsed.write_parquet(str(work / "marked"))
        passes["read+exact_dedup"] = time.perf_counter() - t0
        marked_counts = reason_counts(work / "marked")
        input_rows = sum(marked_counts.values())
        unique = marked_counts.get(None, 0)
        truncated = sum(int(pc.sum(t.column("truncated")).as_py() or 0) for t in scan(work / "marked", ["truncated"]))
        job.stage("read+exact_dedup", input_rows, unique, passes["read+exact_dedup"])
        survivors = read_work("marked").filter(expr=col("reason").is_null())

        # Pass 2: encode each survivor once.
        current = "marked"
        if needs_embeddings and unique:
            t0 = time.perf_counter()
            pool = encoder_pool(ray.actors)
            print(f"[pairmill] filter: encoding {unique} pairs on {pool.size} actor(s), {pool.num_cpus} CPU / {pool.num_gpus} GPU each")
            survivors.map_batches(
                EmbedPairs,
                fn_constructor_kwargs={"encoder_kwargs": encoder_kwargs(encoder)},
                compute=ray_lib.data.ActorPoolStrategy(size=pool.size),
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus,
                batch_size=max(1024, 8 * (encoder.batch_size or 32)),
                batch_format="pyarrow",
            ).write_parquet(str(work / "embedded"))
            passes["encode"] = time.perf_counter() - t0
            job.stage("encode", unique, unique, passes["encode"])
            current = "embedded"
        embedded = current == "embedded"

        # Pass 3: the consistency pool (sharded index) and the k-means sample.
        index, pool_rows, sample, centroids, n_clusters = None, 0, None, None, 0
        wanted_sample = min(unique, options.kmeans_sample)
        t0 = time.perf_counter()
        if options.consistency and embedded:
            index, pool_rows, sample = build_pool(read_work("embedded"), unique, options, wanted_sample)
            passes["pool"] = time.perf_counter() - t0
            job.stage("pool", unique, pool_rows, passes["pool"])
            print(f"[pairmill] filter: consistency pool of {pool_rows} passages in {len(index.shards)} index shard(s)")
        if options.semdedup and embedded:
            if sample is None:
                sample = kmeans_sample(read_work("embedded"), unique, options)
            n_clusters = options.n_clusters or default_n_clusters(unique, len(sample))
            centroids = fit_kmeans(sample, n_clusters, seed=options.seed)
            passes["kmeans"] = time.perf_counter() - t0 - passes.get("pool", 0.0)

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
            print(f"[pairmill] filter: decontaminating against {len(eval_texts.exact)} texts of {list(options.decontaminate)}")

        # Pass 4: per-row stages (consistency, decontamination, cluster assignment, audit).
        scored = options.consistency or options.decontaminate or options.semdedup
        if scored and unique:
            t0 = time.perf_counter()
            read_work(current).filter(expr=col("reason").is_null()).map_batches(
                ScorePairs,
                fn_constructor_kwargs={
                    "search": index.search if index is not None else None,
                    "k": options.k,
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
            ).write_parquet(str(work / "scored"))
            passes["score"] = time.perf_counter() - t0
            if index is not None:
                index.close()
            current = "scored"
        stats_extra = {}
        counts = {INCONSISTENT: 0, CONTAMINATED: 0}
        if current == "scored":
            stage_seconds = {"t_consistency": 0.0, "t_decontaminate": 0.0}
            clean_ranks, corrupted_ranks, clusters = [], [], np.zeros(max(n_clusters, 1), np.int64)
            for t in scan(work / "scored", ["reason", "audit", "rank", "cluster", *stage_seconds]):
                is_audit = t.column("audit").to_numpy(zero_copy_only=False)
                reasons = np.array(t.column("reason").to_pylist(), dtype=object)[~is_audit]
                for r in (INCONSISTENT, CONTAMINATED):
                    counts[r] += int((reasons == r).sum())
                for name in stage_seconds:
                    stage_seconds[name] += float(pc.sum(t.column(name)).as_py() or 0.0)
                if options.consistency:
                    rank = t.column("rank").to_numpy(zero_copy_only=False)
                    clean_ranks.append(rank[~is_audit])
                    corrupted_ranks.append(rank[is_audit])
                alive = (~is_audit) & np.array([r is None for r in t.column("reason").to_pylist()])
                clusters += np.bincount(t.column("cluster").to_numpy(zero_copy_only=False)[alive], minlength=len(clusters))
            after_consistency = unique - counts[INCONSISTENT]
            if options.consistency:
                job.stage("consistency", unique, after_consistency, stage_seconds["t_consistency"])
                stats_extra["consistency"] = {"k": options.k, "pool": pool_rows}
            if options.decontaminate:
                job.stage("decontaminate", after_consistency, after_consistency - counts[CONTAMINATED], stage_seconds["t_decontaminate"])
            if options.audit:
                stats_extra["audit"] = audit_summary(
                    np.concatenate(clean_ranks), np.concatenate(corrupted_ranks), options.k, pool_rows, options.audit
                )
            if options.semdedup and embedded:
                stats_extra["semdedup"] = {"n_clusters": n_clusters, "largest_cluster": int(clusters.max()), "eps": options.eps}
                if clusters.max() > options.max_cluster_rows:
                    warnings.warn(
                        f"the largest k-means cluster holds {clusters.max()} rows (filter.max_cluster_rows="
                        f"{options.max_cluster_rows}): its similarity matrix needs {clusters.max() ** 2 * 4 / 2**30:.1f} GiB "
                        "on one worker; raise filter.n_clusters",
                        stacklevel=2,
                    )

        # Pass 5: semantic dedup within clusters.
        if options.semdedup and embedded:
            t0 = time.perf_counter()
            alive = read_work("scored").filter(expr=col("reason").is_null())
            rows_in = unique - counts[INCONSISTENT] - counts[CONTAMINATED]
            bytes_per_row = 8 * embedding_dim(work / "embedded") + 1024
            alive.groupby("cluster", num_partitions=max(partitions, math.ceil(rows_in * bytes_per_row / PARTITION_BYTES))).map_groups(
                semdedup_group,
                fn_kwargs={"eps": options.eps, "on": options.on, "keep": options.keep, "seed": options.seed},
                batch_format="pyarrow",
            ).write_parquet(str(work / "deduped"))
            passes["semdedup"] = time.perf_counter() - t0
            job.stage("semdedup", rows_in, reason_counts(work / "deduped").get(None, 0), passes["semdedup"])
            current = "deduped"

        # Pass 6: the job folder.
        t0 = time.perf_counter()
        kept_columns = PAIR_COLUMNS + (EMBEDDING_COLUMNS if embedded else [])
        read_work(current).filter(expr=col("reason").is_null()).select_columns(kept_columns).write_parquet(job.path("kept"))
        dropped = [read_work("marked").filter(expr=col("reason") == EXACT_DUPLICATE)]
        if (work / "scored").exists():
            dropped.append(read_work("scored").filter(expr=col("reason").is_in([INCONSISTENT, CONTAMINATED])))
        if current == "deduped":
            dropped.append(read_work("deduped").filter(expr=col("reason") == SEMANTIC_DUPLICATE))
        dropped = [ds.select_columns(DROPPED_COLUMNS) for ds in dropped]
        dropped[0].union(*dropped[1:]).write_parquet(job.path("dropped"))
        read_work("marked").filter(expr=col("reason").is_in(list(REJECT_REASONS))).select_columns(REJECT_COLUMNS).write_parquet(job.path("rejected"))
        passes["write"] = time.perf_counter() - t0
        shutil.rmtree(work)

        stats = {
            "input_rows": input_rows,
            "kept": parquet_rows(job.path("kept")),
            "dropped": count_by(job.path("dropped"), "reason"),
            "rejected": count_by(job.path("rejected"), "reason"),
            "truncated": truncated,
        }
        if embedded:
            stats["encoder"] = encoder_kwargs(encoder)
            stats["encoder_fingerprint"] = encoder.fingerprint()
        stats.update(stats_extra)
        stats["filter"] = dataclasses.asdict(options)
        stats["passes"] = {name: round(s, 3) for name, s in passes.items()}
        stats["seconds"] = round(time.perf_counter() - started, 3)
        return job.commit(stats)


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
