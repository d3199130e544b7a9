"""Pairs from labels (mining.label_pairs): balanced classes, the k² cap, and hard negatives that are
the nearest texts of other classes, never one with the anchor's label (checked against brute force)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mining.label_pairs import boundary_negatives, label_pair_rows, positive_pairs


def unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


LABELS = ["a"] * 12 + ["b"] * 4 + ["c"] * 2 + ["d"]  # k(k-1): 132, 12, 2, 0


def test_positive_pairs_are_balanced_capped_within_a_class_and_never_a_text_with_itself():
    pairs, report = positive_pairs(LABELS, per_class=20, seed=3)
    by_class = Counter(LABELS[a] for a, _ in pairs)
    assert by_class == {"a": 20, "b": 20, "c": 20}  # balanced: the big class capped, the small ones repeated
    assert all(LABELS[a] == LABELS[p] and a != p for a, p in pairs)
    assert report["sampled_down"] == ["a"] and report["repeated"] == ["b", "c"] and report["without_pairs"] == ["d"]
    assert report["possible"] == {"a": 132, "b": 12, "c": 2, "d": 0}
    big = [tuple(x) for x in pairs if LABELS[x[0]] == "a"]
    assert len(set(big)) == 20  # under the cap: distinct pairs, no repeats
    small = Counter(tuple(x) for x in pairs if LABELS[x[0]] == "b")
    assert len(small) == 12  # every possible pair of the small class is used before any repeats
    assert max(small.values()) - min(small.values()) <= 1


def test_the_k_squared_growth_is_cut_at_the_cap():
    for k in (4, 16, 64):
        pairs, report = positive_pairs(["x"] * k + ["y"] * k, per_class=100, seed=0)
        assert len(pairs) == 2 * 100 and report["possible"]["x"] == k * (k - 1)


def test_boundary_negatives_are_the_nearest_other_class_texts_never_the_anchors_label():
    x = unit(len(LABELS), seed=1)
    anchors = np.arange(len(LABELS))
    got = boundary_negatives(x, LABELS, anchors, 3, window=3)  # window = n: the 3 nearest, as a set
    for a in anchors:
        others = [j for j in np.argsort(-(x @ x[a])) if LABELS[j] != LABELS[a]]  # brute force, nearest first
        assert set(got[a]) == set(others[:3])
        assert all(LABELS[j] != LABELS[a] for j in got[a])


def test_rows_are_pairs_with_the_label_as_source_and_fewer_negatives_counted():
    texts = [f"text {i}" for i in range(len(LABELS))]
    rows, report = label_pair_rows(texts, LABELS, unit(len(LABELS)), per_class=5, negatives=2, seed=0)
    assert len(rows) == 15 and len({r["id"] for r in rows}) == 15 and report["rows"] == 15
    label_of = dict(zip(texts, LABELS))
    for r in rows:
        assert label_of[r["query"]] == label_of[r["passage"]] == r["source"]
        assert len(r["negatives"]) == 2 and all(label_of[n] != r["source"] for n in r["negatives"])
    assert report["short_pairs"] == 0


def test_bad_cap_is_refused():
    with pytest.raises(ValueError, match="per_class=0"):
        positive_pairs(LABELS, per_class=0)
