import json
import math
from pathlib import Path

import numpy as np
import pytest

from pairmill.evaluate import (
    RetrievalTask,
    alignment,
    beir_task,
    evaluate,
    evaluate_embeddings,
    load_task,
    normalize_rows,
    pairs_task,
    query_metrics,
    ranking_metrics,
    retrieve,
    uniformity,
)
from pairmill.vectors import exact_search


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_three_queries_by_hand():
    # Corpus at 0, 30, 60, 90 degrees; queries at 0, 90, 40 degrees. Rankings by cosine:
    #   q0: c0 c1 c2 c3    q1: c3 c2 c1 c0    q2: c1 c2 c0 c3
    corpus = np.array([_unit(0), _unit(30), _unit(60), _unit(90)], dtype=np.float32)
    queries = np.array([_unit(0), _unit(90), _unit(40)], dtype=np.float32)
    qrels = [{1: 1.0}, {3: 1.0, 0: 1.0}, {0: 2.0, 3: 1.0}]
    task = RetrievalTask(["q0", "q1", "q2"], ["c0", "c1", "c2", "c3"], qrels, [(0, 1), (1, 3), (2, 0)], [None] * 3)
    m = evaluate_embeddings(task, queries, corpus)
    # q0: relevant at rank 2 -> nDCG 1/log2(3) = 0.630930, MRR 1/2, R@1 0
    # q1: relevant at ranks 1 and 4 -> DCG 1 + 1/log2(5) = 1.430677, IDCG 1 + 1/log2(3) = 1.630930
    #     -> nDCG 0.877215, MRR 1, R@1 1/2
    # q2: gain 2 at rank 3, gain 1 at rank 4 -> DCG 2/2 + 1/log2(5) = 1.430677, IDCG 2 + 1/log2(3) = 2.630930
    #     -> nDCG 0.543792, MRR 1/3, R@1 0
    assert m["ndcg@10"] == pytest.approx((0.630930 + 0.877215 + 0.543792) / 3, abs=1e-5)
    assert m["mrr@10"] == pytest.approx((0.5 + 1 + 1 / 3) / 3, abs=1e-6)
    assert m["recall@1"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert m["recall@10"] == m["recall@100"] == 1.0
    # positives: q0-c1 (30 deg), q1-c3 (0 deg), q2-c0 (40 deg): squared distance 2 - 2 cos
    assert m["alignment"] == pytest.approx((2 - 2 * math.cos(math.radians(30)) + 0 + 2 - 2 * math.cos(math.radians(40))) / 3, abs=1e-5)
    assert m["queries"] == 3 and m["corpus"] == 4


def test_alignment_and_uniformity_by_hand():
    x = np.array([[1, 0], [1, 0]], dtype=np.float32)
    y = np.array([[0, 1], [1, 0]], dtype=np.float32)
    assert alignment(x, y) == pytest.approx(1.0)  # (2 + 0) / 2
    assert uniformity(np.array([[1, 0], [-1, 0]])) == pytest.approx(-8.0)  # one pair, distance^2 = 4
    # three points: distances^2 of 2, 2, 4 -> log((e^-4 + e^-4 + e^-8) / 3)
    assert uniformity(np.array([[1, 0], [0, 1], [-1, 0]])) == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3))


def test_exact_search_matches_a_full_sort():
    rng = np.random.default_rng(0)
    corpus, queries = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    scores, ids = exact_search(corpus, queries, k=25, query_batch=7)
    full = queries @ corpus.T
    for i in range(len(queries)):
        expected = sorted(range(len(corpus)), key=lambda j: (-full[i, j], j))[:25]
        assert ids[i].tolist() == expected
        np.testing.assert_allclose(scores[i], full[i, expected], rtol=1e-6)
    scores, ids = exact_search(corpus[:5], queries, k=25)  # fewer rows than k: padded, as FAISS pads
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all() and sorted(ids[0, :5]) == list(range(5))
    assert exact_search(corpus[:0], queries, k=3)[1].shape == (40, 3)


def test_pairs_task_uses_text_equality_and_extra_corpus():
    task = pairs_task(["q1", "q2", "q3"], ["p1", "p2", "p1"], extra_corpus=["p3", "p2"])
    assert task.corpus == ["p1", "p2", "p3"]
    assert task.qrels == [{0: 1.0}, {1: 1.0}, {0: 1.0}]
    with pytest.raises(ValueError, match="no relevant document"):
        ranking_metrics([[0]], [{0: 0.0}])


def test_beir_folder(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        "\n".join(json.dumps(d) for d in [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "q2", "text": "two"}]) + "\n"
    )
    (tmp_path / "queries.jsonl").write_text(
        "\n".join(json.dumps(q) for q in [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "no qrels"}])
    )
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq2\td1\t1\nq2\tmissing\t1\n")
    task = beir_task(tmp_path)
    assert task.queries == ["first", "second"] and task.corpus == ["T one", "two"]
    assert task.qrels == [{0: 2.0}, {0: 1.0}]
    assert task.exclude == [None, 1]  # q2 never retrieves the document with its own id
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    m = evaluate_embeddings(task, np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), emb)
    assert m["recall@1"] == 0.5  # q1 ranks d1 second; q2 has doc 1 excluded, so d1 comes first


def test_a_messy_beir_folder_is_read_with_counted_rejections(tmp_path):
    """Bad lines, a null title, an integer _id, a repeated _id, a lone surrogate and bad qrels lines
    are counted per file (used + rejected == lines), never raised."""
    (tmp_path / "qrels").mkdir()
    corpus = [
        b'{"_id": "d1", "title": null, "text": "one"}',  # a null title used to raise TypeError
        b'{"_id": 2, "title": "Two", "text": ""}',  # an integer id; a title and no text: the title
        b"{not json",
        b'{"_id": "d1", "text": "again"}',  # duplicate_id
        b'{"title": "no id", "text": "x"}',  # missing_id
        b'{"_id": "d4", "text": "bad \\udc00 text"}',  # invalid_unicode
        b'{"_id": "d5", "title": null, "text": null}',  # missing_text
        b"\xff\xfe",  # invalid_utf8
    ]
    (tmp_path / "corpus.jsonl").write_bytes(b"\n".join(corpus) + b"\n")
    (tmp_path / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "first"}\n{"_id": "q2"}\n[1]\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\tx\nq1\td4\t1\nbroken\nq1\t2\t0\n")
    task = load_task(str(tmp_path))
    assert task.corpus == ["one", "Two"] and task.queries == ["first"] and task.qrels == [{0: 1.0}]
    counts = {Path(p).name: c for p, c in task.inputs.items()}
    assert counts["corpus.jsonl"] == {"input_rows": 8, "used": 2, "rejected": {
        "duplicate_id": 1, "invalid_json": 1, "invalid_unicode": 1, "invalid_utf8": 1, "missing_id": 1, "missing_text": 1}}
    assert counts["queries.jsonl"] == {"input_rows": 3, "used": 1, "rejected": {"missing_text": 1, "not_an_object": 1}}
    # the header is not a row; a score of 0 is a line used (not relevant); d4 was rejected: unknown_id
    assert counts["test.tsv"] == {"input_rows": 5, "used": 2, "rejected": {"bad_qrels_line": 2, "unknown_id": 1}}
    for c in counts.values():
        assert c["used"] + sum(c["rejected"].values()) == c["input_rows"]


def word_set_vectors(texts, kind):
    """Deterministic vectors of real texts, a lexical retriever: the hashed set of a text's words
    (cosine = shared words / sqrt(product of word counts), so equal scores are common)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    hashing = HashingVectorizer(n_features=4096, binary=True, norm=None, alternate_sign=False)
    return hashing.transform(texts).toarray().astype(np.float32)  # (len(texts), 4096)


@pytest.fixture(scope="module")
def sample_tasks(tmp_path_factory):
    """The bundled held-out split as eval reads it (one relevant passage per query), and the same
    texts as a BEIR folder with graded qrels: 2 for a term's own definitions (a term both sources
    define is one query with two), 1 for the passages that cite it as "{term}" (FOLDOC's and the
    Jargon File's cross-references)."""
    from pairmill.sample import HELDOUT

    pairs = load_task(str(HELDOUT))
    folder = tmp_path_factory.mktemp("graded")
    (folder / "qrels").mkdir()
    terms = list(dict.fromkeys(pairs.queries))
    own = {t: set() for t in terms}
    for qi, d in pairs.positives:
        own[pairs.queries[qi]].add(d)
    lines = ["query-id\tcorpus-id\tscore"]
    for i, term in enumerate(terms):
        cites = {d for d, text in enumerate(pairs.corpus) if "{" + term + "}" in text} - own[term]
        lines += [f"q{i}\td{d}\t2" for d in sorted(own[term])] + [f"q{i}\td{d}\t1" for d in sorted(cites)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(pairs.corpus)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(terms)))
    return {"pairs": pairs, "graded": load_task(str(folder))}


TREC_NAMES = {"ndcg@10": "ndcg_cut_10", "recall@1": "recall_1", "recall@10": "recall_10", "recall@100": "recall_100",
              "mrr@10": "recip_rank"}


@pytest.mark.parametrize("name", ["pairs", "graded"])
def test_metrics_equal_trec_eval_per_query_on_the_sample(sample_tasks, name):
    """Every query's nDCG@10, Recall@1/10/100 and MRR@10, and their means, equal trec_eval's
    (pytrec_eval) on a real run: the held-out sample's texts, retrieved by pairmill."""
    import pytrec_eval

    task = sample_tasks[name]
    q, c = normalize_rows(word_set_vectors(task.queries, "query")), normalize_rows(word_set_vectors(task.corpus, "passage"))
    ranked, scores = retrieve(task, q, c, query_batch=64)  # several query batches
    for ids, row in zip(ranked, scores):  # pairmill's order: score descending, ties to the smaller id
        assert all((row[r], -ids[r]) > (row[r + 1], -ids[r + 1]) for r in range(len(ids) - 1))
    # trec_eval sorts a run by score and equal scores by docno descending: corpus id d is docno
    # N - d, so its order is pairmill's, ties included (the run has ties that matter; see the end).
    assert all(g == int(g) for rel in task.qrels for g in rel.values())  # trec_eval's grades are integers

    def trec_eval(docno, measures, depth=None):
        qrels = {str(i): {docno(d): int(g) for d, g in rel.items()} for i, rel in enumerate(task.qrels)}
        run = {str(i): {docno(d): s for d, s in list(zip(ids, row))[:depth]} for i, (ids, row) in enumerate(zip(ranked, scores))}
        return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)

    n = len(task.corpus)
    library = trec_eval(lambda d: f"{n - d:07d}", {"ndcg_cut.10", "recall.1,10,100"})
    reciprocal = trec_eval(lambda d: f"{n - d:07d}", {"recip_rank"}, depth=10)  # trec_eval -M 10: MRR@10
    assert set(library) == set(reciprocal) == {str(i) for i in range(len(task.qrels))}  # no query left out
    expected = []
    for i, (ids, rel) in enumerate(zip(ranked, task.qrels)):
        theirs = {key: (reciprocal if key == "mrr@10" else library)[str(i)][trec] for key, trec in TREC_NAMES.items()}
        assert query_metrics(ids, rel) == pytest.approx(theirs, abs=1e-12), f"query {i} {task.queries[i]!r}"
        expected.append(theirs)
    means = evaluate(task, word_set_vectors)  # end to end from the texts
    for key in TREC_NAMES:
        assert means[key] == pytest.approx(np.mean([e[key] for e in expected]), abs=1e-12), key
    # What the run exercised: misses (metrics 0, still averaged in), partial nDCG, and ties that
    # decide metrics: with docnos in the other order, trec_eval's numbers change.
    assert 0 < sum(e["recall@100"] == 0 for e in expected) and 0 < sum(0 < e["ndcg@10"] < 1 for e in expected)
    assert trec_eval(lambda d: f"{d:07d}", {"ndcg_cut.10", "recall.1,10,100"}) != library
    if name == "graded":
        assert sum(len(rel) > 1 for rel in task.qrels) >= 20 and {1.0, 2.0} <= {g for rel in task.qrels for g in rel.values()}
