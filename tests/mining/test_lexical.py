"""BM25 candidates (mine.method=bm25|hybrid) and reciprocal rank fusion, each against a plain
reference; the mining step on in-process fakes, the Ray shards once."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.lexical import B, K1, BM25Ranker, LexicalShard, reciprocal_rank_fusion, tokenize
from mining.positives import attach_positives
from mining.search import RRF_K, mine_batch
from pairmill.vectors import fixed_size_list

WORDS = ("graph index vector search query passage token model train batch shard corpus negative mining "
         "ranking lexical dense hybrid fusion window curriculum").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" doc{i}" for i in range(n)]


def bm25_reference(texts: list[str], query: str) -> np.ndarray:
    """BM25 as Lucene scores it (Kamphuis et al. 2020), written out: sum over the query's tokens of
    idf * tf / (tf + k1 (1 - b + b dl / avgdl)), idf = ln(1 + (N - df + 0.5) / (df + 0.5))."""
    docs = [Counter(tokens) for tokens in tokenize(texts, return_ids=False)]
    lengths = [sum(d.values()) for d in docs]
    avgdl, n = sum(lengths) / len(docs), len(docs)
    scores = np.zeros(n)
    for token in tokenize([query], return_ids=False)[0]:
        df = sum(token in d for d in docs)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d[token]
            scores[i] += idf * tf / (tf + K1 * (1 - B + B * lengths[i] / avgdl)) if tf else 0.0
    return scores


def ranked(scores: np.ndarray, ids: np.ndarray, skip=()) -> list[int]:
    """ids by score descending, ties to the smaller id; zero scores and ``skip`` left out."""
    order = sorted((i for i in range(len(ids)) if scores[i] > 0 and ids[i] not in skip), key=lambda i: (-scores[i], ids[i]))
    return [int(ids[i]) for i in order]


def test_bm25_ranker_matches_the_formula_written_out():
    texts = corpus(80)
    ids = np.arange(80, dtype=np.int64) * 3 + 5
    ranker = BM25Ranker(ids, texts)
    queries = ["graph shard", "dense fusion window", "nothing matches xyzzy", "token"]
    scores, found = ranker.search(queries, 10, exclude=[None, np.array([ids[7], ids[9]]), None, None])
    for i, query in enumerate(queries):
        reference = bm25_reference(texts, query)
        want = ranked(reference, ids, skip={int(ids[7]), int(ids[9])} if i == 1 else ())[:10]
        assert found[i][found[i] >= 0].tolist() == want
        np.testing.assert_allclose(scores[i][: len(want)], [reference[(j - 5) // 3] for j in want], rtol=1e-5)
        assert (found[i][len(want):] == -1).all() and np.isneginf(scores[i][len(want):]).all()
    assert (found[2] == -1).all()  # no shared token: no candidate, not a zero-score one


def test_shards_hold_every_row_once_and_merge_by_score(tmp_path):
    """In-process shards: each row in exactly one shard (key % N), and the client's merge is each
    shard's top-k merged by score (each shard scores with its own statistics, documented)."""
    from mining.shard import merge_topk

    texts = corpus(60, seed=1)
    keys = np.random.default_rng(2).integers(0, 2**62, size=60)
    pq.write_table(pa.table({"passage_key": pa.array(keys, pa.int64()), "passage": texts}), tmp_path / "a.parquet")
    shards = [LexicalShard([str(tmp_path / "a.parquet")], None, i, 3) for i in range(3)]
    held = np.concatenate([s.ranker.ids for s in shards])
    assert sorted(held.tolist()) == sorted(keys.tolist())
    one = LexicalShard([str(tmp_path / "a.parquet")], None, 0, 1)
    results = [s.search(["graph vector"], 5) for s in shards]
    merged = merge_topk([r[0] for r in results], [r[1] for r in results], 5)
    by_shard = sorted(((-s, i) for r in results for s, i in zip(r[0][0], r[1][0]) if i >= 0))[:5]
    assert merged[1][0].tolist() == [i for _, i in by_shard]
    assert one.search(["graph vector"], 5)[1][0].tolist() == ranked(bm25_reference(texts, "graph vector"), keys)[:5]


def test_reciprocal_rank_fusion_matches_a_dict_reference():
    rng = np.random.default_rng(3)
    for _ in range(20):
        lists = [np.where(rng.random((4, k)) < 0.2, -1, rng.integers(0, 15, size=(4, k))) for k in (6, 9)]
        lists = [np.array([[x if x < 0 or x not in row[:j] else -1 for j, x in enumerate(row)] for row in r]) for r in lists]
        ids, scores = reciprocal_rank_fusion(lists, k=RRF_K)
        for q in range(4):
            fused: dict[int, float] = {}
            for ranking in lists:
                for rank, i in enumerate(ranking[q]):
                    if i >= 0:
                        fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (RRF_K + rank)
            want = sorted(fused, key=lambda i: (-fused[i], i))
            assert ids[q][: len(want)].tolist() == want and (ids[q][len(want):] == -1).all()
            np.testing.assert_allclose(scores[q][: len(want)], [fused[i] for i in want])


# -- the mining step with method=bm25 / hybrid, on in-process fakes --------------------------------


class FlatIndex:
    """The dense index's interface over numpy: exact search, stored vectors, texts."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, texts: list[str]):
        self.keys, self.vecs, self.texts = keys, vectors, dict(zip(keys.tolist(), texts))
        self.row = {int(k): i for i, k in enumerate(keys)}

    def search(self, queries, k, exclude=None):
        scores = queries @ self.vecs.T  # (Q, N)
        out_scores, out_ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        for i, row in enumerate(scores):
            skip = set() if exclude is None else set(exclude[i].tolist())
            order = sorted((j for j in range(len(row)) if int(self.keys[j]) not in skip), key=lambda j: (-row[j], self.keys[j]))[:k]
            out_scores[i, : len(order)], out_ids[i, : len(order)] = row[order], self.keys[order]
        return out_scores, out_ids

    def vectors(self, ids):
        out = np.full(ids.shape + (self.vecs.shape[1],), np.nan, dtype=np.float32)
        for pos, i in np.ndenumerate(ids):
            if i >= 0:
                out[pos] = self.vecs[self.row[int(i)]]
        return out

    def fetch(self, ids):
        texts = np.empty(ids.shape, dtype=object)
        for pos, i in np.ndenumerate(ids):
            texts[pos] = self.texts[int(i)] if i >= 0 else None
        return texts, self.vectors(ids)


def _batch(n: int = 30, dim: int = 12):
    rng = np.random.default_rng(4)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    queries = [" ".join(rng.choice(WORDS, size=3)) for _ in range(n // 2)]
    # a pair's passage shares its query's words and lies near its vector: positives rank high in both
    # lists, so the test sees them removed before the ranks are counted
    passages = [f"{queries[i // 2]} {text}" for i, text in enumerate(corpus(n, seed=5))]
    q_vecs = unit(rng.standard_normal((n // 2, dim)))
    p_vecs = unit(q_vecs[np.arange(n) // 2] + 0.8 * rng.standard_normal((n, dim)))
    keys = np.arange(100, 100 + n, dtype=np.int64)
    table = pa.table({
        "id": [f"r{i}" for i in range(n)], "query": [queries[i // 2] for i in range(n)], "passage": passages,
        "query_embedding": fixed_size_list(q_vecs[np.arange(n) // 2]), "passage_embedding": fixed_size_list(p_vecs),
        "query_key": pa.array(np.arange(n) // 2, pa.int64()), "passage_key": pa.array(keys, pa.int64()),
    })  # two pairs per query: each row's two positives are never its negatives
    return attach_positives(table), FlatIndex(keys, p_vecs, passages), BM25Ranker(keys, passages), keys, p_vecs, table


@pytest.mark.parametrize("method", ["bm25", "hybrid"])
def test_mining_by_bm25_and_hybrid_matches_a_plain_loop(method):
    table, index, ranker, keys, vecs, _ = _batch()
    selection = {"num_negatives": 3, "range_min": 1, "range_max": 8, "margin_ratio": None, "max_score": 0.4,
                 "sampling": "top", "seed": 0}
    out = mine_batch(table, index, selection, keep=["id"], method=method, lexical=ranker)
    counts = []
    for row, got_ids, got_scores in zip(table.to_pylist(), out.column("negative_ids").to_pylist(),
                                        out.column("negative_scores").to_pylist()):
        positives = set(row["positive_keys"])
        q = np.asarray(row["query_embedding"], dtype=np.float32)
        cosine = {int(k): float(v @ q) for k, v in zip(keys, vecs)}

        def candidates(depth: int) -> list[int]:  # each list searched depth + the query's 2 positives deep
            lexical = [i for i in ranked(bm25_reference(table.column("passage").to_pylist(), row["query"]), keys)[:depth + 2]
                       if i not in positives]
            if method == "bm25":
                return lexical
            dense = [i for i in ranked(vecs @ q + 10, keys)[:depth + 2] if i not in positives]  # shifted: all count
            fused: dict[int, float] = {}
            for ranking in (dense, lexical):
                for rank, i in enumerate(ranking):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
            return sorted(fused, key=lambda i: (-fused[i], i))

        order = candidates(8)
        window = [i for i in order if cosine[i] <= 0.4][1:8][:3]  # max_score first, then the rank window
        if len(window) < 3 and len(order) >= 8 and any(cosine[i] > 0.4 for i in order):
            window = [i for i in candidates(8 * 8) if cosine[i] <= 0.4][1:8][:3]  # short behind the filter: deeper
        assert got_ids == window, row["id"]
        counts.append(len(window))
        np.testing.assert_allclose(got_scores, [cosine[i] for i in window], rtol=1e-5)
    assert sum(counts) > 2 * len(counts)  # most rows got negatives: the comparison is not vacuous


def test_write_mined_on_ray_shards_matches_the_step_on_fakes(ray_session, tmp_path):
    """The Ray wiring once: the dense and BM25 shards that the mine job and refresh rounds build
    (``build_index``, ``build_lexical``), through ``write_mined``, give what ``mine_batch`` gives on the
    in-process fakes checked above (hybrid: both kinds of shard are searched)."""
    from mining.mine import build_index, build_lexical
    from mining.search import selection_kwargs, write_mined
    from pairmill.config import MineConfig

    positives, fake, ranker, keys, vecs, raw = _batch()
    cfg = MineConfig(num_negatives=3, range_min=1, range_max=8, margin_ratio=None, max_score=0.4, method="hybrid",
                     shard_cpus=0.5)
    for name, table in {"pairs": raw, "distinct": raw.select(["passage_key", "passage", "passage_embedding"])}.items():
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part.parquet")
    index = build_index(tmp_path / "distinct", len(keys), cfg, tmp_path / "index", {})
    lexical = build_lexical(tmp_path / "distinct", cfg, len(index.shards))
    try:
        assert lexical.rows == len(keys)
        write_mined(tmp_path / "pairs", raw.num_rows, index, cfg, str(tmp_path / "mined"), lexical=lexical)
    finally:
        index.close()
        lexical.close()
    got = {r["id"]: r for r in pq.read_table(tmp_path / "mined").to_pylist()}
    want = mine_batch(positives, fake, selection_kwargs(cfg), keep=["id"], method="hybrid", lexical=ranker).to_pylist()
    assert sum(len(r["negative_ids"]) for r in want) > 2 * len(want)
    for row in want:
        assert got[row["id"]]["negative_ids"] == row["negative_ids"]
        np.testing.assert_allclose(got[row["id"]]["negative_scores"], row["negative_scores"], atol=1e-5)
