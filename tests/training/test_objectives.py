"""The other objectives (train.objective, train.tau_plus) against naive references written one query
at a time: SupCon's L_out, debiased InfoNCE (Chuang et al. 2020) and the triplet margin loss; loss
values and gradients w.r.t. the embeddings, in one process and over 2 gloo workers (the workers
tests/training/conftest.py starts once for test_losses too); and the config that selects them."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from pairmill.config import SECTIONS, ConfigError, TrainConfig, load_config
from tests.training.test_losses import WORLD, global_batch, input_grads, leaves, local, naive_loss
from training.batches import build_batch
from training.losses import InfoNCELoss, SupConLoss, TripletLoss, _debiased_cross_entropy, build_loss, valid_triplets

# Rows 0, 2, 5 ask one query and rows 1, 4 another (both groups cross the two workers: rows 0-2 are
# rank 0's); global_batch's planted passage duplicates stay (rows 0 and 3 share a positive, row 5's
# hard negative is that passage, row 1's is row 2's positive).
QUERY_IDS = torch.tensor([7, 8, 7, 9, 8, 7])


def cos(a, b):
    return F.cosine_similarity(a, b, dim=0, eps=1e-12)


def supcon_batch() -> dict[str, torch.Tensor]:
    return {**global_batch(), "query_ids": QUERY_IDS.clone()}


def near_batch() -> dict[str, torch.Tensor]:
    """global_batch with queries 0-2 close to their positives, so Chuang's clamp binds on those rows."""
    batch = global_batch()
    g = torch.Generator().manual_seed(5)
    batch["query"][:3] = batch["positive"][:3] + 0.05 * torch.randn(3, batch["query"].shape[1], generator=g)
    return batch


def triplet_batch() -> dict[str, torch.Tensor]:
    """global_batch with pair 1 (rank 0's) left without a hard negative; pair 4's negative in slot 2 is its own positive."""
    batch = global_batch()
    batch["negative_mask"][1] = False
    return batch


# ----------------------------------------------------------------------------- naive references


def naive_supcon(query, positive, negatives, negative_mask, positive_ids, negative_ids, query_ids, temperature,
                 symmetric=False):
    """Query i's positives: the passages of every row asking the same query; its negatives: every other
    passage and valid hard negative whose text is none of its positives' texts."""
    B, H = negative_mask.shape
    terms = []
    for i in range(B):
        group = [j for j in range(B) if query_ids[j] == query_ids[i]]
        group_texts = {int(positive_ids[j]) for j in group}
        logits, is_positive = [], []
        for j in range(B):
            if j in group or int(positive_ids[j]) not in group_texts:
                logits.append(cos(query[i], positive[j]) / temperature)
                is_positive.append(j in group)
        for j in range(B):
            for k in range(H):
                if negative_mask[j, k] and int(negative_ids[j, k]) not in group_texts:
                    logits.append(cos(query[i], negatives[j, k]) / temperature)
                    is_positive.append(False)
        logits = torch.stack(logits)
        lse = torch.logsumexp(logits, 0)
        terms.append(torch.stack([lse - logits[c] for c, pos in enumerate(is_positive) if pos]).mean())
    loss = torch.stack(terms).mean()
    if not symmetric:
        return loss
    back = []
    for i in range(B):  # passage i: the queries of its group are positives, another query of its text is skipped
        logits, is_positive = [], []
        for j in range(B):
            same_query = bool(query_ids[j] == query_ids[i])
            if same_query or positive_ids[j] != positive_ids[i]:
                logits.append(cos(positive[i], query[j]) / temperature)
                is_positive.append(same_query)
        logits = torch.stack(logits)
        lse = torch.logsumexp(logits, 0)
        back.append(torch.stack([lse - logits[c] for c, pos in enumerate(is_positive) if pos]).mean())
    return (loss + torch.stack(back).mean()) / 2


def naive_debiased(query, positive, negatives, negative_mask, positive_ids, negative_ids, temperature, tau_plus,
                   symmetric=False):
    """Chuang et al.'s formula as written: -log(pos / (pos + Ng)), Ng = max((sum(neg) - N tau+ pos) / (1 - tau+),
    N e^{-1/t}), negatives masked as InfoNCELoss masks them. Returns the loss and how many rows the clamp set."""
    B, H = negative_mask.shape
    clamped = 0

    def term(pos, neg):
        nonlocal clamped
        n = len(neg)
        ng = (torch.stack(neg).sum() - n * tau_plus * pos) / (1 - tau_plus)
        floor = n * math.exp(-1 / temperature)
        clamped += bool(ng < floor)
        return -torch.log(pos / (pos + torch.clamp(ng, min=floor)))

    terms = []
    for i in range(B):
        neg = [torch.exp(cos(query[i], positive[j]) / temperature) for j in range(B)
               if j != i and positive_ids[j] != positive_ids[i]]
        neg += [torch.exp(cos(query[i], negatives[j, k]) / temperature) for j in range(B) for k in range(H)
                if negative_mask[j, k] and negative_ids[j, k] != positive_ids[i]]
        terms.append(term(torch.exp(cos(query[i], positive[i]) / temperature), neg))
    loss = torch.stack(terms).mean()
    if symmetric:
        back = [term(torch.exp(cos(positive[i], query[i]) / temperature),
                     [torch.exp(cos(positive[i], query[j]) / temperature) for j in range(B)
                      if j != i and positive_ids[j] != positive_ids[i]]) for i in range(B)]
        loss = (loss + torch.stack(back).mean()) / 2
    return loss, clamped


def naive_triplet(query, positive, negatives, negative_mask, positive_ids, negative_ids, margin):
    """The mean over (query i, its positive, each of its valid hard negatives other than its own text)."""
    hinges, without = [], 0
    for i in range(len(query)):
        mine = [k for k in range(negative_mask.shape[1]) if negative_mask[i, k] and negative_ids[i, k] != positive_ids[i]]
        without += not mine
        for k in mine:
            d_pos, d_neg = 1 - cos(query[i], positive[i]), 1 - cos(query[i], negatives[i, k])
            hinges.append(torch.relu(d_pos - d_neg + margin))
    return torch.stack(hinges).mean(), without


def assert_same_loss_and_grads(ours: dict, ref: dict, loss, expected, **tolerance) -> None:
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, **tolerance)
    for got, want in zip(input_grads(ours), input_grads(ref)):
        torch.testing.assert_close(got, want, **tolerance)


# ----------------------------------------------------------------------------- SupCon


@pytest.mark.parametrize("symmetric", [False, True])
def test_supcon_matches_naive_loop(symmetric):
    ours, ref = leaves(supcon_batch()), leaves(supcon_batch())
    loss = SupConLoss(temperature=0.07, symmetric=symmetric)(**ours)
    assert_same_loss_and_grads(ours, ref, loss, naive_supcon(**ref, temperature=0.07, symmetric=symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
def test_supcon_without_repeated_queries_is_infonce(symmetric):
    ours, ref = leaves(global_batch()), leaves(global_batch())
    loss = SupConLoss(0.05, symmetric)(**ours, query_ids=torch.arange(len(ours["query"])))
    assert_same_loss_and_grads(ours, ref, loss, InfoNCELoss(0.05, symmetric)(**ref))


def test_supcon_needs_query_ids():
    with pytest.raises(ValueError, match="SupConLoss needs query_ids"):
        SupConLoss()(**global_batch())
    with pytest.raises(ValueError, match=r"query_ids must have shape \(6,\)"):
        SupConLoss()(**global_batch(), query_ids=QUERY_IDS[:4])


def test_build_batch_gives_query_ids_of_the_normalised_query():
    batch = build_batch({"query": ["Unix  is an OS", "unix is an os", "Unix is an OS"], "passage": ["a", "b", "c"]},
                        hard_negative_count=0, query_prefix="query: ", passage_prefix="")
    ids = batch.query_ids.tolist()
    assert ids[0] == ids[2] != ids[1]


# ----------------------------------------------------------------------------- debiased InfoNCE


@pytest.mark.parametrize("symmetric", [False, True])
def test_debiased_matches_naive_formula_with_and_without_the_clamp(symmetric):
    ours, ref = leaves(near_batch()), leaves(near_batch())
    loss = InfoNCELoss(0.1, symmetric, tau_plus=0.3)(**ours)
    expected, clamped = naive_debiased(**ref, temperature=0.1, tau_plus=0.3, symmetric=symmetric)
    assert 0 < clamped < len(ours["query"]) * (2 if symmetric else 1)  # both branches of the max are taken
    assert_same_loss_and_grads(ours, ref, loss, expected)


def test_debiased_is_stable_at_temperature_001():
    """e^(1/0.01) overflows fp32: the loss shifts its exps; the naive formula runs in float64."""
    ours = leaves(near_batch())
    ref = {k: (v.double().detach().requires_grad_() if v.is_floating_point() else v) for k, v in near_batch().items()}
    loss = InfoNCELoss(0.01, tau_plus=0.1)(**ours)
    expected, _ = naive_debiased(**ref, temperature=0.01, tau_plus=0.1)
    assert torch.isfinite(loss)
    assert_same_loss_and_grads(ours, ref, loss.double(), expected, rtol=1e-4, atol=1e-4, check_dtype=False)


def test_tau_plus_zero_is_todays_loss():
    batch = global_batch()
    for symmetric in (False, True):
        today = InfoNCELoss(0.05, symmetric)(**batch)
        assert torch.equal(InfoNCELoss(0.05, symmetric, tau_plus=0.0)(**batch), today)
        torch.testing.assert_close(today, naive_loss(**batch, temperature=0.05, symmetric=symmetric))
    # and the debiased formula itself reduces to cross-entropy at tau_plus=0 (the clamp never binds there)
    logits = torch.randn(4, 9) / 0.05
    masked = torch.zeros(4, 9, dtype=torch.bool)
    masked[1, 3] = masked[2, 7] = True
    labels = torch.tensor([0, 5, 2, 8])
    torch.testing.assert_close(_debiased_cross_entropy(logits, masked, labels, 0.0, 0.05),
                               F.cross_entropy(logits.masked_fill(masked, float("-inf")), labels))


@pytest.mark.parametrize("bad", [-0.1, 1.0, math.nan, "0.1", True])
def test_tau_plus_validated(bad):
    with pytest.raises(ValueError, match=rf"tau_plus={bad!r}.*0 <= tau_plus < 1"):
        InfoNCELoss(tau_plus=bad)


# ----------------------------------------------------------------------------- triplet


def test_triplet_matches_naive_loop_and_counts_pairs_without_a_negative():
    ours, ref = leaves(triplet_batch()), leaves(triplet_batch())
    loss = TripletLoss(margin=0.3)(**ours)
    expected, without = naive_triplet(**ref, margin=0.3)
    assert_same_loss_and_grads(ours, ref, loss, expected)
    valid = valid_triplets(ours["negative_mask"], ours["positive_ids"], ours["negative_ids"])
    assert without == 1 == int((~valid.any(1)).sum())  # pair 1 (pair 4 keeps two valid negatives)
    assert int(valid.sum()) == 18 - 3 - 2 - 1 - 1  # 18 slots - pair 1's - pair 2's padding - pair 3's - pair 4's own text


def test_triplet_matches_sentence_transformers_cosine_triplet_loss():
    from sentence_transformers.sentence_transformer.losses import TripletDistanceMetric
    from sentence_transformers.sentence_transformer.losses import TripletLoss as STTripletLoss

    batch = global_batch()
    q, p, n = batch["query"], batch["positive"], batch["negatives"][:, :1]  # one valid negative per pair, no ids
    st = STTripletLoss(None, distance_metric=TripletDistanceMetric.COSINE, triplet_margin=0.3)
    torch.testing.assert_close(TripletLoss(0.3)(q, p, n), st.compute_loss_from_embeddings([q, p, n[:, 0]], None))


def test_triplet_without_any_valid_negative_is_zero_and_still_backpropagates():
    batch = leaves(global_batch())
    batch["negative_mask"] = torch.zeros_like(batch["negative_mask"])
    loss = TripletLoss()(**batch)
    loss.backward()
    assert float(loss.detach()) == 0 and batch["query"].grad is not None and not batch["query"].grad.any()


# ----------------------------------------------------------------------------- 2 gloo workers


def objective_cases() -> dict[str, tuple]:
    """name -> (loss module, global batch): what each worker runs on its half, and the test on the whole."""
    from tests.training.test_queue_simcse import queue_entries

    queue, queue_ids = queue_entries()
    return {
        "supcon": (SupConLoss(0.05), supcon_batch()),
        "supcon_symmetric": (SupConLoss(0.05, symmetric=True), supcon_batch()),
        "debiased_symmetric": (InfoNCELoss(0.1, symmetric=True, tau_plus=0.3), near_batch()),
        "triplet": (TripletLoss(0.3), triplet_batch()),  # rank 0 has fewer valid triplets than rank 1
        # train.queue_size: the same queue on every rank (PassageQueue gathers it), appended, not split
        "infonce_queue_symmetric": (partial(InfoNCELoss(0.05, symmetric=True), queue=queue, queue_ids=queue_ids), global_batch()),
        "supcon_queue": (partial(SupConLoss(0.05), queue=queue, queue_ids=queue_ids), supcon_batch()),
    }


def on_worker(rank: int) -> dict:
    """Each objective's loss and input gradients on this rank's half (run by tests/training/conftest.py)."""
    out = {}
    for name, (loss_fn, batch) in objective_cases().items():
        mine = leaves({k: local(v, rank) for k, v in batch.items()})
        loss = loss_fn(**mine)
        loss.backward()
        out[name] = (loss.detach(), input_grads(mine))
    return out


def test_two_workers_objectives_equal_one_process(two_workers):
    for name, (loss_fn, batch) in objective_cases().items():
        ref = leaves(batch)
        loss = loss_fn(**ref)
        loss.backward()
        torch.testing.assert_close(sum(w["objectives"][name][0] for w in two_workers) / WORLD, loss.detach(), msg=name)
        for k, want in enumerate(input_grads(ref)):
            got = torch.cat([w["objectives"][name][1][k] for w in two_workers])
            # InfoNCELoss's convention: each worker's embedding gradient is WORLD x the one-process one
            torch.testing.assert_close(got / WORLD, want, msg=name)


# ----------------------------------------------------------------------------- config


def test_objective_settings_build_their_losses():
    cfg = load_config({"train": SECTIONS["train"]}, None, ["train.objective=supcon", "train.symmetric=true"])["train"]
    loss = build_loss(cfg.objective, temperature=cfg.temperature, symmetric=cfg.symmetric, tau_plus=cfg.tau_plus,
                      triplet_margin=cfg.triplet_margin)
    assert isinstance(loss, SupConLoss) and loss.symmetric
    assert build_loss("infonce", tau_plus=0.05).tau_plus == 0.05
    assert build_loss("triplet", triplet_margin=0.2).margin == 0.2
    default = TrainConfig()
    assert (default.objective, default.tau_plus) == ("infonce", 0.0)  # today's loss unless asked
    assert isinstance(build_loss(default.objective), InfoNCELoss) and build_loss(default.objective).tau_plus == 0
    with pytest.raises(ValueError, match="objective='simclr' is unknown; valid: infonce, supcon, triplet"):
        build_loss("simclr")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.objective=simclr"], "train.objective='simclr'"),
        (["train.tau_plus=1"], "train.tau_plus=1"),
        (["train.tau_plus=-0.1"], "train.tau_plus=-0.1"),
        (["train.objective=supcon", "train.tau_plus=0.1"], "tau_plus debiases InfoNCE only"),
        (["train.objective=triplet", "train.triplet_margin=0"], "train.triplet_margin=0"),
        (["train.objective=triplet", "train.hard_negatives=0"], "train.objective=triplet trains on hard negatives only"),
    ],
)
def test_bad_objective_settings_name_the_value(overrides, named):
    with pytest.raises(ConfigError) as e:
        load_config({"train": SECTIONS["train"]}, None, overrides)
    assert named in str(e.value)


def test_objective_settings_without_effect_warn():
    with pytest.warns(UserWarning, match="triplet_margin=0.5 has no effect with train.objective=infonce"):
        TrainConfig(triplet_margin=0.5)
    with pytest.warns(UserWarning, match="no effect with train.objective=triplet"):
        TrainConfig(objective="triplet", symmetric=True)


def test_train_help_lists_the_objectives(capsys):
    from pairmill.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("train.objective (default 'infonce')", "train.tau_plus (default 0", "train.triplet_margin (default 0.3"):
        assert key in text
