"""ANCE-style periodic refresh of hard negatives while training runs.

Design note.
- What: every N training steps the trainer saves its current model and starts
  ``refresh_negatives`` as a Ray task (``start_refresh``). The task re-encodes the corpus with that
  model on an encoder actor pool, builds a new ``ShardedIndex`` beside the live one
  (``OUT/refresh/step-N/index``), re-mines negatives for a slice of the queries with the same rules
  as ``pairmill mine``, and writes them into the ``NegativeStore``: that write is the swap. The
  training step never waits for it: each batch asks the store, and a pair whose negatives were
  refreshed gets the new ones, the others keep what they had.
- Slices: queries are split into ``rounds`` slices by query key (all pairs of one query fall in one
  slice, so each query's positive set stays complete). Round r refreshes slice ``r mod rounds``:
  ANCE refreshes part of the training queries per round to bound the cost.
- Corpus: the texts the live index holds (the mine job's ``index/`` folder keeps them), or, without
  an index, the distinct passages of the training pairs. Corpus keys are text hashes, so a negative
  id means the same passage in every index generation.
- The store: ``NegativeShard`` actors (0 CPUs) hold pair id -> (negatives, negative ids, step),
  routed by a hash of the pair id. Memory: the refreshed pairs' negative texts. Keying by id is
  safe because every pairs folder a round reads has distinct ids (the train job validates its
  input with ``pairmill.groups.read_unique``; a later row reusing an id is ``duplicate_id``).
- Staleness: each row's negatives carry the step of the model that mined them (0: the mine job).
- Where: ``out``, ``pairs`` and the index may be local (or NFS) folders or prefixes on object
  storage (a train job whose OUT is a bucket); every read and write here goes through the
  filesystem of its path, so the round's actors need no shared disk.
- Cost per round: encode the corpus + 2 x the slice's pairs, build the index, search the slice.
"""

from __future__ import annotations

import time

import pyarrow as pa

from pairmill import storage
from pairmill.pairs import text_key

REFRESHED_COLUMNS = ["id", "negatives", "negative_ids", "negative_scores"]


class NegativeShard:
    """One slice of the store (a Ray actor through ``NegativeStore``)."""

    def __init__(self):
        self.rows: dict[str, tuple[list[str], list[int], int]] = {}

    def update(self, ids: list[str], negatives: list[list[str]], negative_ids: list[list[int]], step: int) -> int:
        for pair, texts, keys in zip(ids, negatives, negative_ids):
            self.rows[pair] = (texts, keys, step)
        return len(self.rows)

    def get(self, ids: list[str]) -> list[tuple[list[str], list[int], int] | None]:
        return [self.rows.get(pair) for pair in ids]

    def size(self) -> int:
        return len(self.rows)


class NegativeStore:
    """pair id -> the latest refreshed (negatives, negative_ids, step), over ``num_shards`` actors.
    Picklable: pass it to Train workers and refresh tasks."""

    def __init__(self, shards: list):
        self.shards = shards

    @classmethod
    def create(cls, num_shards: int = 1) -> NegativeStore:
        import ray

        actor = ray.remote(num_cpus=0)(NegativeShard)  # bookkeeping only: never holds a CPU slot
        return cls([actor.remote() for _ in range(num_shards)])

    def _route(self, ids: list[str]) -> list[list[int]]:
        slots: list[list[int]] = [[] for _ in self.shards]
        for i, pair in enumerate(ids):
            slots[text_key(pair) % len(self.shards)].append(i)
        return slots

    def update(self, table: pa.Table, step: int) -> None:
        """Store the rows of ``table`` (``REFRESHED_COLUMNS``) as mined at ``step``."""
        import ray

        ids = table.column("id").to_pylist()
        negatives = table.column("negatives").to_pylist()
        negative_ids = table.column("negative_ids").to_pylist()
        refs = []
        for shard, slot in zip(self.shards, self._route(ids)):
            if slot:
                refs.append(shard.update.remote([ids[i] for i in slot], [negatives[i] for i in slot],
                                                [negative_ids[i] for i in slot], step))
        ray.get(refs)

    def get(self, ids: list[str]) -> list[tuple[list[str], list[int], int] | None]:
        """Per pair id: (negatives, negative_ids, step) when refreshed, else None."""
        import ray

        slots = self._route(ids)
        answers = ray.get([shard.get.remote([ids[i] for i in slot]) for shard, slot in zip(self.shards, slots)])
        out: list = [None] * len(ids)
        for slot, answer in zip(slots, answers):
            for i, row in zip(slot, answer):
                out[i] = row
        return out

    def size(self) -> int:
        import ray

        return sum(ray.get([shard.size.remote() for shard in self.shards]))

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)
        self.shards = []


def current_negatives(ids: list[str], negatives: list, negative_ids: list, store: NegativeStore | None):
    """The negatives a training batch uses: the store's when a pair was refreshed, else the
    batch's own (mined at step 0). Returns (negatives, negative_ids, steps)."""
    rows = store.get(ids) if store is not None else [None] * len(ids)
    texts = [row[0] if row else (negs or []) for row, negs in zip(rows, negatives)]
    keys = [row[1] if row else (list(k) if k is not None else None) for row, k in zip(rows, negative_ids)]
    steps = [row[2] if row else 0 for row in rows]
    return texts, keys, steps


def in_slice(batch: pa.Table, slice_: tuple[int, int]) -> pa.Table:
    """Rows whose ``query_key`` falls in slice ``slice_ = (r, rounds)``: all pairs of a query
    land in one slice. (Arrow has no integer modulo kernel, so not a filter expression.)"""
    r, rounds = slice_
    return batch.filter(pa.array(batch.column("query_key").to_numpy() % rounds == r))


def _corpus_from_index(batch: pa.Table) -> pa.Table:
    return pa.table({"passage_key": batch.column("id"), "text": batch.column("text")})


def _first_text(group: pa.Table) -> pa.Table:
    from mining.positives import first_rows

    return first_rows(group, "passage_key").select(["passage_key", "passage"]).rename_columns(["passage_key", "text"])


def _as_distinct(batch: pa.Table) -> pa.Table:
    return pa.table({"passage_key": batch.column("passage_key"), "passage": batch.column("text"),
                     "passage_embedding": batch.column("embedding")})


def corpus_texts(pairs: str, index_folder: str | None, min_words: int = 0):
    """Ray Dataset (passage_key, text): the live index's texts, else the pairs' distinct passages;
    with ``min_words`` (``mine.min_negative_words``) only those long enough to be negatives."""
    import ray

    from mining.negatives import negative_pool
    from mining.positives import add_keys, partitions, with_bucket
    from pairmill.groups import bucket_count
    from pairmill.output import parquet_files

    files = [f for f in parquet_files(index_folder) if str(f).endswith(".texts.parquet")] if index_folder else []
    if files:
        ds = ray.data.read_parquet([storage.split(f)[1] for f in files], filesystem=storage.split(files[0])[0]).map_batches(
            _corpus_from_index, batch_format="pyarrow")
    else:
        ds = _read_parquet(pairs).select_columns(["query", "passage"]).map_batches(add_keys, batch_format="pyarrow")
        rows = ds.count()
        buckets = bucket_count(rows, partitions(rows))
        ds = (ds.map_batches(with_bucket, fn_kwargs={"column": "passage_key", "buckets": buckets}, batch_format="pyarrow")
              .groupby("bucket", num_partitions=partitions(rows)).map_groups(_first_text, batch_format="pyarrow"))
    if min_words:  # the pairs' own passages hold short ones; so does an index mined without the rule
        ds = ds.map_batches(negative_pool, fn_kwargs={"min_words": min_words, "column": "text"}, batch_format="pyarrow")
    return ds


def _read_parquet(folder: str):
    """A parquet folder, local or on object storage, as a Ray Dataset."""
    import ray

    fs, inner = storage.split(folder)
    return ray.data.read_parquet(inner, filesystem=fs)


def _write_parquet(ds, folder: str) -> None:
    fs, inner = storage.split(folder)
    ds.write_parquet(inner, filesystem=fs)


def refresh_negatives(
    model: str,
    step: int,
    *,
    pairs: str,
    index_folder: str | None,
    out: str,
    encoder_kwargs: dict,
    mine_cfg,
    slice_: tuple[int, int] = (0, 1),
    store: NegativeStore | None = None,
    actors: int | None = None,
    pool=None,
    filesystems: dict | None = None,
) -> dict:
    """One refresh round: re-encode with ``model``, rebuild the index in ``OUT/index``, re-mine the
    slice's pairs into ``OUT/negatives`` and (with a store) swap them in. Returns its stats.
    ``pool`` (a ``pairmill.cluster.PoolSize``) sizes the encoder actors exactly, e.g. a fraction of
    a CPU next to Train workers; else ``encoder_pool(actors)`` sizes them from the whole cluster.
    ``filesystems`` (``pairmill.storage.carried``): those of the URIs given, for this task and its
    encoder actors to resolve them with."""
    import pyarrow.parquet as pq

    from mining.mine import build_index, build_lexical
    from mining.positives import add_keys
    from mining.search import write_mined
    from pairmill.cluster import encoder_pool
    from pairmill.encoder import EncodeBatch, encoder_stage
    from pairmill.output import parquet_files, parquet_rows
    from pairmill.pairs import output_columns

    started = time.perf_counter()
    storage.adopt(filesystems)
    work = storage.join(out, "work")
    encoder = {**encoder_kwargs, "model": model}
    pool = pool or encoder_pool(actors)
    source = _read_parquet(pairs)
    columns = [c for c in output_columns("pairs") if c in source.schema().names]
    _write_parquet(
        source.select_columns(columns)
        .map_batches(add_keys, batch_format="pyarrow")
        .map_batches(in_slice, fn_kwargs={"slice_": slice_}, batch_format="pyarrow")
        .map_batches(**encoder_stage(EncodeBatch, {"mode": "pairs", "encoder_kwargs": encoder, "keep_columns": True,
                                                   "filesystems": filesystems}, pool, encoder.get("batch_size"))),
        storage.join(work, "pairs"))
    rows = parquet_rows(storage.join(work, "pairs"))
    _write_parquet(
        corpus_texts(pairs, index_folder, mine_cfg.min_negative_words)
        .map_batches(**encoder_stage(EncodeBatch, {"mode": "text", "encoder_kwargs": encoder, "keep_columns": True,
                                                   "text_kind": "passage", "filesystems": filesystems}, pool, encoder.get("batch_size")))
        .map_batches(_as_distinct, batch_format="pyarrow"),
        storage.join(work, "distinct"))
    distinct = storage.join(work, "distinct")
    corpus_rows = parquet_rows(distinct)
    encoded = time.perf_counter()
    index = build_index(distinct, corpus_rows, mine_cfg, storage.join(out, "index"), {"model": model, "step": step})
    lexical = None
    try:
        # mine.method bm25 / hybrid: BM25 ranks the same corpus in every round (its ranking does not
        # depend on the model; rebuilt per round from this round's corpus files, a tokenising pass
        # next to the re-encoding), while the cosine scores and the dense side come from the new model.
        lexical = build_lexical(distinct, mine_cfg, len(index.shards))
        if rows:
            write_mined(storage.join(work, "pairs"), rows, index, mine_cfg, storage.join(out, "negatives"), REFRESHED_COLUMNS,
                        lexical=lexical)
    finally:
        index.close()
        if lexical is not None:
            lexical.close()
    refreshed = 0
    if store is not None and rows:
        for fs, inner in map(storage.split, parquet_files(storage.join(out, "negatives"))):
            table = pq.read_table(inner, filesystem=fs)
            store.update(table, step)
            refreshed += table.num_rows
    storage.remove(work)
    return {
        "step": step,
        "slice": list(slice_),
        "pairs": rows,
        "corpus": corpus_rows,
        "refreshed": refreshed,
        "window": [mine_cfg.range_min, mine_cfg.range_max],  # the curriculum's rank window of this round
        "method": mine_cfg.method,
        "encode_seconds": round(encoded - started, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def start_refresh(model: str, step: int, **kwargs):
    """``refresh_negatives`` as a Ray task; returns its ObjectRef at once (the caller keeps training)."""
    import ray

    task = ray.remote(num_cpus=0)(_quiet_refresh)  # its encoder actors and shards take the CPUs
    return task.remote(model, step, **kwargs)


def _quiet_refresh(model: str, step: int, **kwargs) -> dict:
    """A round without Ray Data's progress bars and plan logs: it runs beside training, whose own
    lines (round started / finished, with its counts and seconds) would drown in them."""
    import logging

    from ray.data import DataContext

    ctx, logger = DataContext.get_current(), logging.getLogger("ray.data")
    bars, level = ctx.enable_progress_bars, logger.level
    ctx.enable_progress_bars = False
    logger.setLevel(logging.WARNING)
    try:
        return refresh_negatives(model, step, **kwargs)
    finally:  # Ray reuses worker processes: the next task there gets its bars and logs back
        ctx.enable_progress_bars = bars
        logger.setLevel(level)
