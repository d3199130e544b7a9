"""What every Ray Train worker runs: ``train_loop_per_worker(LoopConfig)``, one ``train_step`` per
batch (see ``training.train`` for the design: data position, checkpoints, evaluation, refresh).

Read top to bottom: the typed settings the driver hands every worker, the test seam, the step
(batch in, loss and gradients out: runs without Ray), then the loop around it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mining.refresh import current_negatives
from training.batches import PairBatch, build_batch, lr_lambda, place_negatives, simcse_columns
from training.encoding import GradCache, encode_by_length
from training.losses import InfoNCELoss, SupConLoss, TripletLoss, build_loss, valid_triplets
from training.model import (
    embed_features,
    encode_on_rank0,
    evaluate_on_rank0,
    freeze_unused,
    make_tokenize,
    restore_checkpoint,
    save_checkpoint,
    save_live_model,
    setup_model,
    setup_optimizer,
    to_device,
)
from training.collapse import collapse_metrics, collapse_warning
from training.queue import PassageQueue
from training.rounds import RefreshRounds, RefreshSettings, worker_logging

log = logging.getLogger(__name__)

# train.length_group_overhead when empty, on CPU: tokens one extra forward is worth. 64-128 were
# fastest on the sample (benchmarks/length_groups.py: 1.13-1.14x one padded forward per side, 256:
# 1.12x, 384: 1.09x). Elsewhere length grouping (and GradCache's length-sorted chunks) is off: on an
# H100 (MiniLM shapes, bf16, batches 32-1024) every split was 2-30x slower than one padded forward
# (36 ms -> 160-360 ms at batch 32), though it cut tokens by 20-55%; not yet understood (widths
# rounded up to a multiple of 8 helped only a little).
LENGTH_GROUP_OVERHEAD_CPU = 128
# The score of a checkpoint reported without an evaluation (Ray ranks every checkpoint by ndcg@10).
# NaN served until a worker failed: Ray 2.60's checkpoint manager keeps its state as JSON, which
# turns NaN into null, and then multiplies null by the score order (_get_checkpoint_score), so the
# controller crashed instead of restarting the workers. nDCG lies in [0, 1]: -1 ranks below every
# evaluated checkpoint and survives JSON.
UNEVALUATED = -1.0


@dataclass(frozen=True)
class TestHooks:
    """The loop's test seam, handed to ``train(..., hooks=...)`` by tests only (never by a config,
    an environment variable or the CLI)."""

    __test__ = False  # not a pytest class
    fail_at_step: int = 0  # > 0: the last rank raises once at this step of a fresh run (a worker failure)
    # >= 0: a refresh round in flight this many steps is waited for (an event, not a sleep), so a
    # short test run sees rounds finish, while training still steps on beside each round
    round_overlap_steps: int | None = None


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, built once by ``training.train.train`` from the config sections."""

    # the model and its inputs
    model: str
    lora: dict | None
    query_prefix: str
    passage_prefix: str
    query_max_length: int
    passage_max_length: int
    # the objective and the optimiser (train section)
    lr: float
    warmup_ratio: float
    schedule: str
    weight_decay: float
    max_grad_norm: float
    temperature: float
    symmetric: bool
    objective: str
    tau_plus: float
    group_by: str  # objective=supcon: "query", "source" (pairmill setfit's labels) or "group", training.batches.group_ids
    triplet_margin: float
    queue_size: int  # > 0: a PassageQueue of that many past positives, extra negatives of every query
    simcse: bool  # rows are plain texts (id, text): each text is its own query and passage (training.batches.simcse_columns)
    mini_batch_size: int | None
    length_group_overhead: int | None
    seed: int
    # the data plan
    total_steps: int
    steps_per_epoch: int
    per_worker_batch: int
    global_batch: int
    shuffle_buffer: int
    hard_negatives: int
    # reports: metrics lines, checkpoints, rank 0's evaluation
    metrics_path: str
    checkpoint_every: int
    eval_every: int
    log_every: int
    log_level: int  # the driver's (pairmill.log.level()): what a worker's progress lines show
    eval_max_length: int
    eval_query_batch: int
    eval_uniformity_sample: int
    eval_task: Any = None  # ObjectRef of a pairmill.evaluate task, or None
    refresh: RefreshSettings | None = None
    # the collapse alarm (rank 0): the texts it encodes at each report (empty = the eval task's passages), and its threshold
    collapse_texts: tuple[str, ...] = ()
    collapse_sample: int = 0
    collapse_cosine: float = 0.5
    hooks: TestHooks = field(default_factory=TestHooks)
    # metrics_path on object storage: the pyarrow filesystem it is in (metrics_path is then the path in it)
    metrics_filesystem: Any = None


# ----------------------------------------------------------------------------- one step


@dataclass
class StepParts:
    """What ``train_step`` runs a batch through: the (DDP-wrapped or plain) model, its tokenizer, the loss."""

    model: nn.Module
    tokenize: Callable  # (texts, max_length) -> features
    loss_fn: InfoNCELoss | SupConLoss | TripletLoss  # losses.build_loss(train.objective, ...)
    query_max: int
    passage_max: int
    device: torch.device = torch.device("cpu")
    autocast: Callable = contextlib.nullcontext  # () -> a context (bf16 autocast on GPU)
    grad_cache: GradCache | None = None  # train.mini_batch_size: GradCache's chunked forward/backward
    length_group_overhead: int = 0  # > 0: encode each side in length groups (CPU; encoding.encode_by_length)
    queue: PassageQueue | None = None  # train.queue_size: past positives as extra negatives; train_step pushes each batch's

    def encode(self, model: nn.Module, features: dict[str, Tensor]) -> Tensor:
        return embed_features(model, features, self.autocast)


def train_step(parts: StepParts, batch: PairBatch) -> Tensor:
    """One batch's loss (``parts.loss_fn``), with its gradients accumulated into the parameters' ``.grad``
    (zeroing, clipping and the optimiser step are the caller's). No Ray: DDP's all-reduce and the
    loss's all-gather happen inside when the model and a process group are set up."""
    q_features = to_device(parts.tokenize(batch.queries, parts.query_max), parts.device)
    p_features = to_device(parts.tokenize(batch.passages, parts.passage_max), parts.device)
    n_features = to_device(parts.tokenize(batch.negatives, parts.passage_max), parts.device) if batch.negatives else None
    mask = batch.negative_mask.to(parts.device)
    pos_ids, neg_ids = batch.positive_ids.to(parts.device), batch.negative_ids.to(parts.device)
    # SupCon's positives are the rows sharing a query; the other losses take no query ids
    query_groups = {"query_ids": batch.query_ids.to(parts.device)} if isinstance(parts.loss_fn, SupConLoss) else {}
    queued = {"queue": parts.queue.embeddings(), "queue_ids": parts.queue.ids()} if parts.queue is not None else {}
    seen = {}

    def loss_of(q: Tensor, p: Tensor, n_flat: Tensor | None = None) -> Tensor:
        # q, p: (B, D); n_flat: (M, D) -> negatives (B, H, D)
        seen["positive"] = p
        return parts.loss_fn(q, p, place_negatives(n_flat, mask, q), mask, pos_ids, neg_ids, **query_groups, **queued)

    groups = [q_features, p_features] + ([n_features] if n_features is not None else [])
    if parts.grad_cache is not None:
        loss = parts.grad_cache.forward_backward(groups, loss_of)
    else:
        loss = loss_of(*[encode_by_length(parts.model, g, parts.length_group_overhead, parts.encode) for g in groups])
        loss.backward()
    if parts.queue is not None:  # after the loss: this batch's positives are negatives from the next step on
        parts.queue.push(seen["positive"], pos_ids)
    return loss


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(train_loop_config: dict) -> dict:
    """Ray Train's entry point: ``train_loop_config`` is ``{"loop": LoopConfig}``."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pairmill.cluster import model_malloc
    from pairmill.encoder import is_static

    cfg: LoopConfig = train_loop_config["loop"]
    worker_logging(cfg.log_level)
    model_malloc()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray CPUs are logical slots: use this worker's share of the node's cores
        share = max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
        # ... less one when refresh rounds encode beside the steps: with every core taken, torch's
        # threads wait on each other at every op (measured: steps 10x slower while a round ran, 2 cores)
        torch.set_num_threads(max(1, share - 1) if cfg.refresh else share)
    # bf16 autocast on GPU (the loss itself runs in fp32), plain fp32 on CPU
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    torch.manual_seed(cfg.seed)  # same LoRA init on every rank
    st = setup_model(cfg.model, cfg.lora, device)
    tokenize = make_tokenize(st)
    st.train()
    frozen = freeze_unused(st, tokenize, device)
    optimizer = setup_optimizer(st, cfg.lr, cfg.weight_decay)
    total = cfg.total_steps
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total, cfg.schedule))
    state = restore_checkpoint(ray.train.get_checkpoint(), st, optimizer, scheduler)
    store = cfg.refresh.store if cfg.refresh else None  # pair id -> refreshed negatives; every rank reads it
    rounds = None
    if cfg.refresh and rank == 0:
        rounds = RefreshRounds(cfg.refresh, lambda folder: save_live_model(st, folder, model=cfg.model, lora=cfg.lora))
        rounds.restore(state.get("refresh"))
    start_step = step = state["step"]
    epoch, skip, pairs = state["epoch"], state["step_in_epoch"], state["pairs"]
    torch.manual_seed(cfg.seed + 1_000_003 * start_step + rank)  # dropout differs per rank and per resume
    if rank == 0:
        _truncate_metrics(cfg.metrics_path, start_step, cfg.metrics_filesystem)
        log.info(f"train: {world} worker(s) on {device}, {total} steps, starting at step {step} "
                 f"(epoch {epoch}, batch {skip}); {len(frozen)} unused parameter(s) frozen")
    if cfg.mini_batch_size and is_static(st):
        raise ValueError("train.mini_batch_size (GradCache) splits a padded batch by rows; a static-embedding model's "
                         "input is not one. Leave train.mini_batch_size empty: a static model's step is cheap anyway")
    # Embedding buffers (position ids) are constants, so DDP need not broadcast them every forward;
    # that also lets ranks run different numbers of forwards (ragged hard negatives, GradCache chunks).
    model = ray.train.torch.prepare_model(st, parallel_strategy_kwargs={"broadcast_buffers": False})
    by_length = device.type == "cpu"  # measured faster on CPU, slower on GPU (LENGTH_GROUP_OVERHEAD_CPU)
    overhead = cfg.length_group_overhead
    if overhead is None:
        overhead = LENGTH_GROUP_OVERHEAD_CPU if by_length else 0
    # The model's own limit wins: a 128-position model given max_length 256 indexes past its embeddings.
    limit = lambda n: min(n, st.max_seq_length or n)  # noqa: E731
    loss_fn = build_loss(cfg.objective, temperature=cfg.temperature, symmetric=cfg.symmetric, tau_plus=cfg.tau_plus,
                         triplet_margin=cfg.triplet_margin)
    if cfg.simcse and is_static(st):
        raise ValueError("train.simcse needs dropout to make a text's two views differ; a static-embedding model has none, "
                         "so its views would be identical. Use a transformer model, or train on pairs")
    # SimCSE: both views of a text are the same input (passage prefix and length): dropout is the only augmentation
    query_max = cfg.passage_max_length if cfg.simcse else cfg.query_max_length
    parts = StepParts(model, tokenize, loss_fn, limit(query_max), limit(cfg.passage_max_length), device,
                      autocast, length_group_overhead=overhead)
    if cfg.queue_size:
        parts.queue = PassageQueue(cfg.queue_size, st.get_embedding_dimension(), device)
    if cfg.mini_batch_size:
        parts.grad_cache = GradCache(model, cfg.mini_batch_size, parts.encode, by_length=by_length)
    task = ray.get(cfg.eval_task) if cfg.eval_task is not None and rank == 0 else None
    # the collapse alarm's fixed sample: the eval set's first passages, else the driver's sample of the training passages
    collapse_texts = list(task.corpus[: cfg.collapse_sample]) if task is not None else list(cfg.collapse_texts)
    collapse_start = state.get("collapse_start")  # the base model's numbers, kept in the checkpoints
    if rank == 0 and cfg.collapse_sample and len(collapse_texts) >= 2 and collapse_start is None:
        collapse_start = collapse_metrics(encode_on_rank0(st, collapse_texts, cfg, device))
        log.info(f"train: collapse alarm on {len(collapse_texts)} texts: mean cosine {collapse_start['mean_cosine']:.4f}, "
                 f"uniformity {collapse_start['uniformity']:.4f} at step {step}")
    trainable = [p for p in st.parameters() if p.requires_grad]
    shard = ray.train.get_dataset_shard("train")
    hooks = cfg.hooks

    loss_sum, loss_steps, t_last, steps_last = 0.0, 0, time.perf_counter(), step
    cpu_last = time.process_time()  # this worker's CPU seconds: a load-independent cost next to the wall time
    stale_sum, stale_rows, fresh_rows = 0, 0, 0  # since the last log line: staleness of the negatives used
    without_triplet = 0  # since the last log line (objective=triplet): pairs without a valid hard negative, which taught nothing
    queue_stale_sum, queue_steps = 0.0, 0  # since the last log line: the queue's mean staleness at each step that used it
    while step < total:
        batches = shard.iter_batches(
            batch_size=cfg.per_worker_batch, batch_format="pyarrow", drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=cfg.seed * 1000 + epoch,
        )
        for i, table in enumerate(batches):
            if i < skip:  # resume: these batches were trained on before the checkpoint
                continue
            if rounds is not None and hooks.round_overlap_steps is not None:
                rounds.wait_if_older(step, hooks.round_overlap_steps)
            t_step = time.perf_counter()
            columns = {c: table.column(c).to_pylist() for c in table.column_names}
            if cfg.simcse:  # (id, text) rows: each text is its own query and passage
                columns = simcse_columns(columns)
            # The store's refreshed negatives win over the batch's own (mined at step 0 by the mine job)
            columns["negatives"], columns["negative_ids"], mined_at = current_negatives(
                columns["id"], columns["negatives"], columns.get("negative_ids") or [None] * len(columns["id"]), store)
            stale_sum += sum(step - s for s in mined_at)
            stale_rows += len(mined_at)
            fresh_rows += sum(s > 0 for s in mined_at)
            batch = build_batch(columns, hard_negative_count=cfg.hard_negatives,
                                query_prefix=cfg.passage_prefix if cfg.simcse else cfg.query_prefix,
                                passage_prefix=cfg.passage_prefix, group_by=cfg.group_by)
            if cfg.objective == "triplet":
                without_triplet += int((~valid_triplets(batch.negative_mask, batch.positive_ids, batch.negative_ids).any(1)).sum())

            if parts.queue is not None and len(parts.queue):
                queue_stale_sum += parts.queue.staleness()
                queue_steps += 1
            optimizer.zero_grad(set_to_none=True)
            loss = train_step(parts, batch)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            skip = 0
            pairs += cfg.global_batch
            loss_sum += loss.item()
            loss_steps += 1

            last = step >= total
            if rounds is not None:
                rounds.step_seconds += time.perf_counter() - t_step  # compute only: no data wait, eval or checkpoint
                rounds.steps_timed += 1
                rounds.poll(step)
                if rounds.due(step, last):
                    rounds.start(step, total)  # saves the model, starts the round, returns: training goes on
            do_eval = task is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0))
            do_checkpoint = last or step % cfg.checkpoint_every == 0
            do_report = do_checkpoint or (cfg.eval_every and step % cfg.eval_every == 0)
            if step % cfg.log_every == 0 or do_report:
                elapsed = time.perf_counter() - t_last
                metrics = {
                    "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                    "loss": _mean_over_ranks(loss_sum / max(1, loss_steps), device, world),
                    "pairs_per_s": round((step - steps_last) * cfg.global_batch / max(elapsed, 1e-9), 2),
                    "seconds": round(elapsed, 4),  # wall time of the steps since the last line (data wait included)
                    "cpu_seconds": round(time.process_time() - cpu_last, 4),  # this worker process, all its threads
                    "pairs": pairs,
                }
                if cfg.objective == "triplet":  # every rank takes part in the sum (a collective)
                    metrics["pairs_without_triplet"] = int(_sum_over_ranks([without_triplet], device, world)[0])
                    without_triplet = 0
                if parts.queue is not None:  # the same queue on every rank: rank 0's numbers are everyone's
                    if queue_steps:  # mean steps since the queued entries were encoded, as the steps saw them
                        metrics["queue_staleness"] = round(queue_stale_sum / queue_steps, 3)
                    metrics["queue_entries"] = len(parts.queue)
                    queue_stale_sum, queue_steps = 0.0, 0
                if cfg.refresh:
                    stale, rows, fresh = _sum_over_ranks([stale_sum, stale_rows, fresh_rows], device, world)
                    metrics["negative_staleness"] = round(stale / max(1, rows), 3)  # steps behind, mean over pairs
                    metrics["refreshed_pairs_used"] = int(fresh)
                    stale_sum, stale_rows, fresh_rows = 0, 0, 0
                    if rounds is not None:
                        rounds.staleness_sum += stale
                        rounds.staleness_rows += rows
                        rounds.refreshed_used += fresh
                        metrics.update(rounds.metrics())
                loss_sum, loss_steps, t_last, steps_last = 0.0, 0, time.perf_counter(), step
                cpu_last = time.process_time()
                if rank == 0:
                    log.info(f"train: step {step}/{total} epoch {epoch} loss {metrics['loss']:.4f} "
                             f"lr {metrics['lr']:.2e} {metrics['pairs_per_s']:.1f} pairs/s"
                             + (f", {metrics['pairs_without_triplet']} pair(s) without a hard negative (no loss)"
                                if "pairs_without_triplet" in metrics else ""))
            if rank == 0 and step % cfg.log_every == 0 and not do_report:  # a report step's line is written below
                _append_metrics(cfg.metrics_path, metrics, cfg.metrics_filesystem, upload=False)
            if do_report:
                if do_eval:
                    t0 = time.perf_counter()
                    metrics.update(evaluate_on_rank0(st, task, cfg, device))
                    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
                    log.info(f"train: step {step} eval ndcg@10 {metrics['ndcg@10']:.4f} "
                             f"recall@10 {metrics['recall@10']:.4f} mrr@10 {metrics['mrr@10']:.4f}")
                if rank == 0 and collapse_start is not None:
                    t0 = time.perf_counter()
                    now = collapse_metrics(encode_on_rank0(st, collapse_texts, cfg, device))
                    metrics.update({f"collapse_{k}": v for k, v in now.items()})
                    metrics["collapse_seconds"] = round(time.perf_counter() - t0, 2)
                    t_last += metrics["collapse_seconds"]  # the next line's seconds time the steps, not the alarm
                    warning = collapse_warning(collapse_start, now, cfg.collapse_cosine, cfg.queue_size)
                    if warning:
                        log.warning(f"train: step {step}: {warning}")
                reported = dict(metrics)
                if cfg.eval_task is not None and "ndcg@10" not in reported:
                    reported["ndcg@10"] = UNEVALUATED  # ranks below every evaluated checkpoint
                if rank == 0:
                    _append_metrics(cfg.metrics_path, metrics, cfg.metrics_filesystem)
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if do_checkpoint and rank == 0:
                        end_of_epoch = i + 1 == cfg.steps_per_epoch
                        state = {"step": step, "epoch": epoch + end_of_epoch, "step_in_epoch": 0 if end_of_epoch else i + 1,
                                 "pairs": pairs, "collapse_start": collapse_start}
                        if rounds is not None:
                            state["refresh"] = rounds.state()
                        save_checkpoint(Path(tmp), st, optimizer, scheduler, state)
                        checkpoint = Checkpoint.from_directory(tmp)
                    ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:07d}" if do_checkpoint else None)
            if hooks.fail_at_step == step and start_step == 0 and rank == world - 1:
                raise RuntimeError(f"TestHooks(fail_at_step={step}): this worker fails once")
            if last:
                break
        if step < total:
            epoch += 1
    if rounds is not None:
        rounds.close(step)
    if rank == 0 and cfg.metrics_filesystem is not None:  # the last step's report uploaded it whole
        _metrics_copy(cfg.metrics_path).unlink(missing_ok=True)
    return {"step": step, "start_step": start_step, "epoch": epoch, "pairs": pairs,
            "refresh": rounds.summary() if rounds is not None else None}


def _mean_over_ranks(value: float, device, world: int) -> float:
    if world == 1:
        return round(value, 6)
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return round(float(t) / world, 6)


def _sum_over_ranks(values: list[float], device, world: int) -> list[float]:
    if world == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _metrics_copy(path: str) -> Path:
    """Rank 0's local copy of a metrics.jsonl on object storage (which has no append)."""
    import hashlib

    return Path(tempfile.gettempdir()) / f"pairmill-metrics-{hashlib.sha256(path.encode()).hexdigest()[:16]}.jsonl"


def _append_metrics(path: str, metrics: dict, filesystem=None, *, upload: bool = True) -> None:
    """One line onto ``path``. On object storage (``filesystem``: the worker gets it with its
    endpoint, not from its own environment) the line goes onto a local copy, uploaded whole when
    ``upload`` (at every report): a resume drops the lines after its checkpoint anyway, and every
    run ends with a report."""
    local = Path(path) if filesystem is None else _metrics_copy(path)
    with open(local, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if upload and filesystem is not None:
        with filesystem.open_output_stream(path, compression=None) as f:
            f.write(local.read_bytes())


def _truncate_metrics(path: str, step: int, filesystem=None) -> None:
    """Keep the lines up to the checkpoint we resume from: later ones are reported again. On object
    storage the kept lines also start the local copy (rank 0 may be on another node than before)."""
    import pyarrow.fs as pafs

    if filesystem is None:
        text = Path(path).read_text() if Path(path).exists() else ""
    elif filesystem.get_file_info(path).type == pafs.FileType.File:
        with filesystem.open_input_stream(path, compression=None) as f:
            text = f.read().decode("utf-8")
    else:
        text = ""
    kept = "".join(line + "\n" for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= step)
    if filesystem is not None:
        _metrics_copy(path).write_text(kept)
    if text:
        if filesystem is None:
            Path(path).write_text(kept)
        else:
            with filesystem.open_output_stream(path, compression=None) as f:
                f.write(kept.encode("utf-8"))


def negative_counts(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(batch.column("negatives")), 0)
    return pa.table({"has_negatives": pc.cast(pc.greater(lengths, 0), pa.int64())})
