import json
import shutil

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from pairmill.encoder import Encoder, bundled_model_path, resolve_model
from tests.conftest import literal_pairs


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(tiny_model, batch_size=4, query_prefix="query: ", passage_prefix="passage: ")


def test_matches_sentence_transformers_in_input_order(encoder, tiny_model):
    texts = [r["passage"] for r in literal_pairs(23)]  # uneven lengths, not a multiple of the batch
    reference = SentenceTransformer(tiny_model, device="cpu").encode(texts, batch_size=5)
    ours = encoder.encode(texts)
    assert ours.dtype == np.float32 and ours.shape == (23, 32)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the model's Normalize module


def test_prefixes_are_applied_per_kind(encoder):
    np.testing.assert_allclose(encoder.encode(["unix"], "query"), encoder.encode(["query: unix"], "text"), atol=1e-6)
    np.testing.assert_allclose(encoder.encode(["unix"], "passage"), encoder.encode(["passage: unix"], "text"), atol=1e-6)
    with pytest.raises(ValueError, match="kind='doc'"):
        encoder.encode(["x"], "doc")


def test_truncation_and_empty_input(encoder):
    long = " ".join(["memory"] * 500)
    assert encoder.encode([long]).shape == (1, 32)  # truncated to max_length, no position overflow
    assert encoder.encode([]).shape == (0, 32)


def test_model_resolution(tmp_path):
    assert resolve_model(None) == str(bundled_model_path())
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == str(bundled_model_path())
    assert (bundled_model_path() / "modules.json").exists()
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("intfloat/e5-small-v2") == "intfloat/e5-small-v2"  # a hub name, loaded online
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model("./missing-model")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(str(tmp_path / "f"))


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Encoder(tiny_model, batch_size=0)
    with pytest.raises(ValueError, match="precision='fp8'"):
        Encoder(tiny_model, precision="fp8")


def test_auto_precision_on_a_cpu_follows_its_flags_and_a_cached_probe(tiny_model, tmp_path, monkeypatch):
    """bf16 only on a CPU with AVX512-BF16/AMX and a probe that measured it faster with the same
    neighbours; the verdict is cached (the probe runs once); PAIRMILL_CPU_PRECISION overrides it."""
    import pairmill.encoder as encoder_module

    monkeypatch.delenv("PAIRMILL_CPU_PRECISION")
    monkeypatch.setenv("PAIRMILL_CACHE", str(tmp_path))
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx2"})
    assert encoder_module.Encoder(tiny_model).precision == "fp32"  # no bf16 instructions: no probe

    probes = []
    verdict = {"precision": "bf16", "speedup": 2.0, "top10_overlap": 1.0}
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(encoder_module, "probe_bf16", lambda enc: probes.append(enc) or verdict)
    assert encoder_module.Encoder(tiny_model).precision == "bf16"
    assert encoder_module.Encoder(tiny_model).precision == "bf16" and len(probes) == 1  # cached
    copy = tmp_path / "fine-tuned"  # a model trained from it: the same architecture, the same verdict
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": str(copy), "transformers_version": "9.9"}))
    assert encoder_module.Encoder(str(copy)).precision == "bf16" and len(probes) == 1
    key = encoder_module.architecture_key(tiny_model)
    assert key.startswith("architecture ") and encoder_module.architecture_key(str(copy)) == key
    (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # another architecture
    assert encoder_module.architecture_key(str(copy)) != key
    assert encoder_module.architecture_key("org/hub-name") == "org/hub-name"
    assert encoder_module.Encoder(tiny_model, precision="fp32").precision == "fp32"  # asked for: no probe
    monkeypatch.setenv("PAIRMILL_CPU_PRECISION", "fp32")
    assert encoder_module.Encoder(tiny_model).precision == "fp32"


def test_the_bf16_probe_measures_speed_and_neighbours(tiny_model):
    from pairmill.encoder import BF16_MIN_SPEEDUP, Encoder, probe_bf16

    result = probe_bf16(Encoder(tiny_model, precision="fp32"), rounds=1)
    assert set(result) == {"precision", "speedup", "top10_overlap"} and 0 <= result["top10_overlap"] <= 1
    assert (result["precision"] == "bf16") == (result["speedup"] >= BF16_MIN_SPEEDUP and result["top10_overlap"] >= 0.95)


def test_a_process_keeps_one_loaded_encoder_until_its_model_changes(tiny_model, tmp_path):
    """``loaded_encoder``, what an encoding task finds on a reused Ray worker: the same settings get
    the same encoder (no second load); other settings or a model folder rewritten in place (a
    refresh round's, a rerun's) load again, and the process keeps one encoder at a time."""
    import shutil

    from pairmill import encoder as encoder_module
    from pairmill.encoder import loaded_encoder
    from tests.conftest import write_tiny_model

    settings = {"model": tiny_model, "batch_size": 4}
    first = loaded_encoder(settings, num_threads=1)
    assert loaded_encoder(dict(settings), num_threads=1) is first
    assert loaded_encoder({**settings, "batch_size": 8}, num_threads=1) is not first
    assert len(encoder_module._LOADED) == 1

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    before = loaded_encoder({"model": str(folder)})
    texts = ["memory and disk"]
    write_tiny_model(tmp_path / "other", seed=1)
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "other" / "st", folder)  # the same path, other weights
    after = loaded_encoder({"model": str(folder)})
    assert after is not before and len(encoder_module._LOADED) == 1
    assert not np.allclose(after.encode(texts), before.encode(texts))
