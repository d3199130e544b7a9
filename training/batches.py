"""Training batches in memory: a batch's texts (queries, passages, hard negatives) and the masks
the loss needs, the learning-rate schedule and the epoch arithmetic. No model, no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pairmill.pairs import text_key


def hard_negatives(
    negatives: Sequence[Sequence[str] | None], negative_ids: Sequence[Sequence[int] | None] | None, k: int
) -> tuple[list[list[str]], list[list[int]]]:
    """Up to ``k`` hard negatives per pair and their text ids (``negative_ids`` when given, else
    ``text_key``). The one place a batch's negatives are chosen: a refresher that supplies fresher
    negatives by pair id replaces the two lists this returns."""
    texts, ids = [], []
    for i, row in enumerate(negatives):
        row = list(row or [])[:k]
        given = negative_ids[i] if negative_ids is not None and negative_ids[i] is not None else None
        texts.append(row)
        ids.append(list(given)[: len(row)] if given is not None else [text_key(t) for t in row])
    return texts, ids


@dataclass
class PairBatch:
    """One worker's batch as texts and ids; the negatives are flat, ``negative_mask`` places them."""

    queries: list[str]  # (B,) with the query prefix
    passages: list[str]  # (B,) with the passage prefix
    negatives: list[str]  # (M,) with the passage prefix, row-major over the valid slots of negative_mask
    negative_mask: Tensor  # (B, H) bool, True = a real negative
    positive_ids: Tensor  # (B,) int64 text_key of each passage
    negative_ids: Tensor  # (B, H) int64 text_key of each negative, 0 in padded slots
    query_ids: Tensor  # (B,) int64 text_key of each query: rows sharing it are one query (SupConLoss's positives)


def build_batch(columns: dict[str, list], *, hard_negative_count: int, query_prefix: str, passage_prefix: str,
                group_by: str = "query") -> PairBatch:
    """Columns of validated pairs (``query``, ``passage``, optional ``negatives`` / ``negative_ids``)
    -> a ``PairBatch`` with ``hard_negative_count`` slots per pair (ragged rows padded, masked).
    ``group_by="source"``: rows with the same ``source`` share a query id (SupCon's positives: pairmill
    setfit's class labels), a row without one keeps its query's."""
    B, H = len(columns["query"]), hard_negative_count
    texts, ids = hard_negatives(columns.get("negatives") or [None] * B, columns.get("negative_ids"), H)
    mask = torch.zeros(B, H, dtype=torch.bool)
    negative_ids = torch.zeros(B, H, dtype=torch.int64)
    for i, row in enumerate(ids):
        mask[i, : len(row)] = True
        negative_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return PairBatch(
        queries=[query_prefix + q for q in columns["query"]],
        passages=[passage_prefix + p for p in columns["passage"]],
        negatives=[passage_prefix + t for row in texts for t in row],
        negative_mask=mask,
        positive_ids=torch.tensor([text_key(p) for p in columns["passage"]], dtype=torch.int64),
        negative_ids=negative_ids,
        query_ids=torch.tensor(group_ids(columns, group_by), dtype=torch.int64),
    )


def group_ids(columns: dict[str, list], group_by: str = "query") -> list[int]:
    """(B,) the id each row's SupCon group is known by: ``text_key`` of its query, or of its source or
    its ``group`` (prefixed by the column's name, so a label never shares an id with a query or a group of
    the same text); a row without a value keeps its query's."""
    if group_by == "query":
        return [text_key(q) for q in columns["query"]]
    if group_by not in ("source", "group"):
        raise ValueError(f"group_by={group_by!r}; valid: query, source, group")
    prefix = f"\x1f{group_by}:"
    return [text_key(q) if g is None else text_key(prefix + g) for q, g in zip(columns["query"], columns[group_by])]


def simcse_columns(columns: dict[str, list]) -> dict[str, list]:
    """Plain-text rows (``id``, ``text``) as pairs for unsupervised SimCSE (Gao et al. 2021): each
    text is its own query and its own passage, without hard negatives. Encoded in two forwards with
    dropout on, the two views differ by their dropout masks only; the other texts of the batch are
    the negatives, and a repeated text is masked by its id as any duplicate passage is."""
    texts = list(columns["text"])
    return {"id": list(columns["id"]), "query": texts, "passage": list(texts), "negatives": [None] * len(texts)}


def place_negatives(flat: Tensor | None, mask: Tensor, query: Tensor) -> Tensor:
    """(M, D) embeddings of the valid slots -> (B, H, D), zeros in padded slots (masked in the loss).

    A batch without negatives (``flat`` None) takes a 0-row slice of ``query`` (B, D), so its zeros
    still hang off the graph: the loss all-gathers the negatives and all-reduces their gradient in
    backward, and a rank whose batch happens to have no negatives must run that all-reduce too, or
    the ranks' collectives no longer match (gloo aborts the step; NCCL hangs)."""
    if flat is None:
        flat = query[:0]
    B, H = mask.shape
    slots = mask.reshape(-1).nonzero().squeeze(1)  # (M,)
    out = flat.new_zeros(B * H, flat.shape[-1]).index_copy(0, slots, flat)  # differentiable
    return out.view(B, H, flat.shape[-1])


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate factor at ``step``: linear warmup from 0, then linear/cosine decay to 0 or constant.
    Not ``transformers.get_scheduler``: its warmup gives step 0 a learning rate of 0, a lost step
    out of the few a short run has; this one starts at 1 / warmup_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def steps_per_epoch(valid_rows: int, num_workers: int, per_worker_batch: int) -> int:
    """Ray's equal split gives every worker floor(N / W) rows; drop_last keeps whole batches."""
    return (valid_rows // num_workers) // per_worker_batch
