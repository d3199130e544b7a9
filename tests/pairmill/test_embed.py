import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pairmill.config import EncoderConfig, RayConfig, ReadConfig
from pairmill.embed import embed
from pairmill.vectors import to_matrix
from pairmill.encoder import Encoder
from tests.conftest import literal_pairs
from tests.pairmill.test_pairs import BAD_LINES


def _messy_jsonl(path, pairs):
    """Good pairs, every kind of bad line, and a 1 MB text."""
    lines = [json.dumps(p).encode() for p in pairs] + [line for line, _ in BAD_LINES]
    lines.append(json.dumps({"query": "huge", "passage": "memory " * 150_000}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_embed_pairs_counts_every_row(ray_session, tiny_model, tmp_path):
    pairs = literal_pairs(40)
    src = _messy_jsonl(tmp_path / "in.jsonl", pairs)
    encoder = EncoderConfig(model=tiny_model, batch_size=8)
    stats = embed(str(src), str(tmp_path / "out"), mode="pairs", encoder=encoder, read=ReadConfig(), ray=RayConfig())

    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert stats["input_rows"] == 40 + len(BAD_LINES) + 1
    assert stats["kept"] == 41 and stats["truncated"] == 1
    expected = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["rejected"] == dict(sorted(expected.items()))
    assert stats["input_rows"] == stats["kept"] + sum(stats["dropped"].values()) + sum(stats["rejected"].values())

    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert all(r["raw"] and r["origin"].startswith(str(src)) for r in rejected)

    kept = pq.read_table(tmp_path / "out" / "kept")
    assert kept.schema.field("query_embedding").type.list_size == 32
    by_id = dict(zip(kept.column("id").to_pylist(), to_matrix(kept.column("passage_embedding"))))
    direct = Encoder(tiny_model).encode([p["passage"] for p in pairs], "passage")
    from pairmill.pairs import pair_id

    for p, vec in zip(pairs, direct):
        np.testing.assert_allclose(by_id[pair_id(p["query"], p["passage"])], vec, atol=1e-5)


def test_embed_text_mode_and_rerun(ray_session, tiny_model, tmp_path):
    src = tmp_path / "texts.jsonl"
    src.write_text("\n".join(json.dumps({"body": f"text number {i}", "id": i}) for i in range(10)) + "\n{}\n")
    out = tmp_path / "out"
    kw = dict(mode="text", encoder=EncoderConfig(model=tiny_model), read=ReadConfig(text_field="body"), ray=RayConfig())
    first = embed(str(src), str(out), **kw)
    assert first["kept"] == 10 and first["rejected"] == {"missing_text": 1}
    table = pq.read_table(out / "kept")
    assert sorted(table.column("id").to_pylist()) == sorted(str(i) for i in range(10))
    assert table.schema.names == ["id", "embedding"]

    src.write_text(json.dumps({"body": "only one", "id": "z"}) + "\n")
    embed(str(src), str(out), **kw)  # rerun into the same folder: no old rows survive
    assert pq.read_table(out / "kept").column("id").to_pylist() == ["z"]
    assert pq.read_table(out / "rejected").num_rows == 0


def test_encoder_pool_sizing(ray_session):
    from pairmill.cluster import encoder_pool

    pool = encoder_pool()  # 4 logical CPUs in the test session, no GPU
    assert (pool.size, pool.num_cpus, pool.num_gpus) == (1, 3, 0)
    assert encoder_pool(actors=3).num_cpus == 1
    with pytest.raises(ValueError, match="ray.actors=4 needs 4 CPUs"):
        encoder_pool(actors=4)
