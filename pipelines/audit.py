"""Filter audit: measure the consistency filter on the user's own data by mixing in pairs whose
passage belongs to another pair, and counting how many of them the filter removes.

Design note. A corrupted pair is built from two real rows of the same batch: row a's query with
row b's passage (a derangement of a seeded random subset of about ``fraction`` of the rows). Its
embeddings are row a's query embedding and row b's passage embedding, so nothing is encoded twice.
Corrupted pairs are scored by the same ``own_rank`` against the same pool as the real ones (the
pool holds real passages only, which is what it would hold if the corrupted pairs were part of
the input: their passages are the same texts), carry ``audit=True``, and are then discarded: they
never reach kept/, dropped/ or the row counts. A pair whose borrowed passage is text-identical to
its own is not corrupted and is skipped.

``filter.k=auto`` uses the same measurement before the filter runs: on a random sample of the
data (``filter.auto_rows``, a fifth of it corrupted as above) against the finished pool, it estimates
how many of the data's own pairs are mismatched (from how many rank as deep as random passages do:
``choose_k``) and picks the largest k of ``AUTO_KS`` whose kept pairs are at most
``filter.auto_mismatched`` mismatched by that estimate; stats.json gets the curve, the estimate and
the choice. What the audit can and cannot tell: a corrupted pair's passage is, to its query, just
another pool passage, so its rank is close to uniform over the pool for any encoder and the share
it removes is about ``1 - k / pool`` (99.5% at k=10 on a 3,000-pair pool with a static model, 100%
of 411 at k=10 on the 2,050-pair sample). An earlier rule took the largest k that still removed 95%
of the corrupted pairs: on clean data that removed real pairs to guard against mismatches that
were not there (k=100 kept 86% of the bundled dictionary sample, and the chain trained on it lost
to plain training). Noise that is *related* to its query (generic summaries, half-right pairs) is
what the audit cannot simulate; whether a stricter k pays for it is measured per data set by
``benchmarks/chain.py``.
"""

from __future__ import annotations

import hashlib

import warnings

import numpy as np

from pairmill.vectors import to_matrix
from pairmill.pairs import normalize_text
from pipelines.consistency import consistency_ranks

AUDIT_KS = (1, 2, 5, 10)
AUTO_KS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)  # k=auto's candidates; ranks are measured this deep
AUTO_FRACTION = 0.2  # k=auto: the share of the sampled rows that also go in as corrupted pairs
ESTIMATE_COUNT = 100  # k=auto: corrupted pairs ranked beyond the depth its mismatched-share estimate is read at


def _unit(seed: int, text: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big") / 2.0**64


def corrupt_rows(ids: list[str], passages: list[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query_rows, passage_rows): the rows whose query and passage form each corrupted pair."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"audit fraction={fraction}; expected 0 <= fraction <= 1")
    chosen = np.array([i for i, rid in enumerate(ids) if _unit(seed, rid) < fraction], dtype=np.int64)
    if len(chosen) < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    # The ring the passages move along is ordered by a second hash of each id, so which pairs are made
    # depends on the rows in the batch, not on the order they arrived in (Ray Data does not keep block
    # order: a seeded permutation of the arrival order gave k=auto other corrupted pairs on each run).
    chosen = np.array(sorted(chosen.tolist(), key=lambda i: (_unit(seed, f"ring:{ids[i]}"), ids[i])), dtype=np.int64)
    donors = np.roll(chosen, 1)  # a derangement of the chosen rows
    real = np.array([normalize_text(passages[a]) != normalize_text(passages[b]) for a, b in zip(chosen, donors)], dtype=bool)
    return chosen[real], donors[real]


def rank_counts(ranks: np.ndarray, k: int) -> np.ndarray:
    """How many ranks are 0, 1, ..., and above every k the audit reports: (max k + 2,) counts. The
    driver sums these per batch instead of keeping a rank per row."""
    cap = max(max(AUDIT_KS), k) + 1
    return np.bincount(np.clip(np.asarray(ranks, dtype=np.int64), 0, cap), minlength=cap + 1)


def audit_summary(clean_ranks: np.ndarray, corrupted_ranks: np.ndarray, k: int, pool: int, fraction: float) -> dict:
    """What stats.json reports: the filter's recall on corrupted pairs and keep rate on clean ones."""
    return audit_from_counts(rank_counts(clean_ranks, k), rank_counts(corrupted_ranks, k), k, pool, fraction)


def audit_from_counts(clean: np.ndarray, corrupted: np.ndarray, k: int, pool: int, fraction: float) -> dict:
    """``audit_summary`` from ``rank_counts`` of the clean and the corrupted pairs."""

    def share(counts: np.ndarray, kk: int, kept: bool) -> float | None:
        total = int(counts.sum())
        at_most = int(counts[: kk + 1].sum())
        return round((at_most if kept else total - at_most) / total, 4) if total else None

    return {
        "fraction": fraction,
        "k": k,
        "pool": pool,
        "corrupted": int(corrupted.sum()),
        "clean": int(clean.sum()),
        "corrupted_removed": share(corrupted, k, kept=False),
        "clean_kept": share(clean, k, kept=True),
        "curve": {
            str(kk): {"corrupted_removed": share(corrupted, kk, kept=False), "clean_kept": share(clean, kk, kept=True)}
            for kk in sorted(set(AUDIT_KS) | {k})
        },
    }


def choose_k(clean: np.ndarray, corrupted: np.ndarray, target: float) -> dict:
    """k=auto's rule over ``rank_counts`` (at max(AUTO_KS)) of the sample's own pairs (``clean``: the
    data as it is, mismatched pairs and all) and of its corrupted pairs: the largest k of AUTO_KS whose
    kept pairs are, by the estimate below, at most ``target`` mismatched.

    The estimate. A mismatched pair in the data ranks its passage like a corrupted pair does (a
    random passage to its query), so beyond a depth K the data's pairs are its mismatched share
    ``m`` times the corrupted pairs' share there, plus the clean pairs that rank that deep:
    ``beyond_data(K) >= m * beyond_corrupted(K)``, and ``m <= beyond_data(K) / beyond_corrupted(K)``,
    an upper bound (it counts hard clean pairs as mismatched), taken at the deepest K that at least
    ``ESTIMATE_COUNT`` corrupted pairs (half of them, when there are fewer than twice that) still
    rank beyond: few clean pairs go that deep, and the corrupted ones beyond it are enough to count
    (a share of 100 is known to about 10%). A rule of "half of the corrupted pairs" instead put K at
    1000 or 500 by chance on a 2,050-passage pool, where about half rank beyond 1000. At a candidate
    k the kept pairs then hold at most ``m * kept_corrupted(k)`` of the data mismatched, a share
    ``m * kept_corrupted(k) / kept_data(k)`` of what is kept. So clean data (m near 0) is kept
    nearly whole, and noisy data gets a k strict enough for its noise. ``met`` is false, with k=1,
    when no k meets the target or nothing can be estimated (no corrupted pair to count, or a pool so
    small that not even k=1 lets enough of them through)."""
    total, real = int(corrupted.sum()), int(clean.sum())
    removed = {k: int(corrupted[k + 1 :].sum()) / total if total else 0.0 for k in AUTO_KS}
    kept = {k: int(clean[: k + 1].sum()) / real if real else 0.0 for k in AUTO_KS}
    enough = min(ESTIMATE_COUNT, total / 2)  # corrupted pairs that must rank beyond the depth the estimate is read at
    deep = [k for k in AUTO_KS if total and removed[k] * total >= enough]
    mismatched = min(1.0, (1 - kept[max(deep)]) / removed[max(deep)]) if total and real and deep else None
    kept_mismatched = {k: (mismatched * (1 - removed[k]) / kept[k] if kept[k] else 1.0) if mismatched is not None else None
                       for k in AUTO_KS}
    met = [k for k in AUTO_KS if kept_mismatched[k] is not None and kept_mismatched[k] <= target]
    return {
        "k": max(met) if met else 1,
        "met": bool(met),
        "rule": f"the largest k of {list(AUTO_KS)} whose kept pairs are at most {target:.1%} mismatched (estimated)",
        "target": target,
        "clean": real,
        "corrupted": total,
        "mismatched": None if mismatched is None else round(mismatched, 4),
        "estimated_at": max(deep) if deep else None,
        "curve": {str(k): {"corrupted_removed": round(removed[k], 4), "clean_kept": round(kept[k], 4),
                           "kept_mismatched": None if kept_mismatched[k] is None else round(kept_mismatched[k], 4)}
                  for k in AUTO_KS},
    }


def calibrate_k(alive, rows: int, search, options) -> dict:
    """Measure the consistency filter on a sample of ``alive`` (a dataset of embedded pairs) against
    the pool behind ``search`` and apply ``choose_k``; returns its summary (``["k"]`` is the choice)."""
    depth = max(AUTO_KS)
    ds = alive.select_columns(["id", "passage", "query_embedding", "passage_embedding"])
    if options.auto_rows < rows:
        ds = ds.random_sample(options.auto_rows / rows, seed=options.seed)
    clean = corrupted = rank_counts(np.empty(0), depth)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        q, p = to_matrix(batch.column("query_embedding")), to_matrix(batch.column("passage_embedding"))  # (B, D)
        clean = clean + rank_counts(consistency_ranks(q, p, search, depth, options.near_copy_eps), depth)
        query_rows, passage_rows = corrupt_rows(batch.column("id").to_pylist(), batch.column("passage").to_pylist(),
                                                AUTO_FRACTION, options.seed)
        ranks = consistency_ranks(q[query_rows], p[passage_rows], search, depth, options.near_copy_eps)
        corrupted = corrupted + rank_counts(ranks, depth)
    choice = choose_k(clean, corrupted, options.auto_mismatched)
    if choice["mismatched"] is None:
        warnings.warn(
            f"filter.k=auto: {choice['corrupted']} corrupted pairs against a pool this small cannot tell how many of the "
            "data's pairs are mismatched; using k=1. A larger input (and pool) gives the rule room", stacklevel=2)
    elif not choice["met"]:
        warnings.warn(
            f"filter.k=auto: about {choice['mismatched']:.1%} of the data's pairs look mismatched, and even k=1 keeps an "
            f"estimated {choice['curve']['1']['kept_mismatched']:.1%} mismatched, above filter.auto_mismatched="
            f"{options.auto_mismatched}; using k=1", stacklevel=2)
    return choice
