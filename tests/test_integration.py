"""With the real bundled all-MiniLM-L6-v2 (slower; skip with -m 'not integration')."""

import gzip
import json
import math

import numpy as np
import pytest

from pairmill import sample
from pairmill.cli import main

pytestmark = pytest.mark.integration


def _brute_force(queries, passages):
    """Metrics computed independently: sentence-transformers' own encode, a full sort per query,
    and the metric formulas written out again (one relevant passage per query)."""
    from sentence_transformers import SentenceTransformer

    from pairmill.encoder import bundled_model_path

    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    corpus = list(dict.fromkeys(passages))
    q = model.encode(queries, normalize_embeddings=True)
    c = model.encode(corpus, normalize_embeddings=True)
    ndcg = r1 = r10 = r100 = mrr = 0.0
    for i, query_vec in enumerate(q):
        scores = c @ query_vec
        ranking = sorted(range(len(corpus)), key=lambda j: (-scores[j], j))
        rank = ranking.index(corpus.index(passages[i]))  # 0-based
        ndcg += 1 / math.log2(rank + 2) if rank < 10 else 0
        r1 += rank < 1
        r10 += rank < 10
        r100 += rank < 100
        mrr += 1 / (rank + 1) if rank < 10 else 0
    n = len(queries)
    positives = c[[corpus.index(p) for p in passages]]
    return {
        "ndcg@10": ndcg / n, "recall@1": r1 / n, "recall@10": r10 / n, "recall@100": r100 / n, "mrr@10": mrr / n,
        "alignment": float(np.mean(np.sum((q - positives) ** 2, axis=1))),
    }


def test_eval_of_the_bundled_model_matches_brute_force(tmp_path):
    with gzip.open(sample.HELDOUT, "rt") as f:
        rows = [json.loads(line) for line in f][:150]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--data", str(data), "--json", str(tmp_path / "m.json")]) == 0
    ours = json.loads((tmp_path / "m.json").read_text())
    reference = _brute_force([r["query"] for r in rows], [r["passage"] for r in rows])
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=5e-4), key
    assert ours["ndcg@10"] > 0.3  # a real model, not noise
