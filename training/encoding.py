"""Encoding a training batch: GradCache (a big batch in small mini-batches) and length grouping
(each side sorted by length, encoded in groups padded to their own longest).

``GradCache`` runs any encoder in mini-batches so a global batch of thousands fits in small memory
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): one
extra encoder forward (~ +1/3 of a step) for activation memory bounded by the mini-batch.
``encode_by_length`` gives the same embeddings as one padded forward for fewer padded tokens;
faster on CPU, measured slower on an H100, so the training loop uses neither there. The losses
they feed are in ``training.losses``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

# A chunkable encoder input: a tensor, or tokenizer output (a mapping of tensors), sliced on dim 0.
Features = Union[Tensor, Mapping[str, Tensor]]


# ----------------------------------------------------------------------------- GradCache


class GradCache:
    """Encode in mini-batches, take the loss on all embeddings at once, backprop chunk by chunk.

    ``forward_backward(groups, loss_fn)``: ``groups`` are the encoder inputs of each tower
    (e.g. query features (B, ...), passage features (B, ...), negative features (B*H, ...));
    ``loss_fn(*embeddings)`` maps their embeddings to a scalar. Parameter gradients are
    accumulated into ``model``'s ``.grad`` exactly as ``loss_fn(*[encode(model, g) ...]).backward()``
    would, with dropout replayed from the saved RNG state of each chunk. Returns the detached loss.

    Under DDP (or FSDP) pass the wrapped model: every chunk's backward but the last runs under
    ``model.no_sync()`` so gradients are all-reduced once per step; all workers must pass the
    same group sizes (so they run the same number of chunks, hence the same collectives).

    Hand-written rather than sentence-transformers' CachedMultipleNegativesRankingLoss: that one
    caches for its own fixed loss; this one takes any loss over the embeddings (false negatives
    masked by text id, ragged hard negatives, gathered across ranks) and runs under DDP's no_sync.
    """

    def __init__(
        self,
        model: nn.Module,
        mini_batch_size: int,
        encode: Callable[[nn.Module, Features], Tensor] | None = None,
        by_length: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (the DDP-wrapped one under DDP); got {type(model).__name__}.")
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size={mini_batch_size!r} is invalid: it must be an integer >= 1.")
        if encode is not None and not callable(encode):
            raise ValueError(f"encode must be callable (model, features) -> (rows, D) embeddings; got {encode!r}.")
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.encode = encode or (lambda m, features: m(features))
        self.by_length = by_length  # length-sorted, trimmed chunks (measured faster on CPU, far slower on GPU)

    def forward_backward(self, groups: Sequence[Features], loss_fn: Callable[..., Tensor]) -> Tensor:
        # Tokenizer output is chunked longest first, each chunk cut to its own longest text
        # (``length_chunks``): the same embeddings and the same number of chunks, less padding.
        chunk = length_chunks if self.by_length else (lambda g, size: (_split(g, size), None))
        chunks, orders = zip(*[chunk(g, self.mini_batch_size) for g in groups]) if groups else ((), ())
        if not chunks or not all(chunks):
            raise ValueError(
                f"GradCache needs at least one group and at least one row per group; got {[len(c) for c in chunks]} "
                "chunks per group. Leave empty groups (e.g. no hard negatives) out of groups and loss_fn."
            )
        cached, states = self._encode_without_grad(chunks)  # (a)
        # (rows, D) per group, back in the input's row order
        leaves = [_unsort(torch.cat(c), order).detach().requires_grad_() for c, order in zip(cached, orders)]
        loss = loss_fn(*leaves)  # (b)
        grads = torch.autograd.grad(loss, leaves)
        grads = [g if order is None else g.index_select(0, order) for g, order in zip(grads, orders)]  # chunk order
        self._backward_with_grad(chunks, states, grads)  # (c)
        return loss.detach()

    def _encode_without_grad(self, chunks: list[list[Features]]) -> tuple[list[list[Tensor]], list[list[_RngState]]]:
        cached, states = [], []
        with torch.no_grad():
            for group in chunks:
                states.append([])
                cached.append([])
                for chunk in group:
                    states[-1].append(_RngState.capture())
                    cached[-1].append(self.encode(self.model, chunk))
        return cached, states

    def _backward_with_grad(self, chunks: list[list[Features]], states: list[list[_RngState]], grads: Sequence[Tensor]) -> None:
        after = _RngState.capture()  # leave the RNG where step (a) left it
        last = (len(chunks) - 1, len(chunks[-1]) - 1)
        for g, group in enumerate(chunks):
            start = 0
            for c, chunk in enumerate(group):
                states[g][c].restore()
                with self._sync_context(last_chunk=(g, c) == last):
                    emb = self.encode(self.model, chunk)  # (rows, D)
                    emb.backward(grads[g][start : start + len(emb)])
                start += len(emb)
        after.restore()

    def _sync_context(self, last_chunk: bool):
        no_sync = getattr(self.model, "no_sync", None)
        return nullcontext() if last_chunk or no_sync is None else no_sync()


def _split(features: Features, size: int) -> list[Features]:
    rows = len(features) if isinstance(features, Tensor) else len(next(iter(features.values())))
    if isinstance(features, Tensor):
        return [features[i : i + size] for i in range(0, rows, size)]
    return [{k: v[i : i + size] for k, v in features.items()} for i in range(0, rows, size)]


# ----------------------------------------------------------------------------- length grouping
#
# A tokenizer pads a batch to its longest text, so a batch of mixed lengths spends part of its
# encoder work on padding: on the bundled sample a third of the passages reach the 128-token cap
# and the mean is 86, so a batch of 32 is ~1/3 padding. Encoded sorted by length, in groups each
# padded to its own longest, the texts get the same embeddings (padding is masked out of attention
# and pooling) for fewer tokens. Each extra forward has a fixed cost (Python, kernel launches,
# smaller matrix products), so the groups minimise padded tokens + ``overhead`` tokens per group.
# Written here because neither torch nor sentence-transformers does this for training (ST sorts by
# length only in ``encode``, for inference; its trainer pads each batch to its longest).


def length_groups(lengths: Sequence[int], overhead: float) -> list[tuple[int, int]]:
    """Spans ``[a, b)`` of ``lengths`` (sorted longest first) that minimise
    ``sum(overhead + (b - a) * lengths[a])``, i.e. padded tokens (each group padded to its first,
    longest text) plus ``overhead`` tokens per group.

    An exact dynamic programme over the places where the length changes (a cut inside a run of equal
    lengths only adds a group's overhead), so at most max_length + 1 candidates, whatever the rows."""
    n = len(lengths)
    if n == 0:
        return []
    values = np.asarray(lengths, dtype=np.int64)
    if np.any(values[1:] > values[:-1]):
        raise ValueError("length_groups needs lengths sorted longest first")
    cuts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # where a group may start
    cuts = np.r_[cuts, n]
    best = np.zeros(len(cuts))  # best[i]: least cost of the rows before cuts[i]
    prev = np.zeros(len(cuts), dtype=np.int64)
    for i in range(1, len(cuts)):
        cost = best[:i] + overhead + (cuts[i] - cuts[:i]) * values[cuts[:i]]
        prev[i] = int(np.argmin(cost))
        best[i] = cost[prev[i]]
    spans, i = [], len(cuts) - 1
    while i:
        spans.append((int(cuts[prev[i]]), int(cuts[i])))
        i = int(prev[i])
    return spans[::-1]


def _right_padded_lengths(features: Features) -> Tensor | None:
    """Token counts per row when ``features`` is right-padded tokenizer output (every value a
    (rows, width) tensor beside an ``attention_mask`` of ones then zeros); else None, and callers
    encode it as it is: left padding shifts position ids when trimmed, and unknown inputs are not
    sliced on a guess."""
    if isinstance(features, Tensor) or not isinstance(features.get("attention_mask"), Tensor):
        return None
    mask = features["attention_mask"]
    if mask.dim() != 2 or any(not isinstance(v, Tensor) or v.shape != mask.shape for v in features.values()):
        return None
    lengths = mask.sum(1)
    if not torch.equal(mask != 0, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        return None
    if len(lengths) and int(lengths.min()) == 0:  # an all-padding row: nothing to cut it to
        return None
    return lengths


def _take(features: Mapping[str, Tensor], rows: Tensor, width: int) -> dict[str, Tensor]:
    return {k: v.index_select(0, rows)[:, :width] for k, v in features.items()}


def _unsort(embeddings: Tensor, order: Tensor | None) -> Tensor:
    """Rows encoded in ``order`` back to the input's order."""
    return embeddings if order is None else embeddings.index_select(0, torch.argsort(order))


def _length_order(features: Features) -> tuple[Tensor, list[int]] | None:
    """The rows longest first (ties in input order) and their lengths in that order; None when
    ``features`` is not right-padded tokenizer output."""
    lengths = _right_padded_lengths(features)
    if lengths is None:
        return None
    order = torch.argsort(lengths, descending=True, stable=True)
    return order, lengths[order].tolist()


def length_chunks(features: Features, size: int) -> tuple[list[Features], Tensor | None]:
    """``features`` in chunks of ``size`` rows, longest texts first, each cut to its own longest
    text, and the row order used (None: not right-padded tokenizer output, chunked as it is)."""
    sorted_rows = _length_order(features)
    if sorted_rows is None:
        return _split(features, size), None
    order, longest = sorted_rows
    return [_take(features, order[a : a + size], longest[a]) for a in range(0, len(order), size)], order


def encode_by_length(
    model: nn.Module, features: Features, overhead: float, encode: Callable[[nn.Module, Features], Tensor]
) -> Tensor:
    """``encode(model, features)`` computed in ``length_groups``: rows sorted by length, each group
    cut to its own longest text; embeddings (and their gradients) come back in the input order and
    equal the one-forward result up to float rounding. One forward as it is when ``overhead`` <= 0
    or ``features`` is not right-padded tokenizer output. Dropout draws other masks than one
    forward would (other shapes), as any other batch layout does."""
    sorted_rows = _length_order(features) if overhead > 0 else None
    if sorted_rows is None:
        return encode(model, features)
    order, longest = sorted_rows
    spans = length_groups(longest, overhead)
    if len(spans) == 1:
        return encode(model, features)
    parts = [encode(model, _take(features, order[a:b], longest[a])) for a, b in spans]
    return _unsort(torch.cat(parts), order)


class _RngState:
    """CPU and (when initialised) all CUDA generator states, so a chunk's dropout can be replayed."""

    def __init__(self, cpu: Tensor, cuda: list[Tensor] | None) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls) -> _RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
