"""An int8 ONNX forward for a sentence-transformers model: export once, cache it, run it with onnxruntime.

Design note. The sentence-transformers ``[onnx]`` extra needs optimum, which pins transformers<4.58,
so the export is done here with ``torch.onnx.export`` and ``onnxruntime.quantization`` alone:
- the graph is the model's own modules (Transformer -> Pooling -> Dense ...) up to the pooled
  ``sentence_embedding``; a trailing ``Normalize`` is left out, because every caller L2-normalises;
- exporter: the TorchScript one (``dynamo=False``), deprecated but present in torch 2.13. The
  ``dynamo=True`` one gave the same accuracy but took 5x the CPU time (7.8 s vs 1.4 s for
  all-MiniLM-L6-v2), needs ``onnxscript`` + ``onnx_ir``, and exports opset 18 then converts down;
- int8: ``quantize_dynamic`` with QInt8 per-channel weights and no reduce_range (MatMulInteger,
  activations quantised per batch at run time). On all-MiniLM-L6-v2, 300 passages, one thread:
  ~2.1x torch's texts per CPU-second at mean cosine 0.993 to torch. QUInt8 weights gave only 1.4x;
  reduce_range lost accuracy (0.992) for no speed on this AVX-512 VNNI CPU; per-tensor weights fell
  to cosine 0.95; onnxruntime's pre-processing and BERT fusion gained nothing (the fusion does not
  recognise transformers 5's attention);
- a model folder's export is cached beside the model (``.pairmill-onnx/``), or in the user cache
  when the folder is read-only, in a subfolder named by the model files' fingerprint: a re-saved
  model is re-exported and a stale export is never read. A file lock makes concurrent actors
  export once; an export is built in a temp folder and renamed into place, so a crash never
  leaves a folder that looks finished.
Cost: one export ~5 s and ~110 MB of disk (fp32 + int8) for all-MiniLM-L6-v2, once per model.

The graph takes int64 (B, T) ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
tokenizer makes them), padded on the right as the torch path pads, and returns float32 (B, D).
onnx and onnxruntime are the optional ``pairmill[onnx]`` extra, imported only when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the export changes what it writes: older cached exports become stale
OPSET = 17
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "export.json"
CACHE_DIR_NAME = ".pairmill-onnx"
LOCK_TIMEOUT_S = 1800  # a large model's export takes minutes; a dead holder's lock is freed by the OS
# The graph's inputs come in this order: the exporter names them by position in forward's signature.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
# Traced on a padded batch; checked against torch on a batch of another shape.
TRACE_TEXTS = ("hello", "a longer example sentence, so that the first one is padded")
CHECK_TEXTS = ("one", "Search engines index text.", "the third text is the longest of these three, by some margin: 42")
INSTALL_HINT = "pip install 'pairmill[onnx]' (onnx and onnxruntime)"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX backend needs onnxruntime: {INSTALL_HINT}") from e
    return onnxruntime


# ---------------------------------------------------------------------------------------------
# Export


class SentenceEmbeddingGraph(torch.nn.Module):
    """The exported function: keyword (B, T) int64 tensors -> (B, D) pooled embedding."""

    def __init__(self, model):
        super().__init__()
        modules = list(model)  # a SentenceTransformer is a Sequential of its modules
        while modules and type(modules[-1]).__name__ == "Normalize":
            modules.pop()  # the caller normalises; the graph returns the pooled vector
        self.stages = torch.nn.ModuleList(modules)
        # A new Module is in training mode, and the exporter restores the mode it found, recursively:
        # left as is, dropout came back on in the model's layers after the export.
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        for stage in self.stages:  # what SentenceTransformer.forward does when given no kwargs
            features = stage(features)
        return features["sentence_embedding"]  # (B, D)


def model_fingerprint(model_folder: str | os.PathLike) -> str:
    """sha256 over (relative path, size, mtime) of every file of the model folder, dot-entries (this
    module's cache, .git) left out: a re-saved model gets a new fingerprint without reading its
    bytes. Configs count as well as weights: a pooling or Dense change changes the graph."""
    root = Path(model_folder)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _features(model, texts, input_names: list[str]) -> dict[str, torch.Tensor]:
    """Tokenised, right-padded (B, T) int64 tensors in graph input order."""
    encoded = model.tokenizer(
        list(texts), padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt"
    )
    return {name: encoded[name].to(torch.int64) for name in input_names}


def _export_fp32(graph: SentenceEmbeddingGraph, example: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Trace ``graph`` on ``example`` into ``path`` with dynamic batch and seq axes; returns the graph's inputs."""
    names = list(example)
    dynamic_axes = {name: {0: "batch", 1: "seq"} for name in names} | {OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():
        # Known and checked: the exporter's deprecation notice; tracer warnings about shape
        # comparisons (padding length, is_causal) that are constant for an encoder; and "aten::index
        # ... negative indices", raised by transformers' padding-mask lookup, whose indices are aranges.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            graph,
            (),
            str(path),
            kwargs=example,  # in INPUT_NAMES order, which is forward's order: input_names are positional
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    # What the graph takes, which is not always what it was given: an input the forward ignores is dropped.
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


class _DropRecordsStarting(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_preprocess_hint():
    """quantize_dynamic logs 'consider pre-processing' on the root logger; measured, it gains nothing here."""
    hint = _DropRecordsStarting("Please consider to run pre-processing")
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _quantize_int8(fp32_path: Path, int8_path: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = {"weight_type": "QInt8", "per_channel": True, "reduce_range": False}
    with _without_preprocess_hint():
        quantize_dynamic(
            str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False
        )
    return options


def _check_against_torch(graph, model, folder: Path, input_names: list[str], quantized: bool, source: Path) -> dict:
    """Run the exported graph(s) on a batch of another shape than the trace's and compare with torch.
    A model whose forward branches on shapes or values would trace wrongly; fail then, not later."""
    features = _features(model, CHECK_TEXTS, input_names)
    with torch.no_grad():
        reference = graph(**features).float().numpy()  # (3, D)
    arrays = {name: tensor.numpy() for name, tensor in features.items()}
    fp32 = OnnxForward(folder, quantized=False, num_threads=1)(arrays)
    max_abs = float(np.abs(fp32 - reference).max())
    scale = float(np.abs(reference).max())
    if not max_abs <= 1e-3 * max(scale, 1e-6):
        raise RuntimeError(
            f"the ONNX export of {source} differs from torch by {max_abs:.3g} "
            f"(largest value {scale:.3g}) on a batch of another shape than the traced one: its forward probably "
            "branches on a shape or a value. Use the torch encoder for this model."
        )
    check = {"texts": len(CHECK_TEXTS), "fp32_max_abs_diff": max_abs}
    if quantized:
        int8 = OnnxForward(folder, quantized=True, num_threads=1)(arrays)
        check["int8_min_cosine"] = float(_cosines(int8, reference).min())
    return check


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import sentence_transformers
    import transformers

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def _move_into_place(built: Path, target: Path) -> None:
    """Rename the finished ``built`` folder to ``target``; an existing ``target`` is replaced."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.rename(built, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, target)


def export_onnx(model_folder: str | os.PathLike, out_folder: str | os.PathLike, *, quantize: bool = True) -> Path:
    """Export the sentence-transformers model in ``model_folder`` to ``out_folder``: ``model.onnx``
    (fp32), with ``quantize`` also ``model.int8.onnx``, and ``export.json``. The folder appears
    complete or not at all (built beside it, then renamed); an existing one is replaced."""
    from sentence_transformers import SentenceTransformer

    _import_onnxruntime()
    source = Path(model_folder).resolve()
    out = Path(out_folder).absolute()
    if not source.is_dir():
        raise FileNotFoundError(f"model folder {source} does not exist; give a sentence-transformers model folder")
    fingerprint = model_fingerprint(source)  # before loading: a model changed meanwhile reads as stale later
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        started = time.perf_counter()
        model = SentenceTransformer(str(source), device="cpu", local_files_only=True).float().eval()
        made = model.tokenizer(list(TRACE_TEXTS[:1]))
        input_names = [name for name in INPUT_NAMES if name in made]
        if input_names[:2] != ["input_ids", "attention_mask"]:
            raise ValueError(
                f"the tokenizer of {source} makes {sorted(made)}; the ONNX export needs input_ids and attention_mask "
                "(a text model with a Hugging Face tokenizer). Use the torch encoder for this model."
            )
        graph = SentenceEmbeddingGraph(model)
        input_names = _export_fp32(graph, _features(model, TRACE_TEXTS, input_names), built / FP32_FILE)
        quantization = _quantize_int8(built / FP32_FILE, built / INT8_FILE) if quantize else None
        manifest = {
            "format": EXPORT_FORMAT,
            "source": str(source),
            "fingerprint": fingerprint,
            "input_names": input_names,
            "output_name": OUTPUT_NAME,
            "dim": int(model.get_embedding_dimension()),
            "max_seq_length": model.max_seq_length,
            "padding_side": model.tokenizer.padding_side,
            "opset": OPSET,
            "exporter": "torch.onnx.export(dynamo=False)",
            "quantized": quantize,
            "quantization": quantization,
            "versions": _versions(),
        }
        # Written before the check (OnnxForward reads it), again with its result; only then renamed to `out`.
        (built / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["check"] = _check_against_torch(graph, model, built, input_names, quantize, source)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        (built / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return out


def read_manifest(export_folder: str | os.PathLike) -> dict:
    path = Path(export_folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_folder} holds no finished ONNX export (no {MANIFEST_FILE}); make one with "
                                "export_onnx(model_folder, out_folder) or cached_export(model_folder)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Cache


def is_writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, tried for real: os.access says yes to root even
    on a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def user_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pairmill" / "onnx"


def _path_digest(folder: Path) -> str:
    return hashlib.sha256(str(folder).encode()).hexdigest()[:16]


def export_cache_dir(model_folder: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Where the exports of ``model_folder`` live: ``cache_root/<sha of its path>`` when given, else
    ``.pairmill-onnx`` inside the model folder, else (read-only folder) the user cache."""
    source = Path(model_folder).resolve()
    if cache_root is not None:
        return Path(cache_root).expanduser().absolute() / _path_digest(source)
    beside = source / CACHE_DIR_NAME
    if is_writable(beside if beside.is_dir() else source):
        return beside
    fallback = user_cache_root() / _path_digest(source)
    logger.info("model folder %s is not writable; its ONNX export is cached in %s", source, fallback)
    return fallback


def _remove_leftovers(cache_dir: Path, keep_prefix: str) -> None:
    """Under the lock: delete exports of older model versions and temp folders of crashed exports."""
    for entry in cache_dir.iterdir():
        if not entry.is_dir():
            continue
        is_temp = entry.name.startswith(".")  # nobody else builds while we hold the lock
        is_stale = (entry / MANIFEST_FILE).is_file() and not entry.name.startswith(keep_prefix)
        if is_temp or is_stale:
            shutil.rmtree(entry, ignore_errors=True)


def cached_export(
    model_folder: str | os.PathLike, *, quantize: bool = True, cache_root: str | os.PathLike | None = None
) -> Path:
    """The export folder for ``model_folder``, exported first when missing or stale (the model's
    files changed). Safe for several processes at once: one exports, the others wait and reuse it."""
    from filelock import FileLock, Timeout

    source = Path(model_folder).resolve()
    cache_dir = export_cache_dir(source, cache_root)
    prefix = f"v{EXPORT_FORMAT}-{model_fingerprint(source)[:16]}"
    target = cache_dir / f"{prefix}-{'int8' if quantize else 'fp32'}"
    if (target / MANIFEST_FILE).is_file():  # only a finished export is ever renamed to `target`
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir / ".lock"
    try:
        with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
            if not (target / MANIFEST_FILE).is_file():  # another process may have made it while we waited
                logger.info("exporting %s to ONNX in %s", source, target)
                export_onnx(source, target, quantize=quantize)
                _remove_leftovers(cache_dir, keep_prefix=prefix)
    except Timeout as e:
        raise TimeoutError(
            f"waited {LOCK_TIMEOUT_S} s for another process's ONNX export of {source}: a live process holds "
            f"{lock_path} (the OS frees it when the holder exits; `fuser {lock_path}` names it). Stop it, or pass "
            "another cache_root"
        ) from e
    return target


# ---------------------------------------------------------------------------------------------
# Inference


class OnnxForward:
    """(B, T) int64 features -> (B, D) float32 pooled embeddings (not normalised), on onnxruntime's CPU."""

    def __init__(self, export_folder: str | os.PathLike, *, quantized: bool = True, num_threads: int | None = None):
        ort = _import_onnxruntime()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None (onnxruntime's default: all cores), got {num_threads}")
        folder = Path(export_folder)
        self.manifest = read_manifest(folder)
        if quantized and not self.manifest["quantized"]:
            raise ValueError(
                f"{folder} holds no int8 model (exported with quantize=False); pass quantized=False, or export "
                "again with quantize=True"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1  # sequential execution: no second pool
        # Idle pool threads sleep instead of spinning. all-MiniLM-L6-v2 int8 with 2 threads on 2 busy
        # cores: 2.9x torch's texts per CPU-second without spinning, 2.0x with it, and faster in wall
        # time too (benchmarks/encode.py). Actors share their node; spinning burns their CPUs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = folder / (INT8_FILE if quantized else FP32_FILE)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dim = int(self.manifest["dim"])

    def __call__(self, features: dict[str, np.ndarray]) -> np.ndarray:
        missing = [name for name in ("input_ids", "attention_mask") if name not in features]
        if missing:
            raise KeyError(f"features lack {missing}; give int64 (B, T) input_ids and attention_mask, right-padded")
        shape = np.shape(features["input_ids"])  # (B, T)
        feed = {}
        for name in self.input_names:  # keys the graph does not take are dropped
            if name in features:
                feed[name] = np.ascontiguousarray(features[name], dtype=np.int64)
            else:  # token_type_ids: all zeros for single texts, as transformers fills them when absent
                feed[name] = np.zeros(shape, dtype=np.int64)
        return self.session.run([OUTPUT_NAME], feed)[0]  # (B, D) float32
