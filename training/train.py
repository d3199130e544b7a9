"""``pairmill train PAIRS -o OUT``: contrastive fine-tuning of a sentence-transformers model on Ray Train.

Files: ``batches`` (a batch's texts and masks, the schedule; no model), ``losses`` (InfoNCE,
GradCache, length grouping), ``model`` (setup, checkpoints, rank 0's evaluation, export),
``rounds`` (ANCE refresh rounds from rank 0), ``loop`` (the typed ``LoopConfig``, ``train_step``: a
batch in, loss and gradients out, no Ray; ``train_loop_per_worker`` around it) and this one, the
job: input, Ray Train's trainer, resume, export and stats. Each imports only the ones before it.

Design note
-----------
What. A ``TorchTrainer`` runs ``train_loop_per_worker`` on ``train.num_workers`` workers (DDP via
``ray.train.torch.prepare_model``). Each worker streams its shard of the validated pairs
(``get_dataset_shard("train").iter_batches``, the same per-worker batch on every rank, drop_last),
tokenises queries, passages and hard negatives itself with the model's tokenizer (E5 prefixes from
the encoder section, a max length per side), and minimises ``InfoNCELoss`` over the global batch
(all-gather across workers, false negatives masked by ``text_key``; ``train.objective`` picks
SupCon or triplet instead, ``train.tau_plus`` debiases InfoNCE), through ``GradCache`` when
``train.mini_batch_size`` is set; ``train.queue_size`` adds the positives of past steps as
negatives (``training.queue``). ``train.simcse`` reads plain texts instead of pairs (text mode, as
``pairmill embed --text-field``) and makes each its own query and passage (two dropout masks). On CPU each side's texts are encoded sorted by length, in groups
padded to their own longest (``encode_by_length``, ``train.length_group_overhead``): the same
embeddings for less padding (off on GPU, where it measured slower). AdamW, warmup + linear/cosine
decay, gradient clipping, bf16 autocast on GPU and fp32 on CPU; LoRA (peft) optional and merged on
export.

Checkpoints. Every ``checkpoint_every`` steps and at the end, rank 0 hands ``ray.train.report`` a
folder holding ``model.pt`` (the *trainable* parameters by name: everything else is the base model,
which is reloaded from ``encoder.model``), ``optimizer.pt``, ``scheduler.pt`` and ``state.json``
(step, epoch, step_in_epoch, pairs seen). Ray keeps the latest and the best by ``ndcg@10``.
A killed worker group restarts from the latest checkpoint (``FailureConfig``); rerunning the same
command into the same OUT resumes too: the job is staged in ``.OUT.partial`` (``RunConfig(name=
"train", storage_path=.OUT.partial/checkpoints)``), renamed to OUT when it is done; the validated
input is written there once (``work/validated``), so a resumed run reads the same rows in the same
order. Checkpoint files are read with ``weights_only=True`` (``load_tensors``). With OUT on object
storage (``s3://``, ``gs://``) there is no rename: OUT is written in place, Ray Train writes the
checkpoints there itself (``RunConfig(storage_filesystem=...)``), the model is exported locally and
uploaded under the attempt's prefix, and the ``_SUCCESS`` manifest lists it with the rejects,
config.yaml and metrics.jsonl (``BUCKET_PARTS``; rank 0 uploads metrics.jsonl whole at each report).

Data position. The order of an epoch is a function of (input, world size, seed, epoch): the
validated copy is written once in a random order of ``seed`` (``train.shuffle=global``; a filter's
output comes cluster by cluster, and a buffer of ~1,000 rows alone then trains batch after batch on
one topic), Ray Data runs with ``preserve_order`` so the equal split hands every worker the same
rows each time, and each worker shuffles locally with seed ``seed * 1000 + epoch``. A resumed run
re-opens the checkpoint's epoch and skips the first ``step_in_epoch`` batches on every rank (read, not
tokenised or encoded), so it continues with the batches it would have trained on. The rule is
exact only for the same input and ``num_workers`` (enforced: a rerun with a different train/encoder/
read config or input is refused); dropout noise after a resume is reseeded, not replayed.

Evaluation runs on rank 0 at the steps of ``eval_every`` and at the end (the other ranks wait in
``ray.train.report``, which every rank calls at the same steps); its metrics go into that report.
Rank 0 appends a line to ``OUT/metrics.jsonl`` every ``log_every`` steps and at every report: loss,
lr, pairs/s, the wall ``seconds`` since the previous line (data wait included) and the worker's
``cpu_seconds`` meanwhile; with ``log_every=1`` these are per-step timings (``benchmarks/train.py``).
At every report rank 0 also encodes a fixed sample of held-out passages for the collapse alarm
(``training.collapse``: mean pairwise cosine and uniformity against their values at the start).
The export is built on the driver from the final checkpoint, so the exported folder holds exactly
the checkpointed weights.

Refresh (``train.refresh_every`` > 0, ANCE). Every batch takes its negatives through
``mining.refresh.current_negatives``: rows a round re-mined (in the ``NegativeStore``) win, others
keep the batch's own (step 0 = the mine job); the mean staleness (steps behind) is a metric. Rank 0
(``RefreshRounds``) saves the live model to ``OUT/refresh/step-N/model`` every ``refresh_every``
steps and starts a round as a Ray task on a slice of the queries; training never waits for it. One
round in flight at most (a due round is skipped and counted); a round still running at the end is
cancelled. Its encoder actors and shards take fractions of a CPU so they fit beside the workers.
With OUT on object storage the rounds' folders are on the bucket as well (``OUT/refresh``, outside
the manifest, like ``checkpoints/``), so a round's actors on any node reach them.

Cost per step and worker: 2 + H encoder forwards and backwards of B/W texts (H = hard negatives),
the all-gather of the embeddings, DDP's all-reduce of the gradients; GradCache adds one forward.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import shutil
import time
from pathlib import Path
from typing import Any

from mining.refresh import NegativeStore
from pairmill import storage
from pairmill.pairs import is_missing
from training.batches import steps_per_epoch
from training.loop import (
    UNEVALUATED,
    LoopConfig,
    TestHooks,
    negative_counts,
    train_loop_per_worker,
)
from training.model import export_model
from training.rounds import refresh_settings

log = logging.getLogger(__name__)
RUN_NAME = "train"
RUN_SETTINGS = "checkpoints/run.json"  # what the checkpoints were made from: a rerun with others is refused
BATCH_COLUMNS = ["id", "query", "passage", "negatives"]
TEXT_COLUMNS = ["id", "text"]  # train.simcse: plain texts, each its own query and passage (training.batches.simcse_columns)
# On object storage (OUT = s3://...) the job folder is committed by a _SUCCESS manifest
# (pairmill.output.BucketJobFolder) listing the model and rejects under the attempt's prefix and
# these top-level files; checkpoints/ (Ray Train's, with run.json) and work/ are what a rerun resumes from.
BUCKET_PARTS = ("model", "rejected")
BUCKET_FILES = ("config.yaml", "metrics.jsonl")
PAIRS_PER_STORE_SHARD = 1_000_000  # NegativeStore actors: each holds its pairs' refreshed negative texts


# ----------------------------------------------------------------------------- the job


def lora_settings(train_cfg) -> dict | None:
    """The train section's LoRA settings as the loop and ``export_model`` take them (None: full fine-tuning)."""
    if not train_cfg.lora_rank:
        return None
    alpha = train_cfg.lora_alpha if train_cfg.lora_alpha is not None else 2 * train_cfg.lora_rank
    return {"rank": train_cfg.lora_rank, "alpha": alpha, "targets": list(train_cfg.lora_targets)}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def train(pairs_path: str, out: str, *, encoder, read, train_cfg, eval_cfg, ray, mine_cfg=None,
          run_name: str = RUN_NAME, callbacks: list | None = None, resources_per_worker: dict | None = None,
          in_place: bool = False, validated: str | None = None, hooks: TestHooks | None = None) -> dict:
    """Run the train job; returns the stats written to ``OUT/stats.json``. ``mine_cfg`` (the mine
    section) holds the selection rules of refresh rounds (``train.refresh_every``). ``run_name``,
    ``callbacks`` and ``resources_per_worker`` go to Ray Train as they are (the tune job names each
    trial's run, passes ``TuneReportCallback`` and sizes the workers).

    The job folder is built in ``.OUT.partial`` beside OUT (checkpoints, metrics, refresh rounds,
    the model) and renamed into place after its counts are checked: an interrupted run leaves the
    staging folder, and rerunning the same command resumes there. ``in_place`` writes OUT itself
    (a tune trial, whose folder is inside the tune job's own staging folder). ``validated``: PAIRS
    already validated into that folder by ``validate_input`` with these settings (the tune job does
    it once for all its trials), read from there instead of again. ``hooks`` is the loop's test seam
    (``training.loop.TestHooks``), for tests only."""
    import dataclasses

    import ray as ray_lib
    import yaml
    from ray.data.aggregate import Count, Sum
    from ray.data.expressions import col

    from pairmill.cluster import init_ray
    from pairmill.config import MineConfig, TrainConfig, config_to_dict, read_kwargs, resume_free_keys
    from pairmill.encoder import resolve_model
    from pairmill.evaluate import load_task
    from pairmill.output import count_by, open_resumable
    from pairmill.pairs import REJECT_COLUMNS

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    remote = storage.is_remote(out)  # a bucket: written in place, committed by a manifest (BUCKET_PARTS)
    final_dir = out.rstrip("/") if remote else Path(out).expanduser().resolve()
    mine_cfg = mine_cfg or MineConfig()
    refreshing = train_cfg.refresh_every > 0
    if not refreshing and (mine_cfg.range_min_final is not None or mine_cfg.range_max_final is not None):
        log.warning("train: mine.range_min_final / mine.range_max_final have no effect with train.refresh_every=0: "
                    "the curriculum moves the rank window of refresh rounds")
    sections = {"encoder": encoder, "read": read, "train": train_cfg, "eval": eval_cfg, "ray": ray,
                **({"mine": mine_cfg} if refreshing else {})}
    resume_free = resume_free_keys(TrainConfig)  # e.g. log_every: a rerun may change them and still resume
    run = {"input": pairs_path if storage.is_remote(pairs_path) else str(Path(pairs_path).resolve()),
           "sections": {s: {k: v for k, v in dataclasses.asdict(sections[s]).items() if not (s == "train" and k in resume_free)}
                        for s in ("encoder", "read", "train") + (("mine",) if refreshing else ())}}
    job = open_resumable(final_dir, run, settings_file=RUN_SETTINGS, in_place=in_place, parts=BUCKET_PARTS, files=BUCKET_FILES,
                         has_work=lambda folder: _has_checkpoints(storage.join(folder, "checkpoints", run_name)))
    out_dir = job.staging  # everything is written here; commit renames it to OUT (on a bucket: OUT itself)
    storage.write_text(storage.join(out_dir, "config.yaml"), yaml.safe_dump(_plain(config_to_dict(sections)), sort_keys=False))

    # -- read and validate: rejects to OUT/rejected, counts for the step plan -------------------
    t0 = time.perf_counter()
    read_stage = "read" if validated else "read+validate"  # given: validated by the caller (tune), only read here
    validated = validated or validate_input(pairs_path, storage.join(out_dir, "work", "validated"), train_cfg, read)
    fs, validated_path = storage.split(validated)  # fs None: local
    parsed = ray_lib.data.read_parquet(validated_path, filesystem=fs, file_extensions=["parquet"])
    rejected_dir = job.path("rejected")  # on a bucket: this attempt's prefix, new
    if not remote:
        shutil.rmtree(rejected_dir, ignore_errors=True)
        Path(rejected_dir).mkdir()
    parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS).write_parquet(
        storage.split(rejected_dir)[1], filesystem=fs)
    columns = TEXT_COLUMNS if train_cfg.simcse else BATCH_COLUMNS + ([train_cfg.group_by] if train_cfg.group_by != "query" else [])
    valid = parsed.filter(expr=col("reason").is_null()).select_columns(columns)
    if train_cfg.simcse:  # plain texts: no negatives column
        valid_rows, with_negatives = valid.count(), 0
    else:
        totals = valid.map_batches(negative_counts, batch_format="pyarrow").aggregate(Count(), Sum("has_negatives"))
        valid_rows, with_negatives = int(totals["count()"]), int(totals["sum(has_negatives)"] or 0)
    rejected = count_by(rejected_dir, "reason")
    input_rows = validated_input_rows(validated, pairs_path)  # from the input itself: the commit checks the counts against it
    read_seconds = time.perf_counter() - t0

    per_worker = train_cfg.batch_size // train_cfg.num_workers
    per_epoch = steps_per_epoch(valid_rows, train_cfg.num_workers, per_worker)
    if per_epoch == 0:
        raise ValueError(
            f"{pairs_path}: {valid_rows} valid pairs make no full batch of train.batch_size={train_cfg.batch_size} "
            f"over train.num_workers={train_cfg.num_workers}; use a smaller batch_size or more pairs"
        )
    total_steps = train_cfg.max_steps or train_cfg.epochs * per_epoch
    hard = train_cfg.hard_negatives if with_negatives or refreshing else 0
    if train_cfg.objective == "triplet" and not with_negatives and not refreshing:
        raise ValueError(f"train.objective=triplet trains on hard negatives only and {pairs_path} has no `negatives`: "
                         "mine them first (pairmill mine), set train.refresh_every, or use another train.objective")
    if train_cfg.hard_negatives and not with_negatives and not train_cfg.simcse:
        log.warning(f"train: {pairs_path} has no `negatives`; training on in-batch negatives only"
              + (" until the first refresh round" if refreshing else ""))
    if refreshing and train_cfg.refresh_every >= total_steps:
        log.warning(f"train: train.refresh_every={train_cfg.refresh_every} >= {total_steps} steps: no refresh round will run")
    task = load_task(eval_cfg.data, eval_cfg.corpus, read_kwargs(read)) if eval_cfg.data else None

    t0 = time.perf_counter()
    # (a tune trial, which reports to Tune through its callbacks, always runs Ray Train)
    finished = _finished_run(out_dir, run_name, total_steps) if not callbacks else None
    if finished is not None:  # a finished OUT rerun (e.g. for another train.wise_alpha): nothing to train
        result, previous = finished
        log.info(f"train: {final_dir} trained all {total_steps} steps already; exporting its last checkpoint again")
        returned = {"start_step": total_steps, "refresh": previous.get("refresh")}
    else:
        result = _fit(
            valid, validated, out_dir, sections, run_name=run_name, callbacks=callbacks,
            resources_per_worker=resources_per_worker, hooks=hooks, task=task, valid_rows=valid_rows,
            total_steps=total_steps, per_epoch=per_epoch, per_worker=per_worker, hard=hard, with_negatives=with_negatives,
            pairs_path=pairs_path)
        returned = result.return_value or {}
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    with result.checkpoint.as_directory() as folder:
        final_state = json.loads((Path(folder) / "state.json").read_text())
        export_checkpoint(folder, job.path("model"), encoder.model, train_cfg)
    export_seconds = time.perf_counter() - t0
    final_metrics = {k: v for k, v in (result.metrics or {}).items() if not is_missing(v) and not (k == "ndcg@10" and v == UNEVALUATED)}
    trained_metrics, eval_seconds = None, None
    if train_cfg.wise_alpha < 1 and task is not None:
        t0 = time.perf_counter()
        # the loop scored the trained weights; the exported model is their interpolation with the base model's
        from dataclasses import replace

        from pairmill.evaluate import evaluate_model

        exported = evaluate_model(replace(encoder, model=job.path("model")), eval_cfg, task)
        trained_metrics = {k: final_metrics[k] for k in exported if k in final_metrics}
        final_metrics = {**final_metrics, **exported}  # the last step's loss and rate stay
        log.info(f"train: held-out ndcg@10 {trained_metrics.get('ndcg@10', float('nan')):.4f} trained, "
                 f"{final_metrics['ndcg@10']:.4f} exported (train.wise_alpha={train_cfg.wise_alpha})")
        eval_seconds = time.perf_counter() - t0
    best = None
    if task is not None and result.best_checkpoints:
        checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: _score(cm[1]))
        # where the checkpoint will be once the staging folder is OUT
        path = storage.join(final_dir, posixpath.relpath(checkpoint.path, storage.split(out_dir)[1]))
        best = {"step": metrics.get("step"), "ndcg@10": metrics.get("ndcg@10"), "path": path}
    storage.remove(storage.join(out_dir, "work"))
    job.stage(read_stage, input_rows, valid_rows, read_seconds)
    job.stage("train", valid_rows, final_state["pairs"], train_seconds)
    job.stage("export", 1, 1, export_seconds)
    if eval_seconds is not None:  # the exported (interpolated) model scored on eval.data
        job.stage("evaluate_export", 1, 1, eval_seconds)
    stats = {
        "input_rows": input_rows,
        "kept": valid_rows,
        "dropped": {},
        "rejected": rejected,
        "unique_ids": True,
        "train": {
            "steps": final_state["step"],
            "epochs_started": final_state["epoch"] + (final_state["step_in_epoch"] > 0),
            "pairs_trained": final_state["pairs"],  # pair-steps, repeats across epochs counted
            "pairs_unused_per_epoch": valid_rows - per_epoch * train_cfg.batch_size,  # equal split + drop_last
            "pairs_with_negatives": with_negatives,
            "hard_negatives_per_pair": hard,
            "steps_per_epoch": per_epoch,
            "resumed_from_step": returned.get("start_step"),
            # a finished run's rerun trained nothing: the rate of the run that trained
            "pairs_per_s": previous["train"]["pairs_per_s"] if finished else round(final_state["pairs"] / max(train_seconds, 1e-9), 2),
            "wise_alpha": train_cfg.wise_alpha,  # the exported weights: base + wise_alpha * (trained - base)
        },
        "refresh": returned.get("refresh"),
        "final_metrics": final_metrics,  # the exported model's
        **({"trained_metrics": trained_metrics} if trained_metrics is not None else {}),
        "best_checkpoint": best,
        "base_model": resolve_model(encoder.model),
        "lora": lora_settings(train_cfg),
        "exported_merged": bool(lora_settings(train_cfg) is None or train_cfg.lora_merge),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return job.commit(stats)


def _fit(valid, validated: str, out_dir: str, sections: dict, *, run_name: str, callbacks: list | None,
         resources_per_worker: dict | None, hooks: TestHooks | None, task, valid_rows: int, total_steps: int,
         per_epoch: int, per_worker: int, hard: int, with_negatives: int, pairs_path: str):
    """Ray Train's run of ``train_loop_per_worker`` over the valid rows (a new run, or the one whose
    checkpoints are under ``out_dir/checkpoints/run_name``, resumed); returns its ``Result``."""
    import ray as ray_lib
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pairmill.encoder import resolve_model
    from pairmill.log import level as log_level

    encoder, train_cfg, eval_cfg, ray = (sections[s] for s in ("encoder", "train", "eval", "ray"))
    mine_cfg, refreshing = sections.get("mine"), train_cfg.refresh_every > 0
    use_gpu = train_cfg.use_gpu if train_cfg.use_gpu is not None else bool(ray_lib.cluster_resources().get("GPU"))
    store = NegativeStore.create(max(1, math.ceil(valid_rows / PAIRS_PER_STORE_SHARD))) if refreshing else None
    metrics_fs, metrics_path = storage.split(storage.join(out_dir, "metrics.jsonl"))  # fs None: local
    loop = LoopConfig(
        model=resolve_model(encoder.model), lora=lora_settings(train_cfg),
        query_prefix=encoder.query_prefix, passage_prefix=encoder.passage_prefix,
        query_max_length=train_cfg.query_max_length, passage_max_length=train_cfg.passage_max_length,
        **{k: getattr(train_cfg, k) for k in ("lr", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm", "temperature",
                                              "symmetric", "objective", "tau_plus", "group_by", "triplet_margin", "queue_size", "simcse",
                                              "mini_batch_size", "length_group_overhead", "seed")},
        total_steps=total_steps, steps_per_epoch=per_epoch, per_worker_batch=per_worker, global_batch=train_cfg.batch_size,
        shuffle_buffer=max(1024, 8 * per_worker), hard_negatives=hard,
        metrics_path=metrics_path, metrics_filesystem=metrics_fs, checkpoint_every=train_cfg.checkpoint_every,
        eval_every=train_cfg.eval_every, log_every=train_cfg.log_every, log_level=log_level(),
        eval_max_length=encoder.max_length, eval_query_batch=eval_cfg.query_batch,
        eval_uniformity_sample=eval_cfg.uniformity_sample, eval_task=ray_lib.put(task) if task is not None else None,
        refresh=refresh_settings(pairs_path, valid, out_dir, store, encoder, train_cfg, mine_cfg, ray.actors,
                                 train_gpus=train_cfg.num_workers if use_gpu else 0) if refreshing else None,
        collapse_texts=() if task is not None else _first_passages(validated, train_cfg.collapse_sample, train_cfg.simcse),
        collapse_sample=train_cfg.collapse_sample, collapse_cosine=train_cfg.collapse_cosine,
        hooks=hooks or TestHooks(),
    )
    checkpoints_fs, checkpoints_path = storage.split(storage.join(out_dir, "checkpoints"))
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker every epoch (see the data-position rule)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker,
                                     placement_strategy=train_cfg.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            callbacks=callbacks,
            storage_path=checkpoints_path, storage_filesystem=checkpoints_fs,  # a bucket's: Ray Train writes there itself
            # Ray Train's own INFO lines (worker group start-up, placement) only with pairmill's -v
            logging_config=LoggingConfig(log_level="INFO" if log_level() <= logging.DEBUG else "WARNING"),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,  # the best and the latest
                checkpoint_score_attribute="ndcg@10" if task is not None else None,
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": valid},
        dataset_config=DataConfig(execution_options=ingest),
    )
    log.info(f"train: {valid_rows} pairs ({with_negatives} with negatives, {hard} used per pair), "
          f"{train_cfg.num_workers} worker(s) x {per_worker}, {per_epoch} steps/epoch, {total_steps} steps, "
          f"{'GPU' if use_gpu else 'CPU'}")
    try:
        return trainer.fit()
    finally:
        if store is not None:
            store.close()


def validate_input(pairs_path: str, folder: str, train_cfg, read) -> str:
    """PAIRS (texts under ``train.simcse``) read and validated once into ``folder``
    (``pairmill.groups.write_validated``: every row, a ``reason`` on each reject), in a random order of
    ``train.seed`` under ``train.shuffle=global``, and PAIRS' own row count (``count_input_rows``, what
    the commit checks the counts against) in its ``_DONE``. A folder a run finished writing is kept:
    a resumed run reads the rows, in the order, the first one did."""
    from pairmill.config import read_kwargs
    from pairmill.groups import write_validated
    from pairmill.read import count_input_rows

    if not storage.exists(storage.join(folder, "_DONE")):
        storage.remove(folder)
        write_validated(pairs_path, folder, "text" if train_cfg.simcse else "pairs",
                        shuffle_seed=train_cfg.seed if train_cfg.shuffle == "global" else None, **read_kwargs(read))
        storage.write_text(storage.join(folder, "_DONE"), json.dumps({"input_rows": count_input_rows(pairs_path)}))
    return folder


def validated_input_rows(folder: str, pairs_path: str) -> int:
    """PAIRS' row count as ``validate_input`` recorded it (one pass over a line file however many jobs
    and trials read the folder); counted again for a folder whose ``_DONE`` holds none."""
    from pairmill.read import count_input_rows

    done = storage.read_text(storage.join(folder, "_DONE"))
    return json.loads(done)["input_rows"] if done.strip() else count_input_rows(pairs_path)


def _finished_run(out_dir: str, run_name: str, total_steps: int):
    """(Ray Train's ``Result``, the last commit's stats) when this job folder holds a run of these
    settings that trained all ``total_steps`` and committed (a finished OUT rerun, e.g. for another
    ``train.wise_alpha``): its checkpoints' result read back (``Result.from_path``) instead of starting
    Ray Train's controller and workers to find nothing to train. None otherwise."""
    from ray.train import Result

    stats_path = storage.join(out_dir, "stats.json")  # written by the commit only
    if not storage.exists(stats_path):
        return None
    previous = json.loads(storage.read_text(stats_path))
    if previous.get("train", {}).get("steps") != total_steps:
        return None
    fs, path = storage.split(storage.join(out_dir, "checkpoints", run_name))
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run folder or no checkpoint snapshot in it
        return None
    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, "state.json")) as f:
        step = json.loads(f.read())["step"]
    return (result, previous) if step == total_steps else None


def _has_checkpoints(folder: str) -> bool:
    """A Ray Train run folder (local or on a bucket) with a checkpoint in it."""
    if storage.is_remote(folder):
        return any("/step_" in uri[len(folder):] for uri, _ in storage.list_files(folder))
    return any(Path(folder).glob("step_*"))


def export_checkpoint(checkpoint_dir: str, model_dir: str, model: str | None, train_cfg) -> None:
    """The sentence-transformers folder of a checkpoint into ``model_dir``; for a bucket, built in a
    local temporary folder and uploaded (a model is written by libraries that want a local path)."""
    with storage.staged(model_dir) as local:
        export_model(checkpoint_dir, local, model=model, lora=lora_settings(train_cfg), merge=train_cfg.lora_merge,
                     wise_alpha=train_cfg.wise_alpha)


def _first_passages(validated: str, n: int, texts: bool) -> tuple[str, ...]:
    """The collapse alarm's fixed sample without an eval set: the first ``n`` valid training passages
    (texts under train.simcse) of the validated folder, the same on a resumed run."""
    if n == 0:
        return ()
    import pyarrow.dataset as pads

    column = "text" if texts else "passage"
    fs, path = storage.split(validated)
    rows = pads.dataset(path, format="parquet", filesystem=fs).head(n, columns=[column], filter=pads.field("reason").is_null())
    return tuple(rows.column(column).to_pylist())


def _score(metrics: dict) -> float:
    value = metrics.get("ndcg@10")
    return float("-inf") if is_missing(value) or value == UNEVALUATED else value


def format_summary(stats: dict, out: str) -> str:
    from pairmill.output import format_summary as job_summary

    t = stats["train"]
    lines = [
        job_summary(stats, out),
        f"    trained             {t['steps']} steps, {t['pairs_trained']} pairs, {t['pairs_per_s']} pairs/s "
        f"(resumed from step {t['resumed_from_step']})",
    ]
    m = stats["final_metrics"]
    if "ndcg@10" in m:
        lines.append(f"    held-out            ndcg@10 {m['ndcg@10']:.4f}  recall@10 {m['recall@10']:.4f}  mrr@10 {m['mrr@10']:.4f}")
    if stats.get("trained_metrics", {}).get("ndcg@10") is not None:
        lines.append(f"    before wise_alpha   ndcg@10 {stats['trained_metrics']['ndcg@10']:.4f} (the trained weights; the model "
                     f"is {t['wise_alpha']} of the way from the base model to them)")
    if stats["best_checkpoint"]:
        lines.append(f"    best checkpoint     step {stats['best_checkpoint']['step']} ndcg@10 {stats['best_checkpoint']['ndcg@10']:.4f}")
    lines.append(f"    model               {storage.join(out, 'model')}")
    return "\n".join(lines)


def main(args) -> int:
    """``pairmill train PAIRS -o OUT [--eval-data D] [--model M]``."""
    cfg = args.config_sections
    stats = train(args.input, args.output, encoder=cfg["encoder"], read=cfg["read"], train_cfg=cfg["train"],
                  eval_cfg=cfg["eval"], ray=cfg["ray"], mine_cfg=cfg["mine"])
    print(format_summary(stats, args.output))
    return 0
