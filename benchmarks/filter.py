"""Filter job throughput and peak memory at N and 4N pairs, the audit curve, and SemDeDup vs brute force.

    python benchmarks/filter.py [--n 5000] [--scales 1 4] [--model M]

Data: real pairs from ../shared/data/*.jsonl.gz (FOLDOC + Jargon File, 13,700 pairs), shuffled
with a fixed seed. Scale s uses the first s x N of them; beyond the 13,700 real pairs, the rest are
near-duplicates of random real pairs (same query, the passage with one word removed: new text to
encode, and realistic work for semantic dedup). Each scale runs the whole ``pairmill filter`` job
(audit mode: 20% corrupted pairs mixed in) in a fresh process with a fresh local Ray, with the
bundled model unless --model. Reported per scale:
- whole job: input pairs / wall seconds (Ray start excluded, every pass included);
- per stage: rows in / seconds of compute inside the workers (``stats.json`` stages);
- peak memory: the sum of PSS (proportional set size: shared pages split between the processes
  that map them, so the object store is counted once) of the driver and every process under it
  (Ray's GCS, raylet, workers, actors), sampled every 0.5 s.
After the N run, from its kept/ and dropped/ embeddings (no encoding again):
- the audit curve (share of corrupted pairs removed, share of clean pairs kept) for k = 1, 2, 5, 10
  at two pool sizes, computed with the filter's own step functions on one process;
- SemDeDup by k-means clusters (the job's method) vs one all-pairs cluster (brute force), same
  survivor order: rows dropped by one and not the other.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def load_pairs(total: int, seed: int = 0) -> list[dict]:
    rows = []
    for path in sorted(DATA.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    real = len(rows)
    while len(rows) < total:  # near-duplicates of real pairs: one passage word removed
        base = rows[rng.randrange(real)]
        words = base["passage"].split()
        if len(words) > 3:
            del words[rng.randrange(len(words))]
            rows.append({"query": base["query"], "passage": " ".join(words), "source": "perturbed"})
    return rows[:total]


class PeakMemory:
    """Peak summed PSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.root, self.every, self.peak, self.stop = psutil.Process(), every, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root] + self.root.children(recursive=True):
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.sample())
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_one(n: int, model: str | None, out: str) -> dict:
    """One filter job on n pairs in this process; returns its stats plus wall time and peak memory."""
    import ray

    from pairmill.config import EncoderConfig, FilterConfig, RayConfig, ReadConfig
    from pipelines.filter import filter_pairs

    src = Path(out) / "input.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in load_pairs(n)))
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=True, logging_level="warning", log_to_driver=False)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        stats = filter_pairs(str(src), str(Path(out) / "job"), options=FilterConfig(audit=0.2), encoder=EncoderConfig(model=model),
                             read=ReadConfig(), ray=RayConfig())
        wall = time.perf_counter() - t0
    ray.shutdown()
    return {"n": n, "wall": wall, "peak_pss": mem.peak, "stats": stats}


def offline_checks(job: Path, n_pool_small: int = 1000, seed: int = 0) -> dict:
    """Audit curve at two pool sizes and SemDeDup vs brute force, from the job's saved embeddings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pairmill.vectors import to_matrix
    from pipelines.audit import audit_summary, corrupt_rows
    from pipelines.consistency import consistency_ranks, exact_pool_search, rank_depth
    from pipelines.semdedup import assign_clusters, default_n_clusters, fit_kmeans, semdedup_cluster

    kept = pq.read_table(job / "kept")
    dropped = pq.read_table(job / "dropped")
    dropped = dropped.filter(pc.is_valid(dropped.column("passage_embedding")))  # exact duplicates were never encoded
    cols = ["id", "passage", "query_embedding", "passage_embedding"]
    every = pa.concat_tables([kept.select(cols), dropped.select(cols)])
    q, p = to_matrix(every.column("query_embedding")), to_matrix(every.column("passage_embedding"))
    ids, passages = every.column("id").to_pylist(), every.column("passage").to_pylist()
    rng = np.random.default_rng(seed)
    query_rows, passage_rows = corrupt_rows(ids, passages, 0.2, seed)
    curves = {}
    for pool_size in (len(p), n_pool_small):
        pool = p[rng.choice(len(p), size=min(pool_size, len(p)), replace=False)]
        search = exact_pool_search(pool)
        clean = consistency_ranks(q, p, search, rank_depth(2))
        corrupted = consistency_ranks(q[query_rows], p[passage_rows], search, rank_depth(2))
        curves[str(len(pool))] = audit_summary(clean, corrupted, 2, len(pool), 0.2)["curve"]

    entered = dropped.filter(pc.equal(dropped.column("reason"), "semantic_duplicate")).select(cols)
    sem = pa.concat_tables([kept.select(cols), entered])
    sq, sp, sids = to_matrix(sem.column("query_embedding")), to_matrix(sem.column("passage_embedding")), sem.column("id").to_pylist()
    n_clusters = default_n_clusters(len(sp), len(sp))
    cluster, sims = assign_clusters(sp, fit_kmeans(sp, n_clusters, seed=seed))
    t0 = time.perf_counter()
    by_cluster = [None] * len(sp)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        for i, d in zip(members, semdedup_cluster(sq[members], sp[members], [sids[i] for i in members], sims[members], eps=0.01)):
            by_cluster[i] = d
    clustered_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    brute = semdedup_cluster(sq, sp, sids, sims, eps=0.01)  # the same order, all pairs
    brute_s = time.perf_counter() - t0
    differ = sum((a is None) != (b is None) for a, b in zip(by_cluster, brute))
    return {
        "audit_curves": curves,
        "semdedup": {
            "rows": len(sp), "n_clusters": n_clusters, "dropped_clustered": sum(d is not None for d in by_cluster),
            "dropped_brute_force": sum(d is not None for d in brute), "rows_differ": differ,
            "seconds_clustered": round(clustered_s, 3), "seconds_brute_force": round(brute_s, 3),
        },
    }


def report(results: list[dict]) -> str:
    lines = ["| pairs | whole job pairs/s | wall s | peak PSS MiB (driver + Ray) | " + " | ".join(
        f"{s['name']} pairs/s" for s in results[0]["stats"]["stages"]) + " |"]
    lines.append("|" + "---|" * (4 + len(results[0]["stats"]["stages"])))
    for r in results:
        stages = " | ".join(f"{s['rows_in'] / max(s['seconds'], 1e-9):,.0f}" for s in r["stats"]["stages"])
        lines.append(f"| {r['n']:,} | {r['n'] / r['wall']:.1f} | {r['wall']:.1f} | {r['peak_pss'] / 2**20:,.0f} | {stages} |")
    for r in results:
        s = r["stats"]
        lines.append(f"N={r['n']}: passes (wall s) {s['passes']}; kept {s['kept']}, dropped {s['dropped']}; "
                     f"audit k=2 removed {s['audit']['corrupted_removed']}, clean kept {s['audit']['clean_kept']}; "
                     f"curve {json.dumps(s['audit']['curve'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model", default=None)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one scale, print JSON
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        result = run_one(args.one, args.model, args.out)
        if args.one == args.n:
            result["offline"] = offline_checks(Path(args.out) / "job")
        print("RESULT " + json.dumps(result, default=str))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            out = Path(tmp) / f"x{scale}"
            out.mkdir()
            cmd = [sys.executable, __file__, "--one", str(scale * args.n), "--n", str(args.n), "--out", str(out)]
            if args.model:
                cmd += ["--model", args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"scale {scale} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[0][7:]))
            print(f"[bench] {scale * args.n} pairs: {results[-1]['wall']:.1f}s, peak PSS {results[-1]['peak_pss'] / 2**20:,.0f} MiB", flush=True)
    print(report(results))
    for r in results:
        if "offline" in r:
            print(f"offline (N={r['n']}): {json.dumps(r['offline'])}")


if __name__ == "__main__":
    main()
