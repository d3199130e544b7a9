"""Training pairs from labelled texts (pairmill setfit): positives within a class, hard negatives
from other classes near the class boundary. Arrays in, rows out; no Ray.

Design note
-----------
What. ``positive_pairs``: every ordered pair (anchor, positive) of two different texts of one class
(k texts make k(k-1), so the count grows as k²), sampled down to ``per_class`` when there are more
and cycled up to it when there are fewer, so every class trains on as many pairs (balanced; a
class with one text has no pair and is reported). ``boundary_negatives``: for each anchor, the
texts of *other* classes the current model puts nearest to it, the texts across the boundary it
is most likely to confuse the anchor with. They come from the mining code: an in-process
``IndexShard`` (exact Flat search, what a mine shard holds) over every labelled text, and
``select_negatives`` with the anchor's whole class as its positives, so a text with the anchor's
label is never a negative (the false-negative rule of ``pairmill mine``, here exact because labels
are known; the margin filter is off for the same reason). ``sampling=random`` within the
``window`` nearest keeps a class's anchors from all taking the same few negatives.

Rows are pairs as every job reads them: ``query`` = anchor, ``passage`` = positive, ``negatives``,
and ``source`` = the class label, which ``train.group_by=source`` turns into SupCon's groups: all
rows of a class in a batch are positives of each other, every other class's texts are negatives.

Cost: one (n, n) exact search over the n labelled texts (n is small in few-shot work), and
O(classes x per_class) rows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from mining.negatives import select_negatives
from mining.shard import IndexShard

WINDOW = 10  # nearest other-class texts a pair's negatives are drawn from (sampling=random)


def positive_pairs(labels: Sequence[str], per_class: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(P, 2) int64 row indices (anchor, positive), ``per_class`` pairs for every class with >= 2
    texts, and a report: ``{"classes", "pairs_per_class", "possible": {label: k(k-1)},
    "sampled_down": [labels], "repeated": [labels], "without_pairs": [labels]}``."""
    if per_class < 1:
        raise ValueError(f"per_class={per_class}; use >= 1 pairs per class")
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    out, report = [], {"classes": len(members), "pairs_per_class": per_class, "possible": {},
                       "sampled_down": [], "repeated": [], "without_pairs": []}
    for label in sorted(members):
        rows = np.asarray(members[label], dtype=np.int64)
        k = len(rows)
        report["possible"][label] = k * (k - 1)
        if k < 2:
            report["without_pairs"].append(label)
            continue
        # ordered pair number m -> (m // (k-1), the (m % (k-1))-th other text): no (k, k) matrix for a big class
        chosen = rng.choice(k * (k - 1), size=per_class, replace=False) if k * (k - 1) >= per_class else \
            np.resize(rng.permutation(k * (k - 1)), per_class)
        (report["sampled_down"] if k * (k - 1) > per_class else report["repeated"] if k * (k - 1) < per_class else []).append(label)
        a, offset = np.divmod(chosen, k - 1)
        p = offset + (offset >= a)  # skip the anchor itself
        out.append(np.stack([rows[a], rows[p]], 1))
    pairs = np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)
    return pairs[rng.permutation(len(pairs))], report


def boundary_negatives(embeddings: np.ndarray, labels: Sequence[str], anchors: np.ndarray, n: int, *,
                       window: int = WINDOW, seed: int = 0) -> np.ndarray:
    """(len(anchors), n) int64 row indices of other-class texts near each anchor (``embeddings``:
    (N, D) unit vectors of every labelled text by the current model), -1 where fewer exist."""
    if n == 0 or len(anchors) == 0:
        return np.full((len(anchors), n), -1, dtype=np.int64)
    labels = list(labels)
    shard = IndexShard(embeddings.shape[1], "Flat")  # in-process: the few-shot set is small
    shard.add(np.arange(len(labels), dtype=np.int64), embeddings)
    largest = max(Counter(labels).values())
    depth = min(len(labels), largest + max(window, n))  # past every same-class text to `window` others
    unique = np.unique(anchors)
    scores, ids = shard.search(embeddings[unique], depth)
    same_class = {label: set() for label in labels}
    for i, label in enumerate(labels):
        same_class[label].add(i)
    selection = select_negatives(
        ids, scores, np.ones(len(unique), dtype=np.float32), [same_class[labels[a]] for a in unique],
        num_negatives=n, range_min=0, range_max=max(window, n), margin_ratio=None, max_score=None,
        sampling="random", seed=seed)
    by_anchor = dict(zip(unique.tolist(), selection.ids))
    return np.stack([by_anchor[int(a)] for a in anchors]) if len(anchors) else np.empty((0, n), np.int64)


def label_pair_rows(texts: Sequence[str], labels: Sequence[str], embeddings: np.ndarray, *, per_class: int,
                    negatives: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Pairs rows for ``pairmill train`` (id, query, passage, source = label, negatives) and the
    report of ``positive_pairs`` with ``rows`` and ``negatives_per_pair``."""
    pairs, report = positive_pairs(labels, per_class, seed)
    hard = boundary_negatives(embeddings, labels, pairs[:, 0], negatives, seed=seed)
    rows = []
    for m, ((a, p), neg) in enumerate(zip(pairs.tolist(), hard)):
        rows.append({"id": _pair_id(m, a, p), "query": texts[a], "passage": texts[p], "source": labels[a],
                     "negatives": [texts[j] for j in neg if j >= 0]})
    report.update(rows=len(rows), negatives_per_pair=negatives,
                  short_pairs=int(sum(len(r["negatives"]) < negatives for r in rows)))
    return rows, report


def _pair_id(m: int, a: int, p: int) -> str:
    """Unique per row (a repeated pair of a small class is a second row, not a duplicate id)."""
    return hashlib.blake2b(f"{m}:{a}:{p}".encode(), digest_size=8).hexdigest()
