"""Training objectives and negative sources against today's default, equal steps, on two datasets.

    HF_HUB_OFFLINE=1 python benchmarks/objectives.py -o objectives-out \
        [--datasets sample registry] [--seeds 0 1 2] [--arms default inbatch supcon ...] \
        [--tsv ../shared/data/pypi_summaries.tsv.gz | --chain-data chain-out/data] \
        [--pairs 20000] [--heldout 2000] [--steps 100] [--sample-steps 36] [-- key=value ...]

Datasets (each arm is scored on its dataset's held-out split only):

- ``sample``: the bundled sample (``pairmill.sample.TRAIN``, 2,050 FOLDOC/Jargon pairs, 55 queries
  appear twice as SupCon groups them, by ``text_key``) and its held-out split
  (``pairmill.sample.HELDOUT``, 350 pairs); ``--sample-steps``.
- ``registry``: noisy package-registry pairs held out by package name, built by
  ``benchmarks/chain.py``'s ``build_data`` into ``OUT/registry/data`` (the layout of chain's
  ``OUT/data``), or read as they are from a chain run's folder (``--chain-data``); ``--steps``.
  Package names do not repeat, so SupCon there is InfoNCE (its loss is the same without a repeated query).

Each dataset is mined once (``pairmill mine``, default settings, into ``OUT/<dataset>/mine``) and
every pair arm trains on that folder; the SimCSE arm trains on the training passages alone, written
once to ``OUT/<dataset>/passages.txt`` (whitespace collapsed to one line each, empty ones left out).
Arms (the bundled model, TrainConfig's defaults but for the one setting named, the same steps of
``train.batch_size`` pairs; the seed changes the batch order and dropout):

1. ``default``: today's default, InfoNCE with in-batch negatives and one mined hard negative;
2. ``inbatch``: in-batch negatives only (``train.hard_negatives=0``): what the mined negatives add;
3. ``supcon``: ``train.objective=supcon``, rows with the same query are positives of each other;
4. ``tau_plus``: debiased InfoNCE, ``train.tau_plus=--tau-plus`` (0.05);
5. ``triplet``: ``train.objective=triplet``, margin loss on the mined negative only (margin 0.3);
6. ``queue``: ``train.queue_size=--queue-size`` (1024) past positives as extra negatives;
7. ``simcse``: unsupervised SimCSE on the passages alone (``train.simcse=true``, in-batch only);
8. ``bm25``: ``default``'s training on negatives mined with ``mine.method=bm25`` (DPR's lexical
   negatives, into ``OUT/<dataset>/mine-bm25``);
9. ``hybrid``: the same with ``mine.method=hybrid`` (dense and BM25 fused by reciprocal rank);
10. ``refresh``: ``default`` with ANCE refresh rounds re-mining beside training (``REFRESH``: on the
    sample every 12 steps, half the queries a round, as its run profile; on registry pairs every 25, a quarter);
11. ``curriculum``: the same rounds moving the rank window easy -> hard, from ranks [20, 50) (the
    first negatives mined there too, into ``OUT/<dataset>/mine-easy``) to the default [0, 30) at the
    last step (``mine.range_min_final`` / ``range_max_final``).

On 2 CPUs a round takes ~20 training steps' time on the sample and would not finish within the 100 steps
of a registry run (it re-encodes all 20,000 passages), so docs/benchmarks.md has these two arms on the sample
only; ``benchmarks/chain.py --refresh-every N`` runs rounds in the chain.

Per arm and seed ``OUT/<dataset>/seed<S>/<arm>/result.json`` holds held-out nDCG@10, recall@10,
alignment and uniformity (``pairmill.evaluate.evaluate_model``), training pairs/s (steady: the
``metrics.jsonl`` lines after the first, whose steps hold the warm-up; and the job's, from
``stats.json``, Ray start-up included), the queue's staleness and the triplet arm's pairs without a
triplet. A rerun skips finished arms and the mine and passages already written, and refuses other
data or train settings in the same OUT. ``OUT/objectives.json`` and the printed tables hold every
seed, the mean and the spread (max - min); the tables show mean ± half the spread.

Time. Registry, measured (2026-12-03, 2 CPUs, nothing else running): the three mines ~12 minutes
once, then 3-4 minutes a run (100 steps at batch 32 of one-line summaries, Ray Train start-up, export
and the held-out evaluation included), ~35 minutes a seed of all 9 arms, ~1.8 hours for 3 seeds.
Sample, measured the same day with ``train.passage_max_length=128`` (the sample profile's): the three
mines ~4 minutes, then 2.5-4.5 minutes a run of 36 steps, ~35 minutes a seed, under 2 hours for 3 seeds.
``--datasets``, ``--arms`` and ``--seeds`` split it over sittings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; benchmarks.chain is imported from it
from benchmarks.chain import build_data, evaluate, finished, lock_output

ARMS = ("default", "inbatch", "supcon", "tau_plus", "triplet", "queue", "simcse", "bm25", "hybrid", "refresh", "curriculum")
# the refresh and curriculum arms' rounds: every N steps, each re-mining 1/slices of the queries (the sample's as in
# its run profile; seen: with all queries a round, one started at step 12 was still running at step 36, on 2 CPUs)
REFRESH = {"sample": ["train.refresh_every=12", "train.refresh_slices=2"],
           "registry": ["train.refresh_every=25", "train.refresh_slices=4"]}
EASY, HARD = (20, 50), (0, 30)  # the curriculum's first and last rank windows (HARD: MineConfig's default)
# each mine folder of OUT/<dataset>: its settings after the defaults, and the arms that train on it
MINES = {
    "mine": ([], ("default", "inbatch", "supcon", "tau_plus", "triplet", "queue", "refresh")),
    "mine-bm25": (["mine.method=bm25"], ("bm25",)),  # DPR's lexical negatives
    "mine-hybrid": (["mine.method=hybrid"], ("hybrid",)),
    "mine-easy": ([f"mine.range_min={EASY[0]}", f"mine.range_max={EASY[1]}"], ("curriculum",)),
}
DATASETS = ("sample", "registry")
METRICS = ("ndcg@10", "recall@10", "alignment", "uniformity", "pairs_per_s")


def cli(*args: str) -> None:
    from pairmill.cli import main as pairmill

    print(f"[objectives] pairmill {' '.join(args)}", flush=True)
    rc = pairmill(list(args))
    if rc:
        raise SystemExit(f"pairmill {args[0]} exited with {rc}")


def arm_settings(arm: str, folder: Path, args) -> list[str]:
    """The train input and the settings that differ from today's default, for one arm."""
    mined = str(folder / "mine")
    return {
        "default": [mined],
        "inbatch": [mined, "train.hard_negatives=0"],
        "supcon": [mined, "train.objective=supcon"],
        "tau_plus": [mined, f"train.tau_plus={args.tau_plus}"],
        "triplet": [mined, "train.objective=triplet"],
        "queue": [mined, f"train.queue_size={args.queue_size}"],
        "simcse": [str(folder / "passages.txt"), "train.simcse=true"],  # in-batch only: plain texts have no negatives
        "bm25": [str(folder / "mine-bm25")],
        "hybrid": [str(folder / "mine-hybrid")],
        "refresh": [mined, *REFRESH[folder.name]],
        "curriculum": [str(folder / "mine-easy"), *REFRESH[folder.name], *MINES["mine-easy"][0],  # rounds start there
                       f"mine.range_min_final={HARD[0]}", f"mine.range_max_final={HARD[1]}"],
    }[arm]


def write_passages(pairs_path: str, path: Path) -> int:
    """The training pairs' passages as plain texts, one a line (SimCSE's input); returns the count."""
    if path.exists():
        return sum(1 for _ in path.open(encoding="utf-8"))
    texts = []
    with gzip.open(pairs_path, "rt", encoding="utf-8") as f:
        for line in f:
            text = re.sub(r"\s+", " ", json.loads(line).get("passage") or "").strip()
            if text:
                texts.append(text)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    partial.rename(path)
    return len(texts)


def training_speed(train_dir: Path) -> dict:
    """Pairs/s of a finished train job: steady (metrics.jsonl after its first line) and the job's."""
    lines = [json.loads(s) for s in (train_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    later = lines[1:] or lines  # the first line's steps hold the warm-up (first forward, allocations)
    pairs = later[-1]["pairs"] - (lines[0]["pairs"] if len(lines) > 1 else 0)
    stats = json.loads((train_dir / "stats.json").read_text())
    speed = {"pairs_per_s": round(pairs / max(sum(m["seconds"] for m in later), 1e-9), 2),
             "job_pairs_per_s": stats["train"]["pairs_per_s"], "steps": stats["train"]["steps"], "pairs": stats["kept"]}
    staleness = [m["queue_staleness"] for m in lines if "queue_staleness" in m]
    if staleness:
        speed["queue_staleness"] = round(sum(staleness) / len(staleness), 2)
    if stats.get("refresh"):
        speed["refresh_rounds"] = stats["refresh"]["rounds_finished"]
        speed["refresh_windows"] = [r["window"] for r in stats["refresh"]["rounds"]]
    if any("pairs_without_triplet" in m for m in lines):
        speed["pairs_without_triplet"] = sum(m.get("pairs_without_triplet", 0) for m in lines)
    return speed


def run_arm(arm: str, seed: int, folder: Path, steps: int, args, tasks: dict) -> dict:
    out = folder / f"seed{seed}" / arm
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    started = time.perf_counter()
    data, *settings = arm_settings(arm, folder, args)
    if not finished(out / "train"):  # a run stopped after training (in evaluation) keeps its model
        cli("train", data, "-o", str(out / "train"), *settings, f"train.max_steps={steps}", f"train.seed={seed}", *args.overrides)
    result = {"arm": arm, "seed": seed, "settings": settings,
              "metrics": evaluate(str(out / "train" / "model"), tasks), **training_speed(out / "train"),
              "seconds": round(time.perf_counter() - started, 1)}
    result_path.write_text(json.dumps(result, indent=2))
    return result


def check_settings(folder: Path, settings: dict) -> None:
    """A rerun into the same OUT must train with the same data and settings (its results are reused)."""
    path = folder / "settings.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
        return
    before = json.loads(path.read_text())
    if before != settings:
        changed = {k: (before.get(k), settings.get(k)) for k in settings.keys() | before.keys() if before.get(k) != settings.get(k)}
        raise SystemExit(f"{folder} holds results made with other settings (before, now): {changed}; "
                         "use another -o, or the settings it was made with")


def prepare(dataset: str, folder: Path, args) -> tuple[str, dict, dict]:
    """(training pairs file, held-out task, data info) of a dataset; the registry's built once."""
    from pairmill import sample
    from pairmill.evaluate import load_task

    if dataset == "sample":
        return str(sample.TRAIN), {dataset: load_task(str(sample.HELDOUT))}, {"train": str(sample.TRAIN), "heldout": str(sample.HELDOUT)}
    if args.chain_data:  # a chain run's data, read as it is (build_data would rebuild it for other --pairs)
        data_dir = Path(args.chain_data).resolve()
        if not (data_dir / "data.json").exists():
            raise SystemExit(f"--chain-data {data_dir}: no data.json there; give a benchmarks/chain.py OUT/data folder")
        info = json.loads((data_dir / "data.json").read_text())
    else:
        data_dir = folder / "data"
        info = build_data(args.tsv, data_dir, args.pairs, args.heldout, args.data_seed)
    return (str(data_dir / "train_raw.jsonl.gz"), {dataset: load_task(str(data_dir / "heldout.jsonl.gz"))},
            {**info, "folder": str(data_dir)})


def summarise(results: list[dict], dataset: str) -> dict:
    import numpy as np

    table = {}
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        if not mine:
            continue
        row = {"seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"], "pairs": mine[0]["pairs"],
               "settings": mine[0]["settings"]}
        for metric in METRICS:
            values = np.array([r[metric] if metric == "pairs_per_s" else r["metrics"][dataset][metric] for r in mine])
            row[metric] = {"mean": round(float(values.mean()), 4), "spread": round(float(np.ptp(values)), 4),
                           "values": [round(float(v), 4) for v in values]}
        for extra in ("queue_staleness", "pairs_without_triplet"):
            if extra in mine[0]:
                row[extra] = [r[extra] for r in mine]
        table[arm] = row
    return table


def print_table(dataset: str, entry: dict) -> None:
    print(f"\n{dataset}: held-out nDCG@10, alignment (lower: positives closer), uniformity (lower: spread out), "
          "steady training pairs/s; mean ± half-spread over seeds")
    print(f"{'arm':<9} {'steps':>5} {'seeds':>5}  {'nDCG@10':>17} {'alignment':>17} {'uniformity':>17} {'pairs/s':>15}")
    base = entry["base"][dataset]
    print(f"{'base':<9} {'':>5} {'':>5}  {base['ndcg@10']:>17.4f} {base['alignment']:>17.4f} {base['uniformity']:>17.4f}")
    for arm, row in entry["arms"].items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['spread'] / 2:.4f}".rjust(17) for m in METRICS[:1] + METRICS[2:4]]
        speed = f"{row['pairs_per_s']['mean']:.1f} ± {row['pairs_per_s']['spread'] / 2:.1f}".rjust(15)
        print(f"{arm:<9} {row['steps']:>5} {len(row['seeds']):>5}  " + " ".join(cells) + f" {speed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", default="objectives-out")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every arm on the registry pairs")
    parser.add_argument("--sample-steps", type=int, default=36,
                        help="optimizer steps of every arm on the sample (36: pairmill/sample/run.yaml's budget; 64 x 32 = one pass)")
    parser.add_argument("--tsv", default=str(ROOT.parent / "shared" / "data" / "pypi_summaries.tsv.gz"),
                        help="name<TAB>summary registry file the registry pairs are built from")
    parser.add_argument("--chain-data", help="a benchmarks/chain.py OUT/data folder to train and evaluate on instead (read only)")
    parser.add_argument("--pairs", type=int, default=20_000, help="raw registry training pairs (as chain.py)")
    parser.add_argument("--heldout", type=int, default=2_000, help="held-out registry pairs (clean, by package name)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--tau-plus", type=float, default=0.05, help="the tau_plus arm's expected share of false negatives")
    parser.add_argument("--queue-size", type=int, default=1024, help="the queue arm's queued passages")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train settings for every arm, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.output).resolve()
    lock = lock_output(out, "objectives.py")  # noqa: F841 (held until exit)
    summary_path = out / "objectives.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for dataset in args.datasets:
        folder = out / dataset
        steps = args.sample_steps if dataset == "sample" else args.steps
        data_args = ({} if dataset == "sample" else {"chain_data": args.chain_data} if args.chain_data else
                     {"tsv": str(Path(args.tsv).resolve()), "pairs": args.pairs, "heldout": args.heldout, "data_seed": args.data_seed})
        check_settings(folder, {**data_args, "steps": steps, "tau_plus": args.tau_plus, "queue_size": args.queue_size,
                                "overrides": args.overrides})
        pairs_path, tasks, data = prepare(dataset, folder, args)
        print(f"[objectives] {dataset}: {json.dumps(data)}", flush=True)
        for name, (settings, arms) in MINES.items():
            if set(args.arms) & set(arms) and not finished(folder / name):
                cli("mine", pairs_path, "-o", str(folder / name), *settings)
        if "simcse" in args.arms:
            data["simcse_texts"] = write_passages(pairs_path, folder / "passages.txt")
        base_path = folder / "base.json"
        if not base_path.exists():
            base_path.write_text(json.dumps(evaluate(None, tasks), indent=2))
        for seed in args.seeds:
            for arm in args.arms:
                run_arm(arm, seed, folder, steps, args, tasks)
        mines = {name: json.loads((folder / name / "stats.json").read_text())
                 for name in MINES if finished(folder / name)}
        results = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*/*/result.json"))]  # this run's and earlier ones'
        summary[dataset] = {"data": data, "steps": steps, "base": json.loads(base_path.read_text()),
                            **{name: {k: mine.get(k) for k in ("input_rows", "kept", "rejected", "negatives", "seconds")}
                               for name, mine in mines.items()},
                            "arms": summarise(results, dataset)}
        summary_path.write_text(json.dumps(summary, indent=2))
    for dataset, entry in summary.items():
        print_table(dataset, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
