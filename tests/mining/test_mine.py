"""The mine job against a plain in-process loop, its false-negative rules, and a shard killed midway."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.index import ShardedIndex
from pairmill.vectors import exact_search
from mining.mine import mine
from mining.positives import attach_positives
from mining.search import mine_pairs, pad_random
from pairmill.pairs import text_key
from mining.negatives import positive_sets, select_negatives
from pairmill.cli import main
from pairmill.config import EncoderConfig, MineConfig, RayConfig, ReadConfig
from pairmill.vectors import fixed_size_list
from pairmill.encoder import Encoder
from pairmill.pairs import normalize_text
from tests.conftest import literal_pairs, write_jsonl

SELECTION = {"num_negatives": 3, "range_min": 0, "range_max": 10, "margin_ratio": None, "max_score": None,
             "sampling": "top", "seed": 0}


def tricky_pairs() -> list[dict]:
    """Literal pairs plus the cases false-negative control exists for."""
    pairs = literal_pairs(60)
    # Another pair's passage, text-identical after normalisation (spacing), under a new query.
    pairs.append({"query": "search index 0", "passage": "  " + pairs[0]["passage"].replace(" ", "   ") + " "})
    # Two more positives of pair 1's query: never negatives for any of the three.
    pairs.append({"query": pairs[1]["query"], "passage": pairs[2]["passage"]})
    pairs.append({"query": pairs[1]["query"], "passage": "hacker jargon word text vector node"})
    return pairs


def reference(pairs: list[dict], model: str) -> tuple[dict, dict, np.ndarray]:
    """The same mining as a plain loop: encode, distinct corpus, exact search, select.
    Returns ({(query, passage): chosen scores}, {corpus key: vector}, query vectors)."""
    enc = Encoder(model)
    corpus: dict[int, str] = {}
    for p in pairs:
        corpus.setdefault(text_key(p["passage"]), p["passage"])
    keys = np.array(list(corpus), dtype=np.int64)
    corpus_vecs = enc.encode(list(corpus.values()), "passage")  # (C, D)
    q = enc.encode([p["query"] for p in pairs], "query")  # (N, D)
    pos = enc.encode([p["passage"] for p in pairs], "passage")  # (N, D)
    positives = positive_sets([normalize_text(p["query"]) for p in pairs], [text_key(p["passage"]) for p in pairs])
    k = SELECTION["range_max"] + max(len(s) for s in positives)
    scores, rows = exact_search(corpus_vecs, q, k)
    ids = np.where(rows >= 0, keys[np.maximum(rows, 0)], -1)
    chosen = select_negatives(ids, scores, (q * pos).sum(1), positives, **SELECTION)
    scores_of = {(p["query"], p["passage"]): s[i >= 0] for p, s, i in zip(pairs, chosen.scores, chosen.ids)}
    return scores_of, dict(zip(keys.tolist(), corpus_vecs)), dict(zip((p["query"] for p in pairs), q))


def test_mine_job_matches_a_plain_loop(ray_session, tiny_model, tmp_path):
    pairs = tricky_pairs()
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs + ["{not json", {"query": "", "passage": "x"}])
    out = tmp_path / "mined"
    mine_cfg = MineConfig(**{k: v for k, v in SELECTION.items()}, shards=2, shard_cpus=0.5)
    stats = mine(str(src), str(out), corpus_path=None, encoder=EncoderConfig(model=tiny_model, batch_size=8),
                 read=ReadConfig(), mine_cfg=mine_cfg, ray=RayConfig())

    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == len(pairs) + 2 and stats["kept"] == len(pairs)
    assert stats["rejected"] == {"empty_text": 1, "invalid_json": 1}
    assert stats["corpus"]["passages"] == len(pairs) - 2  # the respaced copy and the reused passage are one text each
    assert stats["index"]["shards"] == 2 and not (out / "work").exists()
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert manifest["ntotal"] == len(pairs) - 2 and manifest["encoder_fingerprint"] == stats["encoder_fingerprint"]

    kept = pq.read_table(out / "kept").to_pylist()
    assert {"negatives", "negative_ids", "negative_scores", "positive_score"} <= set(kept[0])
    # The tiny random model scores many passages within float rounding of each other, so which
    # of two tied passages is chosen may differ from the loop: compare scores, and check each id.
    want, vector_of, query_vector = reference(pairs, tiny_model)
    for row in kept:
        np.testing.assert_allclose(row["negative_scores"], want[(row["query"], row["passage"])], atol=1e-5)
        true_scores = [float(vector_of[i] @ query_vector[row["query"]]) for i in row["negative_ids"]]
        np.testing.assert_allclose(row["negative_scores"], true_scores, atol=1e-5)
        assert len(row["negatives"]) == len(row["negative_ids"]) == len(row["negative_scores"])
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
    short = sum(len(r["negative_ids"]) < SELECTION["num_negatives"] for r in kept)
    assert stats["negatives"]["short_pairs"] == short
    assert stats["negatives"]["total"] == sum(len(r["negative_ids"]) for r in kept)

    # False-negative control: no negative is text-identical to a positive of the same query.
    positives_of: dict[str, set[str]] = {}
    for p in pairs:
        positives_of.setdefault(normalize_text(p["query"]), set()).add(normalize_text(p["passage"]))
    for row in kept:
        for negative in row["negatives"]:
            assert normalize_text(negative) not in positives_of[normalize_text(row["query"])]
    by_query = {r["query"]: r for r in kept}
    assert normalize_text(pairs[0]["passage"]) not in {normalize_text(n) for n in by_query["search index 0"]["negatives"]}


def test_mine_cli_reuses_embeddings_and_adds_an_extra_corpus(ray_session, tiny_model, tmp_path, capsys):
    """A job folder with embeddings of the same encoder is not encoded again; --corpus adds passages;
    mine.min_negative_words keeps the shorter passages out of the negatives, not out of the pairs."""
    from pairmill.encoder import EncodeBatch
    from pairmill.config import encoder_kwargs
    from pairmill.output import JobFolder

    pairs = literal_pairs(30)
    encoder = EncoderConfig(model=tiny_model, batch_size=8)
    # A finished job folder whose kept rows carry embeddings (what `pairmill filter` writes).
    job = JobFolder(tmp_path / "filtered")
    table = pa.Table.from_pylist([{"id": f"p{i}", **p, "negatives": None} for i, p in enumerate(pairs)])
    table = EncodeBatch("pairs", encoder_kwargs(encoder), keep_columns=True)(table)
    pq.write_table(table, os.path.join(job.path("kept"), "part.parquet"))
    job.commit({"input_rows": 30, "kept": 30, "dropped": {}, "rejected": {}, "encoder_fingerprint": encoder.fingerprint()})
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": "unix hacker jargon file"}, {"text": pairs[0]["passage"]},
                                                   {"text": 7}])
    short = {p["passage"] for p in pairs if len(p["passage"].split()) < 12} | {"unix hacker jargon file"}
    assert 1 < len(short) < 20

    rc = main(["mine", str(tmp_path / "filtered"), "-o", str(tmp_path / "out"), "--corpus", str(extra),
               "--model", tiny_model, "encoder.batch_size=8", "mine.shard_cpus=0.5", "mine.margin_ratio=none",
               "mine.min_negative_words=12"])
    assert rc == 0 and f"31, {len(short)} under mine.min_negative_words=12 left out; {31 - len(short)} in 1 shard(s)" in \
        capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["reused_embeddings"] and stats["kept"] == 30
    assert stats["corpus"]["passages"] == 31  # one new text; the copy of pair 0's passage is the same entry
    assert stats["corpus"]["extra"]["rows"] == 2 and stats["corpus"]["extra"]["rejected"] == {"wrong_type": 1}
    assert stats["corpus"]["fewer_words_than_min"] == len(short) and stats["corpus"]["negative_pool"] == 31 - len(short)
    mined = pq.read_table(tmp_path / "out" / "kept").to_pylist()
    assert {r["passage"] for r in mined} == {p["passage"] for p in pairs}  # short passages' pairs are mined too
    negatives = [n for r in mined for n in r["negatives"]]
    assert negatives and not short & set(negatives) and stats["negatives"]["total"] == len(negatives)


def _pairs_dataset(n: int, dim: int, rng) -> tuple:
    """Random unit vectors as an already-encoded pairs dataset with positives attached."""
    import ray

    vecs = rng.standard_normal((2 * n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q, p = vecs[:n], vecs[n:]
    keys = np.arange(1000, 1000 + n, dtype=np.int64)
    table = pa.table({
        "id": [f"r{i}" for i in range(n)], "query": [f"q{i}" for i in range(n)], "passage": [f"p{i}" for i in range(n)],
        "query_embedding": fixed_size_list(q), "passage_embedding": fixed_size_list(p),
        "query_key": pa.array(keys // 2, pa.int64()),  # two pairs per query: each has two positives
        "passage_key": pa.array(keys, pa.int64()),
    })
    table = pa.concat_tables([attach_positives(table.filter(pa.compute.equal(table["query_key"], k)))
                              for k in np.unique(keys // 2)])
    return ray.data.from_arrow([table.slice(i, 12) for i in range(0, n, 12)]), keys, p


def test_killing_a_shard_midway_leaves_the_result_unchanged(ray_session, tmp_path):
    import ray

    ds, keys, passages = _pairs_dataset(240, 16, np.random.default_rng(0))
    index = ShardedIndex.create(2, 16, "Flat", num_cpus=0.25, folder=str(tmp_path / "index"))
    try:
        index.add_batches([(keys[:120], passages[:120], [f"p{i}" for i in range(120)]),
                           (keys[120:], passages[120:], [f"p{i}" for i in range(120, 240)])])
        clean = mine_pairs(ds, index, SELECTION, batch_size=8).to_pandas().sort_values("id")

        def pid(shard):
            return ray.get(shard.__ray_call__.remote(lambda self: os.getpid()))

        before = pid(index.shards[0])
        batches = []
        for i, batch in enumerate(mine_pairs(ds, index, SELECTION, batch_size=8).iter_batches(batch_format="pandas")):
            if i == 0:  # the job is under way: kill a shard; Ray restarts it from its saved file
                ray.kill(index.shards[0], no_restart=False)
            batches.append(batch)
        assert pid(index.shards[0]) != before  # it really died and came back
        import pandas as pd

        killed = pd.concat(batches).sort_values("id")
        assert len(killed) == len(clean) == 240
        for column in ("negative_ids", "negatives", "negative_scores"):
            assert [list(v) for v in killed[column]] == [list(v) for v in clean[column]]
        # Own passage and the other positive of the same query are never negatives.
        for row in clean.itertuples():
            own = int(row.passage[1:]) + 1000
            assert own not in set(row.negative_ids) and (own ^ 1) not in set(row.negative_ids)
    finally:
        index.close()


def test_lookup_and_vectors_come_back_from_the_shards(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((50, 8)).astype(np.float32)
    ids = np.arange(50, dtype=np.int64) * 7
    with ShardedIndex.create(3, 8, "Flat", num_cpus=0.25) as index:
        index.add_batches([(ids[i:i + 10], vecs[i:i + 10], [f"t{j}" for j in ids[i:i + 10]]) for i in range(0, 50, 10)])
        got = index.lookup(np.array([[14, -1], [0, 343]]))
        assert got.tolist() == [["t14", None], ["t0", "t343"]]
        np.testing.assert_array_equal(index.vectors(np.array([14, 0])), vecs[[2, 0]])
        assert np.isnan(index.vectors(np.array([-1]))).all()
        with pytest.raises(KeyError, match="no text"):
            index.lookup(np.array([5]))


def test_pad_random_fills_short_rows_with_non_positives():
    ids = np.array([[5, -1, -1], [7, 8, 9]])
    padded_ids, padded = pad_random(ids, [{1, 2}, {3}], pool=np.array([1, 5, 2, 6, 3, 4]))
    assert padded_ids.tolist() == [[5, 6, 3], [7, 8, 9]] and padded.tolist() == [2, 0]
    padded_ids, padded = pad_random(np.array([[-1, -1]]), [{1}], pool=np.array([1, 4]))
    assert padded_ids.tolist() == [[4, -1]] and padded.tolist() == [1]  # the pool ran out: still short, not faked


def test_random_padding_is_asked_for_and_marked(ray_session, tmp_path):
    import ray

    from pairmill.vectors import to_matrix

    ds, keys, passages = _pairs_dataset(48, 16, np.random.default_rng(1))
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    query_of = dict(zip(table.column("id").to_pylist(), to_matrix(table.column("query_embedding"))))
    nothing_passes = {**SELECTION, "max_score": -1.0}  # every candidate filtered: all rows short
    with ShardedIndex.create(2, 16, "Flat", num_cpus=0.25) as index:
        index.add_batches([(keys, passages, [f"p{i}" for i in range(48)])])
        plain = mine_pairs(ds, index, nothing_passes, batch_size=8).to_pandas()
        assert all(len(v) == 0 for v in plain["negative_ids"]) and (plain["padded_negatives"] == 0).all()
        padded = mine_pairs(ds, index, nothing_passes, batch_size=8, pad="random").to_pandas()
    assert (padded["padded_negatives"] == 3).all()
    for row in padded.itertuples():
        own = int(row.passage[1:]) + 1000
        assert len(set(row.negative_ids)) == 3 and not {own, own ^ 1} & set(row.negative_ids)
        expect = [float(passages[i - 1000] @ query_of[row.id]) for i in row.negative_ids]
        np.testing.assert_allclose(row.negative_scores, expect, atol=1e-5)


def test_a_query_repeated_20000_times_mines_in_bounded_memory_and_time(ray_session, tmp_path):
    """A generic query ("A small example package") over 20,000 pairs: its positives are kept once
    (the PositiveStore), not in each of its 20,000 rows (400M keys), and it is searched with them
    excluded inside FAISS instead of 20,000 deep. Its negatives are the best passages that are not
    its positives, exactly; the other queries mine as before."""
    import time

    import pyarrow.compute as pc

    from mining.positives import PositiveStore, add_keys
    from mining.search import write_mined
    from pairmill.config import INLINE_POSITIVES

    n_big, n_other, dim = 20_000, 300, 16
    rng = np.random.default_rng(7)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    q0 = unit(rng.standard_normal(dim))
    big_passages = unit(q0 + 0.4 * rng.standard_normal((n_big, dim)))  # all close to q0: they crowd its top
    other_queries, other_passages = unit(rng.standard_normal((n_other, dim))), unit(rng.standard_normal((n_other, dim)))
    table = add_keys(pa.table({
        "id": [f"b{i}" for i in range(n_big)] + [f"o{i}" for i in range(n_other)],
        "query": ["A small example package"] * n_big + [f"other query {i}" for i in range(n_other)],
        "passage": [f"generic {i}" for i in range(n_big)] + [f"other passage {i}" for i in range(n_other)],
        "source": pa.nulls(n_big + n_other, pa.string()),
        "negatives": pa.nulls(n_big + n_other, pa.list_(pa.string())),
        "query_embedding": fixed_size_list(np.concatenate([np.tile(q0, (n_big, 1)), other_queries])),
        "passage_embedding": fixed_size_list(np.concatenate([big_passages, other_passages])),
    }))
    (tmp_path / "pairs").mkdir()
    for i in range(0, table.num_rows, 4096):
        pq.write_table(table.slice(i, 4096), tmp_path / "pairs" / f"part-{i:06d}.parquet")
    passages = np.concatenate([big_passages, other_passages])
    keys = table.column("passage_key").to_numpy()

    # the grouping step keeps a big query's keys once, in the store, and nothing per row
    store = PositiveStore.create(1)
    try:
        group = attach_positives(table.slice(0, n_big), store)
        assert group.column("positive_keys").null_count == n_big and group.column("positive_count")[0].as_py() == n_big
        assert len(store.get([table.column("query_key")[0].as_py()])[table.column("query_key")[0].as_py()]) == n_big
        small = attach_positives(table.slice(n_big, 1), store)
        assert small.column("positive_keys").to_pylist() == [[keys[n_big]]] and INLINE_POSITIVES < n_big
    finally:
        store.close()

    cfg = MineConfig(**SELECTION, shards=2, shard_cpus=0.5)
    with ShardedIndex.create(2, dim, "Flat", num_cpus=0.5) as index:
        index.add_batches([(keys[i:i + 4096], passages[i:i + 4096], table.column("passage").to_pylist()[i:i + 4096])
                           for i in range(0, len(keys), 4096)])
        t0 = time.perf_counter()
        write_mined(tmp_path / "pairs", table.num_rows, index, cfg, str(tmp_path / "mined"))
        seconds = time.perf_counter() - t0
    assert seconds < 120, seconds  # on main: 20,000 x 20,000 positive keys and a 20,030-deep search
    mined = pq.read_table(tmp_path / "mined")
    assert mined.num_rows == n_big + n_other
    generic = mined.filter(pc.equal(mined["query"], "A small example package")).to_pylist()
    # exactly the best non-positives of q0: the other pairs' passages, by brute force
    scores = other_passages @ q0
    best = np.argsort(-scores, kind="stable")[: SELECTION["num_negatives"]]
    for row in generic[:50] + generic[-50:]:
        assert row["negatives"] == [f"other passage {i}" for i in best]
        np.testing.assert_allclose(row["negative_scores"], scores[best], atol=1e-5)
    assert all(len(r["negatives"]) == SELECTION["num_negatives"] for r in generic)
    for row in mined.filter(pc.not_equal(mined["query"], "A small example package")).to_pylist():
        assert row["passage"] not in row["negatives"] and len(row["negatives"]) == SELECTION["num_negatives"]
