"""The sharded index against exact search: merge, Flat, IVF recall, save/load, a killed shard, Ray Data."""

from __future__ import annotations

import json
import time

import faiss
import numpy as np
import pyarrow as pa
import pytest

from mining.index import ShardedIndex
from mining.shard import FLAT_MAX_MACS, IndexShard, default_index_spec, merge_topk
from pairmill.vectors import exact_search, fixed_size_list, to_matrix

DIM = 32
NUM_CPUS = 0.5  # per shard: 3 shards leave Ray Data a CPU of the session's 4


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return normalised(np.random.default_rng(0).standard_normal((2000, DIM)))  # (2000, 32)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return normalised(np.random.default_rng(1).standard_normal((50, DIM)))  # (50, 32)


def blocks(vectors: np.ndarray, size: int = 250):
    for start in range(0, len(vectors), size):
        yield np.arange(start, start + size)[: len(vectors) - start], vectors[start : start + size]


def flat_reference(corpus: np.ndarray, queries: np.ndarray, k: int):
    """A single FAISS flat index over the whole corpus, with its padding turned into -inf."""
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, ids = index.search(queries, k)
    scores[ids < 0] = -np.inf
    return scores, ids


# -- pure helpers -----------------------------------------------------------------------------


def test_merge_topk_orders_breaks_ties_and_pads():
    # Two shards, one query; shard b holds only one row (FAISS pads with id -1, score -FLT_MAX).
    scores_a = np.array([[0.9, 0.5, 0.5]], dtype=np.float32)
    ids_a = np.array([[7, 9, 3]])
    scores_b = np.array([[0.5, -3.4e38, -3.4e38]], dtype=np.float32)
    ids_b = np.array([[1, -1, -1]])

    scores, ids = merge_topk([scores_a, scores_b], [ids_a, ids_b], k=3)
    assert ids.tolist() == [[7, 1, 3]]  # the three 0.5 ties go by id: 1, 3 (9 is cut)
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.5, 0.5]], dtype=np.float32))

    scores, ids = merge_topk([scores_a, scores_b], [ids_a, ids_b], k=6)
    assert ids.tolist() == [[7, 1, 3, 9, -1, -1]]
    assert np.isneginf(scores[0, 4:]).all() and scores.dtype == np.float32 and ids.dtype == np.int64

    # Fewer candidate columns than k: padded to k.
    scores, ids = merge_topk([scores_a], [ids_a], k=5)
    assert ids.tolist() == [[7, 3, 9, -1, -1]] and np.isneginf(scores[0, 3:]).all()


def test_exact_search_matches_faiss_flat(corpus, queries):
    scores, ids = exact_search(corpus, queries, 10)
    ref_scores, ref_ids = flat_reference(corpus, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_to_matrix_accepts_arrow_object_and_2d_columns():
    rows = [np.arange(3, dtype=np.float64), np.arange(3, 6, dtype=np.float64)]
    object_column = np.empty(2, dtype=object)
    object_column[:] = rows
    arrow = fixed_size_list(np.stack(rows))
    for column in (object_column, np.stack(rows), rows, arrow, pa.chunked_array([arrow[:1], arrow[1:]])):
        matrix = to_matrix(column)
        assert matrix.shape == (2, 3) and matrix.dtype == np.float32 and matrix.flags.c_contiguous
        np.testing.assert_array_equal(matrix, np.stack(rows))


def test_default_index_spec():
    assert default_index_spec(10_000, 768) == "Flat"
    assert default_index_spec(1_000_000, 32) == "Flat"  # a flat scan of 1M x 32 is still cheap
    assert default_index_spec(1_000_000, 768) == "IVF4000,Flat"
    assert default_index_spec(185_729, 256) == "Flat"  # the 886k registry pairs' filtered corpus
    assert default_index_spec(FLAT_MAX_MACS // 384, 384) == "Flat"
    assert default_index_spec(FLAT_MAX_MACS // 384 + 1, 384).startswith("IVF")


# -- on Ray -----------------------------------------------------------------------------------


@pytest.fixture
def make_index(ray_session):
    """ShardedIndex.create / load that closes every index the test opened."""
    opened = []

    def make(*args, load: bool = False, **kwargs) -> ShardedIndex:
        factory = ShardedIndex.load if load else ShardedIndex.create
        index = factory(*args, num_cpus=NUM_CPUS, **kwargs)
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close()


def test_sharded_flat_equals_single_flat(make_index, corpus, queries):
    index = make_index(3, DIM, "Flat")
    assert index.add_batches(blocks(corpus)) == 2000
    assert index.counts == [750, 750, 500]  # 8 blocks of 250, least-filled shard first

    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = flat_reference(corpus, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)

    # k above the corpus size: every row once, then -1 / -inf, as the single flat index pads.
    scores, ids = index.search(queries[:5], 2010)
    ref_scores, ref_ids = flat_reference(corpus, queries[:5], 2010)
    np.testing.assert_array_equal(ids[:, 2000:], ref_ids[:, 2000:])
    np.testing.assert_array_equal(scores[:, 2000:], ref_scores[:, 2000:])
    assert (np.sort(ids[:, :2000], axis=1) == np.arange(2000)).all()
    np.testing.assert_allclose(scores[:, :2000], ref_scores[:, :2000], atol=1e-5)


def test_tiny_corpus_pads_like_a_single_flat_index(make_index, corpus, queries):
    index = make_index(3, DIM, "Flat")
    index.add_batches(blocks(corpus[:5], size=2))  # shards hold 2, 2, 1
    scores, ids = index.search(queries, 8)
    ref_scores, ref_ids = flat_reference(corpus[:5], queries, 8)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_ivf_recall_against_exact(make_index):
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((20, DIM))
    data = normalised(centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, DIM)))  # (3000, 32)
    queries = normalised(centers[rng.integers(0, 20, 100)] + 0.3 * rng.standard_normal((100, DIM)))  # (100, 32)

    index = make_index(2, DIM, "IVF16,Flat", nprobe=8)
    with pytest.raises(ValueError, match="not trained"):
        index.add_batches(blocks(data[:10]))
    index.train(data[rng.choice(3000, 1000, replace=False)])
    index.add_batches(blocks(data, size=500))

    _, ids = index.search(queries, 10)
    _, exact_ids = exact_search(data, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.9, recall


def test_save_load_round_trip_and_expect(make_index, corpus, queries, tmp_path):
    index = make_index(3, DIM, "Flat", manifest_extra={"fingerprint": "abc", "model": "tiny"})
    index.add_batches(blocks(corpus))
    before = index.search(queries, 10)
    manifest = index.save(str(tmp_path))
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert {key: on_disk[key] for key in ("dim", "metric", "spec", "num_shards", "ntotal", "fingerprint")} == {
        "dim": DIM, "metric": "inner_product", "spec": "Flat", "num_shards": 3, "ntotal": 2000, "fingerprint": "abc"
    }
    assert [s["ntotal"] for s in on_disk["shards"]] == [750, 750, 500]
    index.close()

    loaded = make_index(str(tmp_path), {"fingerprint": "abc"}, load=True)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert loaded.manifest_extra == {"fingerprint": "abc", "model": "tiny"}

    with pytest.raises(ValueError, match="fingerprint='abc'.*fingerprint='other'"):
        ShardedIndex.load(str(tmp_path), expect={"fingerprint": "other"})


def test_killed_shard_comes_back_from_its_file(make_index, corpus, queries, tmp_path, ray_session):
    index = make_index(3, DIM, "Flat", folder=str(tmp_path / "index"))
    index.add_batches(blocks(corpus))  # checkpoints to the folder
    before = index.search(queries, 10)

    ray_session.kill(index.shards[1], no_restart=False)
    after = index.search(queries, 10)  # waits for Ray to restart the shard from its file
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # The search really went to a restarted actor.
    was_restarted = lambda shard: ray_session.get_runtime_context().was_current_actor_reconstructed  # noqa: E731
    assert ray_session.get(index.shards[1].__ray_call__.remote(was_restarted))


def test_killed_shard_without_file_raises_instead_of_answering_short(make_index, corpus, queries, ray_session):
    index = make_index(2, DIM, "Flat")
    index.add_batches(blocks(corpus[:500]))
    ray_session.kill(index.shards[0], no_restart=False)
    # ray.kill returns before the process dies: a call sent at once can still be answered by the old
    # actor. Wait until the shard answers as a restarted one (without its rows: there is no file).
    restarted = lambda shard: ray_session.get_runtime_context().was_current_actor_reconstructed  # noqa: E731
    deadline = time.monotonic() + 60
    while not ray_session.get(index.shards[0].__ray_call__.remote(restarted)):
        assert time.monotonic() < deadline, "the killed shard did not restart in 60 s"
        time.sleep(0.2)
    with pytest.raises(ValueError, match="restarted"):
        index.search(queries, 10)


def test_add_dataset_with_fixed_size_list_column(make_index, corpus, queries, ray_session):
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(corpus[:300].reshape(-1)), DIM)
    table = pa.table({"id": pa.array(np.arange(300, dtype=np.int64)), "embedding": vectors})
    ds = ray_session.data.from_arrow(table)

    index = make_index(2, DIM, "Flat")
    assert index.add_dataset(ds, "id", "embedding", batch_size=64) == 300
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact_search(corpus[:300], queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_a_shard_given_a_gpu_without_faiss_gpu_warns_and_says_so(monkeypatch):
    """faiss-cpu in place of faiss-gpu on a GPU node: the shard searches on the CPU, warns, and its
    kind says so (mine's stats.json records each shard's device); the driver warns too."""
    import warnings

    import mining.shard as shard_module

    monkeypatch.setattr(shard_module, "assigned_gpus", lambda: 1.0)
    monkeypatch.setattr(shard_module.faiss, "get_num_gpus", lambda: 0)
    with pytest.warns(UserWarning, match="faiss-gpu"):
        shard = IndexShard(8, "Flat")
    assert shard.kind()["device"] == "cpu" and "pairmill[gpu]" in shard.kind()["warning"]
    monkeypatch.setattr(shard_module, "assigned_gpus", lambda: 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert IndexShard(8, "Flat").kind() == {"device": "cpu", "warning": None}

    client = ShardedIndex.__new__(ShardedIndex)
    client.kinds = lambda: [{"device": "cpu", "warning": None}, shard.kind()]
    with pytest.warns(UserWarning, match="index shard 1: .*faiss-gpu"):
        assert client.check_devices() == ["cpu", "cpu"]
    assert client.device_warnings == [shard.kind()["warning"]]


def test_search_can_exclude_ids_per_query(ray_session):
    """The exclusion search (a query with too many positives to search past) equals an exact search
    with those ids removed, for Flat and IVF shards."""
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((3000, 8)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64) * 5 + 1
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    full_scores, full_rows = exact_search(vecs, queries, 3000)
    exclude = [ids[full_rows[i, : 50 * (i + 1)]] for i in range(4)]  # each query's top 50, 100, 150, 200
    for spec, nprobe in (("Flat", None), ("IVF16,Flat", 16)):  # nprobe = nlist: exact
        with ShardedIndex.create(3, 8, spec, num_cpus=0.25, nprobe=nprobe) as index:
            if spec != "Flat":
                index.train(vecs)
            index.add_batches([(ids[i:i + 500], vecs[i:i + 500]) for i in range(0, 3000, 500)])
            scores, found = index.search(queries, 10, exclude=exclude)
        for i in range(4):
            rows = [r for r in full_rows[i] if ids[r] not in set(exclude[i].tolist())][:10]
            assert found[i].tolist() == ids[rows].tolist(), spec
            np.testing.assert_allclose(scores[i], full_scores[i][np.isin(full_rows[i], rows)], atol=1e-5)
