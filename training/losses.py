"""Contrastive losses for pairmill training: InfoNCE over the global batch, with false-negative
masking and cross-worker negatives; its debiased form, SupCon and triplet as options. The encoders
they take embeddings from (GradCache, length grouping) are in ``training.encoding``.

Design note
-----------
What. ``InfoNCELoss`` is cross-entropy over cosine similarity / temperature. Query i's candidates
are every positive passage in the *global* batch (all workers) plus every hard negative in the
global batch (its own and the other pairs'); the label is its own positive. With
``symmetric=True`` a passage→query term (each positive against all global queries) is averaged
in. Candidates that are the same text as pair i's positive (same ``positive_ids`` value: a
duplicate passage elsewhere in the batch, or another pair's hard negative equal to it) are
masked to -inf for query i, as are padded (invalid) hard-negative slots, so a false negative is
never counted as a negative.

Other objectives (``train.objective``, ``build_loss``). ``InfoNCELoss(tau_plus>0)`` is debiased
InfoNCE (Chuang et al. 2020, "Debiased Contrastive Learning"): the negatives' term is corrected for
an expected share ``tau_plus`` of false negatives among them (their estimator, clamped at N e^{-1/t}),
in both directions when symmetric; it assumes negatives drawn at random, so for mined hard
negatives, which hold more false negatives, it under-corrects. ``SupConLoss`` is SupCon's L_out
(Khosla et al. 2020) with queries as anchors: rows whose queries share an id (``text_key`` of the
query) are positives of each other, and query i's loss is the mean over its positives of -log
softmax over all its candidates; a candidate with the text of any of its positives is masked, not
a negative. With no repeated query it is InfoNCELoss exactly. A duplicate row (same query and
passage) is a second positive, not masked as InfoNCELoss masks it. ``TripletLoss`` is the margin
loss on cosine distance over each pair's own hard negatives only (FaceNet, SBERT), no in-batch
negatives: a pair without a valid hard negative contributes nothing and ``valid_triplets`` counts
them (the training loop logs the count). All three keep InfoNCELoss's cross-worker convention below.
``InfoNCELoss`` and ``SupConLoss`` take an optional ``queue`` (Q, D) of past positives with their
ids (``training.queue.PassageQueue``, ``train.queue_size``): appended to the candidates as extra
negatives, without gradient and the same on every rank, masked by id like any other candidate.

Why not sentence-transformers' losses. ST 6.x ``MultipleNegativesRankingLoss`` has a usable
``compute_loss_from_embeddings`` and gathers across ranks with gradients, so it would run in our
own DDP loop; what it lacks is (a) false-negative masking by text id (it relies on the
NO_DUPLICATES sampler, which cannot see duplicates across workers nor a hard negative that equals
another pair's positive), and (b) a per-pair validity mask for a ragged number of hard negatives
(it takes fixed negative columns, so padding would be counted as negatives). Its cached variant
drives the model itself from ``sentence_features``; ours takes an ``encode`` function so the
loop owns the model call. The test suite checks that, without hard negatives, our loss equals
ST's MNRL on the same embeddings.

Gradient convention under DDP. Each worker computes the loss for its *local* queries against the
*global* candidate pool and returns their mean, so the mean of the workers' losses is the loss
of one process on the concatenated batch. The all-gather's backward sums the gradients every
worker sends to a slot, so each worker's embedding gradients (and its parameter gradients
before the all-reduce) are ``world_size`` times those of the single process, and DDP's
gradient *averaging* divides that back out: after ``loss.backward()`` under DDP the parameter
gradients equal the single-process gradients of the global-mean loss. Code that instead sums
gradients over workers (a manual all-reduce with SUM) must divide the loss by world_size.

Cost. Per worker: one (B, D) x (D, N(1+H)) matmul where N = B * world_size is the global batch
and H the hard negatives per pair, plus the all-gather of N(1+H)+N embeddings (forward) and an
all-reduce of the same size (backward). Memory is the (B, N(1+H)) logits and the gathered
embeddings, small next to the encoder. GradCache costs one extra encoder forward (~ +1/3 of a
step) in exchange for activation memory bounded by the mini-batch. The other objectives cost little
next to that: a queue adds a (B, Q) block to the logits and nothing to the gathers; SupCon adds one all-gather of N query ids and K (B, N(1+H)) comparisons (K = the
most rows one local query has in the global batch), debiasing a few elementwise passes over the
logits, and the triplet loss gathers nothing (one all-reduce of its triplet count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pairmill.config import TrainConfig
from pairmill.pairs import text_key



def passage_ids(texts: Sequence[str]) -> Tensor:
    """(len(texts),) int64: ``pairmill.pairs.text_key`` of each text (the corpus key mining uses),
    for false-negative masking."""
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


# ----------------------------------------------------------------------------- distributed helpers


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the summed gradients.

    Written here rather than using torch.distributed.nn.functional.all_gather because that one is
    deprecated in torch 2.13 (FutureWarning on every call) and its gloo backward goes through
    all_to_all; all_reduce is supported by every backend (gloo, nccl). The all_reduce moves
    world_size x the bytes of a reduce-scatter, which is negligible for embedding-sized tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)  # (world_size * rows, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place; never write into autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss contributes to every slot
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _gather_with_grad(x: Tensor, world_size: int) -> Tensor:
    return x if world_size == 1 else _GatherWithGrad.apply(x)


def _gather_no_grad(x: Tensor, world_size: int) -> Tensor:
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _check_same_shapes(local: Tensor, world_size: int) -> None:
    """Every rank must bring the same (B, H, D, has ids): all-gather needs equal shapes. Raises on all ranks."""
    shapes = _gather_no_grad(local.view(1, -1), world_size)  # (world_size, 4)
    if not bool((shapes == shapes[0]).all()):
        raise ValueError(
            f"InfoNCELoss: workers passed different (batch, negatives, dim, has_ids) {shapes.tolist()}; "
            "all-gather needs equal shapes. Give every worker the same batch size (drop_last=True), "
            "pad hard negatives to a fixed H with negative_mask, and pass ids on all workers or none."
        )


# ----------------------------------------------------------------------------- the loss


class InfoNCELoss(nn.Module):
    """InfoNCE over the global batch; see the module's design note."""

    def __init__(self, temperature: float = TrainConfig.temperature, symmetric: bool = TrainConfig.symmetric,
                 gather_across_workers: bool = True, tau_plus: float = TrainConfig.tau_plus) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_flags(symmetric=symmetric, gather_across_workers=gather_across_workers)
        if isinstance(tau_plus, bool) or not isinstance(tau_plus, (int, float)) or not 0 <= tau_plus < 1:
            raise ValueError(
                f"tau_plus={tau_plus!r} is invalid: it must be a number 0 <= tau_plus < 1, the expected share of "
                "false negatives (0 = plain InfoNCE; Chuang et al. 2020 use 0.01-0.1)."
            )
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.gather_across_workers = gather_across_workers
        self.tau_plus = float(tau_plus)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"gather_across_workers={self.gather_across_workers}, tau_plus={self.tau_plus}")

    def forward(
        self,
        query: Tensor,  # (B, D)
        positive: Tensor,  # (B, D)
        negatives: Tensor | None = None,  # (B, H, D)
        negative_mask: Tensor | None = None,  # (B, H) bool, True = a real negative
        positive_ids: Tensor | None = None,  # (B,) int64 text ids
        negative_ids: Tensor | None = None,  # (B, H) int64 text ids
        queue: Tensor | None = None,  # (Q, D) past positives (training.queue.PassageQueue), the same on every rank
        queue_ids: Tensor | None = None,  # (Q,) int64 their text ids
    ) -> Tensor:
        negatives, negative_mask, positive_ids, negative_ids = _check_inputs(
            query, positive, negatives, negative_mask, positive_ids, negative_ids
        )
        queue, queue_ids = _check_queue(query, queue, queue_ids, positive_ids)
        # fp32 logits even under bf16 autocast: at temperature 0.01 logits reach 100, where bf16's
        # 8-bit mantissa would round them by up to 0.5
        with torch.autocast(query.device.type, enabled=False):
            return self._loss(query, positive, negatives, negative_mask, positive_ids, negative_ids, queue, queue_ids)

    def _loss(self, query, positive, negatives, negative_mask, positive_ids, negative_ids, queue, queue_ids) -> Tensor:
        pool = _global_pool(query, positive, negatives, negative_mask, positive_ids, negative_ids, self.gather_across_workers,
                            queue, queue_ids)
        labels, pos_ids_all, use_ids = pool.labels, pool.positive_ids, pool.use_ids
        logits = pool.q @ pool.candidates.T / self.temperature  # (B, N(1+H))
        masked = _false_negatives(pool.candidate_ids, pool.candidate_valid, pos_ids_all[labels], labels, use_ids)  # (B, N(1+H))
        loss = self._cross_entropy(logits, masked, labels)
        if not self.symmetric:
            return loss

        q_all = _gather_with_grad(pool.q, pool.world_size)  # (N, D)
        logits_pq = pool.p @ q_all.T / self.temperature  # (B, N): each local positive against all queries
        all_valid = torch.ones_like(pos_ids_all, dtype=torch.bool)
        # query j is masked for passage i when pair j's positive is the same text as pair i's
        masked_pq = _false_negatives(pos_ids_all, all_valid, pos_ids_all[labels], labels, use_ids)  # (B, N)
        return (loss + self._cross_entropy(logits_pq, masked_pq, labels)) / 2

    def _cross_entropy(self, logits: Tensor, masked: Tensor, labels: Tensor) -> Tensor:
        if self.tau_plus == 0:
            return F.cross_entropy(logits.masked_fill(masked, float("-inf")), labels)
        return _debiased_cross_entropy(logits, masked, labels, self.tau_plus, self.temperature)


@dataclass
class _Pool:
    """One worker's batch and the global candidate pool it is scored against (see ``_global_pool``)."""

    q: Tensor  # (B, D) local queries, unit length
    p: Tensor  # (B, D) local positives, unit length
    candidates: Tensor  # (C, D), C = N(1+H)+Q: the global positives, the global hard negatives row-major, the queue
    positive_ids: Tensor  # (N,) the global positives' text ids (zeros without ids)
    candidate_ids: Tensor  # (C,)
    candidate_valid: Tensor  # (C,) bool: False for padded hard-negative slots
    labels: Tensor  # (B,) each local pair's own positive: its column in candidates
    use_ids: bool
    world_size: int


def _global_pool(query, positive, negatives, negative_mask, positive_ids, negative_ids, gather_across_workers: bool,
                 queue: Tensor | None = None, queue_ids: Tensor | None = None) -> _Pool:
    """Normalise the local embeddings and all-gather the candidates and their ids (N = B * world_size).
    A queue of past positives (Q, D), already the same on every rank, is appended to the candidates
    unchanged: it is not gathered and has no gradient; its ids mask it like any other candidate."""
    rank, world_size = _world() if gather_across_workers else (0, 1)
    B, H, D = negatives.shape
    use_ids = positive_ids is not None
    if world_size > 1:
        _check_same_shapes(torch.tensor([B, H, D, use_ids], device=query.device), world_size)
    q = F.normalize(query.float(), dim=-1)  # (B, D)
    p = F.normalize(positive.float(), dim=-1)  # (B, D)
    n = F.normalize(negatives.float(), dim=-1)  # (B, H, D)

    p_all = _gather_with_grad(p, world_size)  # (N, D), N = B * world_size
    candidates = torch.cat([p_all, _gather_with_grad(n, world_size).reshape(-1, D)]) if H else p_all  # (N(1+H), D)
    pos_ids_all, cand_ids, cand_valid = _gather_ids(positive_ids, negative_ids, negative_mask, world_size)
    labels = rank * B + torch.arange(B, device=query.device)  # (B,) own positive's global index
    if queue is not None and len(queue):
        candidates = torch.cat([candidates, F.normalize(queue.detach().float(), dim=-1)])  # (N(1+H)+Q, D)
        cand_ids = torch.cat([cand_ids, queue_ids if use_ids else torch.zeros_like(queue_ids)])
        cand_valid = torch.cat([cand_valid, torch.ones_like(queue_ids, dtype=torch.bool)])
    return _Pool(q, p, candidates, pos_ids_all, cand_ids, cand_valid, labels, use_ids, world_size)


def _check_queue(query: Tensor, queue: Tensor | None, queue_ids: Tensor | None, positive_ids: Tensor | None):
    """The queue's embeddings must be (Q, D) beside (Q,) ids; without positive_ids nothing is masked by id,
    so the ids are only required when the batch has them (a queued copy of a pair's positive is then masked)."""
    if queue is None:
        if queue_ids is not None:
            raise ValueError("queue_ids was given without queue; pass the queue's embeddings (Q, D) too.")
        return None, None
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (Q, D={query.shape[1]}); got {tuple(queue.shape)}.")
    if queue_ids is None:
        if positive_ids is not None:
            raise ValueError("queue_ids is required when positive_ids and queue are given: without it a queued copy "
                             "of a pair's own positive would be counted as a negative.")
        return queue, queue.new_zeros(len(queue), dtype=torch.int64)
    return queue, _check_like("queue_ids", queue_ids, (len(queue),), None).long()


def _debiased_cross_entropy(logits: Tensor, masked: Tensor, labels: Tensor, tau_plus: float, temperature: float) -> Tensor:
    """Debiased InfoNCE (Chuang et al. 2020, as in their code), the mean over rows of
    ``-log(pos / (pos + Ng))`` with ``Ng = max((sum(neg) - N tau_plus pos) / (1 - tau_plus), N e^{-1/t})``:
    pos = exp(logit of row i's own column), neg = exp of its N unmasked other columns.

    Every exp is taken after subtracting the row's largest unmasked logit (a constant for the
    gradient): at temperature 0.01 a logit reaches 100 and e^100 overflows fp32. Masked columns
    are -inf before the exp, so neither they nor their gradient can be inf or NaN."""
    rows = torch.arange(len(labels), device=logits.device)
    is_negative = ~masked
    is_negative[rows, labels] = False  # (B, C): the N_i negatives of row i
    count = is_negative.sum(1)  # (B,) N_i
    shift = logits.masked_fill(masked, float("-inf")).amax(1).detach()  # (B,) >= the own logit: every exp <= 1
    own = logits[rows, labels] - shift  # (B,) log pos, shifted
    neg = (logits.masked_fill(~is_negative, float("-inf")) - shift[:, None]).exp().sum(1)  # (B,) sum(neg), shifted
    ng = (neg - tau_plus * count * own.exp()) / (1 - tau_plus)
    floor = count * torch.exp(-1 / temperature - shift)  # N e^{-1/t}: e^{-1/t} is the least exp(cos / t)
    ng = torch.maximum(ng, floor)
    return (torch.log(own.exp() + ng) - own).mean()  # -log(pos / (pos + Ng))


def _gather_ids(
    positive_ids: Tensor | None, negative_ids: Tensor | None, negative_mask: Tensor, world_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Global ids and validity in candidate order [positives; negatives row-major], in one all-gather.

    Returns (N,) positive ids, (N(1+H),) candidate ids, (N(1+H),) bool valid. Without ids the id
    columns are zeros, which _false_negatives ignores (use_ids=False).
    """
    B, H = negative_mask.shape
    if positive_ids is None:
        positive_ids = negative_mask.new_zeros(B, dtype=torch.int64)
        negative_ids = negative_mask.new_zeros(B, H, dtype=torch.int64)
    meta = torch.cat([positive_ids[:, None], negative_ids, negative_mask.long()], 1)  # (B, 1 + 2H)
    meta = _gather_no_grad(meta, world_size)  # (N, 1 + 2H)
    pos_ids_all = meta[:, 0]  # (N,)
    cand_ids = torch.cat([pos_ids_all, meta[:, 1 : 1 + H].reshape(-1)])
    cand_valid = torch.cat([torch.ones_like(pos_ids_all, dtype=torch.bool), meta[:, 1 + H :].reshape(-1).bool()])
    return pos_ids_all, cand_ids, cand_valid


def _false_negatives(cand_ids: Tensor, cand_valid: Tensor, own_ids: Tensor, labels: Tensor, use_ids: bool) -> Tensor:
    """(B, C) bool: True where a candidate must not count as a negative for row i — it is invalid,
    or (use_ids) it carries row i's positive id — except row i's own positive (column labels[i])."""
    masked = ~cand_valid[None, :].expand(len(labels), -1)  # (B, C)
    if use_ids:
        masked = masked | (cand_ids[None, :] == own_ids[:, None])
    masked[torch.arange(len(labels), device=labels.device), labels] = False
    return masked


# ----------------------------------------------------------------------------- SupCon and triplet


class SupConLoss(nn.Module):
    """Multi-positive InfoNCE over the global batch: SupCon's L_out (Khosla et al. 2020) with
    queries as anchors and passages as candidates; see the module's design note."""

    def __init__(self, temperature: float = TrainConfig.temperature, symmetric: bool = TrainConfig.symmetric,
                 gather_across_workers: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_flags(symmetric=symmetric, gather_across_workers=gather_across_workers)
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.gather_across_workers = gather_across_workers

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, gather_across_workers={self.gather_across_workers}"

    def forward(
        self,
        query: Tensor,  # (B, D)
        positive: Tensor,  # (B, D)
        negatives: Tensor | None = None,  # (B, H, D)
        negative_mask: Tensor | None = None,  # (B, H) bool, True = a real negative
        positive_ids: Tensor | None = None,  # (B,) int64 text ids
        negative_ids: Tensor | None = None,  # (B, H) int64 text ids
        query_ids: Tensor | None = None,  # (B,) int64: rows with equal ids are one query (text_key of the query)
        queue: Tensor | None = None,  # (Q, D) past positives, negatives unless their text is one of a row's positives
        queue_ids: Tensor | None = None,  # (Q,) int64 their text ids
    ) -> Tensor:
        if query_ids is None:
            raise ValueError("SupConLoss needs query_ids (B,): rows sharing an id are positives of each other "
                             "(training.batches.build_batch gives text_key of each query).")
        negatives, negative_mask, positive_ids, negative_ids = _check_inputs(
            query, positive, negatives, negative_mask, positive_ids, negative_ids
        )
        query_ids = _check_like("query_ids", query_ids, (len(query),), None).long()
        queue, queue_ids = _check_queue(query, queue, queue_ids, positive_ids)
        with torch.autocast(query.device.type, enabled=False):  # fp32 logits, as InfoNCELoss
            return self._loss(query, positive, negatives, negative_mask, positive_ids, negative_ids, query_ids, queue, queue_ids)

    def _loss(self, query, positive, negatives, negative_mask, positive_ids, negative_ids, query_ids, queue, queue_ids) -> Tensor:
        pool = _global_pool(query, positive, negatives, negative_mask, positive_ids, negative_ids, self.gather_across_workers,
                            queue, queue_ids)
        query_ids_all = _gather_no_grad(query_ids, pool.world_size)  # (N,)
        same_query = query_ids_all[pool.labels][:, None] == query_ids_all[None, :]  # (B, N): each query's positives
        B, N, C = len(pool.labels), len(query_ids_all), len(pool.candidate_ids)
        positives = torch.cat([same_query, same_query.new_zeros(B, C - N)], 1)  # (B, C): no hard negative or queued passage is one

        masked = ~pool.candidate_valid[None, :].expand(B, -1)  # (B, C)
        if pool.use_ids:  # a candidate with the text of any of row i's positives is not a negative of i
            for ids in _group_positive_ids(same_query, pool.positive_ids, pool.labels).unbind(1):  # K x (B,)
                masked = masked | (pool.candidate_ids[None, :] == ids[:, None])
        masked = masked & ~positives
        logits = pool.q @ pool.candidates.T / self.temperature  # (B, C)
        loss = _multi_positive_cross_entropy(logits, masked, positives)
        if not self.symmetric:
            return loss

        # passage -> query: passage i's positives are the queries of its group (the same query text);
        # a query of another group whose positive is passage i's text is masked, as in InfoNCELoss
        q_all = _gather_with_grad(pool.q, pool.world_size)  # (N, D)
        logits_pq = pool.p @ q_all.T / self.temperature  # (B, N)
        same_passage = pool.positive_ids[None, :] == pool.positive_ids[pool.labels][:, None]  # (B, N)
        masked_pq = (same_passage if pool.use_ids else torch.zeros_like(same_query)) & ~same_query
        return (loss + _multi_positive_cross_entropy(logits_pq, masked_pq, same_query)) / 2


def _group_positive_ids(same_query: Tensor, positive_ids: Tensor, labels: Tensor) -> Tensor:
    """(B, K): the text ids of each local row's positives, K = the largest group; a smaller group
    repeats row i's own id (a set with a repeat is the same set). Columns K, not a (B, N, C) match,
    keep the mask's memory at B x C per step."""
    k = int(same_query.sum(1).max())
    columns = torch.argsort((~same_query).to(torch.int8), dim=1, stable=True)[:, :k]  # (B, K): the group's columns first
    columns = torch.where(same_query.gather(1, columns), columns, labels[:, None])
    return positive_ids[columns]


def _multi_positive_cross_entropy(logits: Tensor, masked: Tensor, positives: Tensor) -> Tensor:
    """SupCon's L_out: the mean over rows of the mean over a row's positives of -log softmax, the
    softmax over every unmasked column (positives included). One positive per row: cross-entropy."""
    log_prob = torch.log_softmax(logits.masked_fill(masked, float("-inf")), dim=1)  # (B, C)
    return (-torch.where(positives, log_prob, 0.0).sum(1) / positives.sum(1)).mean()


def valid_triplets(negative_mask: Tensor, positive_ids: Tensor | None = None, negative_ids: Tensor | None = None) -> Tensor:
    """(B, H) bool: the (query, positive, hard negative) triplets TripletLoss counts: a real slot
    whose text (with ids) is not the pair's own positive. A row without one contributes nothing."""
    if positive_ids is None or negative_ids is None:
        return negative_mask.bool()
    return negative_mask.bool() & (negative_ids != positive_ids[:, None])


class TripletLoss(nn.Module):
    """Triplet loss with a margin on cosine distance (FaceNet; SBERT's TripletLoss with
    ``TripletDistanceMetric.COSINE``): the mean over valid triplets (query i, its positive, one of
    its hard negatives) of ``max(0, d(q, p) - d(q, n) + margin)``, ``d = 1 - cos``. No in-batch
    negatives: a pair without a valid hard negative (``valid_triplets``) contributes nothing.

    Across workers the mean is over the global batch's triplets (their count is all-reduced), with
    InfoNCELoss's gradient convention: each worker returns its triplets' sum x world_size / count."""

    def __init__(self, margin: float = TrainConfig.triplet_margin, gather_across_workers: bool = True) -> None:
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < math.inf:
            raise ValueError(f"margin={margin!r} is invalid: it must be a finite number > 0 (cosine distance lies in [0, 2]).")
        _check_flags(gather_across_workers=gather_across_workers)
        self.margin = float(margin)
        self.gather_across_workers = gather_across_workers

    def extra_repr(self) -> str:
        return f"margin={self.margin}, gather_across_workers={self.gather_across_workers}"

    def forward(
        self,
        query: Tensor,  # (B, D)
        positive: Tensor,  # (B, D)
        negatives: Tensor | None = None,  # (B, H, D)
        negative_mask: Tensor | None = None,  # (B, H) bool, True = a real negative
        positive_ids: Tensor | None = None,  # (B,) int64 text ids
        negative_ids: Tensor | None = None,  # (B, H) int64 text ids
    ) -> Tensor:
        negatives, negative_mask, positive_ids, negative_ids = _check_inputs(
            query, positive, negatives, negative_mask, positive_ids, negative_ids
        )
        _, world_size = _world() if self.gather_across_workers else (0, 1)
        valid = valid_triplets(negative_mask, positive_ids, negative_ids)  # (B, H)
        with torch.autocast(query.device.type, enabled=False):
            q = F.normalize(query.float(), dim=-1)  # (B, D)
            p = F.normalize(positive.float(), dim=-1)  # (B, D)
            n = F.normalize(negatives.float(), dim=-1)  # (B, H, D)
            d_pos = 1 - (q * p).sum(-1)  # (B,)
            d_neg = 1 - (q[:, None, :] * n).sum(-1)  # (B, H)
            hinge = F.relu(d_pos[:, None] - d_neg + self.margin)  # (B, H)
            total = torch.where(valid, hinge, 0.0).sum()  # stays on the graph when no triplet is valid
            count = valid.sum().to(total.dtype)
            if world_size > 1:
                count = _gather_no_grad(count.view(1), world_size).sum()
            return total * world_size / count.clamp(min=1)


def build_loss(objective: str = TrainConfig.objective, *, temperature: float = TrainConfig.temperature,
               symmetric: bool = TrainConfig.symmetric, tau_plus: float = TrainConfig.tau_plus,
               triplet_margin: float = TrainConfig.triplet_margin) -> nn.Module:
    """The train section's objective as a loss module (``train.objective``)."""
    if objective == "infonce":
        return InfoNCELoss(temperature, symmetric, tau_plus=tau_plus)
    if tau_plus:
        raise ValueError(f"tau_plus={tau_plus} is an option of objective=infonce; got objective={objective!r}. "
                         "Use objective=infonce, or tau_plus=0.")
    if objective == "supcon":
        return SupConLoss(temperature, symmetric)
    if objective == "triplet":
        return TripletLoss(triplet_margin)
    raise ValueError(f"objective={objective!r} is unknown; valid: infonce, supcon, triplet.")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature={temperature!r} is invalid: it must be a finite number > 0 "
            "(E5 uses 0.01, sentence-transformers 0.05 = scale 20)."
        )


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: it must be True or False.")


def _check_inputs(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    negative_mask: Tensor | None,
    positive_ids: Tensor | None,
    negative_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate shapes; fill the optional parts so the loss has one code path.

    Without negatives H = 0; without a mask every negative is valid; ids stay None (no id masking).
    """
    if query.ndim != 2 or positive.shape != query.shape:
        raise ValueError(f"query and positive must both be (B, D); got {tuple(query.shape)} and {tuple(positive.shape)}.")
    B, D = query.shape
    device = query.device
    if negatives is None:
        if negative_mask is not None or negative_ids is not None:
            raise ValueError("negative_mask / negative_ids were given without negatives; pass negatives (B, H, D).")
        negatives = query.new_zeros(B, 0, D)
    if negatives.ndim != 3 or negatives.shape[0] != B or negatives.shape[2] != D:
        raise ValueError(f"negatives must be (B={B}, H, D={D}); got {tuple(negatives.shape)}.")
    H = negatives.shape[1]
    negative_mask = _check_like("negative_mask", negative_mask, (B, H), torch.ones(B, H, dtype=torch.bool, device=device))
    if positive_ids is None:
        if negative_ids is not None:
            raise ValueError("negative_ids was given without positive_ids; pass both or neither.")
        return negatives, negative_mask.bool(), None, None
    positive_ids = _check_like("positive_ids", positive_ids, (B,), None)
    if H and negative_ids is None:
        raise ValueError(
            "negative_ids is required when positive_ids and negatives are given: without it a hard negative "
            "equal to a pair's positive would be counted as a negative."
        )
    negative_ids = _check_like("negative_ids", negative_ids, (B, H), torch.zeros(B, H, dtype=torch.int64, device=device))
    return negatives, negative_mask.bool(), positive_ids.long(), negative_ids.long()


def _check_like(name: str, value: Tensor | None, shape: tuple[int, ...], default: Tensor | None) -> Tensor:
    if value is None:
        return default
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(value.shape)}.")
    if value.is_floating_point():
        raise ValueError(f"{name} must be an integer or bool tensor; got {value.dtype}.")
    return value
