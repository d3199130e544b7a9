"""``pairmill tune PAIRS -o OUT``: Ray Tune over whole ``pairmill train`` runs.

Design note
-----------
What. Each trial is one ``training.train.train`` run (a ``TorchTrainer``, possibly several workers)
into ``OUT/trials/<trial_id>``. In Ray 2.60 Train V2 ``Tuner(TorchTrainer)`` raises, so the trial
is a Tune *function trainable* that calls ``train`` with its own run name, storage under OUT and
``TuneReportCallback``, which forwards every Train report (rank 0's metrics and the checkpoint path)
to Tune. The trainable itself holds 0.01 CPU (``tune.with_resources``); the Train workers hold the
real resources through their own placement group. PAIRS is read and validated once, before the
first trial (``OUT/work/validated``, removed at the end); every trial trains on those rows.

Search. The keys that vary and their ranges come from the ``tune`` section (``TuneConfig.space``);
random search or Optuna (TPE). The train section's own values are the first trial
(``points_to_evaluate``), so the best trial is never worse than the defaults on the tuning metric:
the default trial is one of the candidates. ASHA stops trials that trail at a rung (time = train
step), on the held-out metric each trial reports every ``train.eval_every`` steps; the trial
checkpoints at every evaluation, so every reported score has its weights on disk and no report
carries a NaN score (a NaN would let a trial pass a rung unjudged).

Resources. A trial holds ``train.num_workers x tune.cpus_per_worker`` CPUs (and a GPU per worker
with ``train.use_gpu``) plus one CPU's worth of room for its Ray Data ingest; trials at once are
sized from the cluster so every trial that is started can also get its workers (more would wait on
each other forever on a small machine). A local single-node Ray counts logical CPUs above the
cores (``init_ray``), so there trials are sized on the cores: 1 at a time on 2 cores.

Resume. Tune checkpoints its experiment state in ``OUT/tune``; rerunning the same command finds it
(``Tuner.can_restore``) and continues (``Tuner.restore``): finished trials are kept, an interrupted
trial restarts and its ``train`` run resumes from its own last checkpoint.

Object storage. With OUT on a bucket (``s3://...``) nothing is staged: Ray Tune keeps its
experiment state there itself (``RunConfig(storage_path, storage_filesystem)``, and the same
filesystem to ``can_restore``/``restore``), each trial is a ``train`` job folder on the bucket
committed by its own ``_SUCCESS`` manifest, and the tune job's manifest (``pairmill.output.
BucketJobFolder``) lists ``best_model/<attempt>/`` and the top-level files. ``tune/`` and
``trials/`` stay outside it: they are what a rerun resumes from, as a train job's checkpoints are.

Output. ``OUT/best_model`` (the best trial's best checkpoint, exported by ``training.train``),
``OUT/best_config.yaml`` (the settings that made it), ``OUT/results.csv`` (a row per trial),
``OUT/trials.png`` (the metric over steps per trial), ``OUT/stats.json`` and ``_SUCCESS`` last.
The best checkpoint is chosen on the held-out data, so its score there is optimistic: report a
separate test split.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

from pairmill import storage
from pairmill.pairs import is_missing

log = logging.getLogger(__name__)

TRIALS = "trials"  # OUT/trials/<trial_id>: one train job folder per trial
EXPERIMENT = "tune"  # OUT/tune: Ray Tune's experiment state (what a rerun restores)
SETTINGS = "tune_settings.json"
BUCKET_PARTS = ("best_model",)  # on object storage: under the attempt's prefix, listed by _SUCCESS
BUCKET_FILES = ("best_config.yaml", "results.csv", "trials.png")
DATA_CPUS = 1.0  # room each trial leaves for its Ray Data ingest (read + split feeding the workers)


def sample_overrides(config_path: str | None, pairs: str | None, overrides: list[str]) -> list[str]:
    """The overrides `pairmill tune` loads its config with: the sample profile first (the user's
    settings win) when there is no --config file and PAIRS is the bundled sample: the settings of
    ``pairmill/sample/tune.yaml``, sized so 4 trials finish in a few minutes on 2 CPUs."""
    from pairmill import sample

    if config_path is not None or (pairs and Path(pairs).expanduser().resolve() != sample.TRAIN.resolve()):
        return list(overrides)
    return sample.profile_first("tune", overrides)


def cli_overrides(args, overrides: list[str]) -> list[str]:
    """The CLI's hook (``pairmill.cli`` calls it before loading the config): ``sample_overrides``."""
    return sample_overrides(args.config, args.input, overrides)


class BadInput(ValueError):
    """What the user asked for cannot run; the message says what to change."""


class Interrupted(RuntimeError):
    """The experiment stopped before every trial ended (Ctrl-C, a lost driver): rerun to resume."""


# ----------------------------------------------------------------------------- search space


def search_space(space: dict[str, tuple[str, list]]) -> dict:
    """``TuneConfig.space()`` -> Ray Tune domains."""
    from ray import tune

    make = {"log": lambda v: tune.loguniform(v[0], v[1]), "uniform": lambda v: tune.uniform(v[0], v[1]),
            "choice": lambda v: tune.choice(v)}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def with_defaults(space: dict[str, tuple[str, list]], train_cfg) -> tuple[dict, dict]:
    """The space with the train section's value added to every choice list (the first trial must be
    a point of the space, or Optuna refuses it), and that first trial's config."""
    default = {key: getattr(train_cfg, key) for key in space}
    out = {}
    for key, (kind, values) in space.items():
        if kind == "choice" and default[key] not in values:
            log.warning(f"tune: tune.{key}={values} does not hold train.{key}={default[key]}, the first trial's "
                        "value: added to the choices")
            values = [default[key], *values]
        out[key] = (kind, values)
    return out, default


def trial_train_config(train_cfg, config: dict):
    """The train section with a trial's values (validated: TrainConfig checks them on construction)."""
    types = {f.name: f.type for f in dataclasses.fields(train_cfg)}
    values = {key: (int(v) if "int" in str(types[key]) else float(v)) for key, v in config.items()}
    return dataclasses.replace(train_cfg, **values)


def check_space(space: dict[str, tuple[str, list]], train_cfg) -> None:
    """Every choice and range bound must make a valid train config (e.g. a batch size that
    num_workers divides): fail before any trial starts, naming the value."""
    from pairmill.config import ConfigError

    for key, (_, values) in space.items():
        for value in values:
            try:
                trial_train_config(train_cfg, {key: value})
            except ConfigError as e:
                raise ConfigError(f"tune.{key} holds {value}, which train refuses: {e}") from None


# ----------------------------------------------------------------------------- resources


def trial_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What one trial's Train workers hold together."""
    return {"CPU": num_workers * cpus_per_worker, **({"GPU": float(num_workers)} if use_gpu else {})}


def max_concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float], cores: int | None = None) -> int:
    """Trials that can run at once: each needs its workers' resources plus ``DATA_CPUS`` for its
    ingest. ``cores`` (a local single-node Ray) caps the CPUs counted at the physical cores.
    Raises when not even one trial fits (it would wait forever)."""
    need_cpu = per_trial["CPU"] + DATA_CPUS
    logical = cluster.get("CPU", 0.0)
    if need_cpu > logical or per_trial.get("GPU", 0) > cluster.get("GPU", 0):
        raise BadInput(
            f"one trial needs {per_trial} for its Train workers plus {DATA_CPUS} CPU for its data, but the cluster "
            f"has {{CPU: {logical}, GPU: {cluster.get('GPU', 0)}}}: lower train.num_workers or tune.cpus_per_worker, "
            "or add nodes"
        )
    cpus = min(logical, cores) if cores else logical
    n = max(1, int(cpus // need_cpu))
    if per_trial.get("GPU"):
        n = min(n, int(cluster["GPU"] // per_trial["GPU"]))
    return n


# ----------------------------------------------------------------------------- the trial


def run_trial(config: dict, *, pairs: str, validated: str, out: str, sections: dict, resources_per_worker: dict,
              log_level: int, filesystems: dict | None = None) -> None:
    """The Tune function trainable: one train run with this trial's values, on the rows the tune
    job validated once for every trial (``validated``). Its reports reach Tune
    through ``TuneReportCallback`` (``tune.report`` is not called here: Train's workers report);
    its lines show at ``log_level``, the driver's (``pairmill.log.level()``). ``filesystems``: the
    driver's for the URIs among its paths (``pairmill.storage.carried``)."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    # The callback is made here, in the Tune session it reports to (through a queue actor); the train
    # run itself runs as a task outside the trial's placement group, which would otherwise capture
    # train's Ray Data tasks (and refuse them: the group holds 0.01 CPU). The task is owned by this
    # trial, so a trial that Tune stops takes its train run (and its Train workers) with it.
    run = ray.remote(_logged_train).options(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)
    ray.get(run.remote(
        log_level, filesystems, pairs, storage.join(out, TRIALS, trial_id),
        encoder=sections["encoder"], read=sections["read"], train_cfg=trial_train_config(sections["train"], config),
        eval_cfg=sections["eval"], ray=sections["ray"], mine_cfg=sections["mine"],
        run_name=f"train-{trial_id}", callbacks=[TuneReportCallback()], resources_per_worker=resources_per_worker,
        in_place=True,  # the trial folder is inside the tune job's staging folder (on a bucket: its own manifest)
        validated=validated,
    ))


def _logged_train(log_level: int, filesystems: dict | None, *args, **kwargs) -> dict:
    """``training.train.train`` in a Ray task, whose process has no log handler of its own: its
    lines (and its Train workers', which take this level) show at the driver's level."""
    from pairmill.log import configure
    from training.train import train

    configure(log_level)
    storage.adopt(filesystems)
    return train(*args, **kwargs)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class TrialRecord:
    trial_id: str
    config: dict
    status: str  # finished | stopped early | error | not finished
    history: list[dict]  # [{"step", metric, "checkpoint_path"}] in report order
    error: str = ""

    def best(self, metric: str) -> dict | None:
        """The report with the highest metric (the earliest of equals)."""
        scored = [h for h in self.history if not is_missing(h.get(metric))]
        return max(scored, key=lambda h: h[metric]) if scored else None


def trial_records(grid, out: str | Path, metric: str, max_steps: int | None = None) -> list[TrialRecord]:
    """One record per trial of a ``ResultGrid``, in the order Tune made them (the default trial first:
    ``_creation_order``). A trial
    is finished when its train run committed (``_SUCCESS``), or reported ``max_steps`` (ASHA may stop a
    trial at its last report, while it exports its own model). Checkpoint paths are URIs for a bucket OUT."""
    from pairmill.output import is_finished

    records, order = [], {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        order[trial_id] = _creation_order(result, trial_id)
        frame = result.metrics_dataframe
        history = []
        if frame is not None and metric in frame.columns:
            for row in frame.to_dict("records"):
                if not is_missing(row.get("step")):
                    path = row.get("checkpoint_path")
                    history.append({"step": int(row["step"]), metric: row[metric],
                                    "checkpoint_path": storage.uri_of(out, path) if isinstance(path, str) else None})
        if result.error is not None:
            status = "error"
        elif is_finished(storage.join(out, TRIALS, trial_id)) or (max_steps and history and history[-1]["step"] >= max_steps):
            status = "finished"
        elif history:
            status = "stopped early"
        else:
            status = "not finished"
        error = f"{type(result.error).__name__}: {result.error}".splitlines()[0][:300] if result.error else ""
        records.append(TrialRecord(trial_id, dict(result.config or {}), status, history, error))
    return sorted(records, key=lambda r: (order[r.trial_id], r.trial_id))


def _creation_order(result, trial_id: str) -> float:
    """The trial's number in creation order: the counter that starts Tune's ``experiment_tag``
    (``3_lr=0.5``), in its results and in its folder's name (``train_<trial_id>_<tag>_<date>``). Trial
    ids are no order: a searcher's (optuna's) are random hex, only the default variant generator's count up."""
    tag = str((result.metrics or {}).get("experiment_tag") or "")
    if not tag:
        name = Path(result.path or "").name
        tag = name.split(f"{trial_id}_", 1)[1] if f"{trial_id}_" in name else ""
    match = re.match(r"(\d+)(_|$)", tag)
    return int(match.group(1)) if match else float("inf")


def _trial_id_from_path(path: str | None) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path or "").name)
    return match.group(1) if match else Path(path or "unknown").name


def write_results_csv(records: list[TrialRecord], keys: list[str], metric: str, path: Path) -> None:
    columns = ["trial_id", "default", "status", *keys, metric, "best_step", f"last_{metric}", "steps", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for i, r in enumerate(records):
            best = r.best(metric)
            writer.writerow({
                "trial_id": r.trial_id, "default": i == 0, "status": r.status,
                **{k: r.config.get(k) for k in keys},
                metric: best[metric] if best else "", "best_step": best["step"] if best else "",
                f"last_{metric}": r.history[-1][metric] if r.history else "",
                "steps": r.history[-1]["step"] if r.history else 0, "error": r.error,
            })


def plot_trials(records: list[TrialRecord], metric: str, path: Path) -> None:
    """The metric over steps, one line per trial; a trial ASHA stopped ends in an x."""
    from pairmill.plot import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(records):
        points = [(h["step"], h[metric]) for h in r.history if not is_missing(h.get(metric))]
        if not points:
            continue
        steps, values = zip(*points)
        label = f"{r.trial_id}{' (default)' if i == 0 else ''}: {r.status}"
        (line,) = ax.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if i == 0 else 1.5, label=label)
        if r.status == "stopped early":
            ax.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    ax.set_xlabel("train step")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("pairmill tune: trials (x = stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the job


def count_validated(validated: str) -> tuple[int, dict[str, int]]:
    """(valid rows, {reject reason: rows}) of a folder of validated rows (``training.train.validate_input``)."""
    import ray

    fs, path = storage.split(validated)
    rows = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).select_columns(["reason"]).map_batches(
        _reason_counts, batch_format="pyarrow").take_all()
    valid, rejected = 0, {}
    for row in rows:
        if row["reason"] is None:
            valid += row["n"]
        else:
            rejected[row["reason"]] = rejected.get(row["reason"], 0) + row["n"]
    return valid, dict(sorted(rejected.items()))


def _reason_counts(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = pc.value_counts(batch.column("reason"))  # struct<values, counts>; null = a valid row
    return pa.table({"reason": counts.field("values"), "n": counts.field("counts")})


def _absolute(path: str | None) -> str | None:
    """Trials run with the trial folder as working directory: local paths must be absolute."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def _open_job(out: str | Path, settings: dict):
    """The tune job's folder (``pairmill.output.open_resumable``, staged in ``.OUT.partial``; on a
    bucket, OUT itself): an interrupted run's trials are resumed; a finished OUT rerun with the same
    settings is restored (its finished trials kept, so nothing trains again); other settings are
    refused, untouched."""
    from pairmill.output import OtherSettings, open_resumable

    try:
        return open_resumable(out, settings, settings_file=SETTINGS, what="tuning run", parts=BUCKET_PARTS,
                              files=BUCKET_FILES, has_work=lambda folder: storage.exists(storage.join(folder, EXPERIMENT)))
    except OtherSettings as e:
        raise BadInput(str(e)) from None


def tune_runs(pairs: str, out: str, *, sections: dict, callbacks: list | None = None) -> dict:
    """Run the tune job; returns the stats written to ``OUT/stats.json``. ``sections`` are the
    config sections (tune, encoder, read, train, eval, mine, ray); ``callbacks`` go to Tune's RunConfig."""
    import ray
    import yaml
    from ray import tune
    from ray.train import Checkpoint
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from pairmill.cluster import init_ray
    from pairmill.config import config_to_dict
    from pairmill.log import level as log_level
    from training.train import export_checkpoint, validate_input, validated_input_rows

    started = time.perf_counter()
    tune_cfg, train_cfg, eval_cfg = sections["tune"], sections["train"], sections["eval"]
    metric = tune_cfg.metric
    if not eval_cfg.data:
        raise BadInput("trials are ranked on held-out data: pass --eval-data FILE (eval.data), pairs or a "
                         "BEIR folder kept apart from PAIRS")
    if tune_cfg.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise BadInput("tune.search=optuna needs optuna, which is not installed: pip install 'pairmill[tune]' "
                         "(or pip install optuna), or use tune.search=random")
    space, default = with_defaults(tune_cfg.space(), train_cfg)
    if not space:
        keys = ", ".join(f"tune.{key}" for key in tune_cfg.search_keys())
        raise BadInput(f"nothing to tune: every search-space key ({keys}) is empty; give at least one a range or choices")
    # Every trial evaluates every eval_every steps (ASHA's signal) and checkpoints there (the best
    # report's weights are then on disk, and no report carries a NaN score).
    eval_every = train_cfg.eval_every or tune_cfg.grace_period
    train_cfg = dataclasses.replace(train_cfg, eval_every=eval_every, checkpoint_every=eval_every)
    check_space(space, train_cfg)
    sections = {**sections, "train": train_cfg,
                "encoder": dataclasses.replace(sections["encoder"], model=_absolute(sections["encoder"].model)),
                "eval": dataclasses.replace(eval_cfg, data=_absolute(eval_cfg.data), corpus=_absolute(eval_cfg.corpus))}
    pairs = pairs if storage.is_remote(pairs) else str(Path(pairs).expanduser().resolve())
    if not storage.exists(pairs):
        raise BadInput(f"{pairs}: no such file or folder (PAIRS: JSONL(.gz), Parquet, an HF dataset or a job folder)")

    init_ray(sections["ray"].address, sections["ray"].num_cpus)
    final_dir = out.rstrip("/") if storage.is_remote(out) else Path(out).expanduser().resolve()
    job = _open_job(final_dir, {"input": pairs, "sections": config_to_dict({k: v for k, v in sections.items() if k != "ray"})})
    out_dir = job.staging  # everything is written here; commit renames it to OUT (a bucket: OUT itself)
    experiment = storage.join(out_dir, EXPERIMENT)
    fs, experiment_path = storage.split(experiment)  # fs None: local; else Tune writes to the bucket itself
    restorable = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)

    use_gpu = train_cfg.use_gpu if train_cfg.use_gpu is not None else bool(ray.cluster_resources().get("GPU"))
    per_trial = trial_resources(train_cfg.num_workers, tune_cfg.cpus_per_worker, use_gpu)
    single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
    fits = max_concurrent_trials(ray.cluster_resources(), per_trial, cores=os.cpu_count() if single_node else None)
    if tune_cfg.max_concurrent and tune_cfg.max_concurrent > fits:
        raise BadInput(f"tune.max_concurrent={tune_cfg.max_concurrent}, but the cluster fits {fits} trial(s) of "
                         f"{per_trial} + {DATA_CPUS} CPU at once; use <= {fits}, or leave it empty")
    concurrent = tune_cfg.max_concurrent or fits

    # PAIRS validated once for every trial (each would otherwise read, check and shuffle it again:
    # a 16-trial sweep 16 times); their settings can differ only in tune's search keys, none of which
    # changes the validated rows or their order
    t0 = time.perf_counter()
    validated = validate_input(pairs, storage.join(out_dir, "work", "validated"), train_cfg, sections["read"])
    valid_rows, rejected = count_validated(validated)
    read_seconds = time.perf_counter() - t0

    resources_per_worker = {"CPU": tune_cfg.cpus_per_worker}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, pairs=pairs, validated=validated, out=str(out_dir), sections=sections,
                             resources_per_worker=resources_per_worker, log_level=log_level(),
                             filesystems=storage.carried(out_dir, pairs, *(p for p in (
                                 sections["eval"].data, sections["eval"].corpus, sections["encoder"].model) if p))),
        {"CPU": 0.01},  # the trial function only waits on its train run ({"CPU": 0} is refused)
    )
    if restorable:
        log.info(f"tune: resuming the interrupted tuning run in {experiment} (finished trials are kept)")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, param_space=search_space(space), storage_filesystem=fs)
    else:
        if tune_cfg.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg, limit = OptunaSearch(points_to_evaluate=[default], seed=tune_cfg.seed), concurrent
        else:  # a SearchGenerator: Tune ignores max_concurrent_trials for it, it takes its own limit
            search_alg, limit = BasicVariantGenerator(
                points_to_evaluate=[default], random_state=tune_cfg.seed, max_concurrent=concurrent), None
        scheduler = FIFOScheduler() if tune_cfg.scheduler == "none" else ASHAScheduler(
            time_attr="step", grace_period=tune_cfg.grace_period, reduction_factor=tune_cfg.reduction_factor,
            # above any trial's length, so the max_t rule never cuts a trial's end (a rung falling on the last
            # step still may: such a trial reported every step and counts as finished)
            max_t=(train_cfg.max_steps + 1) if train_cfg.max_steps else 2**31,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(space),
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=tune_cfg.num_samples,
                                        search_alg=search_alg, scheduler=scheduler, max_concurrent_trials=limit),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage.split(out_dir)[1], storage_filesystem=fs,
                                      callbacks=callbacks),
        )
    log.info(f"tune: {tune_cfg.num_samples} trial(s) ({tune_cfg.search} search, {tune_cfg.scheduler}), "
             f"{concurrent} at a time, each {per_trial}; varying "
             f"{', '.join(f'{k} {kind} {v}' for k, (kind, v) in space.items())}; trial 1 = the train section's values "
             f"{default}; {metric} on {eval_cfg.data} every {eval_every} steps")
    t0 = time.perf_counter()
    grid = tuner.fit()
    tune_seconds = time.perf_counter() - t0

    records = trial_records(grid, out_dir, metric, train_cfg.max_steps)
    keys = list(space)
    with storage.staged(out_dir, upload_on_error=True) as made:
        write_results_csv(records, keys, metric, made / "results.csv")
        plot_trials(records, metric, made / "trials.png")
    # Ctrl-C marks a running trial TERMINATED too: one that never reported nor failed did not end
    ended = grid.num_terminated + grid.num_errors - sum(r.status == "not finished" for r in records)
    if ended < len(grid) or len(records) < tune_cfg.num_samples:
        raise Interrupted(f"the tuning run was interrupted ({ended} of {tune_cfg.num_samples} trial(s) ended); "
                          f"rerun the same command to resume it from {experiment}")
    candidates = [(r, r.best(metric)) for r in records if r.best(metric) is not None]
    if not candidates:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in records if r.error)
        raise RuntimeError(f"no trial reported {metric} (see {storage.join(out_dir, 'results.csv')}): {errors}")
    best_record, best = max(candidates, key=lambda c: c[1][metric])  # the earliest trial wins ties: the defaults

    t0 = time.perf_counter()
    checkpoint = best.get("checkpoint_path")
    if not checkpoint or not storage.exists(checkpoint):  # only kept checkpoints can be exported
        kept = [h for h in best_record.history if h.get("checkpoint_path") and storage.exists(h["checkpoint_path"])]
        if not kept:
            raise RuntimeError(f"trial {best_record.trial_id} has no checkpoint left under {storage.join(out_dir, TRIALS)}")
        best = max(kept, key=lambda h: h[metric])
        checkpoint = best["checkpoint_path"]
    best_train = trial_train_config(train_cfg, {k: best_record.config[k] for k in keys})
    checkpoint_fs, checkpoint_path = storage.split(checkpoint)
    with Checkpoint(checkpoint_path, filesystem=checkpoint_fs).as_directory() as folder:  # a bucket's: fetched by Ray
        export_checkpoint(folder, job.path("best_model"), sections["encoder"].model, best_train)
    best_sections = {k: v for k, v in sections.items() if k not in ("tune", "mine", "ray")}
    with storage.staged(out_dir, upload_on_error=True) as made:
        (made / "best_config.yaml").write_text(yaml.safe_dump(
            json.loads(json.dumps(config_to_dict({**best_sections, "train": best_train}))), sort_keys=False))
    export_seconds = time.perf_counter() - t0

    input_rows = validated_input_rows(validated, pairs)  # from the input itself: the commit checks the counts against it
    storage.remove(storage.join(out_dir, "work"))
    default_best = records[0].best(metric)
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "stopped early", "error")}
    job.stage("read+validate", input_rows, valid_rows, read_seconds)
    job.stage("tune", valid_rows, valid_rows, tune_seconds)
    job.stage("export", 1, 1, export_seconds)
    best_checkpoint = checkpoint  # on a bucket OUT is written in place; a local one is renamed from staging
    if not storage.is_remote(checkpoint) and Path(checkpoint).is_relative_to(out_dir):
        best_checkpoint = str(final_dir / Path(checkpoint).relative_to(out_dir))
    stats = {
        "input_rows": input_rows,
        "kept": valid_rows,
        "dropped": {},
        "rejected": rejected,
        "tune": {
            "metric": metric,
            "trials": len(records),
            **{k.replace(" ", "_"): v for k, v in counts.items()},
            "resumed": restorable,
            "max_concurrent": concurrent,
            "per_trial_resources": per_trial,
            "space": {k: {"kind": kind, "values": v} for k, (kind, v) in space.items()},
            "eval_every": eval_every,
            "best": {"trial_id": best_record.trial_id, "config": {k: best_record.config[k] for k in keys},
                     metric: best[metric], "step": best["step"], "checkpoint": best_checkpoint},
            "default": {"trial_id": records[0].trial_id, "config": default, "status": records[0].status,
                        metric: default_best[metric] if default_best else None,
                        "step": default_best["step"] if default_best else None},
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    return job.commit(stats)


def format_summary(stats: dict, out: str) -> str:
    from pairmill.output import format_summary as job_summary

    t = stats["tune"]
    metric, best, default = t["metric"], t["best"], t["default"]
    default_score = f"{default[metric]:.4f} (step {default['step']})" if default[metric] is not None else "none reported"
    return "\n".join([
        job_summary(stats, out),
        f"    trials              {t['trials']}: {t['finished']} finished, {t['stopped_early']} stopped early, "
        f"{t['error']} error(s){'; resumed' if t['resumed'] else ''}; {t['max_concurrent']} at a time",
        f"    default trial       {default['trial_id']} {metric} {default_score} {default['config']}",
        f"    best trial          {best['trial_id']} {metric} {best[metric]:.4f} (step {best['step']}) {best['config']}",
        f"    best model          {storage.join(out, 'best_model')}  (settings: {storage.join(out, 'best_config.yaml')})",
        f"    results             {storage.join(out, 'results.csv')}, {storage.join(out, 'trials.png')}",
    ])


def main(args) -> int:
    """``pairmill tune [PAIRS] -o OUT --num-samples N [--eval-data D]``."""
    import sys

    from pairmill import sample
    from pairmill.config import ConfigError

    cfg = dict(args.config_sections)
    pairs = args.input or str(sample.TRAIN)
    if not cfg["eval"].data and Path(pairs).expanduser().resolve() == sample.TRAIN.resolve():
        cfg["eval"] = dataclasses.replace(cfg["eval"], data=str(sample.HELDOUT))  # the sample's own held-out split
    try:
        stats = tune_runs(pairs, args.output, sections=cfg)
    except Interrupted as e:
        print(f"pairmill tune: {e}", file=sys.stderr)
        return 1
    except (BadInput, ConfigError) as e:
        print(f"pairmill tune: {e}", file=sys.stderr)
        return 2
    print(format_summary(stats, args.output))
    return 0

