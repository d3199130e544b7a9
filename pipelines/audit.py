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
data (``filter.auto_rows``, a fifth of it corrupted as above) against the finished pool, the rule
picks the largest k of ``AUTO_KS`` that still removes ``filter.auto_removed`` of the corrupted
pairs, and reports the curve and the choice in stats.json. What the audit can and cannot tell:
a corrupted pair's passage is, to its query, just another pool passage, so its rank is close to
uniform over the pool for any encoder and the share it removes is about ``1 - k / pool`` (the
measurements agree: 99.5% at k=10 on a 3,000-pair pool with a static model, 100% of 411 at k=10
on the 2,050-pair sample). Random mismatches are therefore removed at any small k once the pool is
large, and every step down in k only drops more real pairs: the rule takes the most lenient k the
pool allows (k=20 on a 2,050-passage pool at 99%; k=500 on 18,925 registry passages at 95%, where
it removed 97.3% and kept 71.3%). Candidates reach k=1000 (the search goes that deep). Noise that is
*related* to its query (generic summaries, half-right pairs) is what the audit cannot simulate;
whether a stricter k pays for it is measured per data set by ``benchmarks/chain.py``.
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


def choose_k(clean: np.ndarray, corrupted: np.ndarray, target: float) -> dict:
    """k=auto's rule over ``rank_counts`` (at max(AUTO_KS)) of the sample's clean and corrupted
    pairs: the largest k of AUTO_KS that removes at least ``target`` of the corrupted pairs (k=1
    when none does, with ``met`` false: the pool is too small to tell a mismatched pair apart)."""
    total, real = int(corrupted.sum()), max(1, int(clean.sum()))
    curve = {
        k: {"corrupted_removed": round(int(corrupted[k + 1 :].sum()) / total if total else 0.0, 4),
            "clean_kept": round(int(clean[: k + 1].sum()) / real, 4)}
        for k in AUTO_KS
    }
    met = [k for k, share in curve.items() if share["corrupted_removed"] >= target]
    return {
        "k": max(met) if met else 1,
        "met": bool(met),
        "rule": f"the largest k of {list(AUTO_KS)} that removes >= {target:.1%} of corrupted pairs",
        "target": target,
        "clean": int(clean.sum()),
        "corrupted": total,
        "curve": {str(k): share for k, share in curve.items()},
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
    choice = choose_k(clean, corrupted, options.auto_removed)
    if not choice["met"]:
        warnings.warn(
            f"filter.k=auto: no k removes {options.auto_removed:.1%} of corrupted pairs on this data "
            f"(k=1 removes {choice['curve']['1']['corrupted_removed']:.1%} against a pool this small); using k=1. "
            "A larger input (and pool) or a lower filter.auto_removed gives the rule room",
            stacklevel=2,
        )
    return choice
