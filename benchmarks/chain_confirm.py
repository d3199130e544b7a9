"""benchmarks/chain.py's finished arms scored again on held-out sets that no choice was made on.

    HF_HUB_OFFLINE=1 PAIRMILL_CPU_PRECISION=fp32 python benchmarks/chain_confirm.py -o chain-300 \
        [--arms plain dedup-mined] [--seeds 0 1 2 3 4] [--alpha 1 0.85] [--heldout 2000]

chain.py's two held-out sets (its registry split and the bundled FOLDOC/Jargon held-out split) are
the ones configs/web.yaml's settings were read off (train.wise_alpha from one seed's curve on them),
so a gain measured there may be partly chosen. This scores the same trained models, without training
again, on two sets never looked at before:

- ``registry2``: ``--heldout`` more registry pairs drawn as chain.py draws its split (a summary unique
  in the whole registry, 4-60 words, no junk), from package names in neither its training pairs nor
  its held-out split; written to OUT/data/heldout2.jsonl.gz;
- ``bundled-train``: the bundled sample's training split (2,050 FOLDOC / Jargon File pairs), out of
  domain: no registry arm trains on it.

Each (arm, seed, alpha) writes OUT/seed<S>/<arm>/confirm-<alpha>.json (a rerun skips finished ones);
OUT/confirm-base.json holds the bundled model's. The table (and OUT/confirm.json, with every seed's
value) shows each row's mean and half the spread, and its mean difference from plain training at
alpha 1 taken seed for seed, with how many seeds it is ahead on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def draw_second_heldout(out: Path, n: int) -> Path:
    """OUT/data/heldout2.jsonl.gz: n clean pairs whose names chain.py's data did not use (reused when there)."""
    path = out / "data" / "heldout2.jsonl.gz"
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT / "scripts"))
    from chain import clean_summary, read_registry
    from make_registry_pairs import query_of

    from pairmill.pairs import normalize_text

    info = json.loads((out / "data" / "data.json").read_text())
    used = set()
    for name in ("train_raw.jsonl.gz", "heldout.jsonl.gz"):
        with gzip.open(out / "data" / name, "rt", encoding="utf-8") as f:
            used |= {json.loads(line)["id"] for line in f}
    rows, copies, order = read_registry(info["tsv"], info["seed"])  # chain.py's order: its held-out split was its first clean names
    drawn, names = [], set()
    for i in order:
        name, summary = rows[i]
        if name not in used and name not in names and copies[normalize_text(summary)] == 1 and clean_summary(summary):
            drawn.append(i)
            names.add(name)
            if len(drawn) == n:
                break
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in drawn:
            name, summary = rows[i]
            f.write(json.dumps({"id": name, "query": query_of(name), "passage": summary, "source": "pypi"}) + "\n")
    print(f"[confirm] {len(drawn)} held-out pairs drawn from names chain.py's data did not use -> {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", required=True, help="a benchmarks/chain.py OUT with finished arms")
    parser.add_argument("--arms", nargs="+", default=["plain", "dedup-mined"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 0.85],
                        help="each arm's model at base + ALPHA x (trained - base); 1 = the arm's model")
    parser.add_argument("--heldout", type=int, default=2_000, help="pairs of the second registry split")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chain import evaluate, model_at

    from pairmill import sample
    from pairmill.evaluate import load_task

    out = Path(args.output).resolve()
    tasks = {"registry2": load_task(str(draw_second_heldout(out, args.heldout))), "bundled-train": load_task(str(sample.TRAIN))}
    base_path = out / "confirm-base.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(evaluate(None, tasks), indent=2))
    scores: dict[tuple[str, float], dict[int, dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            folder = out / f"seed{seed}" / arm
            for alpha in args.alpha:
                path = folder / f"confirm-{alpha:g}.json"
                if not path.exists():
                    with model_at(folder, alpha) as model:
                        path.write_text(json.dumps({"arm": arm, "seed": seed, "alpha": alpha, "metrics": evaluate(model, tasks)},
                                                   indent=2))
                metrics = json.loads(path.read_text())["metrics"]
                scores.setdefault((arm, alpha), {})[seed] = {t: metrics[t]["ndcg@10"] for t in tasks}
                print(f"[confirm] seed {seed} {arm}@{alpha:g}: "
                      + ", ".join(f"{t} {v:.4f}" for t, v in scores[(arm, alpha)][seed].items()), flush=True)

    base = json.loads(base_path.read_text())
    plain = scores.get(("plain", 1.0), {})
    summary = {"base": {t: base[t]["ndcg@10"] for t in tasks}, "rows": {}}
    print(f"{'nDCG@10':<18}" + "".join(f"{t + ': mean ± half spread':>36}{'- plain (seeds ahead)':>24}" for t in tasks))
    print(f"{'base':<18}" + "".join(f"{base[t]['ndcg@10']:>36.4f}{'':>24}" for t in tasks))
    for (arm, alpha), by_seed in scores.items():
        row, cells = {}, []
        for t in tasks:
            values = [by_seed[s][t] for s in args.seeds]
            row[t] = {"mean": round(statistics.mean(values), 4), "spread": round(max(values) - min(values), 4),
                      "values": [round(v, 4) for v in values]}
            cells.append(f"{row[t]['mean']:.4f} ± {row[t]['spread'] / 2:.4f} ({len(values)} seeds)".rjust(36))
            if plain and (arm, alpha) != ("plain", 1.0):
                diffs = [by_seed[s][t] - plain[s][t] for s in args.seeds]
                row[t]["minus_plain"] = [round(d, 4) for d in diffs]
                cells.append(f"{statistics.mean(diffs):+.4f} ({sum(d > 0 for d in diffs)} of {len(diffs)})".rjust(24))
            else:
                cells.append("".rjust(24))
        summary["rows"][f"{arm}@{alpha:g}"] = row
        print(f"{arm + '@' + format(alpha, 'g'):<18}" + "".join(cells))
    (out / "confirm.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
