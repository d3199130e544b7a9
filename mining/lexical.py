"""BM25 over the corpus on Ray actors (``mine.method=bm25|hybrid``): lexical candidates for hard
negatives, as DPR mined them ("the top passages returned by BM25 which don't contain the answer").

Design note.
- Library: ``bm25s`` (BM25 as a sparse matrix of precomputed scores over numpy/scipy; a query is a
  sum of a few of its columns). Tokens: lower-cased words of two or more characters, English
  stopwords out, no stemming (a stemmer would be another dependency). Parameters k1=0.9, b=0.4:
  Anserini's defaults, the BM25 behind DPR's and BEIR's baselines.
- Sharded like the dense index (``mining.index``): N ``LexicalShard`` actors (N = the dense index's
  shard count), ``SPREAD`` over the nodes, each holding the corpus rows whose key falls in it
  (``key % N``); every query visits every shard and the client merges their top-k
  (``mining.shard.merge_topk``: score descending, ties to the smaller id). Routing by key, not by
  block as the dense index does: a shard builds itself from the corpus files in its constructor, so
  a shard that Ray restarts reads the same rows again and comes back with the same index, with no
  saved file to keep in step (the corpus files live until the job's scratch folder goes).
- Statistics per shard: each shard scores with its own document frequencies and mean length, as
  Elasticsearch's default ``query_then_fetch`` does; with one shard (up to 2M passages by default)
  the scores are exact BM25, with more they differ a little across shards and the merge treats them
  as comparable. A candidate sharing no token with the query scores 0 and is not returned.
- Only ids come from here: a candidate's score for the selection rules (the positive-aware margin,
  ``max_score``) and for stats.json is the encoder's cosine, as in dense mining, so the
  false-negative rules and the stats mean the same thing in every method; BM25 only ranks.
- Cost: building tokenises the corpus once (each shard reads the corpus files and keeps 1/N); a
  query costs the postings of its tokens in every shard (a sparse column sum over n_shard rows),
  then a top-k. Memory: one float and one int per (passage, distinct token) in the shard.
"""

from __future__ import annotations

import numpy as np

from mining.shard import merge_topk

K1, B = 0.9, 0.4  # Anserini's BM25 defaults
STOPWORDS = "en"


def tokenize(texts: list[str], return_ids: bool):
    """bm25s's tokens of ``texts``: a ``Tokenized`` (ids and vocabulary) or lists of token strings."""
    import bm25s

    return bm25s.tokenize(list(texts), lower=True, stopwords=STOPWORDS, return_ids=return_ids, show_progress=False)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of one query's (n,) scores over ids (n,): (scores (k,) float32, ids (k,) int64),
    score descending, ties to the smaller id, padded with -inf / -1; -inf scores never count."""
    live = np.flatnonzero(np.isfinite(scores))  # usually far fewer than n: only passages sharing a token
    if len(live) > k:  # everything scoring at least the k-th best, so ties at the cut still go to the smaller id
        live = live[scores[live] >= np.partition(scores[live], len(live) - k)[len(live) - k]]
    order = live[np.lexsort((ids[live], -scores[live]))][:k]  # primary key last: score desc, then id asc
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_ids = np.full(k, -1, dtype=np.int64)
    out_scores[: len(order)], out_ids[: len(order)] = scores[order], ids[order]
    return out_scores, out_ids


class BM25Ranker:
    """BM25 over (ids (n,) int64, texts (n,)) in one process; ``LexicalShard`` runs one per actor."""

    def __init__(self, ids: np.ndarray, texts: list[str]):
        import bm25s

        self.ids = np.asarray(ids, dtype=np.int64)
        self.bm25 = None
        if len(self.ids):
            self.bm25 = bm25s.BM25(k1=K1, b=B)
            self.bm25.index(tokenize(texts, return_ids=True), show_progress=False)

    def search(self, queries: list[str], k: int, exclude: list[np.ndarray | None] | None = None):
        """Top-k per query: (scores (q, k) float32, ids (q, k) int64), padded with -inf / -1.
        ``exclude``: per query, ids never to return (or None): a query's own positives."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if self.bm25 is None:
            return scores, ids
        for i, tokens in enumerate(tokenize(queries, return_ids=False)):
            known = self.bm25.get_tokens_ids(tokens)  # a token no passage of this shard has scores nothing
            row = self.bm25.get_scores_from_ids(known) if known else np.zeros(len(self.ids), np.float32)
            row = np.where(row > 0, row, -np.inf).astype(np.float32)  # (n,): no shared token, no candidate
            if exclude is not None and exclude[i] is not None and len(exclude[i]):
                row[np.isin(self.ids, exclude[i])] = -np.inf
            scores[i], ids[i] = top_k(row, self.ids, k)
        return scores, ids


class LexicalShard:
    """The corpus rows with ``key % num_shards == shard`` of the parquet ``files`` (on ``filesystem``),
    as a ``BM25Ranker``. A Ray actor through ``LexicalIndex``: a restart rebuilds the same rows."""

    def __init__(self, files: list[str], filesystem, shard: int, num_shards: int,
                 key_column: str = "passage_key", text_column: str = "passage"):
        import pyarrow.parquet as pq

        ids, texts = [], []
        for f in files:
            table = pq.read_table(f, columns=[key_column, text_column], filesystem=filesystem)
            keys = table.column(key_column).to_numpy()
            mine = np.flatnonzero(keys % num_shards == shard)
            ids.append(keys[mine])
            texts += table.column(text_column).take(mine).to_pylist()
        self.ranker = BM25Ranker(np.concatenate(ids) if ids else np.empty(0, np.int64), texts)

    def ntotal(self) -> int:
        return len(self.ranker.ids)

    def search(self, queries: list[str], k: int, exclude: list[np.ndarray | None] | None = None):
        return self.ranker.search(queries, k, exclude)


class LexicalIndex:
    """Driver-side handle on the BM25 shard actors; picklable (it travels into the mining step)."""

    def __init__(self, shards: list, rows: int):
        self.shards = shards
        self.rows = rows

    @classmethod
    def create(cls, folder: str, num_shards: int, *, num_cpus: float) -> "LexicalIndex":
        """BM25 shards over the distinct-passages parquet ``folder`` (``passage_key``, ``passage``)."""
        import ray

        from pairmill import storage
        from pairmill.output import parquet_files

        files = [str(f) for f in parquet_files(folder)]
        filesystem = storage.split(files[0])[0] if files else None
        paths = [storage.split(f)[1] for f in files]
        actor = ray.remote(LexicalShard).options(num_cpus=num_cpus, scheduling_strategy="SPREAD",
                                                 max_restarts=-1, max_task_retries=-1)
        shards = [actor.remote(paths, filesystem, i, num_shards) for i in range(num_shards)]
        index = cls(shards, 0)
        try:
            index.rows = sum(ray.get([s.ntotal.remote() for s in shards]))
        except BaseException:
            index.close()
            raise
        return index

    def search(self, queries: list[str], k: int, exclude: list[np.ndarray | None] | None = None):
        """Top-k over every shard: (scores (q, k) float32 BM25, ids (q, k) int64), padded with -inf / -1."""
        import ray

        results = ray.get([s.search.remote(list(queries), k, exclude) for s in self.shards])
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        self.shards = []


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-query rankings of ids, each (Q, K_i) with -1 padding, by reciprocal rank fusion
    (Cormack, Clarke & Buettcher 2009): an id scores sum over rankings of 1 / (k + rank), rank from 0.
    Returns (ids (Q, M) int64, fused scores (Q, M) float64), M = sum K_i, fused score descending,
    ties to the smaller id, padded with -1 / -inf. ``k`` = 60 as in the paper."""
    q = len(rankings[0])
    width = sum(r.shape[1] for r in rankings)
    out_ids = np.full((q, width), -1, dtype=np.int64)
    out_scores = np.full((q, width), -np.inf, dtype=np.float64)
    for i in range(q):
        ids = np.concatenate([r[i] for r in rankings])  # (S,)
        ranks = np.concatenate([np.arange(r.shape[1]) for r in rankings])
        valid = ids >= 0
        unique, inverse = np.unique(ids[valid], return_inverse=True)
        fused = np.zeros(len(unique))
        np.add.at(fused, inverse, 1.0 / (k + ranks[valid]))
        order = np.lexsort((unique, -fused))
        out_ids[i, : len(order)], out_scores[i, : len(order)] = unique[order], fused[order]
    return out_ids, out_scores
