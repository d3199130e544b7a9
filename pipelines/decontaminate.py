"""Decontamination: drop training pairs whose query or passage is an exact or near-duplicate of
any text in the evaluation files, so held-out scores are not inflated by training on the test set.

Design note. Evaluation sets are small next to training data, so they are read and encoded once on
the driver into an ``EvalTexts`` (a dict from normalised text to eval id, and the eval query and
passage embeddings), which each scoring worker holds. A pair is contaminated when its normalised
query or passage equals any eval text (exact), or when its query embedding is within cosine
``1 - eps`` of an eval query embedding or its passage embedding of an eval passage embedding
(semantic; queries and passages are compared with their own kind because prefixes differ).
``dup_of`` names the eval row matched. eps = 0 checks exact matches only.
Cost per pair: two dict look-ups and B x E x D multiply-adds for E eval texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairmill.pairs import normalize_text

CONTAMINATED = "contaminated"


@dataclass
class EvalTexts:
    exact: dict[str, str]  # normalised text (query or passage) -> eval id
    query_ids: list[str]
    query_embeddings: np.ndarray | None  # (Eq, D) or None for exact-only
    passage_ids: list[str]
    passage_embeddings: np.ndarray | None  # (Ep, D)


def load_eval_texts(paths: list[str], read_kwargs: dict, encoder=None) -> EvalTexts:
    """Read eval pair files (any format ``pairmill.read.read_parsed`` takes) and encode their texts with ``encoder``."""
    from pairmill.read import load_parsed_local

    exact: dict[str, str] = {}
    queries: dict[str, str] = {}  # normalised text -> eval id, each text encoded once
    passages: dict[str, str] = {}
    for path in paths:
        table = load_parsed_local(path, "pairs", **read_kwargs)
        for row in table.select(["id", "query", "passage", "reason"]).to_pylist():
            if row["reason"] is not None:
                continue
            q, p = normalize_text(row["query"]), normalize_text(row["passage"])
            exact.setdefault(q, row["id"])
            exact.setdefault(p, row["id"])
            queries.setdefault(q, row["id"])
            passages.setdefault(p, row["id"])
    if not exact:
        raise ValueError(f"decontaminate files {paths} hold no valid pairs: check the paths and read.query_field/passage_field")
    q_emb = encoder.encode(list(queries), "query") if encoder is not None else None
    p_emb = encoder.encode(list(passages), "passage") if encoder is not None else None
    return EvalTexts(exact, list(queries.values()), q_emb, list(passages.values()), p_emb)


def _nearest(vectors: np.ndarray, against: np.ndarray, ids: list[str], threshold: float) -> list[str | None]:
    if against is None or not len(against) or not len(vectors):
        return [None] * len(vectors)
    sims = vectors @ against.T  # (B, E)
    best = sims.argmax(axis=1)
    hit = sims[np.arange(len(vectors)), best] > threshold
    return [ids[b] if h else None for b, h in zip(best, hit)]


def contamination(
    queries: list[str],
    passages: list[str],
    query_embeddings: np.ndarray | None,
    passage_embeddings: np.ndarray | None,
    eval_texts: EvalTexts,
    eps: float,
) -> list[str | None]:
    """Per pair: the eval id it duplicates (exact first, then nearest semantic), or None when clean."""
    out = [eval_texts.exact.get(normalize_text(q)) or eval_texts.exact.get(normalize_text(p)) for q, p in zip(queries, passages)]
    if eps <= 0 or query_embeddings is None:
        return out
    by_query = _nearest(query_embeddings, eval_texts.query_embeddings, eval_texts.query_ids, 1.0 - eps)
    by_passage = _nearest(passage_embeddings, eval_texts.passage_embeddings, eval_texts.passage_ids, 1.0 - eps)
    return [e or q or p for e, q, p in zip(out, by_query, by_passage)]
