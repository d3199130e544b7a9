"""Mining benchmark: the sharded FAISS index vs exact / brute-force search, and negative quality.

    HF_HUB_OFFLINE=1 python benchmarks/mine.py [--shards 2] [--small 5000] [--repeats 5] [--pairs 0]

Real vectors: every distinct passage and query of /work/shared/data's FOLDOC + Jargon pairs
(~25.9k texts), encoded once with the bundled all-MiniLM-L6-v2 (unless --model) and cached as
.npy under bench-out/, named by model, text count and a hash of the texts.
1. Recall@10: 1,000 held-out queries + 1,000 held-out passages searched against the other
   ~23.9k vectors (passages and queries both: the passages alone are fewer than 20k). The sharded
   IVF index (nprobe swept) against ``exact_search``; the sharded ``Flat`` index must equal exact
   search (ids equal, scores allclose).
2. Throughput and build time at two corpus sizes (--small and the whole corpus): sharded Flat,
   sharded IVF (smallest swept nprobe with recall >= 0.95), one in-process faiss IndexFlatIP,
   and brute-force numpy (``queries @ corpus.T`` + argpartition, in blocks). Methods run
   interleaved, round after round; medians (and the best round, least disturbed by other work
   on the machine) are reported, with how per-query cost grows.
3. Near-duplicate negatives: mine every pair as ``pairmill mine`` does (corpus = distinct
   passages, k = range_max + most positives of a query, 4 negatives from ranks [0, 30)), with
   the positive-aware filter (margin_ratio=0.95) and without; report the share of negatives
   whose cosine to the pair's positive passage is >= 0.95.
Shards run as Ray actors with 1 CPU each on a local Ray (num_cpus=4). Results: bench-out/mine.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
PAIR_FILES = ("foldoc_pairs.jsonl.gz", "jargon_pairs.jsonl.gz")
OUT = Path(__file__).resolve().parent.parent / "bench-out"
K = 10
NEAR_DUP = 0.95  # cosine between a negative and the positive passage above which it is a near-duplicate


# ---------------------------------------------------------------------------------------------
# Data: the pairs, their distinct texts, and the cached embeddings.


def read_pairs(data: Path) -> list[dict]:
    rows = []
    for name in PAIR_FILES:
        with gzip.open(data / name, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def distinct_texts(pairs: list[dict]) -> tuple[list[str], list[str]]:
    """Distinct normalised passages and queries, each sorted (a stable order for the cache)."""
    from pairmill.pairs import normalize_text

    passages = sorted({normalize_text(p["passage"]) for p in pairs})
    queries = sorted({normalize_text(p["query"]) for p in pairs})
    return passages, queries


def cached_embeddings(model: str | None, passages: list[str], queries: list[str]) -> np.ndarray:
    """(len(passages) + len(queries), D) float32, L2-normalised: passages first, then queries.

    Encoding ~26k texts takes ~10 min on 2 CPUs, so the matrix is cached; the file name holds the
    model, the text count and a hash of the texts, so a cache for other texts is never read.
    """
    from pairmill.encoder import Encoder, resolve_model

    model_dir = resolve_model(model)
    digest = hashlib.sha1("\x1e".join(passages + ["\x1d"] + queries).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    model_name = "-".join(Path(model_dir).parts[-2:]) if Path(model_dir).is_dir() else model_dir.replace("/", "--")
    name = f"mine-emb-{model_name}-{len(passages) + len(queries)}-{digest}.npy"
    path = OUT / name
    if path.exists():
        print(f"embeddings: cached {path}")
        return np.load(path)
    print(f"embeddings: encoding {len(passages)} passages + {len(queries)} queries with {model_dir} "
          f"(cached afterwards as {path})")
    encoder = Encoder(model)
    t0 = time.perf_counter()
    vectors = np.concatenate([encoder.encode(passages, "passage", show_progress=True),
                              encoder.encode(queries, "query", show_progress=True)])  # (P + Q, D)
    print(f"embeddings: {len(vectors)} x {vectors.shape[1]} in {time.perf_counter() - t0:.0f}s")
    OUT.mkdir(exist_ok=True)
    np.save(str(path) + ".tmp.npy", vectors)
    os.replace(str(path) + ".tmp.npy", path)  # a killed run never leaves a half-written cache
    return vectors


def holdout_split(n_passages: int, n_queries: int, held: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the embedding matrix: (corpus rows in random order, held-out rows, held-out kind).

    ``held`` passages and ``held`` queries are held out; the corpus is every other text, shuffled
    so that its first N rows are a uniform sample (the small corpus).
    """
    rng = np.random.default_rng(seed)
    held_p = rng.choice(n_passages, held, replace=False)
    held_q = n_passages + rng.choice(n_queries, held, replace=False)
    heldout = np.concatenate([held_p, held_q])
    corpus = np.setdiff1d(np.arange(n_passages + n_queries), heldout)
    kind = np.array(["passage"] * held + ["query"] * held)
    return rng.permutation(corpus), heldout, kind


# ---------------------------------------------------------------------------------------------
# The methods: brute force, one FAISS flat index, the sharded index.


def brute_force(corpus: np.ndarray, queries: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """What a user would write: blocks of ``queries @ corpus.T`` and an argpartition top-k."""
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ corpus.T  # (b, n)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (b, k) unordered
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        out_ids[start : start + block] = np.take_along_axis(part, order, axis=1)
        out_scores[start : start + block] = np.take_along_axis(part_scores, order, axis=1)
    return out_scores, out_ids


def faiss_flat(corpus: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    return index


def ivf_nlist(n: int, shards: int) -> int:
    """Per-shard list count: a power of two <= 4 sqrt(n / shards), with >= 39 training vectors a list."""
    target = min(4 * math.sqrt(n / shards), n / 39)
    return 2 ** int(math.log2(max(target, 1)))


def blocks(vectors: np.ndarray, size: int = 4096):
    for start in range(0, len(vectors), size):
        yield np.arange(start, start + len(vectors[start : start + size]), dtype=np.int64), vectors[start : start + size]


def build_sharded(corpus: np.ndarray, spec: str, shards: int):
    """create + train (IVF only, on the whole corpus) + add; returns (index, seconds)."""
    from mining.index import ShardedIndex

    t0 = time.perf_counter()
    index = ShardedIndex.create(shards, corpus.shape[1], spec, n_vectors=len(corpus), num_cpus=1)
    if index.nlist is not None:
        index.train(corpus)
    index.add_batches(blocks(corpus))
    return index, time.perf_counter() - t0


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query: |found ∩ truth| / k, for id arrays (q, k)."""
    return np.array([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found.tolist(), truth.tolist())])


def compare_exact(scores, ids, ref_scores, ref_ids) -> dict:
    """Sharded Flat vs exact search: ids equal row for row, scores allclose.

    A row whose ids differ but whose score lists agree is an order change between equal scores
    (identical vectors: the uncased model maps 'Foo' and 'foo' to one vector), reported apart.
    """
    rows_differ = ~(ids == ref_ids).all(axis=1)
    scores_close = np.allclose(scores, ref_scores, atol=1e-5)
    tie_rows = rows_differ & np.isclose(scores, ref_scores, atol=1e-5).all(axis=1)
    return {
        "ids_equal": bool(not rows_differ.any()),
        "rows_with_other_ids": int(rows_differ.sum()),
        "of_which_score_ties": int(tie_rows.sum()),
        "scores_allclose": bool(scores_close),
        "max_abs_score_diff": float(np.abs(scores - ref_scores).max()),
    }


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 1 + 2: recall and throughput at one corpus size.


def bench_size(corpus: np.ndarray, heldout: np.ndarray, kind: np.ndarray, args) -> dict:
    """Build every method over ``corpus`` (n, D), check Flat and sweep IVF nprobe against exact
    search for ``heldout`` (q, D), then time search side by side."""
    from pairmill.vectors import exact_search

    n = len(corpus)
    nlist = ivf_nlist(n, args.shards)
    ivf_spec = f"IVF{nlist},Flat"
    print(f"\n== corpus {n} vectors, {len(heldout)} held-out queries, {args.shards} shards x 1 CPU; IVF spec {ivf_spec} per shard")

    # Builds, interleaved; the last build of each kind is the one searched.
    builds: dict[str, list[float]] = {"sharded Flat": [], f"sharded {ivf_spec}": [], "faiss IndexFlatIP": []}
    flat = ivf = single = None
    for _ in range(args.build_repeats):
        for index in (flat, ivf):
            if index is not None:
                index.close()
        flat, seconds = build_sharded(corpus, "Flat", args.shards)
        builds["sharded Flat"].append(seconds)
        ivf, seconds = build_sharded(corpus, ivf_spec, args.shards)
        builds[f"sharded {ivf_spec}"].append(seconds)
        t0 = time.perf_counter()
        single = faiss_flat(corpus)
        builds["faiss IndexFlatIP"].append(time.perf_counter() - t0)
    build_s = {name: statistics.median(times) for name, times in builds.items()}
    print("build (create + train + add, median of %d): " % args.build_repeats
          + ", ".join(f"{name} {s:.2f}s" for name, s in build_s.items()))

    # Exactness of sharded Flat, and IVF recall@10 per nprobe, against exact_search.
    ref_scores, ref_ids = exact_search(corpus, heldout, K)
    flat_check = compare_exact(*flat.search(heldout, K), ref_scores, ref_ids)
    scores, ids = single.search(heldout, K)
    single_check = compare_exact(scores, ids, ref_scores, ref_ids)
    print(f"sharded Flat vs exact_search: {flat_check}")
    print(f"faiss IndexFlatIP vs exact_search: {single_check}")
    sweep = []
    for nprobe in [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist]:
        per_query = recall_at_k(ivf.search(heldout, K, nprobe=nprobe)[1], ref_ids)
        row = {"nprobe": nprobe, "recall@10": float(per_query.mean()),
               **{f"recall@10 {k}": float(per_query[kind == k].mean()) for k in ("query", "passage")}}
        sweep.append(row)
        print(f"  nprobe {nprobe:>3} ({nprobe / nlist:6.1%} of lists): recall@10 {row['recall@10']:.4f} "
              f"(held-out queries {row['recall@10 query']:.4f}, passages {row['recall@10 passage']:.4f})")
    reached = [row for row in sweep if row["recall@10"] >= args.target]
    chosen = reached[0] if reached else sweep[-1]
    nprobe = chosen["nprobe"]
    print(f"  chosen nprobe {nprobe}: " + (f"smallest with recall@10 >= {args.target}" if reached
                                          else f"no swept nprobe reaches recall@10 {args.target}; the largest"))

    # Search throughput, interleaved round after round; one call answers all held-out queries.
    methods = {
        "sharded Flat": lambda: flat.search(heldout, K),
        f"sharded {ivf_spec} nprobe={nprobe}": lambda: ivf.search(heldout, K, nprobe=nprobe),
        "faiss IndexFlatIP (driver, all cores)": lambda: single.search(heldout, K),
        "numpy brute force (blocks of 1024)": lambda: brute_force(corpus, heldout, K),
    }
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    search_s = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0]
    print(f"  (1-min load average {load:.1f} on {os.cpu_count()} cores: timings are shared with other work)")
    best_s = {name: min(t) for name, t in times.items()}  # least disturbed by the other users of the CPUs
    for name, s in search_s.items():
        print(f"  {name:<42} {len(heldout) / s:>10.0f} queries/s  ({s * 1e3:.1f} ms per {len(heldout)})")
    flat.close()
    ivf.close()
    return {
        "corpus": n, "queries": len(heldout), "shards": args.shards, "ivf_spec": ivf_spec, "nlist": nlist,
        "build_seconds": build_s, "flat_vs_exact": flat_check, "faiss_flat_vs_exact": single_check,
        "nprobe_sweep": sweep, "default_nprobe": ivf.nprobe,
        "chosen_nprobe": nprobe, "chosen_recall@10": chosen["recall@10"],
        "load_average": load, "search_seconds": search_s, "search_seconds_best": best_s, "search_seconds_all": times,
        "queries_per_second": {name: len(heldout) / s for name, s in search_s.items()},
        "search_methods": list(methods),
    }


# ---------------------------------------------------------------------------------------------
# 3: negatives mined as `pairmill mine` does, with and without the positive-aware filter.


def bench_negatives(pairs: list[dict], passages: list[str], queries: list[str], vectors: np.ndarray, args) -> dict:
    from mining.negatives import positive_sets, select_negatives
    from pairmill.pairs import normalize_text

    passage_row = {t: i for i, t in enumerate(passages)}
    query_row = {t: i for i, t in enumerate(queries)}
    corpus = vectors[: len(passages)]  # (P, D): each distinct normalised passage once
    query_keys = [normalize_text(p["query"]) for p in pairs]
    positive_ids = np.array([passage_row[normalize_text(p["passage"])] for p in pairs])  # (n,)
    query_vecs = vectors[len(passages) + np.array([query_row[key] for key in query_keys])]  # (n, D)
    positives = positive_sets(query_keys, positive_ids)
    k = args.range_max + max(len(s) for s in positives)
    print(f"\n== negatives: {len(pairs)} pairs, corpus {len(corpus)} distinct passages, "
          f"{len(set(query_keys))} distinct queries (up to {k - args.range_max} positives each); search k={k}")

    index, build_s = build_sharded(corpus, "auto", args.shards)
    t0 = time.perf_counter()
    found = [index.search(q, k) for _, q in blocks(query_vecs)]
    search_s = time.perf_counter() - t0
    index.close()
    cand_scores = np.concatenate([s for s, _ in found])  # (n, k)
    cand_ids = np.concatenate([i for _, i in found])  # (n, k)
    positive_scores = np.einsum("nd,nd->n", query_vecs, corpus[positive_ids])  # (n,)
    print(f"index {index.spec} ({args.shards} shards): build {build_s:.2f}s, search {search_s:.2f}s")

    results = {}
    for margin in (0.95, None):
        t0 = time.perf_counter()
        sel = select_negatives(cand_ids, cand_scores, positive_scores, positives,
                               num_negatives=args.num_negatives, range_max=args.range_max, margin_ratio=margin)
        select_s = time.perf_counter() - t0
        chosen = sel.ids >= 0  # (n, num_negatives)
        neg_vecs = corpus[np.where(chosen, sel.ids, 0)]  # (n, num_negatives, D)
        cos_to_positive = np.einsum("nkd,nd->nk", neg_vecs, corpus[positive_ids])  # (n, num_negatives)
        near = (cos_to_positive >= NEAR_DUP) & chosen
        results[f"margin_ratio={margin}"] = {
            "negatives": int(chosen.sum()),
            "near_duplicates": int(near.sum()),
            "near_duplicate_share": float(near.sum() / max(chosen.sum(), 1)),
            "pairs_with_a_near_duplicate": int(near.any(axis=1).sum()),
            "mean_positive_score": float(positive_scores.mean()),
            "mean_negative_score": float(np.nanmean(sel.scores)),
            "mean_negative_cos_to_positive": float(cos_to_positive[chosen].mean()),
            "short_queries": int(sel.short),
            "filtered_by_margin": int(sel.filtered_by_margin),
            "select_seconds": select_s,
        }
    return {"pairs": len(pairs), "corpus": len(corpus), "k": k, "spec": index.spec, "shards": args.shards,
            "num_negatives": args.num_negatives, "range_max": args.range_max, "near_dup_cosine": NEAR_DUP,
            "build_seconds": build_s, "search_seconds": search_s, "by_filter": results}


# ---------------------------------------------------------------------------------------------
# The report.


def print_report(sizes: list[dict], negatives: dict, target: float) -> dict:
    small, big = sizes[0], sizes[-1]
    print(f"\n{'=' * 100}\nRESULTS ({big['shards']} shards x 1 CPU on a local Ray; k={K}; medians)")
    print(f"\nRecall@{K} of the sharded IVF index vs exact_search ({big['queries']} held-out: half queries, half passages)")
    print(f"{'corpus':>7} {'spec':<14} {'nprobe':>6} {'recall@10':>10} {'queries':>8} {'passages':>9}")
    for size in sizes:
        for row in size["nprobe_sweep"]:
            mark = "  <- chosen" if row["nprobe"] == size["chosen_nprobe"] else ""
            mark += "  (index default nlist/8)" if row["nprobe"] == size["default_nprobe"] else ""
            print(f"{size['corpus']:>7} {size['ivf_spec']:<14} {row['nprobe']:>6} {row['recall@10']:>10.4f} "
                  f"{row['recall@10 query']:>8.4f} {row['recall@10 passage']:>9.4f}{mark}")
    checks = {
        f"IVF recall@10 >= {target} on {big['corpus']} real vectors (nprobe {big['chosen_nprobe']})":
            big["chosen_recall@10"] >= target and big["corpus"] >= 20_000,
    }
    for size in sizes:
        c = size["flat_vs_exact"]
        checks[f"sharded Flat == exact_search at {size['corpus']} (ids equal, scores allclose)"] = (
            c["ids_equal"] and c["scores_allclose"])
        print(f"sharded Flat vs exact at {size['corpus']}: ids equal {c['ids_equal']} "
              f"({c['rows_with_other_ids']} rows differ, {c['of_which_score_ties']} of them equal-score ties), "
              f"max |score diff| {c['max_abs_score_diff']:.1e}")

    print(f"\nSearch throughput ({big['queries']} queries per call) and build time (create + train + add)")
    print(f"{'method':<42} {'corpus':>7} {'queries/s':>10} {'best q/s':>9} {'x numpy':>8} {'build s':>8} "
          f"{'cost big/small (best)':>22}")
    growth, growth_best = {}, {}
    ratio_n = big["corpus"] / small["corpus"]
    for i, name in enumerate(small["search_methods"]):
        big_name = big["search_methods"][i]  # same method; the IVF name carries its own nlist/nprobe
        method = name.split(" nprobe")[0].replace(small["ivf_spec"], "IVF")
        growth[method] = big["search_seconds"][big_name] / small["search_seconds"][name]
        growth_best[method] = big["search_seconds_best"][big_name] / small["search_seconds_best"][name]
        for size, key in ((small, name), (big, big_name)):
            build = next((s for b, s in size["build_seconds"].items() if key.startswith(b)), None)
            build_txt = f"{build:.2f}" if build is not None else "-"
            ratio_txt = f"x{growth[method]:.2f} (x{growth_best[method]:.2f})" if size is big else ""
            numpy_s = size["search_seconds"][size["search_methods"][-1]]
            print(f"{key:<42} {size['corpus']:>7} {size['queries_per_second'][key]:>10.0f} "
                  f"{size['queries'] / size['search_seconds_best'][key]:>9.0f} {numpy_s / size['search_seconds'][key]:>8.2f} "
                  f"{build_txt:>8} {ratio_txt:>22}")
    print("(sharded build times include starting the shard actors; numpy needs no build)")
    print(f"corpus grows x{ratio_n:.2f}; per-query cost grows (medians): "
          + ", ".join(f"{name} x{g:.2f}" for name, g in growth.items()))

    print(f"\nHard negatives ({negatives['pairs']} pairs, corpus {negatives['corpus']} passages, {negatives['spec']} "
          f"x {negatives['shards']} shards, {negatives['num_negatives']} negatives from ranks [0, {negatives['range_max']}))")
    print(f"{'filter':<20} {'negatives':>9} {'near-dup':>9} {'share':>7} {'pairs w/ dup':>12} {'mean pos':>9} "
          f"{'mean neg':>9} {'neg~pos cos':>11} {'short':>6} {'filtered':>9}")
    for name, r in negatives["by_filter"].items():
        print(f"{name:<20} {r['negatives']:>9} {r['near_duplicates']:>9} {r['near_duplicate_share']:>7.2%} "
              f"{r['pairs_with_a_near_duplicate']:>12} {r['mean_positive_score']:>9.4f} {r['mean_negative_score']:>9.4f} "
              f"{r['mean_negative_cos_to_positive']:>11.4f} {r['short_queries']:>6} {r['filtered_by_margin']:>9}")
    print("(near-dup: cosine(negative passage, positive passage) >= %.2f; short: pairs given fewer than %d negatives)"
          % (NEAR_DUP, negatives["num_negatives"]))

    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return {"checks": checks, "per_query_cost_growth": growth, "per_query_cost_growth_best": growth_best,
            "corpus_growth": ratio_n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with foldoc/jargon_pairs.jsonl.gz")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=1000, help="held-out passages, and as many queries")
    parser.add_argument("--small", type=int, default=5000, help="the smaller corpus size")
    parser.add_argument("--repeats", type=int, default=5, help="timed search rounds")
    parser.add_argument("--build-repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 the chosen nprobe must reach")
    parser.add_argument("--pairs", type=int, default=0, help="mine only this many random pairs (0: all)")
    parser.add_argument("--num-negatives", type=int, default=4)
    parser.add_argument("--range-max", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=OUT / "mine.json")
    args = parser.parse_args()

    import ray

    pairs = read_pairs(args.data)
    passages, queries = distinct_texts(pairs)
    vectors = cached_embeddings(args.model, passages, queries)  # (P + Q, D)
    corpus_rows, held_rows, kind = holdout_split(len(passages), len(queries), args.held_out, args.seed)
    corpus, heldout = vectors[corpus_rows], vectors[held_rows]
    print(f"{len(pairs)} pairs -> {len(passages)} distinct passages + {len(queries)} distinct queries "
          f"= {len(vectors)} vectors of dim {vectors.shape[1]}; corpus {len(corpus)}, held out {len(heldout)}")
    if args.pairs:
        pairs = [pairs[i] for i in sorted(np.random.default_rng(args.seed).choice(len(pairs), args.pairs, replace=False))]

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="warning")
    warnings.filterwarnings("ignore", message=".*clustering.*points.*")  # FAISS k-means sample-size notes
    try:
        sizes = [bench_size(corpus[:n], heldout, kind, args) for n in (args.small, len(corpus))]
        negatives = bench_negatives(pairs, passages, queries, vectors, args)
    finally:
        ray.shutdown()
    summary = print_report(sizes, negatives, args.target)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": args.model or "bundled all-MiniLM-L6-v2", "vectors": len(vectors), "dim": int(vectors.shape[1]),
        "k": K, "sizes": sizes, "negatives": negatives, **summary,
    }, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
