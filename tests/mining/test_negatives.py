import math

import numpy as np
import pytest

from mining.negatives import negative_pool, positive_sets, scheduled_window, select_negatives, word_counts


def _one(ids, scores, pos_score, positives, **kw):
    sel = select_negatives(np.array([ids]), np.array([scores], dtype=np.float32), np.array([pos_score]), [positives], **kw)
    return sel.ids[0].tolist(), sel


def test_positives_are_never_negatives_and_the_window_skips_them():
    # corpus id 5 is the pair's own passage, 9 another positive of the same query
    ids, sel = _one([5, 9, 1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.9, {5, 9}, num_negatives=2, margin_ratio=None)
    assert ids == [1, 2] and sel.short == 0
    ids, _ = _one([5, 9, 1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.9, {5, 9}, num_negatives=2, range_min=1, margin_ratio=None)
    assert ids == [2, 3]  # rank 0 is the hardest non-positive


def test_positive_aware_filter_and_max_score():
    scores = [0.99, 0.94, 0.90, 0.50]
    ids, sel = _one([1, 2, 3, 4], scores, 1.0, {0}, num_negatives=3)  # drops > 0.95 x 1.0
    assert ids == [2, 3, 4] and sel.filtered_by_margin == 1
    ids, _ = _one([1, 2, 3, 4], scores, 1.0, {0}, num_negatives=3, max_score=0.92)
    assert ids == [3, 4, -1]


def test_shortfall_is_counted_not_padded():
    ids, sel = _one([0, 1, -1, -1], [0.9, 0.5, -np.inf, -np.inf], 0.9, {0}, num_negatives=3, margin_ratio=None)
    assert ids == [1, -1, -1] and sel.short == 1
    assert np.isnan(sel.scores[0, 1:]).all()


def test_random_sampling_stays_in_the_window_and_is_seeded():
    cands = list(range(1, 31))
    scores = np.linspace(0.8, 0.2, 30)
    a, _ = _one(cands, scores, 1.0, {0}, num_negatives=4, range_max=10, sampling="random", seed=1)
    b, _ = _one(cands, scores, 1.0, {0}, num_negatives=4, range_max=10, sampling="random", seed=1)
    assert a == b and set(a) <= set(range(1, 11)) and a == sorted(a)


def test_bad_arguments():
    with pytest.raises(ValueError, match="range_min < range_max"):
        _one([1], [0.1], 1.0, set(), range_min=5, range_max=5)
    with pytest.raises(ValueError, match="sampling='hard'"):
        _one([1], [0.1], 1.0, set(), sampling="hard")


def test_positive_sets_group_by_query():
    assert positive_sets(["a", "b", "a"], [1, 2, 3]) == [{1, 3}, {2}, {1, 3}]


def test_curriculum_window_matches_a_naive_schedule_and_stays_valid():
    def naive(start, final, p):
        return tuple(int(math.floor(s + p * (f - s) + 0.5)) for s, f in zip(start, final))

    for start, final in [((20, 50), (0, 30)), ((0, 30), (0, 30)), ((10, 14), (0, 7)), ((3, 9), (50, 200))]:
        for step in range(0, 101):
            got = scheduled_window(start, final, step / 100)
            assert got == naive(start, final, step / 100)
            assert 0 <= got[0] and got[1] - got[0] >= min(start[1] - start[0], final[1] - final[0])
        assert scheduled_window(start, final, 0) == start and scheduled_window(start, final, 1) == final


def test_refresh_rounds_move_the_window_by_step():
    from pairmill.config import ConfigError, MineConfig
    from training.rounds import curriculum

    cfg = MineConfig(range_min=20, range_max=50, range_min_final=0, range_max_final=30)
    assert [(c.range_min, c.range_max) for c in (curriculum(cfg, s, 100) for s in (0, 25, 50, 100))] == [
        (20, 50), (15, 45), (10, 40), (0, 30)]
    assert curriculum(MineConfig(), 50, 100) == MineConfig()  # no schedule: the section itself
    only_max = curriculum(MineConfig(range_max=60, range_max_final=20), 50, 100)
    assert (only_max.range_min, only_max.range_max) == (0, 40)
    with pytest.raises(ConfigError, match="range_min_final"):
        MineConfig(range_min_final=28, range_max_final=30)  # 2 candidates cannot give 4 negatives


class _MemoryIndex:
    """The ShardedIndex calls mine_batch makes, over an in-memory corpus (no Ray), counting searches."""

    def __init__(self, vectors: np.ndarray):
        from pairmill.vectors import exact_search

        self.vectors_, self.exact_search, self.depths = vectors, exact_search, []

    def search(self, queries, k, exclude=None):
        self.depths.append((len(queries), k))
        return self.exact_search(self.vectors_, queries, k)

    def fetch(self, ids):
        texts = np.where(ids >= 0, np.vectorize(lambda i: f"passage {i}", otypes=[object])(np.maximum(ids, 0)), None)
        return texts, np.where((ids >= 0)[..., None], self.vectors_[np.maximum(ids, 0)], np.nan).astype(np.float32)


def test_a_pair_whose_positive_ranks_low_gets_negatives_from_below_the_margin():
    import pyarrow as pa

    from mining.search import mine_batch

    # Passage 0 is the pair's positive (cosine 0.5 to the query); passages 1-59 score 0.9 .. 0.6 above it,
    # 60-99 score 0.45 .. 0.05 below it. The window of 10 sees only passages above 0.95 x 0.5.
    dim = 2
    cos = np.concatenate([[0.5], np.linspace(0.9, 0.6, 59), np.linspace(0.45, 0.05, 40)])
    vectors = np.stack([cos, np.sqrt(1 - cos**2)], axis=1).astype(np.float32)  # (100, 2) unit
    index = _MemoryIndex(vectors)
    batch = pa.table({
        "id": ["a"], "query": ["q"], "passage": ["passage 0"],
        "query_embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32(), dim)),
        "passage_embedding": pa.array([vectors[0].tolist()], pa.list_(pa.float32(), dim)),
        "positive_keys": pa.array([[0]], pa.list_(pa.int64())), "query_key": pa.array([7], pa.int64()),
    })
    selection = {"num_negatives": 2, "range_min": 0, "range_max": 10, "margin_ratio": 0.95, "max_score": None,
                 "sampling": "top", "seed": 0}
    out = mine_batch(batch, index, selection, keep=["id", "query", "passage"]).to_pylist()[0]
    assert out["negative_ids"] == [60, 61]  # the hardest below 0.475, found by the one deeper search
    assert np.allclose(out["negative_scores"], [0.45, 0.45 - 0.4 / 39], atol=1e-5)
    assert out["margin_filtered"] == 59 and index.depths == [(1, 11), (1, 81)]
    # A window of 5: 40 deep still sees only passages above the margin, 320 deep finds them.
    index.depths.clear()
    out = mine_batch(batch, index, {**selection, "range_max": 5}, keep=["id"]).to_pylist()[0]
    assert out["negative_ids"] == [60, 61] and index.depths == [(1, 6), (1, 41), (1, 321)]
    # A corpus too small for the window already came back whole: no second search.
    small = _MemoryIndex(vectors[:8])
    out = mine_batch(batch, small, selection, keep=["id"]).to_pylist()[0]
    assert out["negative_ids"] == [] and small.depths == [(1, 11)]


def test_word_counts_and_the_negative_pool():
    """mine.min_negative_words: words are runs of non-space (any Unicode space), and in scripts
    written without spaces each character; the pool keeps the rows with at least that many."""
    import pyarrow as pa

    texts = ["pygeo", "A Django app.", "  coming\u00a0\u3000soon  ", "自用二维游戏框架", "Esigibilità IVA", "", None,
             "tab\tand\nnewline"]
    assert word_counts(pa.array(texts)).tolist() == [1, 3, 2, 8, 2, 0, 0, 3]
    batch = pa.table({"passage": texts, "passage_key": list(range(len(texts)))})
    assert negative_pool(batch, 3).column("passage_key").to_pylist() == [1, 3, 7]
    assert negative_pool(batch, 1).num_rows == 6 and negative_pool(batch, 0).num_rows == len(texts)
