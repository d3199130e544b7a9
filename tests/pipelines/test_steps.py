"""Each filter step on in-memory batches, against a naive loop."""

import numpy as np
import pyarrow as pa
import pytest

from pairmill.config import ConfigError, FilterConfig
from pairmill.vectors import fixed_size_list
from pairmill.pairs import normalize_text, validate_records
from pipelines.audit import AUTO_FRACTION, AUTO_KS, audit_summary, calibrate_k, choose_k, corrupt_rows, rank_counts
from pipelines.consistency import RANK_DEPTH, TIE_TOL, consistency_ranks, exact_pool_search
from pipelines.decontaminate import EvalTexts, contamination
from pipelines.dedup import add_dedup_key, mark_exact_duplicates
from pipelines.filter import ScorePairs, with_status_columns
from pipelines.semdedup import assign_clusters, fit_kmeans, semdedup_cluster, survivor_order
from tests.conftest import literal_pairs


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def jitter(rng, x, scale):
    y = x + scale * rng.standard_normal(x.shape).astype(np.float32)
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


# --- exact dedup ------------------------------------------------------------------------------


def test_exact_dedup_across_blocks_matches_a_naive_loop():
    pairs = literal_pairs(80)
    rows = pairs + pairs[:10] + [{**p, "query": "  " + p["query"].replace(" ", "\u00a0 ")} for p in pairs[5:15]]
    rows += [{"query": "q", "passage": ""}, "not an object"]
    table = validate_records(rows, [f"in:{i}" for i in range(len(rows))])
    keyed = add_dedup_key(table)
    # The job's groupby sends every copy of a key to one group; here: three arbitrary key groups.
    buckets = [keyed.filter(pa.array([hash(k) % 3 == b for k in keyed.column("dedup_key").to_pylist()])) for b in range(3)]
    marked = pa.concat_tables([mark_exact_duplicates(b) for b in buckets]).sort_by("origin").to_pylist()

    keeper = {}
    for row in table.to_pylist():  # naive: the smallest (id, origin) per normalised pair
        if row["reason"] is None:
            key = (normalize_text(row["query"]), normalize_text(row["passage"]))
            keeper[key] = min(keeper.get(key, (row["id"], row["origin"])), (row["id"], row["origin"]))
    expected = {}
    for row in table.to_pylist():
        if row["reason"] is not None:
            expected[row["origin"]] = (row["reason"], None)
            continue
        kid, korigin = keeper[(normalize_text(row["query"]), normalize_text(row["passage"]))]
        expected[row["origin"]] = (None, None) if korigin == row["origin"] else ("exact_duplicate", kid)
    assert {r["origin"]: (r["reason"], r["dup_of"]) for r in marked} == expected
    assert sum(r["reason"] == "exact_duplicate" for r in marked) == 20


# --- consistency ------------------------------------------------------------------------------


def naive_rank(q, p, pool, depth):
    own = float(q @ p)
    return min(1 + sum(float(q @ x) > own + TIE_TOL for x in pool), depth + 1)


def test_consistency_ranks_match_a_naive_loop():
    rng = np.random.default_rng(0)
    queries, pool = unit(rng, 50), unit(rng, 300)
    passages = np.concatenate([jitter(rng, queries[:25], 0.1), unit(rng, 25)])  # half related, half random
    pool[:10] = passages[:10]  # some own passages are in the pool: they tie and do not count
    for depth in (2, RANK_DEPTH):
        ranks = consistency_ranks(queries, passages, exact_pool_search(pool), depth)
        assert ranks.tolist() == [naive_rank(q, p, pool, depth) for q, p in zip(queries, passages)]
    assert (ranks[:25] <= 2).mean() > 0.8 and (ranks[25:] > 2).mean() > 0.8


def naive_rank_near(q, p, pool, depth, eps):
    """naive_rank where a pool passage within cosine 1 - eps of the own passage does not count."""
    own = float(q @ p)
    return min(1 + sum(float(q @ x) > own + TIE_TOL and float(x @ p) < 1 - eps for x in pool), depth + 1)


def test_near_copies_in_the_pool_do_not_count_and_corrupted_pairs_are_still_caught():
    rng = np.random.default_rng(3)
    queries = unit(rng, 60)
    passages = jitter(rng, queries, 0.2)  # clean pairs: related, not identical
    # A near-copy of each own passage, nudged towards its query: it outranks the own passage.
    copies = passages + 0.15 * queries
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    assert ((copies * passages).sum(1) > 0.95).all() and ((copies * queries).sum(1) > (passages * queries).sum(1)).all()
    pool = np.concatenate([unit(rng, 300), copies[:30], copies[:30]])  # two near-copies each for half the pairs
    search = exact_pool_search(pool)
    plain = consistency_ranks(queries, passages, search, 2)
    near = consistency_ranks(queries, passages, search, RANK_DEPTH, near_eps=0.05)
    assert (plain[:30] > 2).all()  # without the rule every pair with copies would be dropped at k=2
    assert near.tolist() == [naive_rank_near(q, p, pool, RANK_DEPTH, 0.05) for q, p in zip(queries, passages)]
    assert (near[:30] <= 2).mean() > 0.8  # the clean pair with near-copies is kept
    # Corrupted: query a with passage b. Pair a's own passage (in the pool, not a near-copy of b's)
    # still outranks the borrowed passage, so the pair is still removed.
    pool2 = np.concatenate([pool, passages])
    borrowed = np.roll(passages, 1, axis=0)
    corrupted = consistency_ranks(queries, borrowed, exact_pool_search(pool2), RANK_DEPTH, near_eps=0.05)
    assert (corrupted > 2).mean() > 0.9
    assert corrupted.tolist() == [naive_rank_near(q, p, pool2, RANK_DEPTH, 0.05) for q, p in zip(queries, borrowed)]


def test_more_near_copies_than_the_slack_leave_the_rank_below_the_depth():
    from pipelines.consistency import NEAR_SLACK

    rng = np.random.default_rng(5)
    q = unit(rng, 1)
    p = jitter(rng, q, 0.5)
    better = q[0] + 0.05 * rng.standard_normal((NEAR_SLACK + RANK_DEPTH + 5, q.shape[1])).astype(np.float32)
    better /= np.linalg.norm(better, axis=1, keepdims=True)  # all score above the own passage, none a copy of it
    ranks = consistency_ranks(q, p, exact_pool_search(better), RANK_DEPTH, near_eps=0.05)
    assert ranks.tolist() == [RANK_DEPTH + 1]


# --- semantic dedup ---------------------------------------------------------------------------


def naive_greedy(q, p, ids, centroid_sims, eps, on, keep):
    """All pairs, one row at a time: drop a row when it is within cosine 1 - eps of a kept row."""
    kept, dup_of = [], [None] * len(ids)
    for i in survivor_order(ids, centroid_sims, keep):
        def sim(j):
            return {"passage": p[i] @ p[j], "query": q[i] @ q[j], "both": min(p[i] @ p[j], q[i] @ q[j])}[on]

        near = [j for j in kept if sim(j) > 1 - eps]
        if near:
            dup_of[i] = ids[max(near, key=sim)]
        else:
            kept.append(i)
    return dup_of


@pytest.mark.parametrize("on,keep", [("passage", "hard"), ("query", "easy"), ("both", "random")])
def test_semdedup_cluster_matches_the_naive_greedy_loop(on, keep):
    rng = np.random.default_rng(1)
    q, p = unit(rng, 120), unit(rng, 120)
    p[60:90], q[60:90] = jitter(rng, p[:30], 0.02), jitter(rng, q[:30], 0.02)  # 30 planted near-duplicates
    p[90:100] = jitter(rng, p[60:70], 0.02)  # chains: duplicates of duplicates
    ids = [f"r{i:03d}" for i in range(120)]
    sims = unit(rng, 120)[:, 0]
    got = semdedup_cluster(q, p, ids, sims, eps=0.01, on=on, keep=keep)
    assert got == naive_greedy(q, p, ids, sims, 0.01, on, keep)
    assert sum(d is not None for d in got) >= 20
    kept = {i for i, d in zip(ids, got) if d is None}
    assert {d for d in got if d is not None} <= kept


@pytest.mark.parametrize("on,keep", [("passage", "hard"), ("both", "random")])
def test_copies_are_decided_once_and_keep_what_the_naive_loop_keeps(on, keep):
    """A template text copied over hundreds of rows (and near-copies of it): the same rows are kept as
    by the naive loop over every row, every copy points at a kept row within eps, and the work is
    done on distinct vectors only, in blocks (BLOCK=8 here, so many blocks)."""
    import pipelines.semdedup as semdedup

    rng = np.random.default_rng(5)
    q, p = unit(rng, 150), unit(rng, 150)
    p[50:90], q[50:90] = jitter(rng, p[:40], 0.02), jitter(rng, q[:40], 0.02)
    p = np.concatenate([p, np.repeat(p[:3], 200, axis=0)])  # 600 copies of three texts
    q = np.concatenate([q, np.repeat(q[:3], 200, axis=0)])
    ids = [f"r{i:04d}" for i in range(len(p))]
    sims = unit(rng, len(p))[:, 0]
    sims[150:] = np.repeat(sims[:3], 200)  # a copy sits where its text sits
    got = semdedup.semdedup_cluster(q, p, ids, sims, eps=0.01, on=on, keep=keep)
    naive = naive_greedy(q, p, ids, sims, 0.01, on, keep)
    assert [d is None for d in got] == [d is None for d in naive]
    index = {rid: i for i, rid in enumerate(ids)}
    sim = {"passage": lambda i, j: p[i] @ p[j], "both": lambda i, j: min(p[i] @ p[j], q[i] @ q[j])}[on]
    for i, d in enumerate(got):
        if d is not None:
            assert got[index[d]] is None and sim(i, index[d]) > 0.99
    kept, best = semdedup.greedy_dedup(q[:150], p[:150], on, 0.01, block=8)
    kept_all, best_all = semdedup.greedy_dedup(q[:150], p[:150], on, 0.01, block=1000)
    assert kept.tolist() == kept_all.tolist() and best.tolist() == best_all.tolist()


def test_semdedup_by_clusters_vs_brute_force():
    rng = np.random.default_rng(2)
    centres = unit(rng, 8, 32)
    p = jitter(rng, np.repeat(centres, 150, axis=0), 0.5)  # 1,200 rows in 8 blobs
    p[1000:1200] = jitter(rng, p[:200], 0.01)
    q = p.copy()
    ids = [f"r{i:04d}" for i in range(len(p))]
    centroids = fit_kmeans(p, 8, seed=0)
    cluster, sims = assign_clusters(p, centroids)
    by_cluster = [None] * len(p)
    for c in np.unique(cluster):
        rows = np.flatnonzero(cluster == c)
        for r, d in zip(rows, semdedup_cluster(q[rows], p[rows], [ids[i] for i in rows], sims[rows], eps=0.01)):
            by_cluster[r] = d
    brute = semdedup_cluster(q, p, ids, sims, eps=0.01)  # one cluster = all pairs
    differ = sum((a is None) != (b is None) for a, b in zip(by_cluster, brute))
    assert sum(d is not None for d in brute) >= 190 and differ <= 0.02 * len(p)


# --- decontamination --------------------------------------------------------------------------


def test_contamination_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    eval_q, eval_p = unit(rng, 20), unit(rng, 20)
    texts = EvalTexts(
        exact={"what is unix": "e1", "an operating system": "e1"},
        query_ids=[f"e{i}" for i in range(20)], query_embeddings=eval_q,
        passage_ids=[f"e{i}" for i in range(20)], passage_embeddings=eval_p,
    )
    queries = ["what  is\u00a0unix", "a", "b", "c"] + [f"q{i}" for i in range(26)]
    passages = ["x", "an operating\tsystem", "y", "z"] + [f"p{i}" for i in range(26)]
    q, p = unit(rng, 30), unit(rng, 30)
    q[5], p[7] = jitter(rng, eval_q[4], 0.001), jitter(rng, eval_p[9], 0.001)
    got = contamination(queries, passages, q, p, texts, eps=0.05)

    exact = {normalize_text(t): i for t, i in texts.exact.items()}
    expected = []
    for i in range(30):  # naive
        hit = exact.get(normalize_text(queries[i])) or exact.get(normalize_text(passages[i]))
        for vec, pool in ((q[i], eval_q), (p[i], eval_p)):
            sims = [float(vec @ e) for e in pool]
            if hit is None and max(sims) > 0.95:
                hit = f"e{int(np.argmax(sims))}"
        expected.append(hit)
    assert got == expected and got[:2] == ["e1", "e1"] and got[5] == "e4" and got[7] == "e9"
    assert contamination(queries, passages, q, p, texts, eps=0.0)[5] is None  # exact only


# --- audit ------------------------------------------------------------------------------------


def test_corrupt_rows_pairs_each_chosen_query_with_another_rows_passage():
    ids = [f"id{i}" for i in range(2000)]
    passages = [f"passage {i}" for i in range(2000)]
    passages[1] = passages[0]
    query_rows, passage_rows = corrupt_rows(ids, passages, 0.2, seed=7)
    assert 0.15 < len(query_rows) / 2000 < 0.25
    assert len(set(query_rows.tolist())) == len(query_rows) and not (query_rows == passage_rows).any()
    assert all(passages[a] != passages[b] for a, b in zip(query_rows, passage_rows))
    again = corrupt_rows(ids, passages, 0.2, seed=7)
    assert (again[0] == query_rows).all() and (again[1] == passage_rows).all()
    # The same rows in another order make the same (query id, passage id) pairs.
    order = np.random.default_rng(3).permutation(2000)
    shuffled = corrupt_rows([ids[i] for i in order], [passages[i] for i in order], 0.2, seed=7)
    assert sorted((ids[order[a]], ids[order[b]]) for a, b in zip(*shuffled)) == sorted(
        (ids[a], ids[b]) for a, b in zip(query_rows, passage_rows))


def test_audit_summary_counts_shares_per_k():
    summary = audit_summary(np.array([1, 1, 2, 3]), np.array([1, 5, 11, 11]), k=2, pool=100, fraction=0.2)
    assert summary["corrupted_removed"] == 0.75 and summary["clean_kept"] == 0.75
    assert summary["curve"]["1"] == {"corrupted_removed": 0.75, "clean_kept": 0.5}
    assert summary["curve"]["10"] == {"corrupted_removed": 0.5, "clean_kept": 1.0}


def test_choose_k_estimates_the_mismatched_share_and_takes_the_largest_k_under_the_target():
    depth = max(AUTO_KS)
    # 200 corrupted pairs at ranks 0, 20, ..., 3980 (about uniform over a 4,000-passage pool); the data:
    # 80 consistent pairs at rank 0 and 20 mismatched ones ranked like the corrupted (0, 200, ..., 3800).
    corrupted = rank_counts(np.arange(0, 4000, 20), depth)
    clean = rank_counts(np.array([0] * 80 + list(range(0, 4000, 200))), depth)
    choice = choose_k(clean, corrupted, 0.01)
    # Estimated at k=1000, the deepest k that 100 corrupted pairs still rank beyond (149 of 200):
    # 14 of the data's 100 pairs rank beyond it, so up to 0.14 / 0.745 of them are mismatched.
    assert choice["estimated_at"] == 1000 and choice["mismatched"] == round(0.14 / 0.745, 4)
    m = 0.14 / 0.745
    assert choice["curve"]["100"] == {"corrupted_removed": 0.97, "clean_kept": 0.81, "kept_mismatched": round(m * 0.03 / 0.81, 4)}
    assert choice["curve"]["200"]["kept_mismatched"] == round(m * 0.055 / 0.82, 4)  # 0.0126
    assert choice["k"] == 100 and choice["met"]
    assert choose_k(clean, corrupted, 0.02)["k"] == 200
    assert choose_k(clean, corrupted, 0.05)["k"] == 500
    assert choose_k(clean, corrupted, 0.06)["k"] == depth
    strict = choose_k(clean, corrupted, 0.001)  # even k=1 keeps an estimated 0.12% mismatched
    assert strict["k"] == 1 and not strict["met"]
    # The estimate is read at the deepest k that 100 corrupted pairs rank beyond, even when that is
    # fewer than half of them (190 of 400 here: a pool of about 2,000, where k=1000 lets half through).
    near_half = rank_counts(np.array([600] * 210 + [2000] * 190), depth)
    at_1000 = choose_k(rank_counts(np.array([0] * 95 + [2000] * 5), depth), near_half, 0.02)
    assert at_1000["estimated_at"] == 1000 and at_1000["mismatched"] == round(0.05 / 0.475, 4)
    # Clean data, nothing ranked deep: kept whole at the deepest k, at any target.
    whole = choose_k(rank_counts(np.array([0] * 90 + [3] * 10), depth), corrupted, 0.0)
    assert whole["mismatched"] == 0 and whole["k"] == depth and whole["curve"][str(depth)]["clean_kept"] == 1.0
    # Nothing to estimate from: no corrupted pair, or a pool so small that none ranks beyond k=1.
    for hopeless in (choose_k(clean, rank_counts(np.empty(0), depth), 0.01), choose_k(clean, rank_counts(np.ones(50, int), depth), 0.01)):
        assert hopeless["k"] == 1 and not hopeless["met"] and hopeless["mismatched"] is None


def test_calibrate_k_keeps_clean_data_whole_and_is_strict_on_noisy_data(ray_session):
    """The rule both ways on datasets of embedded pairs: clean pairs are kept whole; with a fifth of
    the passages given to other queries, the estimate sees the noise and the chosen k removes the
    mismatched pairs while keeping the consistent ones."""
    import ray.data

    def calibrate(n, noisy):
        rng = np.random.default_rng(8)
        q = unit(rng, n, d=32)
        p = jitter(rng, q, 0.15)
        bad = np.flatnonzero(rng.random(n) < 0.2) if noisy else np.empty(0, dtype=np.int64)
        p[bad] = p[np.roll(bad, 1)]  # these queries now hold another row's passage
        table = pa.table({"id": [f"r{i}" for i in range(n)], "passage": [f"passage {i}" for i in range(n)],
                          "query_embedding": fixed_size_list(q), "passage_embedding": fixed_size_list(p)})
        options = FilterConfig(k="auto", auto_rows=n, auto_mismatched=0.01)
        return calibrate_k(ray.data.from_arrow(table), n, exact_pool_search(p), options), len(bad) / n

    clean, _ = calibrate(1500, noisy=False)
    assert clean["k"] == max(AUTO_KS) and clean["mismatched"] < 0.005 and clean["curve"]["1000"]["clean_kept"] > 0.995
    assert abs(clean["corrupted"] - AUTO_FRACTION * 1500) < 0.05 * 1500 and clean["clean"] == 1500
    noisy, share = calibrate(1500, noisy=True)
    kept = noisy["curve"][str(noisy["k"])]
    assert share - 0.02 < noisy["mismatched"] < share + 0.05  # an upper bound, close on data like this
    assert noisy["met"] and noisy["k"] <= 50 and kept["kept_mismatched"] <= 0.01  # 0.2 * 50 / 1500 / 0.8 = 0.8%
    assert kept["corrupted_removed"] > 0.95 and abs(kept["clean_kept"] - (1 - share)) < 0.02  # the consistent ones, kept


# --- the per-row scoring step, in memory ------------------------------------------------------


def test_score_pairs_step_in_memory():
    rng = np.random.default_rng(4)
    n = 200
    q = unit(rng, n)
    p = jitter(rng, q, 0.4)
    p[150:] = unit(rng, 50)  # 50 pairs whose passage is unrelated to the query
    table = validate_records([{"id": f"r{i}", "query": f"q {i}", "passage": f"p {i}"} for i in range(n)], ["x"] * n)
    table = with_status_columns(table)
    table = table.append_column("query_embedding", fixed_size_list(q)).append_column("passage_embedding", fixed_size_list(p))
    step = ScorePairs(search=exact_pool_search(p), k=2, centroids=fit_kmeans(p, 1), audit=0.3, seed=1)
    out = step(table)
    real = out.filter(pa.compute.invert(out.column("audit")))
    assert real.column("id").to_pylist() == table.column("id").to_pylist()
    ranks = real.column("rank").to_numpy()
    assert ranks.tolist() == [naive_rank(a, b, p, RANK_DEPTH) for a, b in zip(q, p)]
    assert real.column("reason").to_pylist() == ["inconsistent" if r > 2 else None for r in ranks]
    corrupted = out.filter(out.column("audit"))
    assert 30 < len(corrupted) < 90 and set(corrupted.column("reason").to_pylist()) == {"audit"}
    assert (corrupted.column("rank").to_numpy() > 2).mean() > 0.9


def test_filter_config_is_validated():
    with pytest.raises(ConfigError, match="filter.audit measures the consistency filter"):
        FilterConfig(consistency=False, audit=0.2)
    with pytest.raises(ConfigError, match="filter.eps=0"):
        FilterConfig(eps=0)
    with pytest.raises(ConfigError, match="filter.k=0"):
        FilterConfig(k=0)
    with pytest.raises(ConfigError, match="filter.k=auto chooses"):
        FilterConfig(k="auto", consistency=False)
    assert FilterConfig(k="auto").k == "auto"
