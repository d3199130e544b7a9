"""train.group_by=source (pairmill setfit): rows with the same source (a class label) are one SupCon
group, so every same-label row of the batch is a positive; checked against a naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pairmill.pairs import text_key
from training.batches import build_batch, group_ids
from training.losses import SupConLoss

COLUMNS = {"query": ["we plan to build it", "we will build it", "we built it", "it is built", "plan b"],
           "passage": ["a plan", "the plan", "done", "finished", "we built it"],
           "source": ["plan", "plan", "built", "built", None]}


def test_rows_of_one_label_share_a_group_and_a_row_without_one_keeps_its_query():
    ids = group_ids(COLUMNS, "source")
    assert ids[0] == ids[1] != ids[2] == ids[3]
    assert ids[4] == text_key("plan b") and ids[0] != text_key("plan")  # a label never collides with a query text
    assert group_ids(COLUMNS, "query") == [text_key(q) for q in COLUMNS["query"]]
    batch = build_batch(COLUMNS, hard_negative_count=0, query_prefix="", passage_prefix="", group_by="source")
    assert batch.query_ids.tolist() == ids
    with pytest.raises(ValueError, match="valid: query, source"):
        group_ids(COLUMNS, "label")


def test_the_group_column_groups_like_source_and_never_collides_with_it():
    columns = {**COLUMNS, "group": ["faq-1", None, "faq-1", "plan", "plan"]}
    ids = group_ids(columns, "group")
    assert ids[0] == ids[2] and ids[3] == ids[4] and len({ids[0], ids[1], ids[3]}) == 3
    assert ids[1] == text_key(COLUMNS["query"][1])  # no group: its query's
    assert ids[3] != group_ids(COLUMNS, "source")[0]  # group "plan" is not source "plan"


def test_supcon_over_labels_equals_a_naive_loop():
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    batch = build_batch(COLUMNS, hard_negative_count=0, query_prefix="", passage_prefix="", group_by="source")
    loss = SupConLoss(temperature=0.1, gather_across_workers=False)(
        q, p, positive_ids=batch.positive_ids, query_ids=batch.query_ids)
    labels = [s if s is not None else f"query:{qt}" for s, qt in zip(COLUMNS["source"], COLUMNS["query"])]
    naive = []
    for i in range(5):
        log_prob = torch.log_softmax(q[i] @ p.T / 0.1, dim=0)  # every passage of the batch is a candidate
        naive.append(torch.stack([-log_prob[j] for j in range(5) if labels[j] == labels[i]]).mean())
    assert loss.item() == pytest.approx(torch.stack(naive).mean().item(), rel=1e-5)
