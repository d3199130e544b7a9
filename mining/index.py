"""A sharded FAISS index on Ray actors: N ``IndexShard`` actors (``mining.shard``) each hold one
FAISS index over a slice of the corpus; ``ShardedIndex``, here (a plain object on the driver), fans
a query batch out to every shard and merges the per-shard top-k.

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
- Home folder on object storage (``s3://...``): a shard gets its file as (pyarrow filesystem,
  path), so the actor needs the node's credentials but not the endpoint; objects appear whole
  when their upload completes, so there is no temporary file to rename.
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

from mining.shard import RemoteIndexShard, default_index_spec, ivf_nlist, merge_topk
from pairmill import storage
from pairmill.vectors import to_matrix

METRIC = "inner_product"  # vectors are L2-normalised embeddings: inner product == cosine
MANIFEST = "manifest.json"
RESERVED_KEYS = ("dim", "metric", "spec", "nprobe", "num_shards", "ntotal", "shards", "faiss_version")


# ---------------------------------------------------------------------------------------------
# The client.


def shard_file(i: int) -> str:
    return f"shard-{i:03d}.faiss"


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
        paths = [storage.join(folder, shard_file(i)) if folder else None for i in range(num_shards)]
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
        files = [storage.join(folder, entry["file"]) for entry in manifest["shards"]]
        missing = [f for f in files if not storage.exists(f)]
        if missing:
            raise FileNotFoundError(f"{folder}/{MANIFEST} lists shard files that are missing: {missing}")
        dim, spec = manifest["dim"], manifest["spec"]
        shards = [start_shard(dim, spec, f, num_cpus, num_gpus) for f in files]
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
        sample = to_matrix(sample)
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
        if not storage.is_remote(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        files = [shard_file(i) for i in range(len(self.shards))]
        saved = self._gather(lambda i, shard: shard.save.remote(storage.split(storage.join(folder, files[i]))[1]), "save")
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
        if storage.is_remote(folder):  # an object appears whole when its upload completes
            storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")
            return manifest
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
        queries = to_matrix(queries)
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
        vectors = to_matrix(vectors)
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
    if storage.is_remote(folder):
        names = [uri.rsplit("/", 1)[1] for uri, _ in storage.list_files(folder)]
        held = MANIFEST in names or any(n.startswith("shard-") and n.endswith(".faiss") for n in names)
    else:
        held = (Path(folder) / MANIFEST).exists() or any(Path(folder).glob("shard-*.faiss"))
    if held:
        raise ValueError(f"folder {folder} already holds an index: ShardedIndex.load({folder!r}) it, or use an empty folder")


def read_manifest(folder: str) -> dict:
    path = storage.join(folder, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a saved ShardedIndex (or its save never finished)")
    manifest = json.loads(storage.read_text(path))
    if manifest.get("metric") != METRIC:
        raise ValueError(f"{path} has metric={manifest.get('metric')!r}; this code reads {METRIC!r} indexes only")
    return manifest


def start_shard(dim: int, spec: str, path: str | None, num_cpus: float, num_gpus: float):
    """One shard actor. Ray restarts it forever and retries its calls after a restart; its
    constructor reloads ``path``, so it comes back with its last saved data. A path on object
    storage reaches the actor as (filesystem, path in it): the filesystem carries the endpoint."""
    filesystem, path = storage.split(path) if path else (None, None)
    return RemoteIndexShard.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        scheduling_strategy="SPREAD",
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(dim, spec, path, filesystem)
