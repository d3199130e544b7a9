"""Objectives 4 and 5 of issue #19 and the collapse alarm, without Ray: the queue of past passages
(train.queue_size) against a naive per-query loop (loss, embedding gradients, queued copies of a
query's own positive masked), its FIFO and staleness bookkeeping against a deque; SimCSE's batch
(each text its own positive, two dropout masks); the alarm's rule on constructed embeddings; the
settings. The 2-worker checks of the queue run in the gloo workers of tests/training/conftest.py
(test_objectives.objective_cases and on_worker)."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pairmill.config import SECTIONS, ConfigError, TrainConfig, load_config
from pairmill.evaluate import uniformity
from tests.conftest import literal_pairs
from tests.training.test_losses import WORLD, D, global_batch, leaves, local
from tests.training.test_objectives import QUERY_IDS, assert_same_loss_and_grads, cos, naive_supcon
from training.batches import build_batch, simcse_columns
from training.collapse import collapse_metrics, collapse_warning
from training.loop import StepParts, train_step
from training.losses import InfoNCELoss, SupConLoss
from training.queue import PassageQueue

QUEUE_IDS = torch.tensor([100, 300, 102, 301, 302, 104, 303])  # entries 0, 2, 5: queued copies of pairs 0/3's, 2's, 4's positives


def queue_entries(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(7, D) past positives and their ids; three are texts some pairs of global_batch hold as positives."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(QUEUE_IDS), D, generator=g), QUEUE_IDS.clone()


def naive_queue_loss(query, positive, negatives, negative_mask, positive_ids, negative_ids, queue, queue_ids,
                     temperature, symmetric=False):
    """test_losses.naive_loss's loop with the queue: every entry whose text is not query i's positive is one more negative."""
    terms = []
    for i in range(len(query)):
        logits = [cos(query[i], positive[i]) / temperature]  # the target first
        logits += [cos(query[i], positive[j]) / temperature for j in range(len(query))
                   if j != i and positive_ids[j] != positive_ids[i]]
        logits += [cos(query[i], negatives[j, k]) / temperature for j in range(len(query))
                   for k in range(negatives.shape[1]) if negative_mask[j, k] and negative_ids[j, k] != positive_ids[i]]
        logits += [cos(query[i], queue[k]) / temperature for k in range(len(queue)) if queue_ids[k] != positive_ids[i]]
        logits = torch.stack(logits)
        terms.append(torch.logsumexp(logits, 0) - logits[0])
    loss = torch.stack(terms).mean()
    if not symmetric:
        return loss
    back = []  # passage -> query: the queue holds passages, so this term is today's
    for i in range(len(query)):
        logits = [cos(positive[i], query[i]) / temperature]
        logits += [cos(positive[i], query[j]) / temperature for j in range(len(query))
                   if j != i and positive_ids[j] != positive_ids[i]]
        logits = torch.stack(logits)
        back.append(torch.logsumexp(logits, 0) - logits[0])
    return (loss + torch.stack(back).mean()) / 2


# ----------------------------------------------------------------------------- the queue in the loss


@pytest.mark.parametrize("symmetric", [False, True])
def test_queue_loss_matches_naive_loop(symmetric):
    queue, queue_ids = queue_entries()
    ours, ref = leaves(global_batch()), leaves(global_batch())
    loss = InfoNCELoss(0.07, symmetric)(**ours, queue=queue, queue_ids=queue_ids)
    expected = naive_queue_loss(**ref, queue=queue, queue_ids=queue_ids, temperature=0.07, symmetric=symmetric)
    assert_same_loss_and_grads(ours, ref, loss, expected)


def test_queue_with_supcon_matches_naive_loop():
    """SupCon: a queued passage is a negative of row i unless its text is one of row i's group's positives."""
    queue, queue_ids = queue_entries()
    ours, ref = leaves(global_batch()), leaves(global_batch())
    loss = SupConLoss(0.07)(**ours, query_ids=QUERY_IDS, queue=queue, queue_ids=queue_ids)
    assert_same_loss_and_grads(ours, ref, loss, naive_supcon_with_queue(ref, queue, queue_ids, 0.07))
    # and without a queue the reference is test_objectives' own
    torch.testing.assert_close(naive_supcon_with_queue(ref, queue[:0], queue_ids[:0], 0.07),
                               naive_supcon(**global_batch(), query_ids=QUERY_IDS, temperature=0.07))


def naive_supcon_with_queue(ref, queue, queue_ids, temperature):
    """naive_supcon, then each row's extra negatives: the queued passages whose text is none of its positives'."""
    B = len(ref["query"])
    terms = []
    for i in range(B):
        group = [j for j in range(B) if QUERY_IDS[j] == QUERY_IDS[i]]
        texts = {int(ref["positive_ids"][j]) for j in group}
        logits, is_positive = [], []
        for j in range(B):
            if j in group or int(ref["positive_ids"][j]) not in texts:
                logits.append(cos(ref["query"][i], ref["positive"][j]) / temperature)
                is_positive.append(j in group)
        for j in range(B):
            for k in range(ref["negative_mask"].shape[1]):
                if ref["negative_mask"][j, k] and int(ref["negative_ids"][j, k]) not in texts:
                    logits.append(cos(ref["query"][i], ref["negatives"][j, k]) / temperature)
                    is_positive.append(False)
        for k in range(len(queue)):
            if int(queue_ids[k]) not in texts:
                logits.append(cos(ref["query"][i], queue[k]) / temperature)
                is_positive.append(False)
        logits = torch.stack(logits)
        lse = torch.logsumexp(logits, 0)
        terms.append(torch.stack([lse - logits[c] for c, pos in enumerate(is_positive) if pos]).mean())
    return torch.stack(terms).mean()


def test_queued_copy_of_a_querys_own_positive_is_masked():
    """A queued entry with the text of a pair's own positive (its id) is no negative of that pair, whatever
    its embedding; with another id it is one, and the loss moves."""
    batch = global_batch()
    one = {"query": batch["query"][:1], "positive": batch["positive"][:1], "positive_ids": batch["positive_ids"][:1]}
    loss_fn = InfoNCELoss(0.05)
    copy = batch["positive"][:1] + 0.01  # (1, D): the same text, as the model encoded it a few steps ago
    alone = loss_fn(**one)
    assert torch.equal(loss_fn(**one, queue=copy, queue_ids=torch.tensor([100])), alone)
    assert float(loss_fn(**one, queue=copy, queue_ids=torch.tensor([999]))) > float(alone) + 0.5  # ~log 2: a near-copy counted as a negative


def test_empty_queue_is_todays_loss_and_the_queue_gets_no_gradient():
    batch = global_batch()
    for symmetric in (False, True):
        today = InfoNCELoss(0.05, symmetric)(**batch)
        empty = InfoNCELoss(0.05, symmetric)(**batch, queue=torch.zeros(0, D), queue_ids=torch.zeros(0, dtype=torch.int64))
        assert torch.equal(empty, today)
    assert TrainConfig().queue_size == 0  # no queue unless asked
    queue, queue_ids = queue_entries()
    queue.requires_grad_()
    ours = leaves(batch)
    InfoNCELoss(0.05)(**ours, queue=queue, queue_ids=queue_ids).backward()
    assert queue.grad is None and ours["positive"].grad is not None


def test_queue_inputs_validated():
    batch = global_batch()
    queue, queue_ids = queue_entries()
    with pytest.raises(ValueError, match="queue_ids is required when positive_ids and queue are given"):
        InfoNCELoss()(**batch, queue=queue)
    with pytest.raises(ValueError, match=rf"queue must be \(Q, D={D}\); got \(7, 3\)"):
        InfoNCELoss()(**batch, queue=queue[:, :3], queue_ids=queue_ids)
    with pytest.raises(ValueError, match=r"queue_ids must have shape \(7,\)"):
        InfoNCELoss()(**batch, queue=queue, queue_ids=queue_ids[:4])
    with pytest.raises(ValueError, match="queue size=0 is invalid"):
        PassageQueue(0, D)


# ----------------------------------------------------------------------------- FIFO and staleness


def test_queue_is_a_fifo_and_counts_staleness_in_steps():
    q = PassageQueue(5, 2, gather_across_workers=False)
    assert len(q) == 0 and q.staleness() is None
    q.push(torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([1, 2]))  # step 0's batch
    assert q.ids().tolist() == [1, 2] and q.staleness() == 1  # the next step sees them one step old
    torch.testing.assert_close(q.embeddings(), torch.tensor([[1.0, 0], [0, 1]]))
    q.push(torch.tensor([[3.0, 4], [0, 2]]), torch.tensor([3, 4]))
    torch.testing.assert_close(q.embeddings()[2:], torch.tensor([[0.6, 0.8], [0, 1]]))  # stored at unit length
    assert q.staleness() == 1.5
    q.push(torch.ones(2, 2), torch.tensor([5, 6]))  # full: 6 overwrites the oldest entry (1)
    assert sorted(q.ids().tolist()) == [2, 3, 4, 5, 6] and len(q) == 5
    assert q.staleness() == pytest.approx((3 + 2 + 2 + 1 + 1) / 5)
    q.push(torch.ones(7, 2), torch.arange(10, 17))  # a batch larger than the queue: its last 5 rows
    assert sorted(q.ids().tolist()) == [12, 13, 14, 15, 16] and q.staleness() == 1


def test_queue_matches_a_deque_over_random_pushes():
    rng = random.Random(0)
    q = PassageQueue(23, 3, gather_across_workers=False)
    ref: deque = deque(maxlen=23)  # (id, step encoded)
    next_id = 0
    for step in range(40):
        n = rng.randint(1, 9)
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        q.push(torch.randn(n, 3), ids)
        ref.extend((int(i), step) for i in ids)
        assert sorted(q.ids().tolist()) == sorted(i for i, _ in ref)
        assert q.staleness() == pytest.approx(np.mean([step + 1 - s for _, s in ref]))


def test_full_queue_staleness_is_half_its_span():
    """Q / N pushes fill it: its mean age is then (Q / N + 1) / 2 steps, as the design note says."""
    q = PassageQueue(64, 4, gather_across_workers=False)
    for _ in range(50):
        q.push(torch.randn(8, 4), torch.arange(8))
    assert q.staleness() == pytest.approx((64 / 8 + 1) / 2)


def test_train_step_pushes_the_batch_after_scoring_it(tiny_model):
    """The first step sees an empty queue (today's loss), then its own positives are queued; the second step's
    loss is scored against them too."""
    from training.model import make_tokenize, setup_model

    torch.manual_seed(0)
    st = setup_model(tiny_model, None)
    st.eval()
    rows = literal_pairs(16)
    batches = [build_batch({"query": [r["query"] for r in part], "passage": [r["passage"] for r in part]},
                           hard_negative_count=0, query_prefix="", passage_prefix="") for part in (rows[:8], rows[8:])]
    plain = StepParts(st, make_tokenize(st), InfoNCELoss(0.05), query_max=16, passage_max=48)
    queued = StepParts(st, make_tokenize(st), InfoNCELoss(0.05), query_max=16, passage_max=48,
                       queue=PassageQueue(32, st.get_embedding_dimension(), gather_across_workers=False))
    first = [float(train_step(parts, batches[0]).detach()) for parts in (plain, queued)]
    assert first[0] == pytest.approx(first[1], abs=1e-6) and len(queued.queue) == 8
    assert queued.queue.ids().tolist() == batches[0].positive_ids.tolist()
    assert float(train_step(queued, batches[1]).detach()) > float(train_step(plain, batches[1]).detach())  # 8 more negatives


def on_worker(rank: int) -> dict:
    """This rank's queue after two steps of pushing its half of global_batch's positives (a collective:
    run by tests/training/conftest.py's gloo workers)."""
    batch = global_batch()
    q = PassageQueue(9, D)
    for _ in range(2):
        q.push(local(batch["positive"], rank), local(batch["positive_ids"], rank))
    return {"embeddings": q.embeddings(), "ids": q.ids(), "staleness": q.staleness()}


def test_two_workers_hold_the_same_queue_as_one_process(two_workers):
    batch = global_batch()
    one = PassageQueue(9, D, gather_across_workers=False)
    for _ in range(2):
        one.push(batch["positive"], batch["positive_ids"])
    assert len(two_workers) == WORLD
    for w in two_workers:
        torch.testing.assert_close(w["queue"]["embeddings"], one.embeddings())
        assert torch.equal(w["queue"]["ids"], one.ids()) and w["queue"]["staleness"] == one.staleness()


# ----------------------------------------------------------------------------- SimCSE


def test_simcse_batch_is_each_text_as_its_own_positive():
    texts = ["Unix is an OS", "Unix  is an OS", "linux is a kernel"]
    columns = simcse_columns({"id": ["a", "b", "c"], "text": texts})
    batch = build_batch(columns, hard_negative_count=0, query_prefix="passage: ", passage_prefix="passage: ")
    assert batch.queries == batch.passages == ["passage: " + t for t in texts]
    assert torch.equal(batch.positive_ids, batch.query_ids)
    assert batch.positive_ids[0] == batch.positive_ids[1] != batch.positive_ids[2]  # a repeated text is masked, not a negative
    assert batch.negatives == [] and batch.negative_mask.shape == (3, 0)


def test_simcse_views_differ_by_dropout_only(tiny_model):
    """Through train_step: in train mode the two views of each text get different embeddings (two dropout
    masks), in eval mode the same ones."""
    from training.model import make_tokenize, setup_model

    seen = {}

    def record(q, p, *args, **kwargs):
        seen["q"], seen["p"] = q.detach(), p.detach()
        return InfoNCELoss(0.05)(q, p, *args, **kwargs)

    torch.manual_seed(0)
    st = setup_model(tiny_model, None)
    texts = [r["passage"] for r in literal_pairs(8)]
    batch = build_batch(simcse_columns({"id": list(map(str, range(8))), "text": texts}), hard_negative_count=0,
                        query_prefix="", passage_prefix="")
    parts = StepParts(st, make_tokenize(st), record, query_max=48, passage_max=48)
    st.train()
    loss = train_step(parts, batch)
    assert torch.isfinite(loss) and not torch.allclose(seen["q"], seen["p"], atol=1e-4)
    assert F.cosine_similarity(seen["q"], seen["p"]).min() > 0.5  # the same text, slightly perturbed
    st.eval()
    train_step(parts, batch)
    torch.testing.assert_close(seen["q"], seen["p"])


# ----------------------------------------------------------------------------- the collapse alarm


def spread(n: int = 300, d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def collapsed(n: int = 300, d: int = 32, noise: float = 0.1, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(d)[None, :] + noise * rng.standard_normal((n, d))  # one direction plus a little noise


def test_collapse_metrics_match_naive_pairs():
    x = spread(40, 8)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [float(unit[i] @ unit[j]) for i in range(40) for j in range(40) if i != j]
    got = collapse_metrics(torch.as_tensor(x))
    assert got["mean_cosine"] == pytest.approx(np.mean(pairs), abs=1e-6)
    assert got["uniformity"] == pytest.approx(uniformity(x), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        collapse_metrics(x[:1])


def test_collapse_alarm_fires_on_collapse_only():
    start = collapse_metrics(spread())
    assert abs(start["mean_cosine"]) < 0.05 and start["uniformity"] < -3
    assert collapse_warning(start, collapse_metrics(spread(seed=5)), 0.5) is None  # still spread
    now = collapse_metrics(collapsed())
    assert now["mean_cosine"] > 0.95 and now["uniformity"] > -0.5
    warning = collapse_warning(start, now, 0.5)
    assert warning and "mean pairwise cosine 0.9" in warning and "train.temperature" in warning
    # with a queue on, the advice names the queue first (its stale negatives are a measured cause)
    queued = collapse_warning(start, now, 0.5, queue_size=1024)
    assert "train.queue_size=1024 is a likely cause" in queued and "train.queue_size=0" in queued
    assert "larger batch or train.queue_size" not in queued
    halfway = collapse_metrics(collapsed(noise=1.0))  # mean cosine ~0.5: not past a threshold of 0.7
    assert collapse_warning(start, halfway, 0.7) is None


def test_collapse_alarm_compares_against_the_start():
    """An anisotropic model (E5-like: every cosine high from the start) is not collapsing while it stays there."""
    start = collapse_metrics(collapsed(noise=0.6))  # mean cosine ~0.7 at step 0
    assert 0.6 < start["mean_cosine"] < 0.85
    assert collapse_warning(start, collapse_metrics(collapsed(noise=0.58, seed=2)), 0.5) is None
    assert collapse_warning(start, collapse_metrics(collapsed(noise=0.1)), 0.5)  # a quarter of the way to 1 and more


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.queue_size=-1"], "train.queue_size=-1"),
        (["train.objective=triplet", "train.queue_size=64"], "queued passages would never be used"),
        (["train.simcse=true", "train.objective=triplet"], "plain texts have no hard negatives"),
        (["train.simcse=true", "train.refresh_every=10"], "use refresh_every=0"),
        (["train.collapse_sample=1"], "train.collapse_sample=1"),
        (["train.collapse_cosine=1.5"], "train.collapse_cosine=1.5"),
    ],
)
def test_bad_queue_simcse_collapse_settings_name_the_value(overrides, named):
    with pytest.raises(ConfigError) as e:
        load_config({"train": SECTIONS["train"]}, None, overrides)
    assert named in str(e.value)


def test_settings_without_effect_warn_and_defaults_are_today():
    default = TrainConfig()
    assert (default.queue_size, default.simcse) == (0, False)
    with pytest.warns(UserWarning, match="hard_negatives=3 has no effect with train.simcse=true"):
        TrainConfig(simcse=True, hard_negatives=3)
    with pytest.warns(UserWarning, match="collapse_cosine=0.9 has no effect with train.collapse_sample=0"):
        TrainConfig(collapse_sample=0, collapse_cosine=0.9)


def test_train_help_lists_the_queue_simcse_and_alarm(capsys):
    from pairmill.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("train.queue_size (default 0)", "train.simcse (default false)", "train.collapse_sample (default 256)",
                "train.collapse_cosine (default 0.5)"):
        assert key in text, key
