"""``train_step`` without Ray: one batch's loss and gradients, the same through every encoding path,
and a few dozen steps that make held-out retrieval better (not only "the weights changed")."""

from __future__ import annotations

import pytest
import torch

from pairmill.evaluate import evaluate_embeddings, pairs_task
from tests.conftest import literal_pairs
from training.batches import build_batch
from training.encoding import GradCache
from training.losses import InfoNCELoss
from training.loop import StepParts, train_step
from training.model import make_tokenize, setup_model, setup_optimizer


def columns(rows: list[dict], negatives: int = 0) -> dict[str, list]:
    out = {"query": [r["query"] for r in rows], "passage": [r["passage"] for r in rows]}
    if negatives:  # other rows' passages, ragged: row i has i % (negatives + 1) of them
        out["negatives"] = [[rows[(i + k + 1) % len(rows)]["passage"] for k in range(i % (negatives + 1))]
                            for i in range(len(rows))]
    return out


def step_parts(model_path: str, **kw) -> StepParts:
    torch.manual_seed(0)
    st = setup_model(model_path, None)
    st.eval()  # no dropout: the paths below must agree exactly
    return StepParts(st, make_tokenize(st), InfoNCELoss(0.05, symmetric=True), query_max=16, passage_max=48, **kw)


def loss_and_grads(parts: StepParts, batch) -> tuple[float, dict[str, torch.Tensor]]:
    parts.model.zero_grad(set_to_none=True)
    loss = train_step(parts, batch)
    return float(loss.detach()), {n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None}


def test_train_step_gives_the_loss_of_the_encoded_batch_and_its_gradients(tiny_model):
    batch = build_batch(columns(literal_pairs(12), negatives=2), hard_negative_count=2, query_prefix="query: ",
                        passage_prefix="passage: ")
    parts = step_parts(tiny_model)
    loss, grads = loss_and_grads(parts, batch)

    # the reference: each side encoded whole, negatives placed by the mask, the same loss
    st, tok = parts.model, parts.tokenize
    with torch.no_grad():
        q = st(tok(batch.queries, 16))["sentence_embedding"]
        p = st(tok(batch.passages, 48))["sentence_embedding"]
        n = st(tok(batch.negatives, 48))["sentence_embedding"]
        negatives = torch.zeros(*batch.negative_mask.shape, q.shape[1])
        negatives[batch.negative_mask] = n
        expected = parts.loss_fn(q, p, negatives, batch.negative_mask, batch.positive_ids, batch.negative_ids)
    assert loss == pytest.approx(float(expected), abs=1e-5)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("path", ["length_groups", "grad_cache"])
def test_every_encoding_path_gives_the_same_loss_and_gradients(tiny_model, path):
    batch = build_batch(columns(literal_pairs(12), negatives=2), hard_negative_count=2, query_prefix="query: ",
                        passage_prefix="passage: ")
    plain_loss, plain = loss_and_grads(step_parts(tiny_model), batch)
    parts = step_parts(tiny_model, length_group_overhead=4 if path == "length_groups" else 0)
    if path == "grad_cache":
        parts.grad_cache = GradCache(parts.model, 5, parts.encode, by_length=True)
    loss, grads = loss_and_grads(parts, batch)
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain[name], atol=2e-5, rtol=1e-3, msg=name)


def test_steps_make_held_out_retrieval_better(tiny_model):
    """40 steps of batch 16 on 64 pairs raise nDCG@10 on 16 pairs never trained on."""
    from pairmill.encoder import Encoder

    rows = literal_pairs(80)
    train_rows, held_out = rows[:64], rows[64:]
    task = pairs_task([r["query"] for r in held_out], [r["passage"] for r in held_out])
    torch.manual_seed(0)
    st = setup_model(tiny_model, None)
    parts = StepParts(st, make_tokenize(st), InfoNCELoss(0.05, symmetric=False), query_max=16, passage_max=48)

    def ndcg() -> float:
        encoder = Encoder(st, max_length=64, precision="fp32")
        metrics = evaluate_embeddings(task, encoder.encode(task.queries), encoder.encode(task.corpus))
        st.train()
        return metrics["ndcg@10"]

    before = ndcg()
    optimizer = setup_optimizer(st, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        picked = [train_rows[i] for i in torch.randperm(len(train_rows), generator=g)[:16].tolist()]
        optimizer.zero_grad(set_to_none=True)
        train_step(parts, build_batch(columns(picked), hard_negative_count=0, query_prefix="", passage_prefix=""))
        optimizer.step()
    after = ndcg()
    print(f"ndcg@10 {before:.4f} -> {after:.4f}")
    assert after > before + 0.05, (before, after)
