"""`pairmill filter` then `pairmill mine` on registry pairs at two sizes, each in a fresh process with a
fresh local Ray: rows/s per stage and for the whole job, peak memory, object-store spill, driver memory,
and (at the larger size) the mining index's recall@10 against exact search.

    python scripts/make_registry_pairs.py ../shared/data/pypi_summaries.tsv.gz /tmp/registry.jsonl.gz
    python scripts/make_registry_pairs.py ../shared/data/pypi_summaries.tsv.gz /tmp/registry-250k.jsonl.gz --rows 250000
    pairmill distill -o /tmp/static-minilm
    python benchmarks/scale.py /tmp/registry-250k.jsonl.gz /tmp/registry.jsonl.gz --model /tmp/static-minilm \\
        filter.pool_size=100000

Measured per size (each job runs in the benchmark's child process, as the CLI would run it):
- wall seconds and input rows/s of each job and of both together (Ray start-up excluded);
- each stage's rows in / seconds, from the jobs' stats.json;
- peak memory of each job: the sum of PSS over the child process and every process under it (Ray's
  GCS, raylet, workers, actors; PSS splits shared pages, so the object store is counted once),
  sampled every 0.5 s, with the largest processes at that moment; and the driver process alone
  (the driver must hold no per-row state);
- object-store spill: what Ray's memory summary reports spilled to disk after each job;
- at the largest size: recall@10 of the mining index (as the mine job built and saved it) against
  exact inner-product search over the same passages, for ``--recall-queries`` sampled queries.
``--corpus-recall`` instead measures the mining index alone over every distinct passage of the last
PAIRS (see ``corpus_recall``). Settings go to both jobs as key=value (e.g. ``filter.pool_size=100000``: a fixed consistency pool
keeps the filter's cost per row independent of N; the default caps it at 1,000,000).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Memory:
    """Peak summed PSS of this process and its descendants, and of this process alone, sampled in a thread."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.root, self.every, self.stop = psutil.Process(), every, threading.Event()
        self.peak_total = self.peak_driver = 0
        self.at_peak: list[tuple[str, int]] = []  # (process name, PSS) at the peak, largest first
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        import psutil

        while not self.stop.is_set():
            total, seen = 0, []
            for proc in [self.root] + self.root.children(recursive=True):
                try:
                    pss, name = proc.memory_full_info().pss, " ".join(proc.cmdline())[:60]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += pss
                seen.append((name, pss))
                if proc.pid == self.root.pid:
                    self.peak_driver = max(self.peak_driver, pss)
            if total > self.peak_total:
                self.peak_total, self.at_peak = total, sorted(seen, key=lambda item: -item[1])[:8]
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def spilled_bytes() -> int:
    """Bytes Ray spilled from the object store so far (0 when its summary names none)."""
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Spilled (\d+) MiB", summary)
    return int(match.group(1)) * 2**20 if match else 0


def run_size(pairs: str, out: Path, overrides: list[str], model: str | None) -> dict:
    """filter then mine on ``pairs`` in this process; what the module docstring lists."""
    from pairmill.cluster import init_ray
    from pairmill.config import SECTIONS, load_config
    from pairmill.read import count_input_rows
    from mining.mine import mine
    from pipelines.filter import filter_pairs

    sections = {s: SECTIONS[s] for s in ("encoder", "read", "filter", "mine", "ray")}
    cfg = load_config(sections, None, [f"encoder.model={model}"] * bool(model) + overrides)
    init_ray(cfg["ray"].address, cfg["ray"].num_cpus)
    rows = count_input_rows(pairs)
    result = {"pairs": pairs, "input_rows": rows, "settings": overrides}
    jobs = {
        "filter": lambda: filter_pairs(pairs, str(out / "filter"), options=cfg["filter"], encoder=cfg["encoder"],
                                       read=cfg["read"], ray=cfg["ray"]),
        "mine": lambda: mine(str(out / "filter"), str(out / "mine"), corpus_path=None, encoder=cfg["encoder"],
                             read=cfg["read"], mine_cfg=cfg["mine"], ray=cfg["ray"]),
    }
    peaks = {}
    for job, run in jobs.items():
        with Memory() as memory:
            t0 = time.perf_counter()
            stats = run()
            seconds = time.perf_counter() - t0
        result[job] = {"seconds": seconds, "spilled_bytes": spilled_bytes(), "stats": stats,
                       "peak_pss": memory.peak_total, "at_peak": memory.at_peak}
        peaks[job] = memory
        print(f"[bench] {job}: {seconds:.0f} s, peak {memory.peak_total / 2**30:.2f} GiB: "
              + ", ".join(f"{name.split()[0][:40]} {pss / 2**20:.0f} MiB" for name, pss in memory.at_peak[:5]), flush=True)
    result["peak_pss"] = max(m.peak_total for m in peaks.values())
    result["peak_driver_pss"] = max(m.peak_driver for m in peaks.values())
    return result


def exact_top10(q, vectors, keys):
    """The keys of each query's exact top 10 by inner product (``pairmill.vectors.exact_search``)."""
    from pairmill.vectors import exact_search

    return keys[exact_search(vectors, q, 10, query_batch=256)[1]]


def search_recall(index, q, exact) -> dict:
    """Search ``index`` (closed afterwards) with ``q``: recall@10 against ``exact``, seconds, q/s."""
    import numpy as np

    try:
        t0 = time.perf_counter()
        _, found = index.search(q, 10)
        search_s = time.perf_counter() - t0
        spec, nprobe = index.spec, index.nprobe
    finally:
        index.close()
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)]))
    return {"spec": spec, "nprobe": nprobe, "recall@10": round(recall, 4), "search_seconds": round(search_s, 2),
            "queries_per_s": round(len(q) / search_s, 1)}


def index_recall(job: Path, queries: int, seed: int = 0) -> dict:
    """recall@10 of the saved mining index against exact search over the same passages, for a
    sample of the filter's kept queries (the queries mining searched with)."""
    import numpy as np
    import pyarrow.parquet as pq

    from mining.index import ShardedIndex
    from pairmill.vectors import to_matrix
    from pairmill.pairs import text_key

    kept = pq.read_table(job / "filter" / "kept", columns=["passage", "query_embedding", "passage_embedding"])
    keys = np.array([text_key(t) for t in kept.column("passage").to_pylist()], dtype=np.int64)
    keys, first = np.unique(keys, return_index=True)  # the mine job's corpus: one row per distinct text
    corpus = to_matrix(kept.column("passage_embedding"))[first]  # (C, D)
    rng = np.random.default_rng(seed)
    q = to_matrix(kept.column("query_embedding"))[rng.choice(kept.num_rows, min(queries, kept.num_rows), replace=False)]
    exact = exact_top10(q, corpus, keys)
    return {"queries": len(q), "corpus": len(corpus), **search_recall(ShardedIndex.load(str(job / "mine" / "index")), q, exact)}


def corpus_recall(pairs: str, model: str | None, queries: int, folder: Path, seed: int = 0) -> dict:
    """recall@10 against exact search, and search q/s, of the index mining builds by default
    (``mining.mine.build_index``) over every distinct passage of ``pairs``, unfiltered (the largest
    corpus this data gives), and of the IVF index the default picks past its Flat threshold, at
    nprobe lists/16, /8 and /4 (the default). Vectors from ``model``, encoded here in-process."""
    import gzip

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mining.mine import build_index
    from pairmill.config import MineConfig
    from pairmill.vectors import fixed_size_list
    from pairmill.encoder import Encoder
    from pairmill.pairs import text_key

    opener = gzip.open if pairs.endswith(".gz") else open
    with opener(pairs, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    passages: dict[int, str] = {}
    for row in rows:
        if row["passage"].strip():
            passages.setdefault(text_key(row["passage"]), row["passage"])
    encoder = Encoder(model)
    t0 = time.perf_counter()
    keys = np.fromiter(passages, dtype=np.int64, count=len(passages))
    vectors = encoder.encode(list(passages.values()), "passage")  # (C, D)
    encode_s = time.perf_counter() - t0
    (folder / "distinct").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"passage_key": keys, "passage": list(passages.values()),
                             "passage_embedding": fixed_size_list(vectors)}), folder / "distinct" / "part.parquet")
    rng = np.random.default_rng(seed)
    sample = [rows[i]["query"] for i in rng.choice(len(rows), queries, replace=False)]
    q = encoder.encode(sample, "query")
    exact = exact_top10(q, vectors, keys)
    arms = {"auto": MineConfig()}
    lists = int(4 * np.sqrt(len(keys)))  # mining.shard.default_index_spec's IVF
    ivf = f"IVF{lists},Flat"  # what auto picks past the Flat threshold; its default nprobe is lists / 4
    for nprobe in (lists // 16, lists // 8, lists // 4):
        arms[f"{ivf} nprobe {nprobe}"] = MineConfig(index_spec=ivf, nprobe=nprobe)
    out = {"pairs": len(rows), "corpus": len(keys), "queries": len(q), "encode_seconds": round(encode_s, 1), "arms": {}}
    for name, cfg in arms.items():
        t0 = time.perf_counter()
        index = build_index(folder / "distinct", len(keys), cfg, folder / f"index-{len(out['arms'])}", {})
        build_s = time.perf_counter() - t0
        out["arms"][name] = {**search_recall(index, q, exact), "build_seconds": round(build_s, 1)}
        print(f"[bench] {name}: {json.dumps(out['arms'][name])}", flush=True)
    return out


def report(results: list[dict]) -> str:
    lines = ["| pairs | job | wall s | rows/s | peak PSS MiB (all) | driver PSS MiB | spilled MiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["input_rows"]
        for job in ("filter", "mine"):
            j = r[job]
            lines.append(f"| {n:,} | {job} | {j['seconds']:.0f} | {n / j['seconds']:,.0f} | {j['peak_pss'] / 2**20:,.0f} | | "
                         f"{j['spilled_bytes'] / 2**20:,.0f} |")
        both = r["filter"]["seconds"] + r["mine"]["seconds"]
        lines.append(f"| {n:,} | **filter + mine** | {both:.0f} | **{n / both:,.0f}** | {r['peak_pss'] / 2**20:,.0f} | "
                     f"{r['peak_driver_pss'] / 2**20:,.0f} | |")
    lines.append("")
    lines.append("| pairs | job | stage | rows in | seconds | rows/s |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        for job in ("filter", "mine"):
            for s in r[job]["stats"]["stages"]:
                lines.append(f"| {r['input_rows']:,} | {job} | {s['name']} | {s['rows_in']:,} | {s['seconds']:.1f} | "
                             f"{s['rows_in'] / max(s['seconds'], 1e-9):,.0f} |")
    if len(results) > 1:
        small, large = results[0], results[-1]
        rate = lambda r: r["input_rows"] / (r["filter"]["seconds"] + r["mine"]["seconds"])  # noqa: E731
        lines.append("")
        lines.append(f"rows/s at {large['input_rows']:,} / at {small['input_rows']:,}: {rate(large) / rate(small):.2f} "
                     f"(target >= 0.8); peak memory ratio {large['peak_pss'] / small['peak_pss']:.2f} (target <= 1.25)")
    for r in results:
        if "recall" in r:
            lines.append(f"index recall@10 at {r['recall']['corpus']:,} passages: {json.dumps(r['recall'])} (target >= 0.95)")
        f, m = r["filter"]["stats"], r["mine"]["stats"]
        lines.append(f"{r['input_rows']:,}: filter kept {f['kept']:,}, dropped {f['dropped']}, rejected {f['rejected']}, "
                     f"passes {f['passes']}; mine corpus {m['corpus']['passages']:,}, index {m['index']['spec']} "
                     f"x {m['index']['shards']}, negatives {m['negatives']['total']:,}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="pair files, smallest first")
    parser.add_argument("--model", help="encoder.model for both jobs (e.g. a `pairmill distill` folder)")
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--out", help="keep the job folders here (default: a temporary folder)")
    parser.add_argument("--corpus-recall", action="store_true",
                        help="instead: recall@10 of mining's default index over every distinct passage of the last PAIRS")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process, print JSON
    args, overrides = parser.parse_known_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.corpus_recall:
        from pairmill.cluster import init_ray

        init_ray()
        with tempfile.TemporaryDirectory() as tmp:
            result = corpus_recall(args.pairs[-1], args.model, args.recall_queries, Path(args.out or tmp))
        print(json.dumps(result))
        return
    if args.one:
        out = Path(args.out)
        result = run_size(args.one, out, overrides, args.model)
        if args.recall_queries:
            result["recall"] = index_recall(out, args.recall_queries)
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for i, pairs in enumerate(args.pairs):
            out = root / f"size{i}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, *args.pairs, "--one", pairs, "--out", str(out),
                   "--recall-queries", str(args.recall_queries if i == len(args.pairs) - 1 else 0), *overrides]
            if args.model:
                cmd += ["--model", args.model]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{pairs} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            results.append(json.loads(line[0][7:]))
            print("\n".join(x for x in proc.stdout.splitlines() if x.startswith("[bench]")), flush=True)
            print(f"[bench] {pairs}: {results[-1]['input_rows']:,} rows in {time.perf_counter() - t0:.0f} s (with Ray start)",
                  flush=True)
            (root / "scale.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results))


if __name__ == "__main__":
    main()
