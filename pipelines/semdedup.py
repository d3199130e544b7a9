"""Semantic dedup (SemDeDup, arXiv 2303.09540) over precomputed, L2-normalised embeddings.

Design note. All-pairs similarity is quadratic, so the data is split by k-means (FAISS, spherical,
fitted on a sample) and duplicates are looked for within each cluster only: near-duplicates
(cosine > 1 - eps, eps ~ 0.01) sit so close together that they almost always share a cluster; the
pairs split by a cluster boundary are the method's known miss (measured by benchmarks/filter.py
against a brute-force reference). Within a cluster the rows are ordered by the survivor policy:
``hard`` keeps the row farthest from the centroid first (SemDeDup's choice), ``easy`` the closest,
``random`` a seeded shuffle. A row is dropped when its similarity to an already *kept* row exceeds
``1 - eps``, and ``dup_of`` names the most similar kept row. ``on`` picks the vector: the passage
embedding (default), the query embedding, or ``both`` (a row is a duplicate only when query and
passage are both near-duplicates: similarity = the smaller of the two cosines).
Copies (rows whose vectors are identical: the same text, e.g. one template summary under 10k
package names) are decided once, by their first row in survivor order: the greedy keeps the same
rows as over every row, and a later copy's ``dup_of`` is that first row (or, when the first row
is itself a duplicate, the row it duplicates). Web data clusters thousands of copies together;
without this, a cluster of m copies cost an m x m matrix (100k copies: 40 GB).
Cost per cluster of m rows with u distinct vectors: u^2 x d / 2 multiply-adds, computed in column
blocks of ``BLOCK`` (memory u x BLOCK x 4 bytes, not u^2), then a Python step only for rows that
have a near-duplicate earlier in the order (rare).
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np

from pairmill.config import FilterConfig

SEMANTIC_DUPLICATE = "semantic_duplicate"
On = Literal["passage", "query", "both"]
Keep = Literal["hard", "easy", "random"]
ROWS_PER_CLUSTER = 1000  # default cluster size: a 1000 x 1000 similarity matrix is 4 MB and ~1 ms
BLOCK = 512  # columns of the similarity matrix computed at once (u x 512 floats: 200 MB at u = 100k)
MIN_POINTS_PER_CENTROID = 40  # FAISS warns below 39 training points per centroid


def default_n_clusters(n_rows: int, sample_rows: int) -> int:
    """About ROWS_PER_CLUSTER rows per cluster, but never more clusters than the sample can train."""
    return max(1, min(math.ceil(n_rows / ROWS_PER_CLUSTER), sample_rows // MIN_POINTS_PER_CENTROID))


def dedup_vectors(queries: np.ndarray, passages: np.ndarray, on: On) -> np.ndarray:
    """The (B, D') vectors k-means clusters: one embedding, or both concatenated (normalised)."""
    if on == "passage":
        return passages
    if on == "query":
        return queries
    both = np.concatenate([queries, passages], axis=1)  # (B, 2D)
    return both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)


def fit_kmeans(sample: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (n_clusters, D) fitted on sample (n, D)."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if n_clusters < 1 or n_clusters > len(sample):
        raise ValueError(f"n_clusters={n_clusters} needs 1 <= n_clusters <= sample rows ({len(sample)})")
    if n_clusters == 1:
        centroid = sample.mean(axis=0, keepdims=True)
        return centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    kmeans = faiss.Kmeans(sample.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(sample)
    return kmeans.centroids


def assign_clusters(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster (B,) int32, cosine to that centroid (B,) float32) for vectors (B, D)."""
    sims = vectors @ centroids.T  # (B, C)
    cluster = sims.argmax(axis=1)
    return cluster.astype(np.int32), sims[np.arange(len(vectors)), cluster].astype(np.float32)


def survivor_order(ids: list[str], centroid_sims: np.ndarray, keep: Keep, seed: int = 0) -> np.ndarray:
    """Row order in which survivors are chosen (ties broken by id, so the order is deterministic)."""
    if keep == "hard":  # farthest from the centroid first
        primary = centroid_sims
    elif keep == "easy":
        primary = -centroid_sims
    elif keep == "random":
        primary = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") for i in ids], dtype=np.float64)
    else:
        raise ValueError(f"keep={keep!r}; valid: hard, easy, random")
    id_rank = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    return np.lexsort((id_rank, primary))


def semdedup_cluster(
    queries: np.ndarray,
    passages: np.ndarray,
    ids: list[str],
    centroid_sims: np.ndarray,
    *,
    eps: float,
    on: On = FilterConfig.on,
    keep: Keep = FilterConfig.keep,
    seed: int = FilterConfig.seed,
) -> list[str | None]:
    """One cluster's rows -> ``dup_of`` per row: None for a survivor, else the id of the most similar kept row."""
    m = len(ids)
    dup_of: list[str | None] = [None] * m
    if m < 2:
        return dup_of
    order = survivor_order(ids, centroid_sims, keep, seed)
    vectors = dedup_vectors(queries, passages, on)[order]  # (m, D'): what a copy has in common
    _, first, group = np.unique(vectors, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    firsts = np.sort(first)  # (u,) positions in survivor order of each vector's first row
    rep_of_group = np.empty(len(first), dtype=np.int64)
    rep_of_group[group[firsts]] = np.arange(len(firsts))  # group -> index into firsts
    reps = order[firsts]
    kept, best = greedy_dedup(queries[reps], passages[reps], on, eps)
    for r in np.flatnonzero(~kept):
        dup_of[reps[r]] = ids[reps[best[r]]]
    for position in np.setdiff1d(np.arange(m), firsts, assume_unique=True):  # later copies
        r = rep_of_group[group[position]]
        dup_of[order[position]] = ids[reps[r if kept[r] else best[r]]]
    return dup_of


def greedy_dedup(queries: np.ndarray, passages: np.ndarray, on: On, eps: float, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The greedy over rows in order (u of them): a row is dropped when it is within cosine 1 - eps
    of an earlier kept row. Returns (kept (u,) bool, best (u,): the most similar earlier kept row
    of a dropped row, -1 for a kept one). Columns are computed ``block`` at a time."""
    u = len(queries)
    kept = np.zeros(u, dtype=bool)
    best = np.full(u, -1, dtype=np.int64)
    for a in range(0, u, block):
        b = min(u, a + block)
        sims = block_similarity(queries, passages, on, b, a)  # (b, b - a): rows 0..b-1 against columns a..b-1
        near = sims > 1.0 - eps
        near &= np.arange(b)[:, None] < np.arange(a, b)[None, :]  # near[i, c]: row i comes before column a + c
        candidates = np.flatnonzero(near.any(axis=0))
        kept[a:b] = True  # rows with no near-duplicate before them; the candidates are decided below
        kept[a + candidates] = False
        for c in candidates:  # in order: a row's fate depends only on the rows before it
            j = a + c
            earlier_kept = np.flatnonzero(kept[:j] & near[:j, c])
            if len(earlier_kept):
                best[j] = earlier_kept[np.argmax(sims[earlier_kept, c])]
            else:
                kept[j] = True
    return kept, best


def block_similarity(queries: np.ndarray, passages: np.ndarray, on: On, rows: int, start: int) -> np.ndarray:
    """(rows, end - start) similarity of rows 0..rows-1 against rows start..rows-1 (end = rows)."""
    if on == "passage":
        return passages[:rows] @ passages[start:rows].T
    if on == "query":
        return queries[:rows] @ queries[start:rows].T
    return np.minimum(queries[:rows] @ queries[start:rows].T, passages[:rows] @ passages[start:rows].T)
