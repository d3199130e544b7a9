"""The ONNX forward against the torch forward it replaces, and the export cache's reuse, staleness,
fallback, locking and crash behaviour. Runs on the tiny random BERT; skipped without the extra."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pairmill import onnx_backend  # noqa: E402
from pairmill.onnx_backend import OnnxForward, cached_export, export_cache_dir, export_onnx  # noqa: E402
from tests.conftest import WORDS  # noqa: E402

# One padded batch of very different lengths; the last one is cut at the tiny model's 64 tokens.
TEXTS = [" ".join(WORDS[i : i + n]) for i, n in enumerate([1, 3, 7, 12, 20, 33, 60])] + [
    "unix " * 2,
    " ".join(WORDS) * 2,
]


def load(model_folder: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_folder, device="cpu", local_files_only=True).eval()


def tokenize(model, texts) -> dict[str, np.ndarray]:
    encoded = model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in encoded.items()}  # (B, T) each


def torch_pooled(model, features: dict[str, np.ndarray]) -> np.ndarray:
    """The naive path: the tiny model's Transformer and Pooling modules, its Normalize left out."""
    transformer, pooling = model[0], model[1]
    with torch.no_grad():
        out = pooling(transformer({k: torch.from_numpy(v) for k, v in features.items()}))
    return out["sentence_embedding"].numpy()  # (B, D)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def export_folder(tiny_model, tmp_path_factory) -> Path:
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "export", quantize=True)


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model, so the cache can write into it and its files can change."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def export_calls(monkeypatch) -> list:
    calls = []
    real = onnx_backend.export_onnx

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_backend, "export_onnx", counting)
    return calls


def test_fp32_export_matches_torch_before_normalisation(tiny_model, export_folder):
    model = load(tiny_model)
    features = tokenize(model, TEXTS)
    assert len(set(features["attention_mask"].sum(1).tolist())) > 5  # a padded batch of many lengths
    forward = OnnxForward(export_folder, quantized=False, num_threads=1)
    got = forward(features)  # (B, D)
    want = torch_pooled(model, features)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), forward.dim)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The model ends in Normalize; the graph stops at the pooled vector, which is not unit length.
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_int8_export_stays_close_to_torch(tiny_model, export_folder):
    model = load(tiny_model)
    features = tokenize(model, TEXTS)
    got = OnnxForward(export_folder, quantized=True, num_threads=1)(features)
    cos = cosines(got, torch_pooled(model, features))
    # Measured on this tiny model (seeds 0-2): mean 0.99998, min 0.99997; all-MiniLM-L6-v2: mean 0.993.
    assert cos.mean() > 0.999 and cos.min() > 0.995


def test_forward_drops_keys_the_graph_does_not_take_and_fills_token_types(tiny_model, export_folder):
    model = load(tiny_model)
    features = tokenize(model, TEXTS[:3])
    forward = OnnxForward(export_folder, quantized=False, num_threads=1)
    assert forward.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    want = forward(features)
    extra = dict(features, prompt_length=np.array([1]), input_ids=features["input_ids"].astype(np.int32))
    np.testing.assert_array_equal(forward(extra), want)
    without_types = {k: v for k, v in features.items() if k != "token_type_ids"}
    np.testing.assert_array_equal(forward(without_types), want)  # all-zero token types, as transformers does
    with pytest.raises(KeyError, match="attention_mask"):
        forward({"input_ids": features["input_ids"]})


def test_cached_export_is_reused_then_redone_when_the_model_changes(model_copy, export_calls):
    first = cached_export(model_copy, quantize=False)
    assert first.parent == model_copy / ".pairmill-onnx"
    assert cached_export(model_copy, quantize=False) == first
    assert len(export_calls) == 1
    with pytest.raises(ValueError, match="quantized=False"):
        OnnxForward(first, quantized=True)

    weights = next(model_copy.rglob("model.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-saved model
    second = cached_export(model_copy, quantize=False)
    assert second != first and len(export_calls) == 2
    assert not first.exists()  # the stale export was removed
    assert OnnxForward(second, quantized=False).manifest["fingerprint"] == onnx_backend.model_fingerprint(model_copy)


def test_a_read_only_model_folder_is_cached_in_the_user_cache(model_copy, tmp_path, monkeypatch):
    # Root writes anywhere, so read-only is simulated through the writability check.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert export_cache_dir(model_copy) == model_copy / ".pairmill-onnx"
    monkeypatch.setattr(onnx_backend, "is_writable", lambda folder: False)
    fallback = export_cache_dir(model_copy)
    assert fallback.parent == tmp_path / "xdg" / "pairmill" / "onnx"
    assert export_cache_dir(model_copy, cache_root=tmp_path / "mine").parent == tmp_path / "mine"
    # Different models, different folders; the same model by another spelling, the same folder.
    assert export_cache_dir(tmp_path) != fallback
    assert export_cache_dir(model_copy / ".." / "model") == fallback


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_is_writable_sees_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert not onnx_backend.is_writable(folder)
    finally:
        folder.chmod(0o755)
    assert onnx_backend.is_writable(folder)


def test_concurrent_cached_exports_export_once(model_copy, tmp_path, export_calls):
    results, errors = [], []

    def export():
        try:
            results.append(cached_export(model_copy, quantize=False, cache_root=tmp_path / "cache"))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=export) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(export_calls) == 1
    assert len(set(results)) == 1 and (results[0] / "model.onnx").is_file()


def test_a_crashed_export_leaves_nothing_that_looks_finished(model_copy, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"

    def crash(fp32_path, int8_path):
        raise KeyboardInterrupt("killed while quantising")

    monkeypatch.setattr(onnx_backend, "_quantize_int8", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_export(model_copy, quantize=True, cache_root=cache_root)
    cache_dir = export_cache_dir(model_copy, cache_root)
    assert [p.name for p in cache_dir.iterdir()] == [".lock"]  # the half export was removed

    # A process killed outright leaves its temp folder behind; the next export clears it.
    leftover = cache_dir / ".v1-0123456789abcdef-int8.tmp-x1y2"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    monkeypatch.undo()
    done = cached_export(model_copy, quantize=True, cache_root=cache_root)
    assert not leftover.exists()
    assert sorted(p.name for p in done.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx"]


def test_the_encoder_runs_the_onnx_backend_and_a_ray_job_takes_it(ray_session, tiny_model, tmp_path):
    """encoder.backend=onnx: unit vectors close to torch's, its own fingerprint, and the Ray actors of
    a job (which cannot pickle a session) build it themselves."""
    import json

    from pairmill.cli import main
    from pairmill.config import EncoderConfig
    from pairmill.encoder import Encoder
    from tests.conftest import literal_pairs, write_jsonl

    onnx_encoder, torch_encoder = Encoder(tiny_model, backend="onnx"), Encoder(tiny_model)
    assert onnx_encoder.precision == "int8"
    a, b = onnx_encoder.encode(TEXTS, "passage"), torch_encoder.encode(TEXTS, "passage")
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert cosines(a, b).min() > 0.995
    assert EncoderConfig(model=tiny_model, backend="onnx").fingerprint() != EncoderConfig(model=tiny_model).fingerprint()
    with pytest.raises(ValueError, match="valid: torch, onnx"):
        Encoder(tiny_model, backend="tensorrt")

    data = write_jsonl(tmp_path / "pairs.jsonl", literal_pairs(20))
    assert main(["embed", str(data), "-o", str(tmp_path / "emb"), "--model", tiny_model, "encoder.backend=onnx"]) == 0
    stats = json.loads((tmp_path / "emb" / "stats.json").read_text())
    assert stats["kept"] == 20 and stats["encoder"]["backend"] == "onnx"
