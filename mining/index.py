"""A sharded FAISS index on Ray actors: N ``IndexShard`` actors each hold one FAISS index over a
slice of the corpus; ``ShardedIndex`` (a plain object on the driver) fans a query batch out to
every shard and merges the per-shard top-k.

Design note.
- Why shards: one index is bounded by one process's memory and cores. N actors spread over the
  nodes (``SPREAD``) hold N slices and search them in parallel. Flat search stays exact: every
  shard returns its own top-k, and the global top-k lies inside their union.
- Routing: each incoming block goes whole to the least-filled shard (plain round-robin when
  blocks are equal). No per-row work and no block splitting on the driver; placement by id hash
  would buy nothing for search, since every query visits every shard. Cost: a row's shard is not
  derivable from its id, so a future remove-by-id must ask every shard.
- Ids: IVF indexes store int64 ids in their inverted lists; every other type (Flat, HNSW) is
  wrapped in ``IndexIDMap2``, so one file holds vectors and ids (no parallel array to keep in
  step when saving) and ``reconstruct(id)`` works for reading a neighbour's vector back.
- Texts: rows added with their text keep it in the shard (``lookup``), saved beside the shard's
  file, so mining turns neighbour ids back into passages without a join over the corpus.
  Memory: the texts of the shard's rows, next to n x d x 4 bytes of vectors.
- Fault tolerance: shards run with ``max_restarts=-1, max_task_retries=-1``, and a shard's
  constructor loads its file when there is one, so a restarted shard comes back with its data
  as of the last save. The client counts the rows it sent each shard and every search carries
  that count: a shard that came back from an older file (or none) raises instead of answering
  without its rows. A search never returns a result that silently misses a shard.
- Cost: Flat search is q x n x d multiply-adds over all shards (IVF about nprobe/nlist of that,
  plus q x nlist x d for the coarse step); the driver merges q x (shards x k) candidates with a
  lexsort, O(q x S log S) for S = shards x k. Memory per shard: n x d x 4 bytes of vectors plus
  8 bytes of id per row (IDMap2 adds a reverse hash map, roughly 16-32 bytes per row).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np
import ray

from pairmill.cluster import actor_threads
from pairmill.config import FAISS_GPU_MAX_K

METRIC = "inner_product"  # vectors are L2-normalised embeddings: inner product == cosine
MANIFEST = "manifest.json"
RESERVED_KEYS = ("dim", "metric", "spec", "nprobe", "num_shards", "ntotal", "shards", "faiss_version")

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
# Pure numpy helpers (no Ray, no FAISS): the merge and its brute-force reference.


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


def exact_search(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: top-k rows of corpus (n, d) for queries (q, d) by inner product.

    Ids are row numbers. Holds the whole (q, n) score matrix: for tests and small data
    (``pairmill.evaluate.search_exact`` is the blocked version for evaluation).
    """
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(corpus, dtype=np.float32).T  # (q, n)
    ids = np.broadcast_to(np.arange(len(corpus), dtype=np.int64), scores.shape)
    return merge_topk([scores], [ids], k)


def as_matrix(column) -> np.ndarray:
    """A vector column as (n, d) float32, C-contiguous.

    Ray's numpy batches give a 2-D array for a fixed_size_list / tensor column, but an object
    array of 1-D arrays for a variable list column (and some versions for fixed_size_list too).
    """
    array = np.asarray(column)
    if array.dtype == object:
        array = np.stack(list(array)) if len(array) else np.empty((0, 0), dtype=np.float32)
    return np.ascontiguousarray(array, dtype=np.float32)


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
    comes back with the data of its last ``save``.
    """

    def __init__(self, dim: int, spec: str, path: str | None = None):
        faiss.omp_set_num_threads(actor_threads())
        self.path = path
        index = faiss.read_index(path) if path and os.path.exists(path) else new_index(dim, spec)
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
        self.texts: dict[int, str] = read_texts(texts_file(path)) if path and os.path.exists(texts_file(path)) else {}
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
        self.index.train(as_matrix(sample))

    def add(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str] | None = None) -> int:
        """Add vectors (n, d) float32 under int64 ids (n,), optionally with their texts (n,);
        returns the shard's new ntotal."""
        if not self.index.is_trained:
            raise ValueError(f"index spec {self.spec!r} is not trained: call train(sample) before adding")
        self.index.add_with_ids(as_matrix(vectors), np.ascontiguousarray(ids, dtype=np.int64))
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
        queries = as_matrix(queries)
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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if self.texts:
            write_texts(self.texts, texts_file(path))
        faiss.write_index(cpu_index, path + ".tmp")
        os.replace(path + ".tmp", path)  # a reader (or a restart) never sees a half-written file
        return int(self.index.ntotal)


RemoteIndexShard = ray.remote(IndexShard)


# ---------------------------------------------------------------------------------------------
# The client.


def shard_file(i: int) -> str:
    return f"shard-{i:03d}.faiss"


def texts_file(path: str) -> str:
    return path + ".texts.parquet"


def write_texts(texts: dict[int, str], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(list(texts), pa.int64()), "text": pa.array(list(texts.values()), pa.string())})
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_texts(path: str) -> dict[int, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


class ShardedIndex:
    """Driver-side handle on N shard actors. Build with ``create`` or ``load``, not directly.

    ``shards`` are plain Ray actor handles: they can be passed into ``map_batches`` UDFs or
    Train workers. ``timeout_s`` bounds how long one call waits for a restarting shard;
    ``max_attempts`` bounds resubmissions after ``ActorUnavailableError``.
    """

    timeout_s: float = 600.0
    max_attempts: int = 5

    def __init__(
        self,
        shards: list,
        *,
        dim: int,
        spec: str,
        counts: list[int],
        folder: str | None,
        nprobe: int | None,
        manifest_extra: dict,
    ):
        self.shards = shards
        self.dim = dim
        self.spec = spec
        self.counts = counts  # rows sent to each shard; every search checks the shards against it
        self.folder = folder
        self.nlist = ivf_nlist(dim, spec)
        self.nprobe = nprobe
        self.manifest_extra = manifest_extra
        self.devices: list[str] = []  # per shard, "gpu" or "cpu" (check_devices)
        self.device_warnings: list[str] = []

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        num_shards: int,
        dim: int,
        spec: str = "auto",
        *,
        n_vectors: int | None = None,
        nprobe: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        folder: str | None = None,
        manifest_extra: dict | None = None,
    ) -> ShardedIndex:
        """Start ``num_shards`` empty shard actors.

        spec: a FAISS factory string, or "auto" to pick one from ``n_vectors`` (corpus size) with
        ``default_index_spec``. folder: the shards' home; restarted shards reload from it, and
        ``add_*``/``train`` checkpoint to it. Without a folder the index lives in memory only: a
        shard that dies loses its rows and the next search raises.
        manifest_extra: JSON values saved in manifest.json and checked by ``load(expect=...)``.
        """
        if num_shards < 1 or dim < 1:
            raise ValueError(f"num_shards={num_shards} and dim={dim} must both be >= 1")
        spec = resolve_spec(spec, n_vectors, num_shards, dim)
        nlist = ivf_nlist(dim, spec)  # also validates the spec on the driver, before any actor starts
        nprobe = check_nprobe(spec, nlist, nprobe if nprobe is not None else default_nprobe(nlist))
        extra = check_extra(manifest_extra)
        if folder is not None:
            check_no_index(folder)  # a shard would silently load an old file found there
        paths = [str(Path(folder) / shard_file(i)) if folder else None for i in range(num_shards)]
        shards = [start_shard(dim, spec, path, num_cpus, num_gpus) for path in paths]
        counts = [0] * num_shards
        index = cls(shards, dim=dim, spec=spec, counts=counts, folder=folder, nprobe=nprobe, manifest_extra=extra)
        index.check_devices()
        return index

    @classmethod
    def load(cls, folder: str, expect: dict | None = None, *, num_cpus: float = 1, num_gpus: float = 0) -> ShardedIndex:
        """Recreate the shard actors from a saved folder; the folder becomes their home.

        expect: manifest values the caller relies on (e.g. the encoder fingerprint); any
        difference raises ValueError naming both values, before any actor starts.
        """
        manifest = read_manifest(folder)
        check_expect(manifest, expect, folder)
        files = [Path(folder) / entry["file"] for entry in manifest["shards"]]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{folder}/{MANIFEST} lists shard files that are missing: {missing}")
        dim, spec = manifest["dim"], manifest["spec"]
        shards = [start_shard(dim, spec, str(f), num_cpus, num_gpus) for f in files]
        extra = {key: value for key, value in manifest.items() if key not in RESERVED_KEYS}
        counts = [int(entry["ntotal"]) for entry in manifest["shards"]]
        nprobe = manifest["nprobe"]
        index = cls(shards, dim=dim, spec=spec, counts=counts, folder=str(folder), nprobe=nprobe, manifest_extra=extra)
        index.check_counts()  # every shard read the file the manifest describes
        index.check_devices()
        return index

    # -- writing ------------------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Train every shard on the same sample (n, d); IVF specs only, before adding."""
        if self.nlist is None:
            warnings.warn(f"index spec {self.spec!r} needs no training: train() does nothing", stacklevel=2)
            return
        sample = as_matrix(sample)
        if sample.ndim != 2 or sample.shape[1] != self.dim or len(sample) < self.nlist:
            raise ValueError(
                f"training sample has shape {sample.shape}; {self.spec!r} needs (n, {self.dim}) with "
                f"n >= nlist={self.nlist} (FAISS recommends n >= 39 x nlist = {39 * self.nlist})"
            )
        sample_ref = ray.put(sample)  # one copy in the object store, read by every shard
        self._gather(lambda i, shard: shard.train.remote(sample_ref), "train")
        if self.folder:
            self.save()

    def add_batches(self, batches: Iterable[tuple], *, max_in_flight: int | None = None) -> int:
        """Add blocks of (ids (n,) int64, vectors (n, d) float32[, texts (n,)]); returns the rows added.
        Blocks with texts make them available to ``lookup``.

        Each block goes whole to the least-filled shard. At most ``max_in_flight`` blocks
        (default 2 per shard) wait in the object store, so the corpus is never gathered here.
        Checkpoints to the home folder at the end when there is one.
        """
        max_in_flight = max_in_flight or 2 * len(self.shards)
        if self.nlist is not None and not all(self._gather(lambda i, shard: shard.is_trained.remote(), "is_trained")):
            # Checked here, before any block is sent, so the client's row counts stay true.
            raise ValueError(f"index spec {self.spec!r} is not trained: call train(sample) before adding")
        pending, added = [], 0
        for ids, vectors, *texts in batches:
            ids, vectors = self._check_block(ids, vectors)
            texts = self._check_texts(ids, texts[0]) if texts else None
            if not len(ids):
                continue
            shard = int(np.argmin(self.counts))  # ties go to the lowest index: round-robin for equal blocks
            pending.append(self.shards[shard].add.remote(ids, vectors, texts))
            self.counts[shard] += len(ids)
            added += len(ids)
            if len(pending) >= max_in_flight:
                done, pending = ray.wait(pending, num_returns=len(pending) - max_in_flight + 1)
                ray.get(done)  # a shard's error surfaces now, not after the whole stream
        ray.get(pending)
        self.check_counts()  # a shard that restarted mid-stream (or re-ran an add) shows up here
        if self.folder:
            self.save()
        return added

    def add_dataset(
        self,
        ds,
        id_column: str = "id",
        vector_column: str = "embedding",
        *,
        text_column: str | None = None,
        batch_size: int = 4096,
    ) -> int:
        """Stream a Ray Dataset into the shards, ``batch_size`` rows at a time (see add_batches);
        with ``text_column`` the shards keep each row's text for ``lookup``."""
        wanted = [c for c in (id_column, vector_column, text_column) if c]

        def blocks():
            for batch in ds.iter_batches(batch_format="numpy", batch_size=batch_size):
                if any(c not in batch for c in wanted):
                    raise ValueError(f"dataset has columns {sorted(batch)}; expected {wanted}")
                yield tuple(batch[c] for c in wanted)

        return self.add_batches(blocks())

    def save(self, folder: str | None = None) -> dict:
        """Write every shard's file and then manifest.json (last, so a folder with a manifest
        is complete) to ``folder`` (default: the home folder). Returns the manifest."""
        folder = folder or self.folder
        if not folder:
            raise ValueError("this index has no home folder: pass save(folder)")
        Path(folder).mkdir(parents=True, exist_ok=True)
        files = [shard_file(i) for i in range(len(self.shards))]
        saved = self._gather(lambda i, shard: shard.save.remote(str(Path(folder) / files[i])), "save")
        self._check_saved(saved)
        manifest = {
            "dim": self.dim,
            "metric": METRIC,
            "spec": self.spec,
            "nprobe": self.nprobe,
            "num_shards": len(self.shards),
            "ntotal": int(sum(saved)),
            "shards": [{"file": f, "ntotal": int(n)} for f, n in zip(files, saved)],
            "faiss_version": faiss.__version__,
            **self.manifest_extra,
        }
        tmp = Path(folder) / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, Path(folder) / MANIFEST)
        return manifest

    # -- reading ------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all shards: (scores (q, k) float32, ids (q, k) int64), descending score,
        ties to the smaller id, padded with -inf / -1 when the corpus has fewer than k rows.
        ``exclude``: per query, ids never to return (see ``IndexShard.search``).

        Waits for a restarting shard (up to ``timeout_s``) rather than answering without it.
        """
        queries = as_matrix(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries have shape {queries.shape}; expected (q, {self.dim})")
        if k < 1:
            raise ValueError(f"k={k}; expected k >= 1")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries: one id array per query")
        nprobe = check_nprobe(self.spec, self.nlist, nprobe) if nprobe is not None else self.nprobe
        # nprobe travels with every search, so a restarted shard cannot drift from the others.
        queries_ref = ray.put(queries)
        exclude_ref = ray.put(exclude) if exclude is not None else None
        results = self._gather(
            lambda i, shard: shard.search.remote(queries_ref, k, nprobe=nprobe, expect_ntotal=self.counts[i],
                                                 exclude=exclude_ref), "search"
        )
        return merge_topk([scores for scores, _ in results], [ids for _, ids in results], k)

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(texts, vectors) of corpus ids of any shape: texts (...) object (None for -1), vectors
        (..., d) float32 (NaN for -1), from the shards that hold them, in one call to each.

        Raises when an id is in no shard (or was added without its text): a caller would
        otherwise pair a query with a negative it cannot show.
        """
        ids = np.asarray(ids, dtype=np.int64)
        wanted = np.unique(ids[ids >= 0])
        texts: dict[int, str] = {}
        vectors: dict[int, np.ndarray] = {}
        wanted_ref = ray.put(wanted)
        for held, held_texts, held_vectors in self._gather(lambda i, shard: shard.fetch.remote(wanted_ref), "fetch"):
            texts.update(zip(held.tolist(), held_texts))
            vectors.update(zip(held.tolist(), held_vectors))
        missing = [int(i) for i in wanted if int(i) not in texts]
        if missing:
            raise KeyError(f"{len(missing)} ids have no text in any shard (first: {missing[:5]}); add them with texts")
        out_texts = np.empty(ids.shape, dtype=object)
        out_vectors = np.full(ids.shape + (self.dim,), np.nan, dtype=np.float32)
        for pos, i in np.ndenumerate(ids):
            if i >= 0:
                out_texts[pos] = texts[int(i)]
                out_vectors[pos] = vectors[int(i)]
        return out_texts, out_vectors

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The texts of corpus ids (any shape; -1 gives None); see ``fetch``."""
        return self.fetch(ids)[0]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of corpus ids (..., ) -> (..., d) float32; -1 gives NaN; see ``fetch``."""
        return self.fetch(ids)[1]

    def sample_ids(self, n: int, seed: int) -> np.ndarray:
        """About ``n`` random corpus ids (rows added with texts), drawn from every shard in
        proportion to its rows; deterministic for a seed."""
        total = max(1, sum(self.counts))
        wants = [math.ceil(n * c / total) for c in self.counts]
        parts = self._gather(lambda i, shard: shard.sample_ids.remote(wants[i], seed * 1009 + i), "sample_ids")
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


    def kinds(self) -> list[dict]:
        """Per shard, where it searches: {"device": "gpu" | "cpu", "warning": None or why not on its GPU}."""
        return self._gather(lambda i, shard: shard.kind.remote(), "kind")

    def ntotal(self) -> int:
        """Rows added so far (the shards are checked against this on every search)."""
        return int(sum(self.counts))

    def check_devices(self) -> list[str]:
        """Each shard's device ("gpu" | "cpu"), kept in ``self.devices``; a warning here, on the
        driver, for every shard that was given a GPU it cannot use."""
        kinds = self.kinds()
        for i, kind in enumerate(kinds):
            if kind["warning"]:
                warnings.warn(f"index shard {i}: {kind['warning']}", stacklevel=3)
        self.devices = [kind["device"] for kind in kinds]
        self.device_warnings = sorted({kind["warning"] for kind in kinds if kind["warning"]})
        return self.devices

    def check_counts(self) -> None:
        """Raise unless every shard holds exactly the rows sent to it."""
        self._check_saved(self._gather(lambda i, shard: shard.ntotal.remote(), "ntotal"))

    def close(self) -> None:
        """Kill the shard actors (no restart). Saved files stay."""
        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        self.shards = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_block(self, ids, vectors) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids have dtype {ids.dtype}; the index stores int64 row ids: map other ids to row numbers")
        vectors = as_matrix(vectors)
        if len(ids) and (vectors.ndim != 2 or vectors.shape != (len(ids), self.dim)):
            raise ValueError(f"block has {len(ids)} ids, vectors of shape {vectors.shape}; expected ({len(ids)}, {self.dim})")
        return np.ascontiguousarray(ids, dtype=np.int64), vectors

    def _check_texts(self, ids: np.ndarray, texts) -> list[str]:
        texts = [str(t) for t in texts]
        if len(texts) != len(ids):
            raise ValueError(f"block has {len(ids)} ids but {len(texts)} texts")
        return texts

    def _check_saved(self, ntotals: list[int]) -> None:
        wrong = [(i, n, want) for i, (n, want) in enumerate(zip(ntotals, self.counts)) if n != want]
        if wrong:
            detail = ", ".join(f"shard {i} holds {n} (expected {want})" for i, n, want in wrong)
            raise RuntimeError(
                f"shards do not hold the rows sent to them: {detail}. A shard restarted from an older file (or none), "
                "or Ray re-ran an add after a crash; reload the last saved folder and re-add the rows since"
            )

    def _gather(self, call: Callable, what: str) -> list:
        """``call(i, shard)`` on every shard in parallel; the results in shard order, all or an error."""
        refs = [call(i, shard) for i, shard in enumerate(self.shards)]
        deadline = time.monotonic() + self.timeout_s
        return [self._result(i, ref, call, what, deadline) for i, ref in enumerate(refs)]

    def _result(self, i: int, ref, call: Callable, what: str, deadline: float):
        # Ray resubmits queued calls to a restarting shard itself (max_task_retries=-1); a call
        # caught mid-flight can still surface as ActorUnavailableError, so resubmit a few times.
        for attempt in range(self.max_attempts):
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"shard {i} gave no {what} result within {self.timeout_s:.0f} s (restarting from a large file? "
                    "raise ShardedIndex.timeout_s)"
                ) from None
            except ray.exceptions.ActorUnavailableError as err:
                last_error = err
                time.sleep(min(0.2 * 2**attempt, 5.0))
                ref = call(i, self.shards[i])
            except ray.exceptions.ActorDiedError as err:
                raise RuntimeError(
                    f"shard {i} is dead and will not restart (its constructor failed, or it was killed with "
                    f"no_restart); no {what} without it. ShardedIndex.load(folder) recreates it from its file"
                ) from err
        raise RuntimeError(f"shard {i} was unavailable for {what} {self.max_attempts} times in a row") from last_error


def resolve_spec(spec: str, n_vectors: int | None, num_shards: int, dim: int) -> str:
    if spec != "auto":
        return spec
    if n_vectors is None:
        raise ValueError("spec='auto' needs n_vectors= (the corpus size) to choose Flat or IVF; or pass a factory string")
    return default_index_spec(math.ceil(n_vectors / num_shards), dim)


def default_nprobe(nlist: int | None) -> int | None:
    # Visit 1/4 of the lists: benchmarks/mine.py measured recall@10 0.925 at 1/8 and 0.966 at 1/4
    # (IVF256 over 24k MiniLM vectors; short queries need more lists than passages). Recall-leaning:
    # measure against exact_search on your data and lower it for speed.
    return None if nlist is None else max(1, nlist // 4)


def check_nprobe(spec: str, nlist: int | None, nprobe: int | None) -> int | None:
    if nprobe is None:
        return None
    if nlist is None:
        warnings.warn(f"nprobe={nprobe} has no effect on index spec {spec!r} (IVF specs only)", stacklevel=3)
        return None
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe={nprobe}; {spec!r} has nlist={nlist}: use 1 <= nprobe <= {nlist}")
    return nprobe


def check_extra(manifest_extra: dict | None) -> dict:
    extra = dict(manifest_extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"manifest_extra keys {clash} are reserved by the manifest {list(RESERVED_KEYS)}: rename them")
    try:
        return json.loads(json.dumps(extra))  # what load() will read back (tuples become lists)
    except TypeError as err:
        raise ValueError(f"manifest_extra must hold JSON values: {err}") from None


def check_expect(manifest: dict, expect: dict | None, folder: str) -> None:
    for key, want in json.loads(json.dumps(expect or {})).items():
        have = manifest.get(key, "<missing>")
        if have != want:
            raise ValueError(
                f"index at {folder} has {key}={have!r} but {key}={want!r} was expected: "
                "rebuild the index with the current settings, or load the folder that matches them"
            )


def check_no_index(folder: str) -> None:
    if (Path(folder) / MANIFEST).exists() or any(Path(folder).glob("shard-*.faiss")):
        raise ValueError(f"folder {folder} already holds an index: ShardedIndex.load({folder!r}) it, or use an empty folder")


def read_manifest(folder: str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a saved ShardedIndex (or its save never finished)")
    manifest = json.loads(path.read_text())
    if manifest.get("metric") != METRIC:
        raise ValueError(f"{path} has metric={manifest.get('metric')!r}; this code reads {METRIC!r} indexes only")
    return manifest


def start_shard(dim: int, spec: str, path: str | None, num_cpus: float, num_gpus: float):
    """One shard actor. Ray restarts it forever and retries its calls after a restart; its
    constructor reloads ``path``, so it comes back with its last saved data."""
    return RemoteIndexShard.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        scheduling_strategy="SPREAD",
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(dim, spec, path)
