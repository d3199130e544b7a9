"""A refresh round against a plain loop with the new model; slices; the store; reading the corpus back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.index import ShardedIndex
from mining.refresh import NegativeStore, corpus_texts, current_negatives, refresh_negatives
from pairmill.config import MineConfig
from pairmill.pairs import text_key
from tests.conftest import write_tiny_model
from tests.mining.test_mine import SELECTION, reference, tricky_pairs


def test_refresh_round_matches_a_plain_loop_with_the_new_model(ray_session, tmp_path):
    pairs = tricky_pairs()
    src = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": f"r{i}", **p} for i, p in enumerate(pairs)]), src)
    new_model = str(write_tiny_model(tmp_path / "model-b", seed=1))
    store = NegativeStore.create(2)
    try:
        stats = refresh_negatives(new_model, 40, pairs=str(src), index_folder=None, out=str(tmp_path / "step-40"),
                                  encoder_kwargs={"batch_size": 8}, mine_cfg=MineConfig(**SELECTION, shard_cpus=0.5),
                                  slice_=(0, 2), store=store)
        in_slice = [p for p in pairs if text_key(p["query"]) % 2 == 0]
        assert 0 < stats["pairs"] == len(in_slice) < len(pairs) and stats["corpus"] == len(pairs) - 2
        assert stats["refreshed"] == store.size() == len(in_slice)
        assert (tmp_path / "step-40" / "index" / "manifest.json").exists() and not (tmp_path / "step-40" / "work").exists()

        ids = [f"r{i}" for i in range(len(pairs))]
        rows = store.get(ids)
        want, _, _ = reference(pairs, new_model)  # all pairs: positives of a query are all in one slice
        for pair, row in zip(pairs, rows):
            if text_key(pair["query"]) % 2:
                assert row is None  # not in this round's slice
                continue
            negatives, negative_ids, step = row
            assert step == 40 and len(negatives) == len(negative_ids)
            assert negative_ids == [text_key(t) for t in negatives]  # ids are the texts' keys
        scored = pq.read_table(tmp_path / "step-40" / "negatives").to_pylist()
        by_id = {r["id"]: r for r in scored}
        for i, pair in enumerate(pairs):
            if f"r{i}" in by_id:
                np.testing.assert_allclose(by_id[f"r{i}"]["negative_scores"], want[(pair["query"], pair["passage"])], atol=1e-5)

    finally:
        store.close()


def test_current_negatives_prefers_refreshed_rows(ray_session):
    store = NegativeStore.create(3)
    try:
        store.update(pa.table({"id": ["b"], "negatives": [["new"]], "negative_ids": [[7]],
                               "negative_scores": [[0.5]]}), step=12)
        texts, keys, steps = current_negatives(["a", "b", "c"], [["old a"], ["old b"], None], [[1], [2], None], store)
        assert texts == [["old a"], ["new"], []] and keys == [[1], [7], None] and steps == [0, 12, 0]
        texts, _, steps = current_negatives(["a"], [["x"]], [[1]], None)
        assert texts == [["x"]] and steps == [0]
    finally:
        store.close()


def test_corpus_texts_come_from_the_live_index(ray_session, tmp_path):
    vecs = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    with ShardedIndex.create(2, 4, "Flat", num_cpus=0.25, folder=str(tmp_path / "index")) as index:
        index.add_batches([(np.arange(3), vecs[:3], ["a", "b", "c"]), (np.arange(3, 6), vecs[3:], ["d", "e", "f"])])
    rows = corpus_texts("unused", str(tmp_path / "index")).take_all()
    assert sorted((r["passage_key"], r["text"]) for r in rows) == list(zip(range(6), "abcdef"))
    # mine.min_negative_words: the pairs' own passages are filtered as the mine job filters its index
    (tmp_path / "pairs").mkdir()
    pq.write_table(pa.table({"query": ["q1", "q2", "q3"], "passage": ["one", "two words here", "one"]}),
                   tmp_path / "pairs" / "part.parquet")
    pairs = str(tmp_path / "pairs")
    assert [r["text"] for r in corpus_texts(pairs, None, min_words=2).take_all()] == ["two words here"]
    assert sorted(r["text"] for r in corpus_texts(pairs, None).take_all()) == ["one", "two words here"]
