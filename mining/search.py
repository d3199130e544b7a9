"""Mining a batch of pairs against the sharded index: search past each query's positives, choose
negatives with ``mining.negatives.select_negatives``, fetch their texts. Shared by the mine job
(``mining.mine``) and the refresh rounds (``mining.refresh``).

Design note. Identical query vectors in a batch are searched once. Rows whose query has few
positives (``mining.positives``) search ``range_max`` + their positives deep in one batched call;
rows of a query with too many search once per distinct (query, vector) with those positives
excluded inside the index. Rows left short of negatives because every candidate scored above the
margin (their positive ranks low) search again, ``DEEPER`` times as deep each time up to a cap.
Cost per batch: the distinct queries x that depth over the corpus, the short rows' deeper searches
(mining 18,208 unfiltered registry pairs, a fifth of them junk that stays short, took 28 s; the
13,248 the k=auto filter kept, 12.5 s), then one fetch of the chosen negatives' texts and vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from mining.lexical import reciprocal_rank_fusion
from mining.negatives import select_negatives
from mining.positives import PositiveStore, attach_positives, partitions, with_bucket
from pairmill.config import MineConfig
from pairmill.groups import bucket_count
from pairmill.pairs import text_key

NEAR_DUPLICATE = 0.95  # cosine between a negative and its positive above which it is counted as a near-duplicate
MINED_COLUMNS = ["negatives", "negative_ids", "negative_scores", "positive_score", "padded_negatives",
                 "margin_filtered", "near_duplicate_negatives"]
RRF_K = 60  # mine.method=hybrid: reciprocal rank fusion's constant (Cormack et al. 2009 found 60 near best)
DEEPER = 8  # a row left short behind the margin searches again this many times deeper ...
MAX_DEPTH = 1920  # ... up to this past its positives (+ INLINE_POSITIVES: FAISS GPU stops at k=2048)
LEXICAL_MAX_DEPTH = 240  # ... or this with bm25/hybrid, whose candidates' vectors are fetched (B, depth, D)


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


def dense_candidates(index, queries: np.ndarray, query_keys: np.ndarray, inline: list, stored: dict,
                     range_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (B, depth), from the dense index: rows with inline positives in one batched
    search, deep enough to skip the deepest row's positives; rows whose positives are in the store
    (``inline`` None) searched with them excluded, ``range_max`` deep."""
    big = np.array([keys is None for keys in inline], dtype=bool)
    depth = range_max + max((len(keys) for keys in inline if keys is not None), default=0)
    scores = np.full((len(inline), depth), -np.inf, dtype=np.float32)  # (B, depth)
    ids = np.full((len(inline), depth), -1, dtype=np.int64)  # (B, depth)
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
    return scores, ids


def lexical_candidates(lexical, texts: list[str], query_keys: np.ndarray, inline: list, stored: dict,
                       range_max: int) -> np.ndarray:
    """ids (B, depth) in BM25 order (``mining.lexical``), with the same depth and positive handling
    as ``dense_candidates``; each distinct (query text, stored positives) searched once."""
    depth = range_max + max((len(keys) for keys in inline if keys is not None), default=0)
    groups: dict[tuple, list[int]] = {}
    for r, (text, keys) in enumerate(zip(texts, inline)):
        groups.setdefault((text, None if keys is not None else int(query_keys[r])), []).append(r)
    exclude = [None if big is None else stored[big] for _, big in groups]
    _, found = lexical.search([text for text, _ in groups], depth, exclude)
    ids = np.full((len(texts), depth), -1, dtype=np.int64)
    for j, rows in enumerate(groups.values()):
        ids[rows] = found[j]
    return ids


def without(ids: np.ndarray, positives: list[set[int]]) -> np.ndarray:
    """(B, K) ids with each row's positives (and -1) taken out, the rest moved up in order, -1 after."""
    out = np.full_like(ids, -1)
    for i, row in enumerate(ids):
        kept = row[(row >= 0) & ~np.isin(row, list(positives[i]))]
        out[i, : len(kept)] = kept
    return out


def cosine_scores(index, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(B, K) cosine of each query (B, D) with the stored vectors of its candidate ids, -inf at -1."""
    vectors = index.vectors(ids)  # (B, K, D), NaN at -1
    return np.where(ids >= 0, np.einsum("bkd,bd->bk", np.nan_to_num(vectors), queries), -np.inf).astype(np.float32)


def mine_batch(batch: pa.Table, index, selection: dict, keep: list[str], pad: str = MineConfig.pad,
               store: PositiveStore | None = None, method: str = MineConfig.method, lexical=None) -> pa.Table:
    """``map_batches`` step: search the index for a batch of pairs and choose their negatives.
    ``method`` (``mine.method``): candidates ranked by the dense index, by BM25 (``lexical``, a
    ``mining.lexical.LexicalIndex``) or by both fused (``RRF_K``); scored by cosine in every method."""
    from pairmill.vectors import to_matrix

    queries = to_matrix(batch.column("query_embedding"))  # (B, D)
    passages = to_matrix(batch.column("passage_embedding"))  # (B, D)
    positive_scores = np.einsum("bd,bd->b", queries, passages)  # (B,) cosine: embeddings are unit length
    inline = batch.column("positive_keys").to_pylist()
    big = np.array([keys is None for keys in inline], dtype=bool)  # positives in the store, not in the row
    query_keys = batch.column("query_key").to_numpy()
    stored = store.get(query_keys[big].tolist()) if big.any() else {}
    range_max = selection["range_max"]
    # Excluded searches never return a positive: those rows need no second check against 100k keys.
    positives = [set() if keys is None else set(keys) for keys in inline]
    if method not in ("dense", "bm25", "hybrid") or (method != "dense" and lexical is None):
        raise ValueError(f"mine.method={method!r} needs a LexicalIndex (lexical=...); valid methods: dense, bm25, hybrid")
    query_texts = batch.column("query").to_pylist() if method != "dense" else None

    def candidates(rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of ``rows``' candidates, ``depth`` past their positives."""
        sub_inline, sub_keys = [inline[r] for r in rows], query_keys[rows]
        if method == "dense":
            scores, ids = dense_candidates(index, queries[rows], sub_keys, sub_inline, stored, depth)
            return ids, scores
        ids = lexical_candidates(lexical, [query_texts[r] for r in rows], sub_keys, sub_inline, stored, depth)
        if method == "hybrid":  # ranks among non-positives in each list, as select_negatives counts them
            _, dense_ids = dense_candidates(index, queries[rows], sub_keys, sub_inline, stored, depth)
            sub_positives = [positives[r] for r in rows]
            ids, _ = reciprocal_rank_fusion([without(dense_ids, sub_positives), without(ids, sub_positives)], RRF_K)
        return ids, cosine_scores(index, queries[rows], ids)

    every = np.arange(batch.num_rows)
    ids, scores = candidates(every, range_max)
    chosen = select_negatives(ids, scores, positive_scores, positives, **selection)
    # A pair whose positive ranks low has every searched candidate above the margin (a noisy pair the
    # consistency filter kept at rank 500): search those DEEPER times as deep, and again, up to the
    # cap, where the candidates below the margin are. A search that came back short saw the whole corpus.
    depth, rows = range_max, every
    cap = MAX_DEPTH if method == "dense" else LEXICAL_MAX_DEPTH  # lexical candidates fetch a vector each
    while depth < cap:
        full = np.array([((row >= 0) & ~np.isin(row, list(positives[r]))).sum() >= depth  # non-positives found
                         for r, row in zip(rows, ids)], dtype=bool)
        short = (chosen.ids[rows] < 0).any(axis=1) & (chosen.filtered[rows] > 0) & full
        rows, depth = rows[short], min(depth * DEEPER, cap)
        if not len(rows):
            break
        ids, scores = candidates(rows, depth)
        again = select_negatives(ids, scores, positive_scores[rows], [positives[r] for r in rows], **selection)
        chosen.ids[rows], chosen.scores[rows], chosen.filtered[rows] = again.ids, again.scores, again.filtered
    chosen.short = int((chosen.ids < 0).any(axis=1).sum())
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
               pad: str = MineConfig.pad, store: PositiveStore | None = None, method: str = MineConfig.method, lexical=None):
    """Ray Dataset of pairs (with embeddings, ``query_key`` and ``positive_keys``) -> the same pairs
    with ``MINED_COLUMNS``.
    ``store`` holds the positives of rows whose ``positive_keys`` is null (see ``attach_positives``)."""
    from pairmill.pairs import output_columns

    return pairs.map_batches(
        mine_batch,
        fn_kwargs={"index": index, "selection": selection, "keep": keep or output_columns("pairs"), "pad": pad,
                   "store": store, "method": method, "lexical": lexical},
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


def write_mined(pairs: str | Path, rows: int, index, mine_cfg, out: str, columns: list[str] | None = None,
                lexical=None) -> None:
    """Encoded pairs with keys (a parquet folder) -> their mined rows (see ``mine_pairs``; only
    ``columns`` when given) written to the parquet folder ``out``. The positives of repeated
    queries live in a ``PositiveStore`` for the length of the write. ``lexical``: the BM25 shards
    ``mine_cfg.method`` bm25 and hybrid rank with."""
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
                           pad=mine_cfg.pad, store=store, method=mine_cfg.method, lexical=lexical)
        (mined.select_columns(columns) if columns else mined).write_parquet(out, filesystem=storage.split(out)[0])
    finally:
        store.close()
