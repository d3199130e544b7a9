"""Connecting to Ray and sizing work from the cluster's resources."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

# Memory allocators of Ray's worker processes. A worker that ran a task keeps its peak heap after
# the task (Arrow's default pool, mimalloc, and glibc's malloc keep freed memory for reuse), and Ray
# keeps idle workers: on 250k registry pairs (benchmarks/scale.py) idle workers held 1.1-1.7 GiB
# each and the filter job peaked at 7.95 GiB summed PSS. With Arrow on the system allocator and
# glibc returning allocations of 1 MiB and more to the OS when freed, it peaked at 3.99 GiB in the
# same time (252 s against 264 s); MIMALLOC_PURGE_DELAY=0 alone gave 5.48 GiB. The fixed mmap
# threshold costs torch ~16% CPU per encoded text (each activation is a fresh mapping), so
# processes that run a model raise it again (``model_malloc``). Set for a local Ray here; on a
# cluster, cluster.yaml's `ray start` commands set them. A value already in the environment wins.
#
# Ray Data's Parquet reader. Ray 2.60 reads Parquet through "datasource v2" by default, which starts
# a pool of 32 FooterReader actors (each a new worker process: ~1 CPU-s to start) for every read of
# a Parquet folder, only to read file footers; pairmill reads its own Parquet folders many times a
# job (the validated input, staged passes, the previous job's folder). The v1 reader reads footers
# in the driver, or in tasks on running workers for many files. Measured side by side on this
# 2-core machine: ten small reads 11.9 s (v2) / 6.1 s (v2, one footer actor) / 3.3 s (v1); a mine
# test plus the every-verb embed/filter/mine/eval test 95 / 70 / 61 s.
WORKER_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 20),
    "RAY_DATA_USE_DATASOURCE_V2": "0",
}
# Ray's worker pool on a local Ray. Ray keeps idle worker processes up to a soft limit (the node's
# CPU count) and kills the others after idle_worker_killing_time_threshold_ms, 1 s by default. A
# pairmill job runs many small Ray Data operators beside its actors, so after each operator its
# workers were killed and the next one started new processes, each importing Python, Ray and torch
# again (1-3 CPU-s each here): one small filter job (182 rows, tests/pipelines/test_filter.py) started
# 17 worker processes. Kept for 10 minutes, the next operator, stage or job reuses them. Measured on
# this 2-core machine, two filter jobs of 182 rows in one Ray: 50.8 s / 45.4 s by default, 22.6 s /
# 16.2 s with this. Idle workers hold what their imports took (~0.1-0.4 GiB each).
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}
# What else a local Ray's processes inherit. Ray Train starts a preemption watcher per worker group:
# one more actor process (~1-2 CPU-s to start here) that only logs drains of preemptible cloud nodes;
# a local Ray on one machine has none. Ray Train's controller polls its workers every 2 s and moves
# on (workers up, training done) only at a poll; on one machine with a few workers a poll every
# 0.25 s costs next to nothing. Measured on this 2-core machine, one-worker runs of 4 steps in one
# local Ray (benchmarks/train_poll.py): 16.4 s a run at 2 s, 14.0 s at 0.25 s, the same CPU time
# (20.2 and 20.0 CPU-s). Clusters, where a poll reaches every worker, keep Ray's defaults; the
# environment's own values win.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
MODEL_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)


def model_malloc() -> None:
    """In a process that runs a torch model: glibc's mmap threshold back at its dynamic ceiling, so
    activations reuse heap memory instead of mapping fresh pages per batch (see WORKER_ENV). Only
    where WORKER_ENV's threshold is in force; a no-op elsewhere and off glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != WORKER_ENV["MALLOC_MMAP_THRESHOLD_"]:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MODEL_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def parquet_reader() -> None:
    """This process's Ray Data reads Parquet with the reader WORKER_ENV names (or the environment's
    own RAY_DATA_USE_DATASOURCE_V2): Ray reads the variable once, when ray.data is first imported,
    which may be before init_ray sets it."""
    from ray.data import DataContext

    flag = os.environ.get("RAY_DATA_USE_DATASOURCE_V2", WORKER_ENV["RAY_DATA_USE_DATASOURCE_V2"])
    DataContext.get_current().use_datasource_v2 = flag.strip().lower() in ("1", "true")


# Ray Data's console. Its INFO lines (a plan and a summary per dataset and, when stdout is not a
# terminal, a progress dump every 10 s) drowned pairmill's own progress lines, so the "ray.data"
# logger keeps warnings and errors, on the console and in its log file: Ray's RAY_DATA_LOG_LEVEL,
# which a local Ray's workers inherit. When stdout is not a terminal, progress bars are off too
# (DataContext.enable_progress_bars, which the datasets carry to the workers that run them): a
# worker's bars, such as the training data feed's, reached the console as lines of tqdm output.
# A value already in the environment wins: RAY_DATA_LOG_LEVEL (DEBUG is Ray's default),
# RAY_DATA_DISABLE_PROGRESS_BARS (0 keeps the bars). Measured on a local Ray running five small
# datasets (one a training-style streaming_split), stdout and stderr to files: 127 lines of
# stderr before, 3 after (two errors of a failing map, one worker's "Progress bars disabled").
RAY_DATA_LOG_LEVEL = "WARNING"
# Warnings hidden from the console and kept in Ray Data's log file (ray-data.log in the session's
# logs folder; its console handler drops records marked ``hide``). The first comes when a dataset
# starts while no CPU is free: in pairmill's jobs, when the previous stage's actors had not yet
# handed their CPUs back, before a Parquet write that then ran. The second says that progress
# bars are off, which pairmill chose.
HIDDEN_WARNINGS = ("Warning: The Ray cluster currently does not have any available CPUs", "Progress bars disabled.")


def _hide_from_console(record: logging.LogRecord) -> bool:
    if record.getMessage().startswith(HIDDEN_WARNINGS):
        record.hide = True
    return True


def quiet_ray_console() -> None:
    """This process's Ray Data logs warnings and errors to the console, not INFO, and workers of a
    local Ray started after this call do the same; off a terminal, no progress bars (see
    RAY_DATA_LOG_LEVEL)."""
    from ray.data import DataContext

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", RAY_DATA_LOG_LEVEL)
    # Ray applies the variable when ray.data is first imported, which may be before this call.
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"].upper())
    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ and not sys.stdout.isatty():
        DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data.dataset", "ray.data._internal.progress"):  # the loggers that say them
        logging.getLogger(name).addFilter(_hide_from_console)  # once: addFilter skips a repeat


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    A local Ray gets ``max(4, 2 x cores)`` logical CPUs: Ray counts CPUs as slots, and on a
    2-core machine an encoder actor plus the read and write tasks need more than 2 slots or the
    pipeline deadlocks (RAY_NOTES: "small-machine deadlock"). The actor still runs as many torch
    threads as there are physical cores (see ``actor_threads``), so nothing is oversubscribed much.
    """
    import ray

    parquet_reader()
    quiet_ray_console()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cores = os.cpu_count() or 1
    for name, value in {**WORKER_ENV, **LOCAL_RAY_ENV}.items():  # inherited by the raylet, hence by its workers
        os.environ.setdefault(name, value)
    ray.init(
        num_cpus=num_cpus or max(4, 2 * cores),
        # Ray Train V2 (and Tune) ask the state API, served by the dashboard, to clean up placement
        # groups; without it they log "Failed to query ..." every few seconds and, under Tune, leak
        # a stopped trial's placement group (RAY_NOTES). Bound to localhost only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="warning",
        _system_config=LOCAL_RAY_SYSTEM_CONFIG,
    )


def actor_threads() -> int:
    """Threads for torch or FAISS in a Ray actor: the CPUs Ray assigned, capped at the node's cores.

    Fractional CPUs still get one thread. A task gets its CPUs the same way; outside Ray (a test, a
    script, the driver) every core.
    """
    import ray

    cores = os.cpu_count() or 1
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:  # the driver
        return cores
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, min(int(assigned), cores))


@dataclass
class PoolSize:
    size: int
    num_cpus: float
    num_gpus: float
    # Encode in ``size`` tasks at a time on Ray's reused worker processes, each keeping the encoder it
    # loaded, instead of a pool of ``size`` actors (``pairmill.encoder.encoder_stage`` says why).
    tasks: bool = False

    def __str__(self) -> str:
        unit = "task(s) at a time" if self.tasks else "actor(s)"
        return f"{self.size} encoder {unit}, {self.num_cpus} CPU / {self.num_gpus} GPU each"


def encoder_pool(actors: int | None = None, cpus_per_actor: int = 4) -> PoolSize:
    """How many encoder actors to run and what each one asks for.

    GPUs present: one actor per GPU. CPU only: up to ``cpus_per_actor`` CPUs each, always leaving
    one CPU free for the read/parse/write tasks that feed and drain the pool.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus:
        if actors and actors > gpus:
            raise ValueError(f"ray.actors={actors} but the cluster has {gpus} GPU(s): one encoder actor per GPU at most")
        return PoolSize(size=actors or gpus, num_cpus=1, num_gpus=1)
    if actors and actors > cpus - 1:
        # Every actor holds at least one CPU; with none left for reading, Ray Data hangs.
        raise ValueError(
            f"ray.actors={actors} needs {actors} CPUs plus one for reading, but the cluster has {cpus}; "
            f"use ray.actors={max(1, cpus - 1)} or fewer, or leave it empty to size the pool automatically"
        )
    # An actor lives on one node: asking for more CPUs than the largest node has never schedules
    # (seen: a 4-CPU actor on a cluster of 2-CPU nodes, and the pipeline hung).
    node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=cpus)
    cpus_per_actor = max(1, min(cpus_per_actor, int(node_cpus)))
    size = actors or max(1, (cpus - 1) // max(1, min(cpus_per_actor, cpus - 1)))
    per_actor = max(1, min(cpus_per_actor, (cpus - 1) // size))
    return PoolSize(size=size, num_cpus=per_actor, num_gpus=0, tasks=one_node())


def one_node() -> bool:
    """True on a Ray of one live node (a local Ray, or a cluster that has not grown)."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"]) == 1


def search_cpus(shards: int = 1) -> float:
    """CPUs for each of ``shards`` index shard actors: half a node's CPUs, and together at most half
    the cluster's, at least 0.5. A shard's FAISS search is the work of the passes that query it
    (their own tasks mostly wait), and a batch of queries runs as a multi-threaded GEMM: on 2 cores,
    2 threads searched 1.7x as fast as 1 (benchmarks/scale.py). The other half is left to the
    passes' tasks, so Ray Data never waits on CPUs the shards hold (RAY_NOTES: small-machine deadlock)."""
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=cluster_cpus)
    return max(0.5, float(int(min(node_cpus / 2, cluster_cpus / 2 / max(1, shards)))))


# A job's data above this goes through disk, not memory: its groupbys shuffle through disk
# (``disk_shuffle``) and the filter writes its passes to the staging folder (``pipelines.filter.hold``).
LARGE_BYTES = 512 << 20
SHUFFLE_INPUT_BATCH_BYTES = 128 << 20


def disk_shuffle(data_bytes: int) -> None:
    """Ray Data's disk-based hash shuffle for the groupbys that follow, when a job's data is over
    LARGE_BYTES: the object-store shuffle holds every row being shuffled in memory at once, so its
    memory grows with the input. Also on when the environment sets RAY_DATA_ENABLE_DISK_SHUFFLE=1.
    With it, each shuffle map task takes SHUFFLE_INPUT_BATCH_BYTES of input at a time instead of
    Ray's 1 GiB: at 886k registry pairs one such task held 2 GiB at the filter's peak
    (benchmarks/scale.py)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.use_disk_based_hash_shuffle = data_bytes > LARGE_BYTES or os.environ.get("RAY_DATA_ENABLE_DISK_SHUFFLE") == "1"
    if ctx.use_disk_based_hash_shuffle and "RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES" not in os.environ:
        ctx.shuffle_input_batch_bytes = min(ctx.shuffle_input_batch_bytes, SHUFFLE_INPUT_BATCH_BYTES)
