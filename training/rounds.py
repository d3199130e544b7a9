"""ANCE refresh rounds during training (rank 0): when to start one, on what, and what they did.
The rounds themselves run in ``mining.refresh``."""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairmill import storage

# A refresh round runs beside the Train workers: its encoder actors and index shards take a fraction
# of a CPU each so they never hold the slots the workers' data ingest needs (RAY_NOTES: deadlock).
REFRESH_ACTOR_CPUS = 0.5
REFRESH_SHARD_CPUS = 0.25


log = logging.getLogger(__name__)


def worker_logging(level: int) -> None:
    """A Train worker's log lines, shown once on the driver. Ray Train V2 patches ``print`` in its
    workers to send a line both to the worker's stdout and to a logger with a console handler, so
    every ``print`` there reached the driver twice (Ray 2.60); a handler on the process's own
    stdout skips the patch (Ray's log monitor still forwards it)."""
    from pairmill.log import configure

    configure(level, sys.__stdout__ or sys.stdout)


@dataclass(frozen=True)
class RefreshSettings:
    """What rank 0 needs to run refresh rounds (built on the driver by ``refresh_settings``)."""

    every: int  # train.refresh_every
    slices: int  # train.refresh_slices: a round re-mines 1/slices of the pairs, in rotation
    folder: str  # OUT/refresh: one step-N folder per round (its model, index and negatives); a URI for a bucket OUT
    store: Any  # mining.refresh.NegativeStore: pair id -> the newest negatives
    pairs: str  # validated pairs (a parquet folder or prefix) the rounds re-mine
    index_folder: str | None  # a mine job's index (its *.texts.parquet) to re-encode, else the pairs' own passages
    encoder_kwargs: dict
    mine_cfg: Any  # MineConfig: the selection rules
    pool: Any  # pairmill.cluster.PoolSize of the encoder actors
    filesystems: dict = field(default_factory=dict)  # pairmill.storage.carried: the buckets of folder and pairs


class RefreshRounds:
    """Rank 0's bookkeeping of ANCE refresh rounds (``mining.refresh``). Every ``every`` steps it
    saves the live model and starts a round as a Ray task; it never waits for one: at most one
    round is in flight, a due round finds the previous one still running is skipped (counted),
    and a finished round is noticed by a zero-timeout ``ray.wait`` at the next step. Its counters
    travel in the checkpoint's state.json, so a resumed run continues the slice rotation.

    With OUT on object storage every round's folder is on the bucket too (the round's encoder actors
    and shards may run on any node): the live model is saved locally and uploaded, and each node's
    encoders fetch it once into their model cache (``pairmill.output.local_model``)."""

    def __init__(self, cfg: RefreshSettings, save_model):
        self.cfg = cfg
        self.folder = cfg.folder
        storage.adopt(cfg.filesystems)  # rank 0 writes the rounds' models and records there
        self.save_model = save_model  # folder -> the live model saved there as a ST folder
        self.inflight: dict | None = None  # {"ref", "step", "t0", "save_seconds"}
        self.started = self.skipped = self.late_skipped = 0
        self.finished: list[dict] = []
        self.staleness_sum = self.staleness_rows = self.refreshed_used = 0.0
        self.step_seconds = self.steps_timed = 0.0
        self.cancelled: dict | None = None

    def state(self) -> dict:
        keys = ("started", "skipped", "late_skipped", "finished", "staleness_sum", "staleness_rows", "refreshed_used",
                "step_seconds", "steps_timed")
        return {k: getattr(self, k) for k in keys}

    def restore(self, state: dict | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.every == 0 and not last  # a round started at the end could never be used

    def start(self, step: int, total: int) -> None:
        from mining.refresh import start_refresh

        if self.inflight is not None:  # one round at a time: this one is skipped, training goes on
            self.skipped += 1
            self.inflight["skipped"] += 1
            return
        if self.finished and step + self.finished[-1]["steps_trained_meanwhile"] >= total:
            # the last round took that many steps: this one would land after the last step and its
            # negatives could never be used, while it slows every step left (measured on 2 CPUs: 6 s
            # -> 10 s a step while a round ran)
            self.skipped += 1
            self.late_skipped += 1
            log.info(f"train: refresh round due at step {step} skipped: the last one took "
                 f"{self.finished[-1]['steps_trained_meanwhile']} steps, so it would land after step {total}")
            return
        t0 = time.perf_counter()
        out = storage.join(self.folder, f"step-{step}")
        model = self._save_model(storage.join(out, "model"))
        save_seconds = time.perf_counter() - t0
        slices = self.cfg.slices
        mine_cfg = curriculum(self.cfg.mine_cfg, step, total)
        ref = start_refresh(
            str(model), step, pairs=self.cfg.pairs, index_folder=self.cfg.index_folder, out=out,
            encoder_kwargs=self.cfg.encoder_kwargs, mine_cfg=mine_cfg,
            slice_=(self.started % slices, slices), store=self.cfg.store, pool=self.cfg.pool,
            filesystems=self.cfg.filesystems,
        )
        self.inflight = {"ref": ref, "step": step, "t0": time.perf_counter(), "save_seconds": save_seconds, "skipped": 0}
        self.started += 1
        log.info(f"train: refresh round {self.started} started at step {step} "
             f"(slice {(self.started - 1) % slices + 1}/{slices}, rank window [{mine_cfg.range_min}, {mine_cfg.range_max}); "
             f"model saved in {save_seconds:.1f}s)")

    def _save_model(self, folder: str) -> str:
        """The live model saved at ``folder``: written there, or for a bucket written locally and uploaded."""
        with storage.staged(folder) as local:
            self.save_model(local)
        return str(folder)

    def wait_if_older(self, step: int, steps: int) -> dict | None:
        """Test seam (``TestHooks.round_overlap_steps``): a round in flight for ``steps`` steps or
        more is waited for, then polled; training has stepped on beside it until then."""
        import ray

        if self.inflight is None or step - self.inflight["step"] < steps:
            return None
        ray.wait([self.inflight["ref"]], num_returns=1)
        return self.poll(step)

    def poll(self, step: int) -> dict | None:
        """The round's record when it finished since the last poll, else None. A failed round raises."""
        import ray

        if self.inflight is None or not ray.wait([self.inflight["ref"]], timeout=0)[0]:
            return None
        round_, self.inflight = self.inflight, None
        try:
            stats = ray.get(round_["ref"])
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"the negative refresh round started at step {round_['step']} failed: {e}") from e
        record = {**stats, "finished_by_step": step, "steps_trained_meanwhile": step - round_["step"],
                  "rounds_skipped_meanwhile": round_["skipped"], "wall_seconds": round(time.perf_counter() - round_["t0"], 3),
                  "save_seconds": round(round_["save_seconds"], 3)}
        self.finished.append(record)
        # whole, from the records the checkpoints carry (an object store cannot append)
        storage.write_text(storage.join(self.folder, "rounds.jsonl"), "".join(json.dumps(r) + "\n" for r in self.finished))
        for older in self.finished[:-1]:  # the newest finished round holds the live index; older ones are spent
            storage.remove(storage.join(self.folder, f"step-{older['step']}"))
        log.info(f"train: refresh round of step {record['step']} finished at step {step}: "
             f"{record['refreshed']} pairs re-mined in {record['seconds']:.1f}s ({record['rounds_skipped_meanwhile']} due "
             "round(s) skipped meanwhile)")
        return record

    def metrics(self) -> dict:
        out = {"refresh_rounds_started": self.started, "refresh_rounds_finished": len(self.finished),
               "refresh_rounds_skipped": self.skipped}
        if self.finished:
            last = self.finished[-1]
            out.update({"refresh_last_step": last["step"], "refresh_last_seconds": last["seconds"],
                        "refresh_last_pairs": last["refreshed"]})
        return out

    def close(self, step: int) -> None:
        """End of training: a round still running could never be used, so it is cancelled, not awaited."""
        import ray

        if self.inflight is None or self.poll(step) is not None:
            return
        ray.cancel(self.inflight["ref"], force=True)  # kills its worker; the round's actors go with it
        self.cancelled = {"step": self.inflight["step"], "action": "cancelled", "at_step": step}
        log.info(f"train: refresh round of step {self.inflight['step']} cancelled at the end of training")
        self.inflight = None

    def summary(self) -> dict:
        rounds = self.finished
        per_round = sum(r["seconds"] for r in rounds) / len(rounds) if rounds else None
        per_step = self.step_seconds / self.steps_timed if self.steps_timed else None
        return {
            "every": self.cfg.every,
            "slices": self.cfg.slices,
            "rounds_started": self.started,
            "rounds_finished": len(rounds),
            "rounds_skipped": self.skipped,
            "rounds_skipped_as_too_late": self.late_skipped,  # of rounds_skipped: would have landed after the last step
            "unfinished_at_end": self.cancelled,  # {"action": "cancelled", ...} or None
            "mean_staleness": round(self.staleness_sum / self.staleness_rows, 3) if self.staleness_rows else None,
            "refreshed_pairs_used": int(self.refreshed_used),
            "seconds_per_round": round(per_round, 3) if per_round is not None else None,
            "seconds_per_step": round(per_step, 4) if per_step is not None else None,
            "round_cost_in_steps": round(per_round / per_step, 1) if per_round and per_step else None,
            "model_save_seconds_per_round": round(sum(r["save_seconds"] for r in rounds) / len(rounds), 3) if rounds else None,
            "rounds": rounds,
        }


def curriculum(mine_cfg, step: int, total: int):
    """The mine section a round started at ``step`` of ``total`` mines with: the rank window moved
    from (range_min, range_max) towards (range_min_final, range_max_final) by ``step / total``
    (``mining.negatives.scheduled_window``); unchanged when neither final end is set."""
    import dataclasses

    from mining.negatives import scheduled_window

    if mine_cfg.range_min_final is None and mine_cfg.range_max_final is None:
        return mine_cfg
    start = (mine_cfg.range_min, mine_cfg.range_max)
    final = (mine_cfg.range_min if mine_cfg.range_min_final is None else mine_cfg.range_min_final,
             mine_cfg.range_max if mine_cfg.range_max_final is None else mine_cfg.range_max_final)
    low, high = scheduled_window(start, final, step / max(1, total))
    return dataclasses.replace(mine_cfg, range_min=low, range_max=high)


def refresh_settings(pairs_path, valid, out_dir: str | Path, store, encoder, train_cfg, mine_cfg, actors, train_gpus: int) -> RefreshSettings:
    """What a refresh round needs, sized to run beside the Train workers without taking the CPUs or
    GPUs they and the data ingest need (RAY_NOTES: small-machine deadlock)."""
    import dataclasses

    import ray

    from pairmill.cluster import PoolSize, one_node
    from pairmill.config import encoder_kwargs

    folder = storage.join(out_dir, "refresh")
    pairs, index_folder = _job_folders(str(pairs_path))
    if pairs is None:  # not a finished job folder: the validated rows, written once
        pairs = storage.join(folder, "pairs")
        storage.remove(pairs)
        fs, inner = storage.split(pairs)
        valid.write_parquet(inner, filesystem=fs)
    free_gpus = int(ray.cluster_resources().get("GPU", 0)) - train_gpus
    if free_gpus >= 1:
        pool = PoolSize(size=min(actors or 1, free_gpus), num_cpus=1, num_gpus=1)
    else:
        if train_gpus:
            log.warning("train: the Train workers hold every GPU; refresh rounds encode on CPU")
        pool = PoolSize(size=actors or 1, num_cpus=REFRESH_ACTOR_CPUS, num_gpus=0, tasks=one_node())
    if mine_cfg.shard_gpus:
        log.warning(f"train: mine.shard_gpus={mine_cfg.shard_gpus} has no effect on refresh rounds (CPU shards beside training)")
    return RefreshSettings(
        every=train_cfg.refresh_every,
        slices=train_cfg.refresh_slices,
        folder=str(folder),
        store=store,
        pairs=str(pairs),
        index_folder=index_folder,
        encoder_kwargs={**encoder_kwargs(encoder), **({} if pool.num_gpus else {"device": "cpu"})},
        mine_cfg=dataclasses.replace(mine_cfg, shard_cpus=min(mine_cfg.shard_cpus or REFRESH_SHARD_CPUS, REFRESH_SHARD_CPUS),
                                     shard_gpus=0.0),
        pool=pool,
        filesystems=storage.carried(folder, pairs_path),
    )


def _job_folders(pairs_path: str) -> tuple[str | None, str | None]:
    """(kept rows, index texts) of a finished job folder given as PAIRS, read where they are: its
    rows are validated already, with the same ids, and a mine job's index holds the corpus it
    searched. On object storage these are the attempt prefixes its ``_SUCCESS`` vouches for.
    (None, None) for any other input; an index folder is None without ``*.texts.parquet``."""
    from pairmill.output import finished_files, is_finished

    if not is_finished(pairs_path):
        return None, None
    if storage.is_remote(pairs_path):
        kept = finished_files(pairs_path, "kept")
        texts = [f for f in finished_files(pairs_path, "index") if f.endswith(".texts.parquet")]
        return (posixpath.dirname(kept[0]) if kept else None), (posixpath.dirname(texts[0]) if texts else None)
    source = Path(pairs_path)
    if not (source / "kept").is_dir():
        return None, None
    return str(source / "kept"), (str(source / "index") if any((source / "index").glob("*.texts.parquet")) else None)
