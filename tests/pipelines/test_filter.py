"""The filter job on Ray: every row accounted for, reasons and dup_of right, and the same result as
a plain loop over the same rows."""

import json

import numpy as np
import pyarrow.parquet as pq

from pairmill.cli import main as cli
from pairmill.config import EncoderConfig, FilterConfig, RayConfig, ReadConfig
from pairmill.vectors import to_matrix
from pairmill.encoder import Encoder
from pairmill.read import load_parsed_local
from pairmill.pairs import normalize_text
from pipelines.consistency import TIE_TOL, rank_depth
from pipelines.filter import filter_pairs
from tests.conftest import write_jsonl
from tests.pairmill.test_pairs import BAD_LINES
from tests.pipelines.conftest import topical_pairs
from tests.pipelines.test_steps import naive_greedy

P_A = "memory disk cpu network node cluster graph tree list string"
P_N = "hacker jargon term word text query passage index search model vector"
P_S = "file code software machine user process function"
EVAL = [
    {"id": "e1", "query": "function error protocol unix", "passage": "an evaluation passage about bits"},
    {"id": "e2", "query": "an evaluation query", "passage": P_S},
]
PLANTED = [
    {"id": "a-keep", "query": P_A, "passage": P_A},
    {"id": "b-dup1", "query": "  " + P_A, "passage": P_A.replace(" ", "  ")},  # exact duplicate after normalising
    {"id": "b-dup2", "query": P_A, "passage": P_A},
    {"id": "n1", "query": P_N, "passage": P_N},
    {"id": "n2", "query": P_N.upper(), "passage": P_N.upper()},  # same words: a semantic duplicate of n1
    {"id": "inc", "query": P_N, "passage": "bit byte the a of to"},  # n1 and n2 outrank its own passage
    {"id": "c1", "query": "function error protocol unix", "passage": "function error protocol unix"},  # eval query
    {"id": "c2", "query": P_S.upper(), "passage": P_S.upper()},  # near-duplicate of an eval passage
]


def make_input(tmp_path):
    rows = topical_pairs(150) + PLANTED
    lines = [json.dumps(r).encode() for r in rows] + [line for line, _ in BAD_LINES]
    src = tmp_path / "raw.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src, write_jsonl(tmp_path / "eval.jsonl", EVAL)


def plain_filter(src, eval_path, model, k=2, eps=0.01, decontaminate_eps=0.05, near_eps=0.05):
    """The whole filter as one loop over in-memory rows: {id: (reason, dup_of)} for every valid row."""
    rows = [r for r in load_parsed_local(src).to_pylist() if r["reason"] is None]
    keeper, out = {}, {}
    for r in rows:
        key = (normalize_text(r["query"]), normalize_text(r["passage"]))
        keeper[key] = min(keeper.get(key, (r["id"], r["origin"])), (r["id"], r["origin"]))
    unique = []
    for r in rows:
        kid, korigin = keeper[(normalize_text(r["query"]), normalize_text(r["passage"]))]
        if korigin == r["origin"]:
            unique.append(r)
        else:
            out[r["id"]] = ("exact_duplicate", kid)
    encoder = Encoder(model)
    q = encoder.encode([r["query"] for r in unique], "query")
    p = encoder.encode([r["passage"] for r in unique], "passage")
    evals = load_parsed_local(eval_path).to_pylist()
    exact = {}
    for e in evals:
        exact.setdefault(normalize_text(e["query"]), e["id"])
        exact.setdefault(normalize_text(e["passage"]), e["id"])
    eq = encoder.encode([e["query"] for e in evals], "query")
    ep = encoder.encode([e["passage"] for e in evals], "passage")
    alive = []
    for i, r in enumerate(unique):
        # A pool passage within cosine 1 - near_eps of the own passage does not count against it.
        above = ((p @ q[i]) > float(q[i] @ p[i]) + TIE_TOL) & ((p @ p[i]) < 1 - near_eps)
        rank = min(1 + int(above.sum()), rank_depth(k) + 1)
        hit = exact.get(normalize_text(r["query"])) or exact.get(normalize_text(r["passage"]))
        if hit is None and (eq @ q[i]).max() > 1 - decontaminate_eps:
            hit = evals[int((eq @ q[i]).argmax())]["id"]
        if hit is None and (ep @ p[i]).max() > 1 - decontaminate_eps:
            hit = evals[int((ep @ p[i]).argmax())]["id"]
        if rank > k:
            out[r["id"]] = ("inconsistent", None)
        elif hit is not None:
            out[r["id"]] = ("contaminated", hit)
        else:
            alive.append(i)
    centroid = p.mean(axis=0) / np.linalg.norm(p.mean(axis=0))  # one cluster at this size
    ids = [unique[i]["id"] for i in alive]
    dup_of = naive_greedy(q[alive], p[alive], ids, p[alive] @ centroid, eps, "passage", "hard")
    for rid, d in zip(ids, dup_of):
        out[rid] = ("semantic_duplicate", d) if d else (None, None)
    return out


def test_filter_job_accounts_for_every_row_and_matches_a_plain_loop(ray_session, bow_model, tmp_path):
    src, eval_path = make_input(tmp_path)
    options = FilterConfig(decontaminate=[str(eval_path)], audit=0.3)
    encoder = EncoderConfig(model=bow_model, batch_size=16)
    stats = filter_pairs(str(src), str(tmp_path / "out"), options=options, encoder=encoder, read=ReadConfig(), ray=RayConfig())

    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "dropped", "kept", "rejected", "stats.json"]
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert stats["input_rows"] == 158 + len(BAD_LINES)
    assert stats["input_rows"] == stats["kept"] + sum(stats["dropped"].values()) + sum(stats["rejected"].values())
    rejected = {}
    for _, reason in BAD_LINES:
        rejected[reason] = rejected.get(reason, 0) + 1
    assert stats["rejected"] == dict(sorted(rejected.items()))
    assert stats["encoder_fingerprint"] == encoder.fingerprint() and stats["encoder"]["model"] == bow_model
    assert [s["name"] for s in stats["stages"]] == ["exact_dedup", "unique_ids", "encode", "consistency", "decontaminate",
                                                    "semdedup"]
    assert stats["stages"][0]["rows_in"] == 158
    for before, after in zip(stats["stages"], stats["stages"][1:]):
        assert after["rows_in"] == before["rows_out"]
    assert stats["stages"][-1]["rows_out"] == stats["kept"]
    assert stats["semdedup"]["n_clusters"] == 1 and stats["semdedup"]["largest_cluster"] >= stats["kept"]

    kept = pq.read_table(out / "kept")
    dropped = pq.read_table(out / "dropped").to_pylist()
    assert kept.schema.names == ["id", "query", "passage", "source", "negatives", "group", "query_embedding", "passage_embedding"]
    assert str(kept.schema.field("passage_embedding").type) == "fixed_size_list<element: float>[64]"
    kept_ids = set(kept.column("id").to_pylist())
    got = {r["id"]: (r["reason"], r["dup_of"]) for r in dropped} | {i: (None, None) for i in kept_ids}
    assert got == plain_filter(src, eval_path, bow_model)  # the audit rows leaked nowhere

    reasons = {r["id"]: r for r in dropped}
    assert reasons["b-dup1"]["dup_of"] == reasons["b-dup2"]["dup_of"] == "a-keep" and "a-keep" in kept_ids
    assert (reasons["n2"]["reason"], reasons["n2"]["dup_of"]) == ("semantic_duplicate", "n1") and "n1" in kept_ids
    assert reasons["inc"]["reason"] == "inconsistent" and reasons["inc"]["rank"] >= 3
    assert (reasons["c1"]["reason"], reasons["c1"]["dup_of"]) == ("contaminated", "e1")
    assert (reasons["c2"]["reason"], reasons["c2"]["dup_of"]) == ("contaminated", "e2")
    assert all(r["dup_of"] in kept_ids for r in dropped if r["reason"] == "semantic_duplicate")
    assert all(r["rank"] > 2 for r in dropped if r["reason"] == "inconsistent")

    # Embeddings in kept/ are the encoder's, computed once.
    direct = Encoder(bow_model).encode(kept.column("passage").to_pylist(), "passage")
    np.testing.assert_allclose(to_matrix(kept.column("passage_embedding")), direct, atol=1e-5)

    audit = stats["audit"]
    assert audit["corrupted"] > 10 and audit["clean"] == stats["stages"][2]["rows_in"]
    assert audit["corrupted_removed"] > 0.8 and set(audit["curve"]) == {"1", "2", "5", "10"}


def test_filter_k_auto_chooses_k_from_the_data_and_applies_it(ray_session, bow_model, tmp_path):
    rows = topical_pairs(300)
    bad = list(range(0, 300, 6))  # 50 rows (a sixth) mismatched: each query given the next bad row's passage
    passages = [rows[i]["passage"] for i in bad]
    for i, passage in zip(bad, passages[1:] + passages[:1]):
        rows[i] = {**rows[i], "id": f"bad{i}", "passage": passage}
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    rc = cli(["filter", str(src), "-o", str(tmp_path / "out"), "--model", bow_model, "filter.semdedup=false",
              "filter.k=auto", "filter.auto_mismatched=0.01"])
    assert rc == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    auto = stats["consistency"]["auto"]
    assert stats["filter"]["k"] == "auto" and stats["consistency"]["k"] == auto["k"]
    assert auto["k"] == max(int(k) for k, share in auto["curve"].items() if share["kept_mismatched"] <= 0.01)  # the stated rule
    assert 1 / 6 - 0.03 < auto["mismatched"] < 1 / 6 + 0.08 and auto["corrupted"] > 30 and auto["clean"] == 300
    dropped = pq.read_table(tmp_path / "out" / "dropped")
    assert all(r > auto["k"] for r in dropped.column("rank").to_pylist()) and stats["kept"] == 300 - dropped.num_rows
    # The sample was the whole input, scored against the same pool: the job keeps what it measured.
    assert abs(stats["kept"] / 300 - auto["curve"][str(auto["k"])]["clean_kept"]) < 1e-3
    # The mismatched rows go; of the consistent ones (which this bag-of-words model ranks up to ~100
    # deep in a pool of 300) k keeps what it can at that purity: 44% at k=5 when written.
    gone = set(dropped.column("id").to_pylist())
    assert sum(f"bad{i}" in gone for i in bad) >= 0.9 * len(bad) and len(gone - {f"bad{i}" for i in bad}) < 0.6 * 250


def test_filter_cli_without_embeddings_and_rerun(ray_session, bow_model, tmp_path, capsys):
    src, eval_path = make_input(tmp_path)
    folder = tmp_path / "in"  # two files, so two blocks: a copy in the second must meet its original
    folder.mkdir()
    src.rename(folder / "a.jsonl")
    write_jsonl(folder / "b.jsonl", [{"id": "z-dup3", "query": P_A, "passage": P_A + " "}])
    src = folder
    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "old.parquet").write_text("left over from an earlier run")
    rc = cli(["filter", str(src), "-o", str(out), "--model", bow_model, "filter.consistency=false", "filter.semdedup=false",
              "filter.decontaminate_eps=0", "--decontaminate", str(eval_path), str(eval_path)])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"contaminated": 1, "exact_duplicate": 3}  # c1 only: c2 is a semantic match
    assert stats["kept"] == 158 - 3 and "encoder_fingerprint" not in stats
    dropped = {r["id"]: r for r in pq.read_table(out / "dropped").to_pylist()}
    assert dropped["z-dup3"]["dup_of"] == "a-keep" and dropped["c1"]["dup_of"] == "e1"
    assert stats["filter"]["decontaminate"] == [str(eval_path)] * 2
    assert not (out / "kept" / "old.parquet").exists()
    assert pq.read_table(out / "kept").schema.names == ["id", "query", "passage", "source", "negatives", "group"]
    assert "155 kept" in capsys.readouterr().out

    assert cli(["filter", str(src), "-o", str(out), "--audit", "0.2", "filter.consistency=false"]) == 2
    assert "filter.audit measures the consistency filter" in capsys.readouterr().err


def test_a_pass_too_big_for_the_object_store_goes_to_the_job_folder(ray_session, tmp_path, monkeypatch):
    """hold(): the same rows come back either way; over its share of the object store a pass is
    written to parquet in the staging folder instead of materialised."""
    import ray

    import pipelines.filter as filter_module

    ds = ray.data.from_items([{"id": f"r{i}", "x": i} for i in range(50)])
    in_memory = filter_module.hold(ds, tmp_path / "a", estimate=1)
    assert not (tmp_path / "a").exists()
    on_disk = filter_module.hold(ds, tmp_path / "b", estimate=10**15)
    assert any((tmp_path / "b").glob("*.parquet"))
    assert sorted(r["id"] for r in on_disk.take_all()) == sorted(r["id"] for r in in_memory.take_all())
