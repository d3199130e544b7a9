"""One FAISS index over a slice of a corpus, held by one Ray actor (``IndexShard``), and the
FAISS and numpy helpers it shares with the client that fans out to every shard
(``mining.index.ShardedIndex``). The design notes on sharding, ids, texts, fault tolerance and
cost are in ``mining.index``.
"""

from __future__ import annotations

import math
import os
import warnings

import faiss
import numpy as np
import ray

from pairmill.cluster import actor_threads
from pairmill.config import FAISS_GPU_MAX_K
from pairmill.vectors import to_matrix

# A flat scan costs n x d multiply-adds per query, but FAISS runs a batch of queries as one GEMM,
# which an IVF list scan cannot: measured on 2 cores with 256-d vectors and 2,000 queries of the
# registry pairs (benchmarks/scale.py's data), Flat searched 1,576 q/s over 100k vectors and 778 q/s
# over 185k on one thread, exact; IVF{4 sqrt(n)} at nprobe = nlist/4 searched 486 and 282 q/s at
# recall@10 0.935 and 0.944, and reached Flat's speed only near nprobe 64 (recall 0.81-0.83). So
# Flat up to a million 384-d vectors a shard; IVF above, where a flat scan's cost per query grows
# past what a GEMM buys back.
FLAT_MAX_MACS = 1_000_000 * 384
# IVF with 4 x sqrt(n) lists needs 39 training vectors per list (FAISS warns below that): at 50k
# vectors that is 35k, most of the shard. Below this, IVF cannot be trained properly anyway.
IVF_MIN_VECTORS = 50_000
GPU_MAX_K = FAISS_GPU_MAX_K  # FAISS GPU's limit on k (and nprobe) in one search


# ---------------------------------------------------------------------------------------------
# Pure numpy: merging the shards' top-k (``pairmill.vectors.exact_search`` is the brute-force reference).


def merge_topk(score_lists: list[np.ndarray], id_lists: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over per-shard candidates, each (q, k_i): -> (scores (q, k) float32, ids (q, k) int64).

    Descending score, ties to the smaller id among the candidates the shards returned. A tie that
    straddles a shard's own k-th place is cut by FAISS (earliest added row first), so among exactly
    equal scores at rank k the ids can differ from exact_search; the scores cannot. Exact ties come
    from identical vectors (texts an uncased model cannot tell apart). Id -1 is padding (FAISS's own) and always scores -inf; rows with fewer than k real
    candidates end in -1 / -inf, as a single flat index over the same rows would.
    """
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s in score_lists], axis=1)  # (q, S)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in id_lists], axis=1)  # (q, S)
    scores = np.where(ids < 0, np.float32(-np.inf), scores)  # FAISS pads with -FLT_MAX, not -inf
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # last key is primary: score desc, then id asc
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    missing = k - top_ids.shape[1]
    if missing > 0:
        top_scores = np.pad(top_scores, ((0, 0), (0, missing)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, missing)), constant_values=-1)
    return top_scores, top_ids


def default_index_spec(n_vectors: int, d: int) -> str:
    """FAISS factory string for one shard of ``n_vectors`` vectors of dimension ``d``.

    "Flat" (exact) while a flat scan is cheap (n x d <= FLAT_MAX_MACS) or IVF cannot be trained
    well (n < IVF_MIN_VECTORS); else "IVF{4 sqrt(n)},Flat", the usual FAISS starting point.
    """
    if n_vectors < IVF_MIN_VECTORS or n_vectors * d <= FLAT_MAX_MACS:
        return "Flat"
    return f"IVF{int(4 * math.sqrt(n_vectors))},Flat"


# ---------------------------------------------------------------------------------------------
# FAISS helpers shared by the shard (building, loading) and the client (validating a spec).


def new_index(dim: int, spec: str) -> faiss.Index:
    """An empty inner-product index for a factory string, able to take int64 ids."""
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).rsplit(": ", 1)[-1]  # drop FAISS's "Error in <C++ signature> at <file:line>" prefix
        raise ValueError(
            f"FAISS cannot build index spec {spec!r} for dim={dim}: {reason}. "
            "Use a factory string such as 'Flat', 'IVF1024,Flat', 'HNSW32', or spec='auto'"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        index = faiss.IndexIDMap2(index)  # Flat/HNSW have no add_with_ids of their own
    else:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) for arbitrary int64 ids
    return index


def ivf_nlist(dim: int, spec: str) -> int | None:
    """Number of inverted lists of an IVF spec, None for the other types."""
    ivf = faiss.try_extract_index_ivf(new_index(dim, spec))
    return None if ivf is None else int(ivf.nlist)


def assigned_gpus() -> float:
    """GPUs Ray gave the calling actor (0 outside an actor)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return 0.0
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0))


def shard_device() -> tuple[str, str | None]:
    """("gpu" | "cpu", a warning or None) for a shard in the calling actor: a shard given a GPU by
    Ray runs there when FAISS has GPU support; without it (faiss-cpu installed, not faiss-gpu) it
    runs on the CPU, and says so instead of leaving the GPU idle in silence."""
    if assigned_gpus() <= 0:
        return "cpu", None
    if faiss.get_num_gpus() == 0:
        return "cpu", ("this index shard was given a GPU but FAISS sees none (faiss-cpu is installed, not faiss-gpu: "
                       "pip install 'pairmill[gpu]'); it searches on the CPU")
    return "gpu", None


# ---------------------------------------------------------------------------------------------
# The shard: one FAISS index in one actor.


class IndexShard:
    """One FAISS index over a slice of the corpus. Plain class: run it as a Ray actor through
    ``RemoteIndexShard`` (what ``ShardedIndex`` does) or in-process.

    ``path`` is the shard's file: loaded here when it exists, so an actor that Ray restarts
    comes back with the data of its last ``save``. ``filesystem``: the ``pyarrow.fs`` filesystem
    ``path`` is on (object storage: ``pairmill.storage.split``); None for a local file.
    """

    def __init__(self, dim: int, spec: str, path: str | None = None, filesystem=None):
        faiss.omp_set_num_threads(actor_threads())
        self.path = path
        self.filesystem = filesystem
        index = read_index(path, filesystem) if path and exists(path, filesystem) else new_index(dim, spec)
        if index.d != dim:
            raise ValueError(f"shard file {path} holds dim={index.d} vectors, expected dim={dim}")
        self.spec = spec
        self.gpu_resources = None
        self.device, self.warning = shard_device()
        if self.warning:
            warnings.warn(self.warning, stacklevel=2)
        if self.device == "gpu":
            # Device 0 is the actor's own GPU: Ray sets CUDA_VISIBLE_DEVICES per actor.
            self.gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.gpu_resources, 0, index)
        self.index = index
        # id -> text of the rows added with texts: the job that mines negatives needs them back,
        # and each shard holding its own rows' texts keeps that lookup sharded like the vectors.
        self.texts: dict[int, str] = (read_texts(texts_file(path), filesystem)
                                      if path and exists(texts_file(path), filesystem) else {})
        self._id_array: np.ndarray | None = None

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def kind(self) -> dict:
        """Where this shard searches: {"device": "gpu" | "cpu", "warning": None or why a GPU went unused}."""
        return {"device": self.device, "warning": self.warning}

    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Train an IVF index on sample (n, d) float32; must come before the first add."""
        if self.index.ntotal:
            raise ValueError(f"shard {self.path or '(in memory)'} holds {self.index.ntotal} vectors: train before adding")
        self.index.train(to_matrix(sample))

    def add(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str] | None = None) -> int:
        """Add vectors (n, d) float32 under int64 ids (n,), optionally with their texts (n,);
        returns the shard's new ntotal."""
        if not self.index.is_trained:
            raise ValueError(f"index spec {self.spec!r} is not trained: call train(sample) before adding")
        self.index.add_with_ids(to_matrix(vectors), np.ascontiguousarray(ids, dtype=np.int64))
        if texts is not None:
            self.texts.update(zip((int(i) for i in ids), texts))
        return int(self.index.ntotal)

    def lookup(self, ids: np.ndarray) -> dict[int, str]:
        """The texts of those ``ids`` this shard holds (ids it does not hold are left out)."""
        return {int(i): self.texts[int(i)] for i in ids if int(i) in self.texts}

    def sample_ids(self, n: int, seed: int) -> np.ndarray:
        """Up to ``n`` distinct ids of this shard's rows (those added with texts), uniformly at random."""
        if self._id_array is None or len(self._id_array) != len(self.texts):  # rebuilt after adds only
            self._id_array = np.fromiter(self.texts, dtype=np.int64, count=len(self.texts))
        ids = self._id_array
        return np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(held ids (m,), their vectors (m, d)) for those ``ids`` this shard holds."""
        held, _, vectors = self.fetch(ids, texts=False)
        return held, vectors

    def fetch(self, ids: np.ndarray, texts: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(held ids (m,), their texts (m,), their vectors (m, d)) for those ``ids`` this shard holds:
        one call for what mining needs of its chosen negatives."""
        if self.index.ntotal and not self.texts:
            raise ValueError("fetch() reads the ids a shard holds from its texts: add the rows with texts")
        held = np.array([i for i in ids if int(i) in self.texts], dtype=np.int64)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.gpu_resources is not None else self.index
        out = np.stack([cpu_index.reconstruct(int(i)) for i in held]) if len(held) else np.empty((0, self.index.d), np.float32)
        return held, ([self.texts[int(i)] for i in held] if texts else []), out.astype(np.float32)

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None, expect_ntotal: int | None = None,
        exclude: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of this shard: (scores (q, k) float32, ids (q, k) int64), padded with -inf / -1.

        ``expect_ntotal``: the rows the client sent here. A mismatch means the actor restarted
        from an older file (or none) and would answer without some rows: raise instead.
        ``exclude``: per query, ids never to return (a query's own positives when they are too many
        to search past). On CPU FAISS skips them inside the search (an ``IDSelectorNot``), one query
        per call; on GPU, where FAISS takes no selector, the query searches ``k + len(exclude)`` deep
        (at most ``GPU_MAX_K``) and drops them, so it may come back with fewer than k.
        """
        if expect_ntotal is not None and expect_ntotal != self.index.ntotal:
            raise ValueError(
                f"shard {self.path or '(in memory)'} holds {self.index.ntotal} vectors but was sent {expect_ntotal}: "
                "it was restarted from a file older than the last add (or without a file) and would answer without "
                "some rows. Re-add the rows added since the last save, or ShardedIndex.load() the last saved folder"
            )
        if self.gpu_resources is not None and k > GPU_MAX_K:
            raise ValueError(f"k={k} is above FAISS GPU's limit: search a GPU index with k <= {GPU_MAX_K}")
        if nprobe is not None:
            space = faiss.GpuParameterSpace() if self.gpu_resources is not None else faiss.ParameterSpace()
            space.set_index_parameter(self.index, "nprobe", nprobe)
        queries = to_matrix(queries)
        if exclude is None:
            scores, ids = self.index.search(queries, k)  # (q, k), (q, k)
        else:
            scores, ids = self._search_excluding(queries, k, exclude)
        scores[ids < 0] = -np.inf  # FAISS pads with -FLT_MAX; -inf sorts last everywhere
        return scores, ids

    def _search_excluding(self, queries: np.ndarray, k: int, exclude: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        ivf = faiss.try_extract_index_ivf(self.index) if self.gpu_resources is None else None
        for i, (query, excluded) in enumerate(zip(queries, exclude)):
            excluded = np.ascontiguousarray(excluded, dtype=np.int64)
            if self.gpu_resources is not None:
                depth = min(GPU_MAX_K, k + len(excluded))
                s, found = self.index.search(query[None], depth)
                keep = (found[0] >= 0) & ~np.isin(found[0], excluded)
                s, found = s[0][keep][:k], found[0][keep][:k]
            else:
                inner = faiss.IDSelectorBatch(excluded)  # kept in a name: the SWIG wrapper does not own it
                selector = faiss.IDSelectorNot(inner)
                params = (faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe) if ivf is not None
                          else faiss.SearchParameters(sel=selector))
                s, found = self.index.search(query[None], k, params=params)
                s, found = s[0], found[0]
            scores[i, : len(s)], ids[i, : len(found)] = s, found
        return scores, ids

    def save(self, path: str | None = None) -> int:
        """Write the index to ``path`` (default: the shard's own file) atomically; returns ntotal."""
        path = path or self.path
        if not path:
            raise ValueError("this shard has no file: pass save(path)")
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.gpu_resources is not None else self.index
        if self.texts:
            write_texts(self.texts, texts_file(path), self.filesystem)
        if self.filesystem is not None:  # an object appears whole when its upload completes
            with self.filesystem.open_output_stream(path, compression=None) as f:
                f.write(faiss.serialize_index(cpu_index).tobytes())
            return int(self.index.ntotal)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        faiss.write_index(cpu_index, path + ".tmp")
        os.replace(path + ".tmp", path)  # a reader (or a restart) never sees a half-written file
        return int(self.index.ntotal)


RemoteIndexShard = ray.remote(IndexShard)


def texts_file(path: str) -> str:
    return path + ".texts.parquet"


def write_texts(texts: dict[int, str], path: str, filesystem=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(list(texts), pa.int64()), "text": pa.array(list(texts.values()), pa.string())})
    if filesystem is not None:
        pq.write_table(table, path, filesystem=filesystem)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_texts(path: str, filesystem=None) -> dict[int, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, filesystem=filesystem)
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


def exists(path: str, filesystem=None) -> bool:
    if filesystem is None:
        return os.path.exists(path)
    import pyarrow.fs as pafs

    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_index(path: str, filesystem=None):
    if filesystem is None:
        return faiss.read_index(path)
    with filesystem.open_input_stream(path, compression=None) as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
