"""`pairmill distill` (model2vec) makes a static-embedding sentence-transformers folder that the
encoder (and so every Ray job) takes as --model: unit vectors, in large batches, through the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pairmill.cli import main
from tests.conftest import literal_pairs, write_jsonl

pytest.importorskip("model2vec")


@pytest.fixture(scope="module")
def static_model(tiny_model, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("static") / "model"
    assert main(["distill", "-o", str(out), "--model", tiny_model, "distill.pca_dims=16"]) == 0
    return str(out)


def test_distill_writes_a_static_sentence_transformers_folder(static_model, tiny_model):
    from sentence_transformers import SentenceTransformer

    from pairmill.encoder import Encoder, is_static

    record = json.loads((Path(static_model) / "distill.json").read_text())
    assert record["dimension"] == 16 and record["source_model"] == tiny_model and record["vocabulary"] > 100
    st = SentenceTransformer(static_model, device="cpu")
    assert is_static(st)
    encoder = Encoder(static_model)
    texts = ["unix file system", "the data of a program 3", "zzzz qqqq", "unix file system"]
    vectors = encoder.encode(texts, "passage")
    assert encoder.static and vectors.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[3])
    reference = st.encode(texts, convert_to_numpy=True)  # sentence-transformers' own path, normalised
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, atol=5e-4)  # its output is float16 (the distilled weights are)
    long_text = " ".join(["unix"] * 10 + ["jargon"] * 5000)  # cut to max_length tokens, as a transformer's
    np.testing.assert_allclose(Encoder(static_model, max_length=10).encode([long_text]), Encoder(static_model).encode(["unix"]),
                               atol=1e-6)


def test_a_static_model_runs_through_a_ray_job(ray_session, static_model, tmp_path):
    """What used to die at actor start ('Tokenizer' object has no attribute 'pad_token_id')."""
    data = write_jsonl(tmp_path / "pairs.jsonl", literal_pairs(40))
    assert main(["filter", str(data), "-o", str(tmp_path / "f"), "--model", static_model, "filter.k=5"]) == 0
    stats = json.loads((tmp_path / "f" / "stats.json").read_text())
    assert stats["input_rows"] == 40 and stats["kept"] > 0 and stats["encoder"]["model"] == static_model

    # and trains: the token table itself (float32), one forward per side, exported as a static folder
    from sentence_transformers import SentenceTransformer

    assert main(["train", str(data), "-o", str(tmp_path / "t"), "--model", static_model, "train.max_steps=3",
                 "train.batch_size=8", "train.lr=0.05"]) == 0
    trained = SentenceTransformer(str(tmp_path / "t" / "model"), device="cpu")
    before = SentenceTransformer(static_model, device="cpu")
    assert type(trained[0]).__name__ == "StaticEmbedding"
    assert not np.allclose(trained.encode(["unix file system"]), before.encode(["unix file system"]), atol=1e-3)

