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
Cost per cluster of m rows: an m x m similarity matrix (m^2 x d multiply-adds, m^2 x 4 bytes), then
a Python step only for rows that have a near-duplicate earlier in the order (rare).
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np

SEMANTIC_DUPLICATE = "semantic_duplicate"
On = Literal["passage", "query", "both"]
Keep = Literal["hard", "easy", "random"]
ROWS_PER_CLUSTER = 1000  # default cluster size: a 1000 x 1000 similarity matrix is 4 MB and ~1 ms
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


def similarity(queries: np.ndarray, passages: np.ndarray, on: On) -> np.ndarray:
    """(m, m) pairwise similarity the dedup thresholds."""
    if on == "passage":
        return passages @ passages.T
    if on == "query":
        return queries @ queries.T
    return np.minimum(queries @ queries.T, passages @ passages.T)


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
    on: On = "passage",
    keep: Keep = "hard",
    seed: int = 0,
) -> list[str | None]:
    """One cluster's rows -> ``dup_of`` per row: None for a survivor, else the id of the most similar kept row."""
    m = len(ids)
    dup_of: list[str | None] = [None] * m
    if m < 2:
        return dup_of
    order = survivor_order(ids, centroid_sims, keep, seed)
    sims = similarity(queries[order], passages[order], on)  # (m, m), rows and columns in survivor order
    near = np.triu(sims > 1.0 - eps, k=1)  # near[i, j]: j comes after i and is a near-duplicate of it
    candidates = np.flatnonzero(near.any(axis=0))  # rows with some near-duplicate before them
    kept = np.ones(m, dtype=bool)
    for j in candidates:  # in order: a row's fate depends only on the rows before it
        earlier_kept = np.flatnonzero(kept[:j] & near[:j, j])
        if len(earlier_kept):
            kept[j] = False
            best = earlier_kept[np.argmax(sims[earlier_kept, j])]
            dup_of[order[j]] = ids[order[best]]
    return dup_of
