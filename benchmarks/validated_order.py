"""Training's validated copy of raw pairs in a seeded random order, two ways side by side on the same
input, alternating: the id check's hash shuffle followed by Ray Data's ``random_shuffle`` (two
all-to-all passes over every row: what ``pairmill.groups.write_validated`` did before), and the id
check's hash shuffle alone with seeded buckets permuted in place (one pass: what it does now).

    python scripts/make_registry_pairs.py ../shared/data/pypi_summaries.tsv.gz /tmp/registry.jsonl.gz
    python benchmarks/validated_order.py /tmp/registry.jsonl.gz -o /tmp/validated-order --repeats 2

Prints, per run (after one uncounted warm-up run), the seconds to write the copy, the peak memory
(PSS summed over this process and the local Ray's, sampled every 0.5 s) and how mixed its order is: the mean distance in input
lines between consecutive rows, over the input's line count (1/3 for a uniformly random order, ~0 for
the input's own), and the share of 32-row windows whose rows span more than half the input. Both
ways must write the same rows with the same reasons (checked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def two_passes(path: str, folder: Path, seed: int) -> None:
    from pairmill.groups import default_partitions, unique_ids
    from pairmill.read import count_input_rows, read_parsed

    rows = unique_ids(read_parsed(path), default_partitions(path), count_input_rows(path))
    rows.random_shuffle(seed=seed).write_parquet(str(folder))


def one_pass(path: str, folder: Path, seed: int) -> None:
    from pairmill.groups import write_validated

    write_validated(path, folder, shuffle_seed=seed)


def order_stats(folder: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["origin", "id", "reason"])
    lines = np.array([int(o.rpartition(":")[2]) for o in table.column("origin").to_pylist()])
    n = len(lines)
    windows = lines[: n // 32 * 32].reshape(-1, 32)
    rows = sorted(zip(table.column("id").to_pylist(), table.column("reason").to_pylist()), key=lambda r: (r[0] or "", r[1] or ""))
    return {"rows": n, "mean_step": float(np.abs(np.diff(lines)).mean() / n),
            "wide_windows": float(((windows.max(1) - windows.min(1)) > n / 2).mean()), "rows_digest": hash(tuple(rows))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", help="raw pairs (JSONL, plain or .gz)")
    parser.add_argument("-o", "--output", required=True, help="a scratch folder (emptied)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pairmill.cluster import init_ray
    from scale import Memory  # benchmarks/scale.py: peak PSS of this process and the local Ray's

    init_ray()
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    # a first run, not counted, starts the Ray workers both ways then reuse (the first timed run paid ~7 s for it)
    one_pass(args.pairs, out / "warm-up", args.seed)
    shutil.rmtree(out / "warm-up")
    results = []
    for repeat in range(args.repeats):
        ways = [("two passes", two_passes), ("one pass", one_pass)]
        for name, way in ways if repeat % 2 == 0 else ways[::-1]:
            folder = out / f"{name.replace(' ', '-')}-{repeat}"
            with Memory() as memory:
                t0 = time.perf_counter()
                way(args.pairs, folder, args.seed)
                seconds = time.perf_counter() - t0
            result = {"way": name, "repeat": repeat, "seconds": round(seconds, 1),
                      "peak_gib": round(memory.peak_total / 2**30, 2), **order_stats(folder)}
            print(json.dumps(result), flush=True)
            results.append(result)
            shutil.rmtree(folder)
    digests = {r["rows_digest"] for r in results}
    assert len(digests) == 1, "the two ways wrote different rows"
    for name in ("two passes", "one pass"):
        mine = [r for r in results if r["way"] == name]
        print(f"{name}: seconds {[r['seconds'] for r in mine]}, peak GiB {[r['peak_gib'] for r in mine]}, mean step {mine[0]['mean_step']:.4f}, "
              f"windows spanning over half the input {mine[0]['wide_windows']:.3f}, rows {mine[0]['rows']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
