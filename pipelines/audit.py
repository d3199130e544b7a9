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
"""

from __future__ import annotations

import hashlib

import numpy as np

from pairmill.pairs import normalize_text

AUDIT_KS = (1, 2, 5, 10)


def _unit(seed: int, text: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big") / 2.0**64


def corrupt_rows(ids: list[str], passages: list[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query_rows, passage_rows): the rows whose query and passage form each corrupted pair."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"audit fraction={fraction}; expected 0 <= fraction <= 1")
    chosen = np.array([i for i, rid in enumerate(ids) if _unit(seed, rid) < fraction], dtype=np.int64)
    if len(chosen) < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(int(_unit(seed, ids[chosen[0]]) * 2**32))
    chosen = rng.permutation(chosen)
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
