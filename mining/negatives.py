"""Hard-negative selection with false-negative control, over arrays (no index, no Ray).

Design note. The index returns, per query, candidates ranked by score. A candidate is a false
negative when it is a positive of that query: the pair's own passage, a passage text-identical to
it (the corpus holds each normalised text once, so these share one corpus id), or the passage of
another pair with the same query. Those are removed first, then the positive-aware filter of
NV-Retriever ("TopK-PercPos") drops candidates scoring above ``margin_ratio`` x the positive's
score, plus an optional absolute ``max_score``: a candidate that close to the positive is more
often an unlabelled positive than a negative. The rank window ``[range_min, range_max)`` is taken
over what is left (so "rank 0" is the hardest candidate below the margin), as NV-Retriever takes
its top-k after the filter. Filtering first matters for pairs whose positive ranks low (a noisy
web pair kept at rank 50 has ~50 passages scoring above it): a window taken first would hold only
candidates above the margin and leave the pair with no negative (1,229 of 11,845 registry pairs
did); ``mining.search`` searches such pairs again, deeper. From the window, ``top`` takes the
highest-scoring, ``random`` samples uniformly. A query left with fewer than ``num_negatives`` gets
fewer: the shortfall is counted, never padded silently. Cost: O(queries x candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from pairmill.config import MineConfig

# mine.min_negative_words: scripts written without spaces between words (Thai, kana, CJK ideographs),
# where each character counts as a word, so a Chinese sentence is not "one word".
UNSPACED = "[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


@dataclass
class Selection:
    ids: np.ndarray  # (Q, n) int64 corpus ids, -1 where a query got fewer than n
    scores: np.ndarray  # (Q, n) float32, nan where ids == -1
    short: int  # queries with fewer than n negatives
    filtered: np.ndarray  # (Q,) int64: searched candidates the positive-aware filter (and max_score) dropped

    @property
    def filtered_by_margin(self) -> int:
        return int(self.filtered.sum())


def select_negatives(
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    positive_scores: np.ndarray,
    positives: Sequence[set[int]],
    *,
    num_negatives: int = MineConfig.num_negatives,
    range_min: int = MineConfig.range_min,
    range_max: int = MineConfig.range_max,
    margin_ratio: float | None = MineConfig.margin_ratio,
    max_score: float | None = MineConfig.max_score,
    sampling: Literal["top", "random"] = MineConfig.sampling,
    seed: int = MineConfig.seed,
) -> Selection:
    """Choose ``num_negatives`` per query from ranked candidates ``cand_ids`` / ``cand_scores`` (Q, K).

    Hand-written rather than sentence-transformers' ``mine_hard_negatives``: that one holds the whole
    corpus and its index in one process; this works on one batch of a sharded search's candidates,
    so it runs inside Ray tasks at any corpus size, with the same rules (rank window, margin, max score)."""
    if not 0 <= range_min < range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={range_min}, range_max={range_max}")
    if sampling not in ("top", "random"):
        raise ValueError(f"sampling={sampling!r}; valid: top, random")
    if margin_ratio is not None and margin_ratio <= 0:
        raise ValueError(f"margin_ratio must be > 0 (or None to switch the filter off), got {margin_ratio}")
    rng = np.random.default_rng(seed)
    q = len(cand_ids)
    out_ids = np.full((q, num_negatives), -1, dtype=np.int64)
    out_scores = np.full((q, num_negatives), np.nan, dtype=np.float32)
    short = 0
    filtered = np.zeros(q, dtype=np.int64)
    for i in range(q):
        keep = (cand_ids[i] >= 0) & ~np.isin(cand_ids[i], list(positives[i]))
        ids, scores = cand_ids[i][keep], cand_scores[i][keep]
        ok = np.ones(len(ids), dtype=bool)
        if margin_ratio is not None:
            ok &= scores <= margin_ratio * positive_scores[i]
        if max_score is not None:
            ok &= scores <= max_score
        filtered[i] = int((~ok).sum())
        ids, scores = ids[ok][range_min:range_max], scores[ok][range_min:range_max]
        if sampling == "random" and len(ids) > num_negatives:
            pick = np.sort(rng.choice(len(ids), num_negatives, replace=False))  # keep score order
            ids, scores = ids[pick], scores[pick]
        n = min(num_negatives, len(ids))
        out_ids[i, :n], out_scores[i, :n] = ids[:n], scores[:n]
        short += n < num_negatives
    return Selection(out_ids, out_scores, short, filtered)


def positive_sets(query_keys: Sequence[str], positive_ids: Sequence[int]) -> list[set[int]]:
    """Per pair: the corpus ids of every positive of its query (pairs sharing a query key)."""
    by_query: dict[str, set[int]] = {}
    for key, pid in zip(query_keys, positive_ids):
        by_query.setdefault(key, set()).add(int(pid))
    return [by_query[key] for key in query_keys]


def scheduled_window(start: tuple[int, int], final: tuple[int, int], progress: float) -> tuple[int, int]:
    """The curriculum's rank window at ``progress`` (0 = the first step, 1 = the last) of training:
    each end moves linearly from ``start`` to ``final`` and is rounded half up. Easy -> hard is a
    window moving towards rank 0 (e.g. (20, 50) -> (0, 30)). Rounding each end keeps the window at
    least as wide as the narrower of the two (its width is a convex mix of theirs, and the two
    roundings lose less than one together), so a window valid at both ends is valid throughout."""
    p = min(1.0, max(0.0, float(progress)))
    return tuple(int(math.floor(a + p * (b - a) + 0.5)) for a, b in zip(start, final))  # type: ignore[return-value]


def word_counts(texts) -> np.ndarray:
    """Words per text (a pyarrow string array): whitespace-separated, or the characters of
    ``UNSPACED`` scripts when those are more; a null text has none."""
    import pyarrow.compute as pc

    spaced = pc.fill_null(pc.count_substring_regex(texts, r"[^\s\p{Z}]+"), 0)  # runs of non-space (RE2: \p{Z} is Unicode)
    unspaced = pc.fill_null(pc.count_substring_regex(texts, UNSPACED), 0)
    return np.maximum(spaced.to_numpy(zero_copy_only=False), unspaced.to_numpy(zero_copy_only=False))


def negative_pool(batch, min_words: int, column: str = "passage"):
    """``map_batches`` step: the corpus rows that may become negatives under ``mine.min_negative_words``."""
    import pyarrow as pa

    return batch.filter(pa.array(word_counts(batch.column(column)) >= min_words))
