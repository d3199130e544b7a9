"""Multi-node behaviour on a real Ray cluster of four nodes on one machine (``ray.cluster_utils.Cluster``):
a head that runs no work (``CPU: 0``, like cluster.yaml's head) and three workers of 2 logical CPUs,
told apart by a custom resource each (``worker0``..``worker2``). Placement is read back from Ray's
state API (actor -> node id), so the checks see where Ray really put things.

A process joins one Ray, and the rest of the suite shares a local one (``ray_session``), so these
run in a fresh process: ``test_multinode.py`` starts ``pytest`` on this file and reports each case.
The cases share one cluster and run in file order: the last one removes a node.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pairmill.config import EncoderConfig, FilterConfig, MineConfig, RayConfig, ReadConfig
from tests.conftest import literal_pairs, write_jsonl

WORKERS = 3
WORKER_CPUS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """The ``Cluster`` plus names for its nodes: ``name[node_id]`` is ``head`` or ``workerN``."""

    def __init__(self):
        import ray
        from ray.cluster_utils import Cluster

        from pairmill.cluster import LOCAL_RAY_SYSTEM_CONFIG

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "resources": {"head": 1},
                # Train V2 cleans up placement groups through the state API, served by the dashboard;
                # a free port, because Cluster does not move on from a busy one (8265: another Ray).
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
                "object_store_memory": 150 << 20,
                "_system_config": LOCAL_RAY_SYSTEM_CONFIG,  # cluster-wide: every node keeps its idle workers
            },
        )
        self.workers = [
            self.cluster.add_node(num_cpus=WORKER_CPUS, resources={f"worker{i}": 1}, object_store_memory=150 << 20)
            for i in range(WORKERS)
        ]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.name = {self.cluster.head_node.node_id: "head"}
        self.name.update({node.node_id: f"worker{i}" for i, node in enumerate(self.workers)})

    def placed(self, class_name: str, actor_ids: set[str] | None = None) -> list[str]:
        """The node names of every actor of ``class_name`` this cluster ran, dead or alive."""
        return [self.name.get(a.node_id, a.node_id) for a in self.actors(class_name) if actor_ids is None or a.actor_id in actor_ids]

    def actors(self, class_name: str, state: str | None = None) -> list:
        from ray.util.state import list_actors

        filters = [("class_name", "=", class_name)] + ([("state", "=", state)] if state else [])
        return list_actors(filters=filters, limit=10_000, detail=True, raise_on_missing_output=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    import ray

    if ray.is_initialized():  # joining a second Ray from this process is impossible
        pytest.fail("Ray is already running in this process: run these cases through tests/cluster/test_multinode.py")
    t0 = time.perf_counter()
    local = LocalCluster()
    print(f"cluster of {1 + WORKERS} nodes up in {time.perf_counter() - t0:.1f} s: {ray.cluster_resources()}")
    yield local
    local.shutdown()


def test_filter_spreads_its_encoder_pool_and_index_shards_over_nodes(cluster, tiny_model, tmp_path):
    from pipelines.filter import filter_pairs

    src = write_jsonl(tmp_path / "pairs.jsonl", literal_pairs(60))
    # Pool sized by pairmill from the cluster (6 CPUs on three 2-CPU nodes): two encoder actors of 2 CPUs.
    stats = filter_pairs(str(src), str(tmp_path / "filtered"), options=FilterConfig(pool_shards=2),
                         encoder=EncoderConfig(model=tiny_model, batch_size=16), read=ReadConfig(), ray=RayConfig())
    assert stats["input_rows"] == 60 and stats["kept"] + sum(stats["dropped"].values()) == 60
    encoders = cluster.placed("MapWorker(MapBatches(EmbedPairs))")
    scorers = cluster.placed("MapWorker(MapBatches(ScorePairs))")
    shards = cluster.placed("IndexShard")
    assert len(encoders) == 2 and len(set(encoders)) == 2, encoders
    assert len(shards) == 2 and len(set(shards)) == 2, shards  # SPREAD
    assert len(set(scorers)) >= 2, scorers
    assert "head" not in encoders + scorers + shards  # the head offers no CPU, like cluster.yaml's


def test_two_trial_tune_run_of_spread_two_worker_trials_finishes_with_best_model(cluster, tiny_model, tmp_path):
    """Each trial trains on two half-CPU workers with placement_strategy=STRICT_SPREAD: two such
    workers fit on one 2-CPU node, where Ray's default (PACK) puts them; only the strategy makes them
    land on two nodes. (A plain `train` takes the same path: a trial runs pairmill's train job.)"""
    import csv
    from collections import defaultdict

    from pairmill.config import SECTIONS, load_config
    from sentence_transformers import SentenceTransformer
    from tune.tune import tune_runs

    rows = literal_pairs(120)
    src = write_jsonl(tmp_path / "pairs.jsonl", rows[:96])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows[96:])
    names = ("tune", "encoder", "read", "train", "eval", "mine", "ray")
    sections = load_config({s: SECTIONS[s] for s in names}, None, [
        f"encoder.model={tiny_model}", f"eval.data={heldout}", "train.batch_size=8", "train.max_steps=2",
        "train.eval_every=2", "train.log_every=1", "train.max_failures=0", "train.num_workers=2",
        "train.placement_strategy=STRICT_SPREAD", "tune.cpus_per_worker=0.5", "tune.num_samples=2",
        "tune.scheduler=none", "tune.lr=[1e-4,1e-3]", "tune.temperature="])
    out = tmp_path / "tune"
    stats = tune_runs(str(src), str(out), sections=sections)

    # 6 CPUs on three nodes: each trial takes two half-CPU workers plus 1 CPU of ingest, so both run at once
    assert stats["tune"]["max_concurrent"] == 3 and stats["tune"]["finished"] == 2
    with open(out / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert [r["status"] for r in results] == ["finished", "finished"] and all(r["ndcg@10"] for r in results)
    assert [int(r["steps"]) for r in results] == [2, 2]
    assert (out / "_SUCCESS").exists()
    # best_model is the best report's checkpoint (its path in OUT after the staging folder's rename), exported
    from training.model import load_tensors, load_trainable_state, setup_model

    reference = setup_model(tiny_model, None)
    load_trainable_state(reference, load_tensors(Path(stats["tune"]["best"]["checkpoint"]) / "model.pt"))
    texts = ["a query", "memory and disk 3"]
    exported = SentenceTransformer(str(out / "best_model"), device="cpu").encode(texts)
    assert exported.shape == (2, 32) and abs(exported - reference.encode(texts)).max() < 1e-6
    trials = defaultdict(list)  # a trial's workers share its train run's placement group
    for actor in cluster.actors("RayTrainWorker"):
        trials[actor.placement_group_id].append(cluster.name.get(actor.node_id, actor.node_id))
    assert len(trials) == 2, trials
    for nodes in trials.values():
        assert len(nodes) == 2 and len(set(nodes)) == 2 and "head" not in nodes, trials


def test_mining_finishes_with_the_same_result_after_losing_a_node(cluster, tmp_path):
    """Runs last: it removes a worker node. The node holding an index shard goes away once the
    index is saved (the job then searches it); Ray restarts the shard on another node from its file.
    The result is checked against the plain loop that tests/mining/test_mine.py shows an undisturbed
    run equals (running the job twice here would double the module's time)."""
    from mining.mine import mine
    from tests.mining.test_mine import SELECTION, reference
    from tests.pipelines.conftest import write_bow_model

    # Word-vector model: passages get distinct scores, so the chosen negatives are not decided by ties.
    model = write_bow_model(tmp_path / "model")
    pairs = literal_pairs(80)
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    removed: dict = {}

    def remove_a_shard_node():
        try:
            deadline = time.monotonic() + 300
            while not list(tmp_path.glob(".mined.partial-*/index/manifest.json")):
                if time.monotonic() > deadline:
                    raise TimeoutError("the mine job never saved its index")
                time.sleep(0.05)
            shards = cluster.actors("IndexShard", state="ALIVE")
            victim = next(node for node in cluster.workers if node.node_id in {a.node_id for a in shards})
            removed.update(node=cluster.name[victim.node_id], shards={a.actor_id for a in shards}, at=time.monotonic())
            cluster.cluster.remove_node(victim)
        except BaseException as err:  # reported by the test below, not lost in the thread
            removed["error"] = err

    watcher = threading.Thread(target=remove_a_shard_node, daemon=True)
    watcher.start()
    stats = mine(str(src), str(tmp_path / "mined"), corpus_path=None, encoder=EncoderConfig(model=model, batch_size=16),
                 read=ReadConfig(), mine_cfg=MineConfig(**SELECTION, shards=2, shard_cpus=0.5), ray=RayConfig(actors=1))
    finished = time.monotonic()
    watcher.join(timeout=60)
    assert "error" not in removed, removed.get("error")
    assert removed and removed["at"] < finished, "the node was not removed while the job ran"
    # The shard that lived on the removed node came back on another one.
    restarted = [a for a in cluster.actors("IndexShard") if a.actor_id in removed["shards"] and a.num_restarts]
    assert restarted and all(cluster.name.get(a.node_id) != removed["node"] for a in restarted), (removed, restarted)

    assert stats["kept"] == 80 and stats["corpus"]["passages"] == 80
    kept = pq.read_table(tmp_path / "mined" / "kept").to_pylist()
    want, vector_of, query_vector = reference(pairs, model)
    assert stats["negatives"]["total"] == sum(len(scores) for scores in want.values())
    for row in kept:
        np.testing.assert_allclose(row["negative_scores"], want[(row["query"], row["passage"])], atol=1e-5)
        true_scores = [float(vector_of[i] @ query_vector[row["query"]]) for i in row["negative_ids"]]
        np.testing.assert_allclose(row["negative_scores"], true_scores, atol=1e-5)
