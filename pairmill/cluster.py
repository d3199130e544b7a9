"""Connecting to Ray and sizing work from the cluster's resources."""

from __future__ import annotations

import os
from dataclasses import dataclass


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    A local Ray gets ``max(4, 2 x cores)`` logical CPUs: Ray counts CPUs as slots, and on a
    2-core machine an encoder actor plus the read and write tasks need more than 2 slots or the
    pipeline deadlocks (RAY_NOTES: "small-machine deadlock"). The actor still runs as many torch
    threads as there are physical cores (see ``actor_threads``), so nothing is oversubscribed much.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=num_cpus or max(4, 2 * cores),
        # Ray Train V2 (and Tune) ask the state API, served by the dashboard, to clean up placement
        # groups; without it they log "Failed to query ..." every few seconds and, under Tune, leak
        # a stopped trial's placement group (RAY_NOTES). Bound to localhost only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="warning",
    )


def actor_threads() -> int:
    """Threads for torch or FAISS in a Ray actor: the CPUs Ray assigned, capped at the node's cores.

    Fractional CPUs still get one thread. Outside an actor (a test, a script) every core.
    """
    import ray

    cores = os.cpu_count() or 1
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return cores
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, min(int(assigned), cores))


@dataclass
class PoolSize:
    size: int
    num_cpus: float
    num_gpus: float


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
    return PoolSize(size=size, num_cpus=per_actor, num_gpus=0)
