"""The collapse alarm: is training squeezing every embedding into one direction?

Design note
-----------
What. At each report step rank 0 encodes a fixed sample of held-out texts (``train.collapse_sample``:
the eval set's passages, else the first training passages) and logs two numbers into
metrics.jsonl: ``collapse_mean_cosine``, the mean cosine over all pairs of distinct texts, and
``collapse_uniformity``, Wang & Isola's log mean exp(-2 ||x - y||^2) over the same pairs
(``pairmill.evaluate.uniformity``; lower is more uniform, 0 = every embedding the same point).

Why. A contrastive objective with too few or too easy negatives (SimCSE without enough texts, a
tiny batch, a too high temperature) can reach a low loss while the embeddings drift together, and
retrieval dies with it; the loss curve does not show it. Wang & Isola (2020) tie retrieval quality
to uniformity, and a mean pairwise cosine near 1 is collapse itself.

The rule (``collapse_warning``). A model's own starting point varies (MiniLM's mean cosine on
unrelated passages is ~0.1, E5's ~0.7: an anisotropic space is not a collapse), so the alarm
compares against the numbers at the start of training: it warns when the mean cosine is at least
``threshold`` (``train.collapse_cosine``), has closed at least a quarter of its distance to 1 since
the start, and uniformity has risen too (both measures agree on the direction).

Cost. One forward over a few hundred texts per report (no gradient), and an (n, n) Gram matrix.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from pairmill.evaluate import normalize_rows, uniformity

# share of the start's distance to cosine 1 that the mean cosine must have closed before the alarm fires
TOWARDS_ONE = 0.25


def collapse_metrics(embeddings: Tensor | np.ndarray) -> dict[str, float]:
    """``mean_cosine`` over all pairs of distinct rows and ``uniformity`` (t=2) of (n >= 2, D) embeddings."""
    x = normalize_rows(np.asarray(embeddings, dtype=np.float64))  # (n, D)
    n = len(x)
    if n < 2:
        raise ValueError(f"collapse_metrics needs at least 2 embeddings (it scores pairs); got {n}.")
    total = float(np.square(x.sum(0)).sum())  # sum over all ordered pairs (i, j) of cos(i, j), the diagonal included
    mean_cosine = (total - float(np.square(x).sum())) / (n * (n - 1))
    return {"mean_cosine": round(mean_cosine, 6), "uniformity": round(uniformity(x), 6)}


def collapse_warning(start: dict[str, float], now: dict[str, float], threshold: float, queue_size: int = 0) -> str | None:
    """The alarm's text when ``now`` has moved towards collapse from ``start`` (see the design note), else
    None. ``queue_size`` is the run's ``train.queue_size`` (0: no queue): with a queue on, the advice
    names it first, since stale queued negatives are a measured cause (docs/benchmarks.md, the
    objectives on registry pairs: the queue arm collapsed where the same run without it did not)."""
    cos0, cos = start["mean_cosine"], now["mean_cosine"]
    closer = cos - cos0 >= TOWARDS_ONE * (1 - cos0)
    if cos >= threshold and closer and now["uniformity"] > start["uniformity"]:
        if queue_size:
            advice = (f"train.queue_size={queue_size} is a likely cause (its negatives come from the model of earlier "
                      "steps, and moving every embedding away from them lowers the loss): try train.queue_size=0 or "
                      "a lower train.lr")
        else:
            advice = "lower train.temperature, use a larger batch or train.queue_size, or a lower train.lr"
        return (f"embeddings are collapsing: mean pairwise cosine {cos:.3f} (start {cos0:.3f}, alarm at "
                f">= {threshold} and a quarter of the way to 1), uniformity {now['uniformity']:.3f} (start "
                f"{start['uniformity']:.3f}). Held-out retrieval is likely falling: {advice}")
    return None
