"""``pairmill mine PAIRS -o OUT [--corpus C]``: hard negatives for every pair, from a sharded index.

Design note.
- Corpus: the distinct passages of the pairs plus an optional extra corpus; with
  ``mine.min_negative_words`` the index (the negative pool) leaves out the shorter ones, which stay
  in the pairs. Texts equal after
  normalisation (NFKC, collapsed whitespace) are one corpus row, keyed by a 63-bit hash of the
  normalised text. That makes "text-identical to the positive" the same test as "is the
  positive": both are the positive's key, and ``select_negatives`` removes it.
- Positives of a query: the keys of every pair whose normalised query is the same, inline in its
  rows or, for a query with very many, in a ``PositiveStore`` (``mining.positives``).
- Embeddings are computed once: by the encoder actor pool (queries and passages of every pair), or
  taken from a filter job folder whose stats.json names the same encoder fingerprint. The encoded
  pairs go to ``OUT/work/`` (deleted at the end) and are read back by the passes that need them,
  rather than re-encoded or held in the object store.
- Passes: encode pairs -> work/; distinct passages (groupby passage key) [+ encoded extra corpus]
  streamed into a ``ShardedIndex`` (``OUT/index``, with the texts, so a negative's text comes back
  from the shard that holds it); groupby query key attaches positives, then ``map_batches``
  searches, selects and looks up texts (``mining.search``). Shards restart from their saved files, so a shard that
  dies mid-mining costs a wait, not a different result.
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

from mining.negatives import negative_pool
from mining.positives import add_keys, first_rows, partitions, with_bucket
from mining.search import selection_kwargs, write_mined
from pairmill.groups import bucket_count
from pairmill.pairs import text_key

log = logging.getLogger(__name__)

PASSAGES_PER_SHARD = 2_000_000


def first_passage(group: pa.Table) -> pa.Table:
    """``map_groups`` step over a bucket of passage keys: one row per key (one corpus entry per text)."""
    return first_rows(group, "passage_key").select(["passage_key", "passage", "passage_embedding"])


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
    from pairmill.encoder import EncodeBatch, encoder_stage
    from pairmill.config import encoder_kwargs, read_kwargs
    from pairmill import storage
    from pairmill.output import PARTS, count_by, open_job, parquet_bytes, parquet_rows
    from pairmill.pairs import REJECT_COLUMNS, output_columns
    from pairmill.read import count_input_rows, read_parsed
    from pairmill.groups import write_validated

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    if mine_cfg.range_min_final is not None or mine_cfg.range_max_final is not None:
        log.info(f"mine: mines with the rank window [{mine_cfg.range_min}, {mine_cfg.range_max}); "
                 "mine.range_min_final / range_max_final move it in train's refresh rounds")
    fingerprint = encoder.fingerprint()
    pool = encoder_pool(ray.actors)
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
            log.info(f"mine: encoding pairs on {pool}")
            valid = parsed.filter(expr=col("reason").is_null()).select_columns(output_columns("pairs"))
            pairs = valid.map_batches(**encoder_stage(
                EncodeBatch, {"mode": "pairs", "encoder_kwargs": encoder_kwargs(encoder), "keep_columns": True}, pool,
                encoder.batch_size))
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
                .map_batches(**encoder_stage(
                    EncodeBatch, {"mode": "text", "encoder_kwargs": encoder_kwargs(encoder), "keep_columns": True,
                                  "text_kind": "passage"}, pool, encoder.batch_size))
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
        pool_folder, pool_rows = work("distinct"), corpus_rows
        if mine_cfg.min_negative_words:  # the index is the negative pool: short passages stay out of it
            pool_folder = work("pool")
            (ray_lib.data.read_parquet(work("distinct"), filesystem=fs)
             .map_batches(negative_pool, fn_kwargs={"min_words": mine_cfg.min_negative_words}, batch_format="pyarrow")
             .write_parquet(pool_folder, filesystem=fs))
            pool_rows = parquet_rows(pool_folder)
            if not pool_rows:
                raise ValueError(f"mine.min_negative_words={mine_cfg.min_negative_words} leaves none of the {corpus_rows} "
                                 "corpus passages to mine negatives from; lower it (0 = off)")
            log.info(f"mine: {corpus_rows - pool_rows} of {corpus_rows} corpus passages have fewer than "
                     f"{mine_cfg.min_negative_words} words and are never negatives (mine.min_negative_words)")
        index = build_index(pool_folder, pool_rows, mine_cfg, job.path("index"),
                            {"encoder_fingerprint": fingerprint, "encoder": encoder_kwargs(encoder)})
        num_shards, shard_devices = len(index.shards), {"devices": index.devices, "warnings": index.device_warnings}
        lexical = None
        try:
            lexical = build_lexical(pool_folder, mine_cfg, num_shards)
            log.info(f"mine: index {index.spec!r} over {pool_rows} passages in {num_shards} shard(s)"
                     + (f", and BM25 shards over the same passages (mine.method={mine_cfg.method})" if lexical else ""))
            job.stage("index", valid_rows, pool_rows, time.perf_counter() - t0)

            # -- 3. positives per query, search, select, look up texts ------------------------
            t0 = time.perf_counter()
            write_mined(work("pairs"), valid_rows, index, mine_cfg, job.path("kept"), lexical=lexical)
        finally:
            index.close()
            if lexical is not None:
                lexical.close()
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
                "selection": {**selection_kwargs(mine_cfg), "method": mine_cfg.method},
                "corpus": {"passages": corpus_rows, "negative_pool": pool_rows, "extra": extra_stats,
                           "fewer_words_than_min": corpus_rows - pool_rows, "min_negative_words": mine_cfg.min_negative_words},
                "index": {"spec": index.spec, "shards": num_shards, "nprobe": index.nprobe, "folder": "index",
                          **shard_devices, "lexical": lexical_stats(mine_cfg, num_shards)},
                "unique_ids": True,
                "reused_embeddings": reuse is not None,
                "encoder": encoder_kwargs(encoder),
                "encoder_fingerprint": fingerprint,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    return stats


def build_index(distinct: str | Path, rows: int, mine_cfg, folder: str | Path, manifest_extra: dict):
    """A ShardedIndex (home ``folder``) over a parquet folder of distinct passages
    (``passage_key``, ``passage``, ``passage_embedding``), trained first when IVF."""
    import ray

    from mining.index import ShardedIndex

    from pairmill import storage

    shards = mine_cfg.shards or max(1, math.ceil(rows / PASSAGES_PER_SHARD))
    index = ShardedIndex.create(
        shards,
        _dimension(distinct),
        mine_cfg.index_spec,
        n_vectors=rows,
        nprobe=mine_cfg.nprobe,
        num_cpus=shard_cpus(mine_cfg, shards),
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


def shard_cpus(mine_cfg, shards: int) -> float:
    """CPUs of each index shard actor: ``mine.shard_cpus`` or ``search_cpus``; with BM25 shards
    beside the dense ones (``mine.method`` bm25 or hybrid) the two kinds share that, half each, so
    the shards together never hold more of the cluster than dense mining does (RAY_NOTES: deadlock)."""
    from pairmill.cluster import search_cpus

    cpus = mine_cfg.shard_cpus or search_cpus(shards)
    return cpus if mine_cfg.method == "dense" else cpus / 2


def build_lexical(distinct: str | Path, mine_cfg, shards: int):
    """The BM25 shards (``mining.lexical``) over a parquet folder of distinct passages, as many as
    the dense index has, for ``mine.method`` bm25 and hybrid; None for dense."""
    if mine_cfg.method == "dense":
        return None
    from mining.lexical import LexicalIndex

    return LexicalIndex.create(str(distinct), shards, num_cpus=shard_cpus(mine_cfg, shards))


def lexical_stats(mine_cfg, shards: int) -> dict | None:
    """stats.json's ``index.lexical``: what ranked the candidates besides the dense index."""
    from mining.lexical import B, K1, STOPWORDS

    if mine_cfg.method == "dense":
        return None
    return {"kind": "bm25s", "shards": shards, "k1": K1, "b": B, "stopwords": STOPWORDS}


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

    neg, corpus = stats["negatives"], stats["corpus"]
    pool = (f", {corpus['fewer_words_than_min']} under mine.min_negative_words={corpus['min_negative_words']} left out; "
            f"{corpus['negative_pool']}" if corpus.get("min_negative_words") else "")
    return "\n".join(
        [
            job_summary(stats, out),
            f"    corpus passages     {corpus['passages']}{pool} in {stats['index']['shards']} shard(s), index {stats['index']['spec']}"
            + (f" + BM25 ({stats['selection']['method']})" if stats["index"].get("lexical") else ""),
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
