"""InfoNCELoss and GradCache against naive references: a per-query Python loop, sentence-transformers'
MultipleNegativesRankingLoss, one process on the whole batch (for 2 gloo workers), and the uncached
loss (for GradCache)."""

from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import encoding
from training.encoding import GradCache, encode_by_length, length_groups
from training.losses import InfoNCELoss, passage_ids
from training.batches import place_negatives

B, H, D = 6, 3, 8  # global batch: 6 pairs, 3 hard-negative slots, 8-dim embeddings
WORLD = 2


def global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Embeddings, validity mask and ids with planted false negatives, identical in every process.

    Pairs 0..2 go to rank 0 and 3..5 to rank 1 when split, so the duplicates cross workers.
    """
    g = torch.Generator().manual_seed(seed)
    positive_ids = torch.tensor([100, 101, 102, 100, 104, 105])  # pairs 0 and 3 share a positive
    negative_ids = torch.arange(200, 200 + B * H).view(B, H)
    negative_ids[1, 0] = 102  # pair 1's hard negative is pair 2's positive
    negative_ids[4, 2] = 104  # pair 4's own hard negative is its own positive
    negative_ids[5, 1] = 100  # pair 5's hard negative is pairs 0 and 3's positive
    negative_mask = torch.ones(B, H, dtype=torch.bool)
    negative_mask[2, 1:] = False  # pair 2 has one real negative
    negative_mask[3, 2] = False
    return {
        "query": torch.randn(B, D, generator=g),
        "positive": torch.randn(B, D, generator=g),
        "negatives": torch.randn(B, H, D, generator=g),
        "negative_mask": negative_mask,
        "positive_ids": positive_ids,
        "negative_ids": negative_ids,
    }


def naive_loss(query, positive, negatives, negative_mask, positive_ids, negative_ids, temperature, symmetric=False):
    """One query at a time: candidates = all positives + all valid negatives, minus false negatives."""
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0, eps=1e-12)  # noqa: E731
    terms = []
    for i in range(len(query)):
        logits, target = [], None
        for j in range(len(query)):
            if j == i:
                target = len(logits)
            elif positive_ids[j] == positive_ids[i]:
                continue  # a duplicate of i's positive is not a negative
            logits.append(cos(query[i], positive[j]) / temperature)
        for j in range(len(query)):
            for k in range(negatives.shape[1]):
                if negative_mask[j, k] and negative_ids[j, k] != positive_ids[i]:
                    logits.append(cos(query[i], negatives[j, k]) / temperature)
        logits = torch.stack(logits)
        terms.append(torch.logsumexp(logits, 0) - logits[target])
    loss = torch.stack(terms).mean()
    if not symmetric:
        return loss
    back = []
    for i in range(len(query)):
        logits = torch.stack([cos(positive[i], query[j]) / temperature for j in range(len(query))
                              if j == i or positive_ids[j] != positive_ids[i]])
        target = sum(1 for j in range(i) if positive_ids[j] != positive_ids[i])
        back.append(torch.logsumexp(logits, 0) - logits[target])
    return (loss + torch.stack(back).mean()) / 2


def leaves(batch):
    return {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in batch.items()}


def input_grads(batch):
    return [batch[k].grad for k in ("query", "positive", "negatives")]


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("symmetric", [False, True])
def test_masking_matches_naive_loop(symmetric):
    ours, ref = leaves(global_batch()), leaves(global_batch())
    loss = InfoNCELoss(temperature=0.07, symmetric=symmetric)(**ours)
    expected = naive_loss(**ref, temperature=0.07, symmetric=symmetric)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(input_grads(ours), input_grads(ref)):
        torch.testing.assert_close(got, want)


def test_masked_candidates_change_nothing():
    """Moving a false negative or an invalid slot must not move the loss."""
    batch = global_batch()
    loss_fn = InfoNCELoss(temperature=0.05)
    before = loss_fn(**batch)
    batch["negatives"][2, 2] = torch.randn(D)  # invalid slot
    assert torch.equal(loss_fn(**batch), before)
    without_ids = loss_fn(batch["query"], batch["positive"], batch["negatives"], batch["negative_mask"])
    assert without_ids > before  # with the duplicates counted as negatives the loss is larger here


def test_matches_sentence_transformers_mnrl():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    batch = global_batch()
    q, p, n = batch["query"], batch["positive"], batch["negatives"]
    for temperature in (0.05, 0.01):
        st = MultipleNegativesRankingLoss(None, scale=1 / temperature)
        ours = InfoNCELoss(temperature=temperature)
        torch.testing.assert_close(ours(q, p), st.compute_loss_from_embeddings([q, p], None))
        # all-valid hard negatives, no ids: ST takes them as columns (column-major order, same set)
        torch.testing.assert_close(ours(q, p, n), st.compute_loss_from_embeddings([q, p, *n.unbind(1)], None))
    st_sym = MultipleNegativesRankingLoss(None, scale=20.0, directions=("query_to_doc", "doc_to_query"),
                                          partition_mode="per_direction")
    torch.testing.assert_close(InfoNCELoss(0.05, symmetric=True)(q, p), st_sym.compute_loss_from_embeddings([q, p], None))


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.05", True])
def test_temperature_validated(bad):
    with pytest.raises(ValueError, match=rf"temperature={bad!r}.*finite number > 0"):
        InfoNCELoss(temperature=bad)


def test_bad_inputs_named():
    batch = global_batch()
    loss_fn = InfoNCELoss()
    with pytest.raises(ValueError, match="symmetric='yes'"):
        InfoNCELoss(symmetric="yes")
    with pytest.raises(ValueError, match="negative_ids is required"):
        loss_fn(batch["query"], batch["positive"], batch["negatives"], positive_ids=batch["positive_ids"])
    with pytest.raises(ValueError, match=r"negatives must be \(B=6, H, D=8\); got \(6, 8\)"):
        loss_fn(batch["query"], batch["positive"], batch["positive"])
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(6, 3\)"):
        loss_fn(batch["query"], batch["positive"], batch["negatives"], batch["negative_mask"][:, :2])
    with pytest.raises(ValueError, match="mini_batch_size=0"):
        GradCache(nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match=r"got \[1, 0\] chunks per group"):
        GradCache(nn.Linear(2, 2), 2).forward_backward([torch.randn(2, 2), torch.randn(0, 2)], lambda a, b: a.sum())


def test_logits_stay_fp32_under_autocast():
    batch = global_batch()
    loss_fn = InfoNCELoss(temperature=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(**batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(**batch))


def test_passage_ids_normalise_text():
    ids = passage_ids(["Unix  is\tan OS", "Unix is an OS", "unix is an os"])
    assert ids.dtype == torch.int64 and ids[0] == ids[1] != ids[2] and bool((ids >= 0).all())


# ----------------------------------------------------------------------------- GradCache


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(config)


def bert_encode(model, features):
    hidden = model(**features).last_hidden_state  # (rows, L, 32)
    mask = features["attention_mask"][..., None].float()  # (rows, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1)  # (rows, 32) mean pooling


def token_batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, 12), generator=g)
    lengths = torch.randint(3, 13, (rows,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def bert_step(model, groups, loss_fn, seed, mini_batch_size=None, chunked_reference=False, by_length=True):
    """Parameter gradients of one step: GradCache when mini_batch_size is set, else the plain loss
    (each group encoded whole, or in the same chunks in the same order when chunked_reference)."""
    model.zero_grad()
    torch.manual_seed(seed)
    if mini_batch_size:
        loss = GradCache(model, mini_batch_size, bert_encode, by_length=by_length).forward_backward(groups, loss_fn)
    else:
        # GradCache's chunks: 3 rows each, longest texts first, each cut to its longest
        split = (lambda g: encoding.length_chunks(g, 3)) if chunked_reference else (lambda g: ([g], None))
        embs = [encoding._unsort(torch.cat([bert_encode(model, c) for c in chunks]), order)
                for chunks, order in map(split, groups)]
        loss = loss_fn(*embs)
        loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}


def bert_loss_fn():
    ids = global_batch()
    loss = InfoNCELoss(temperature=0.05, symmetric=True)
    return lambda q, p, n: loss(q, p, n.view(B, H, -1), ids["negative_mask"], ids["positive_ids"], ids["negative_ids"])


def bert_groups():
    return [token_batch(B, 1), token_batch(B, 2), token_batch(B * H, 3)]


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("by_length", [True, False])  # length-sorted chunks (CPU) or input order (GPU)
def test_grad_cache_equals_full_batch_without_dropout(tiny_bert, by_length):
    tiny_bert.eval()
    loss, grads = bert_step(tiny_bert, bert_groups(), bert_loss_fn(), seed=0)
    cached_loss, cached = bert_step(tiny_bert, bert_groups(), bert_loss_fn(), seed=0, mini_batch_size=4, by_length=by_length)
    torch.testing.assert_close(cached_loss, loss)
    assert_same_grads(cached, grads)


def test_grad_cache_replays_dropout(tiny_bert, monkeypatch):
    tiny_bert.train()
    loss, grads = bert_step(tiny_bert, bert_groups(), bert_loss_fn(), seed=7, chunked_reference=True)
    cached_loss, cached = bert_step(tiny_bert, bert_groups(), bert_loss_fn(), seed=7, mini_batch_size=3)
    torch.testing.assert_close(cached_loss, loss)
    assert_same_grads(cached, grads)
    # the check has teeth: without the RNG replay the re-run's dropout differs and so do the gradients
    monkeypatch.setattr(encoding._RngState, "restore", lambda self: None)
    _, unreplayed = bert_step(tiny_bert, bert_groups(), bert_loss_fn(), seed=7, mini_batch_size=3)
    name = "embeddings.word_embeddings.weight"
    assert not torch.allclose(unreplayed[name], grads[name], rtol=1e-4, atol=1e-6)


def test_grad_cache_chunks_cut_padding_when_sorted_by_length():
    features = {"input_ids": torch.arange(8)[:, None].repeat(1, 6), "attention_mask":
                (torch.arange(6)[None, :] < torch.tensor([2, 6, 1, 5, 3, 6, 2, 4])[:, None]).long()}
    chunks, order = encoding.length_chunks(features, 3)
    assert order.tolist() == [1, 5, 3, 7, 4, 0, 6, 2]  # longest first, ties in input order
    assert [c["input_ids"].shape for c in chunks] == [(3, 6), (3, 4), (2, 2)]
    assert chunks[1]["input_ids"][:, 0].tolist() == [7, 4, 0]
    left = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"].flip(1)}
    chunks, order = encoding.length_chunks(left, 3)  # left padding: chunked as it is (trimming shifts positions)
    assert order is None and [c["input_ids"].shape for c in chunks] == [(3, 6), (3, 6), (2, 6)]


# ----------------------------------------------------------------------------- length groups


def brute_force_groups(lengths, overhead):
    """The least cost over every way to cut the sorted lengths into consecutive groups."""
    n, best = len(lengths), None
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        cost = sum(overhead + (b - a) * lengths[a] for a, b in zip(cuts, cuts[1:]))
        best = cost if best is None else min(best, cost)
    return best


def test_length_groups_minimise_padding_plus_overhead():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 10, (1,), generator=g))
        lengths = sorted(torch.randint(1, 20, (n,), generator=g).tolist(), reverse=True)
        overhead = float(torch.randint(0, 40, (1,), generator=g))
        spans = length_groups(lengths, overhead)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        cost = sum(overhead + (b - a) * lengths[a] for a, b in spans)
        assert cost == pytest.approx(brute_force_groups(lengths, overhead)), (lengths, overhead)
    assert length_groups([128] * 10 + [20] * 22, 128) == [(0, 10), (10, 32)]
    assert length_groups([128] * 10 + [120] * 22, 256) == [(0, 32)]  # padding 8 x 22 < one more forward
    assert length_groups([], 5) == []
    with pytest.raises(ValueError, match="longest first"):
        length_groups([3, 5], 1)


def test_encoding_by_length_gives_the_one_forward_embeddings_and_gradients(tiny_bert):
    tiny_bert.eval()  # no dropout: the grouped and the one-forward call must agree exactly
    features = token_batch(16, 5)
    out = {}
    for overhead in (0, 4):
        tiny_bert.zero_grad()
        calls = []
        emb = encode_by_length(tiny_bert, features, overhead, lambda m, f: calls.append(f["input_ids"].shape) or bert_encode(m, f))
        emb.pow(2).sum().backward()
        out[overhead] = emb.detach(), {k: v.grad.clone() for k, v in tiny_bert.named_parameters() if v.grad is not None}, calls
    (one, grads, calls), (grouped, grouped_grads, group_calls) = out[0], out[4]
    assert calls == [(16, 12)] and len(group_calls) > 1 and sum(s[0] for s in group_calls) == 16
    assert sum(s[0] * s[1] for s in group_calls) < 16 * 12  # fewer tokens through the encoder
    torch.testing.assert_close(grouped, one, rtol=1e-5, atol=1e-6)
    assert_same_grads(grouped_grads, grads)


# ----------------------------------------------------------------------------- 2 gloo workers


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, D))


def features(seed: int = 1) -> list[torch.Tensor]:
    """Raw encoder inputs for queries (B, 5), positives (B, 5), negatives (B*H, 5)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 5, generator=g), torch.randn(B, 5, generator=g), torch.randn(B * H, 5, generator=g)]


def local(x: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's pairs (rows in pair order; negatives keep their pair's rows)."""
    per = len(x) // WORLD
    return x[rank * per : (rank + 1) * per]


def encoder_loss(model, x, batch, loss_fn):
    rows = len(batch["query"])
    emb = model(torch.cat(x))  # one forward for all towers: (rows * (2 + H), D)
    q, p, n = emb.split([rows, rows, rows * H])
    return loss_fn(q, p, n.view(rows, H, D), *(batch[k] for k in ("negative_mask", "positive_ids", "negative_ids")))


def on_worker(rank: int) -> dict:
    """What each of the 2 gloo workers computes (tests/training/conftest.py starts them once)."""
    batch = {k: local(v, rank) for k, v in global_batch().items()}
    out = {}
    # (1) the loss on embeddings
    emb = leaves(batch)
    loss = InfoNCELoss(temperature=0.05, symmetric=True)(**emb)
    loss.backward()
    out["loss"], out["input_grads"] = loss.detach(), input_grads(emb)
    # (2) a small encoder under DDP
    loss_fn = InfoNCELoss(temperature=0.05, symmetric=True)
    ddp = nn.parallel.DistributedDataParallel(encoder())
    x = [local(f, rank) for f in features()]
    encoder_loss(ddp, x, batch, loss_fn).backward()
    out["ddp_grads"] = [p.grad.clone() for p in ddp.parameters()]
    # (3) GradCache under DDP, mini-batch 2 (no_sync for all chunks but the last)
    ddp.zero_grad()
    cached = GradCache(ddp, 2).forward_backward(
        x, lambda q, p, n: loss_fn(q, p, n.view(-1, H, D), *(batch[k] for k in ("negative_mask", "positive_ids", "negative_ids")))
    )
    out["cached_loss"], out["cached_grads"] = cached, [p.grad.clone() for p in ddp.parameters()]
    # (4) rank 0's batch has no hard negatives, rank 1's has: both still run the same collectives
    # (the negatives' all-gather backward included), as train.py's step builds them
    ddp.zero_grad()
    mask = batch["negative_mask"] & (rank == 1)  # (B / WORLD, H)
    groups = x[:2] + ([x[2][mask.reshape(-1)]] if mask.any() else [])  # GradCache takes no empty group

    def loss_of(q, p, n_flat=None):
        return loss_fn(q, p, place_negatives(n_flat, mask, q), mask, batch["positive_ids"], batch["negative_ids"])

    out["ragged_loss"] = GradCache(ddp, 2).forward_backward(groups, loss_of)
    out["ragged_grads"] = [p.grad.clone() for p in ddp.parameters()]
    # (5) unequal local batches fail on every worker with a message, instead of hanging
    try:
        InfoNCELoss()(torch.randn(2 + rank, D), torch.randn(2 + rank, D))
    except ValueError as error:
        out["shape_error"] = str(error)
    return out


def test_two_workers_loss_and_input_grads_equal_one_process(two_workers):
    ref = leaves(global_batch())
    loss = InfoNCELoss(temperature=0.05, symmetric=True)(**ref)
    loss.backward()
    torch.testing.assert_close(sum(w["loss"] for w in two_workers) / WORLD, loss.detach())
    # and against the naive loop directly: the planted duplicates cross the two workers
    torch.testing.assert_close(loss.detach(), naive_loss(**global_batch(), temperature=0.05, symmetric=True))
    for k, want in enumerate(input_grads(ref)):
        got = torch.cat([w["input_grads"][k] for w in two_workers])
        # convention: each worker's embedding gradient is WORLD x the single-process one (DDP averages it back)
        torch.testing.assert_close(got / WORLD, want)


def test_two_workers_ddp_and_grad_cache_param_grads_equal_one_process(two_workers):
    model, batch = encoder(), global_batch()
    loss = encoder_loss(model, features(), batch, InfoNCELoss(temperature=0.05, symmetric=True))
    loss.backward()
    for w in two_workers:
        torch.testing.assert_close(sum(w["cached_loss"] for w in two_workers) / WORLD, loss.detach())
        for got, cached, param in zip(w["ddp_grads"], w["cached_grads"], model.parameters()):
            torch.testing.assert_close(got, param.grad)
            torch.testing.assert_close(cached, param.grad)


def test_two_workers_one_without_negatives_match_one_process(two_workers):
    model, batch = encoder(), global_batch()
    batch["negative_mask"][: B // WORLD] = False  # rank 0's pairs have none
    loss = encoder_loss(model, features(), batch, InfoNCELoss(temperature=0.05, symmetric=True))
    loss.backward()
    torch.testing.assert_close(sum(w["ragged_loss"] for w in two_workers) / WORLD, loss.detach())
    for w in two_workers:
        for got, param in zip(w["ragged_grads"], model.parameters()):
            torch.testing.assert_close(got, param.grad)


def test_two_workers_unequal_batches_raise_everywhere(two_workers):
    for w in two_workers:
        assert "[[2, 0, 8, 0], [3, 0, 8, 0]]" in w["shape_error"] and "drop_last=True" in w["shape_error"]
