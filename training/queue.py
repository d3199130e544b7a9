"""A queue of past positive-passage embeddings: extra negatives for every query (``train.queue_size``).

Design note
-----------
What. Cross-batch memory (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning", XBM):
after each step the global batch's positive passages, as the loss saw them (unit length,
detached), go into a FIFO of the last ``size`` entries, and the next steps score every query
against them as well as against the batch (``InfoNCELoss``/``SupConLoss``'s ``queue`` argument).
MoCo's queue without its momentum encoder: the entries come from the model being trained, a few
steps old. Each entry keeps its text id, so a queued copy of a query's own positive (the same
passage seen again, or a duplicate) is masked exactly as an in-batch duplicate is.

Why. On 2 CPUs a batch holds 32 pairs; a queue of 4,096 lets each query see 4,000+ negatives for
the price of a (B, Q) matmul. XBM's argument is that embeddings drift slowly once training
settles, so entries a few steps old are still informative negatives; their staleness (steps since
an entry was encoded, mean over the queue) is logged as ``queue_staleness``, as the refresh logs
its negatives' staleness. With a full queue it is (Q / N + 1) / 2 steps for a global batch N.

Measured against it (docs/benchmarks.md, the objectives benchmark): 1,024 entries from the start of
fine-tuning the bundled model collapsed it (the collapse alarm firing; held-out nDCG@10 below the base
model on registry pairs, 0.013 below the default on the bundled sample) on each of 3 seeds, and 256
entries (4.5 steps old on average) still ended below the base model on registry pairs. The drift of
the first 100 steps is not slow, and XBM turns its memory on only after a warm-up, which this queue
does not do.

Workers. ``push`` all-gathers the global batch's positives, so every rank holds the same queue and
the loss appends it to the candidates without a gather. The queue is not checkpointed: a resumed
run starts with it empty and refills it in Q / N steps.

Cost. Memory Q x D floats per rank (4,096 x 384 fp32: 6 MiB); per step one all-gather of N x D
floats and the (B, Q) logits; no encoder work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.losses import _gather_no_grad, _world


class PassageQueue:
    """FIFO of the last ``size`` positive-passage embeddings, their text ids and the step each was encoded at."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", gather_across_workers: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size={size!r} is invalid: it must be an integer >= 1 (train.queue_size; 0 = no queue).")
        self.size = size
        self.gather_across_workers = gather_across_workers
        self._emb = torch.zeros(size, dim, device=device)  # (Q, D) unit rows; only the first `filled` in use
        self._ids = torch.zeros(size, dtype=torch.int64, device=device)  # (Q,)
        self._encoded_at = torch.zeros(size, dtype=torch.int64)  # (Q,) the push count when each entry came in
        self._next = 0  # the slot the next entry overwrites (the oldest once full)
        self.filled = 0
        self.pushes = 0  # one push per training step: staleness is counted in steps

    def __len__(self) -> int:
        return self.filled

    def embeddings(self) -> Tensor:
        """(filled, D) the queued embeddings (order does not matter to the loss)."""
        return self._emb[: self.filled]

    def ids(self) -> Tensor:
        """(filled,) their text ids."""
        return self._ids[: self.filled]

    def staleness(self) -> float | None:
        """Mean steps since the queued entries were encoded, as the next step sees them (1 = the last
        step's batch); None while empty."""
        if not self.filled:
            return None
        return float((self.pushes - self._encoded_at[: self.filled]).double().mean())

    def push(self, positives: Tensor, positive_ids: Tensor) -> None:
        """Add this step's positives (B, D) and ids (B,), gathered over the workers (a collective:
        every rank calls it once per step), overwriting the oldest entries when full."""
        _, world_size = _world() if self.gather_across_workers else (0, 1)
        emb = _gather_no_grad(F.normalize(positives.detach().float(), dim=-1), world_size)  # (N, D)
        ids = _gather_no_grad(positive_ids.to(self._ids.device, torch.int64), world_size)  # (N,)
        self.pushes += 1
        if len(emb) >= self.size:  # a batch larger than the queue: keep its last `size` rows
            emb, ids = emb[-self.size :], ids[-self.size :]
        slots = (self._next + torch.arange(len(emb))) % self.size  # (N,) the oldest slots, wrapping
        self._emb[slots.to(self._emb.device)] = emb.to(self._emb.device)
        self._ids[slots.to(self._ids.device)] = ids
        self._encoded_at[slots] = self.pushes - 1
        self._next = int((self._next + len(emb)) % self.size)
        self.filled = min(self.size, self.filled + len(emb))
