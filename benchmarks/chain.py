"""The E5 chain against plain training on noisy web-like pairs (package registry), equal steps.

    HF_HUB_OFFLINE=1 python benchmarks/chain.py ../shared/data/pypi_summaries.tsv.gz -o chain-out \
        [--pairs 20000] [--heldout 2000] [--steps 100] [--seeds 0 1 2] [--arms plain filtered ...]

One seed of the first five arms takes about 25 minutes on 2 CPUs at the defaults (filter and mine
once more, ~10 minutes, on the first run); ``kauto-inbatch`` adds a run the size of ``plain`` (3-6 min),
``e5-inbatch`` a filter (~5 min, once) and such a run.

Data (built once into OUT/data, nothing committed): the registry's (package name -> summary)
pairs made as ``scripts/make_registry_pairs.py`` makes them. A held-out split is drawn by package
name first and cleaned of the obvious junk, so it measures retrieval rather than noise: a held-out
summary is unique in the whole registry (no template copies), has 4-60 words and matches none of
``JUNK``. The training input is a seeded random ``--pairs`` of the *other* names, raw: empty
summaries, templates, copies and all. The bundled sample's held-out split (FOLDOC/Jargon) is the
out-of-domain check.

Arms (the bundled model, ``--steps`` optimizer steps of batch ``train.batch_size`` each, one run
per seed; the seed changes the batch order, dropout and the refresh rounds' timing):

1. ``plain``: in-batch InfoNCE on the raw pairs (``pairmill train RAW``; pair IO still rejects
   invalid rows, nothing else is removed);
2. ``filtered``: the same on ``pairmill filter RAW`` with the default settings (k=2);
3. ``mined``: filtered + ``pairmill mine`` (one hard negative per pair);
4. ``refresh``: mined + ANCE refresh rounds every ``--refresh-every`` steps;
5. ``kauto-mined``: the consistency filter's k chosen from the data (``KAUTO``: k=auto, at most 2% mismatched kept),
   then mined + refreshed as arm 4 (the same ``--refresh-every``): it differs from arm 4 in the filter;
6. ``kauto-inbatch``: arm 5's filtered pairs with in-batch negatives only: the k=auto filter's own
   effect, without the mined negatives.
7. ``e5-inbatch``: E5's order: the k=auto filter scored by the ``plain`` arm's model of seed 0 (a
   model first trained on the raw pairs) instead of the bundled one, then in-batch training of the
   bundled model on what it kept: arm 6 with a filter model that has seen this data.
8. ``dedup-mined``: ``configs/web.yaml``'s filter (no consistency filter: exact and semantic dedup
   only), then mined with its mining settings (no negative under 4 words) and trained with one
   hard negative per pair, exported as the profile exports (``train.wise_alpha``): the negatives without
   the consistency filter.
9. ``dedup-inbatch``: arm 8's pairs with in-batch negatives only: what the dedup filters alone change.

``--wise ALPHA ...`` adds rows ``<arm>@ALPHA``: each arm's model moved back towards the bundled one
(base + ALPHA x (trained - base), WiSE-FT, what ``train.wise_alpha`` exports), scored without training
again. An arm already exported below 1 (``dedup-mined`` under ``configs/web.yaml``) is refused: give
``train.wise_alpha=1`` as an override to train it at 1 and score the curve from there.
``benchmarks/chain_confirm.py`` scores finished arms again on held-out sets no choice was made on.

Filter and mine run once (they do not depend on the training seed) and are reused on a rerun, as
is every finished arm: the benchmark resumes where it stopped. Each arm writes
``OUT/seed<S>/<arm>/result.json``; ``OUT/chain.json`` and the printed table hold every seed, the
mean and the spread (max - min) per arm, the pairs each arm drew from, the filter's reasons and
the negatives' statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("plain", "filtered", "mined", "refresh", "kauto-mined", "kauto-inbatch", "e5-inbatch", "dedup-mined", "dedup-inbatch")
# The consistency filter with its k chosen from the data (configs/web.yaml's filter until the benchmark
# showed the filter costing on registry pairs): k=auto at 2% mismatched among the kept pairs, near-copies exempt.
KAUTO = ("filter.k=auto", "filter.auto_mismatched=0.02", "filter.near_copy_eps=0.05", "filter.audit=0.05")
JUNK = re.compile(
    r"\b(todo|tbd|lorem|ipsum|placeholder|short description|description here|add a description|"
    r"example package|sample package|test package|my first|hello world|no description|test project)\b",
    re.IGNORECASE,
)


def clean_summary(summary: str) -> bool:
    words = summary.split()
    return 4 <= len(words) <= 60 and not JUNK.search(summary)


def read_registry(tsv: str, seed: int) -> tuple[list[tuple[str, str]], dict[str, int], list[int]]:
    """The registry's (name, summary) rows, how many rows share each normalized summary, and the seeded
    order the held-out split and the training pairs are drawn in."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_registry_pairs import read_rows

    from pairmill.pairs import normalize_text

    rows = list(read_rows(tsv))
    copies: dict[str, int] = {}
    for _, summary in rows:
        key = normalize_text(summary)
        copies[key] = copies.get(key, 0) + 1
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return rows, copies, order


def build_data(tsv: str, folder: Path, pairs: int, heldout: int, seed: int) -> dict:
    """OUT/data/{train_raw.jsonl.gz, heldout.jsonl.gz, data.json}; reused when data.json matches."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_registry_pairs import query_of

    from pairmill.pairs import normalize_text

    want = {"tsv": str(Path(tsv).resolve()), "pairs": pairs, "heldout": heldout, "seed": seed}
    info_path = folder / "data.json"
    if info_path.exists() and {k: v for k, v in json.loads(info_path.read_text()).items() if k in want} == want:
        return json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rows, copies, order = read_registry(tsv, seed)
    held, held_names = [], set()
    for i in order:
        name, summary = rows[i]
        if copies[normalize_text(summary)] == 1 and clean_summary(summary):
            held.append(i)
            held_names.add(name)
            if len(held) == heldout:
                break
    rest = [i for i in order if rows[i][0] not in held_names]
    train = sorted(rest[:pairs])

    def write(path: Path, indices: list[int]) -> None:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for i in indices:
                name, summary = rows[i]
                f.write(json.dumps({"id": name, "query": query_of(name), "passage": summary, "source": "pypi"}) + "\n")

    write(folder / "train_raw.jsonl.gz", train)
    write(folder / "heldout.jsonl.gz", held)
    templated = sum(copies[normalize_text(rows[i][1])] > 1 for i in train)
    empty = sum(not rows[i][1].strip() for i in train)
    info = {**want, "registry_rows": len(rows), "train_rows": len(train), "heldout_rows": len(held),
            "train_empty_summaries": empty, "train_summaries_shared_with_other_names": templated}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def cli(*args: str) -> None:
    from pairmill.cli import main as pairmill

    print(f"[chain] pairmill {' '.join(args)}", flush=True)
    rc = pairmill(list(args))
    if rc:
        raise SystemExit(f"pairmill {args[0]} exited with {rc}")


def web_settings(*sections: str) -> list[str]:
    """configs/web.yaml's values of those sections as key=value overrides (each verb takes only its own sections)."""
    import yaml

    profile = yaml.safe_load((ROOT / "configs" / "web.yaml").read_text())
    return [f"{name}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for name in sections for key, value in profile.get(name, {}).items()]


def finished(folder: Path) -> bool:
    return (folder / "_SUCCESS").exists()


def lock_output(out: Path, script: str):
    """Create OUT and hold an exclusive lock on it until this process exits (the open file is returned to keep)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # seen: a second run on the same OUT trained the arm the first had in flight, in the same folder, and both failed
        raise SystemExit(f"{out} is in use by another {script} run: wait for it to end, or use another -o") from None
    return lock


def evaluate(model: str | None, tasks: dict) -> dict:
    """Held-out metrics per task of a model folder (None: the bundled model)."""
    from pairmill.config import EncoderConfig, EvalConfig
    from pairmill.evaluate import evaluate_model

    return {name: evaluate_model(EncoderConfig(model=model), EvalConfig(), task) for name, task in tasks.items()}


def run_arm(arm: str, seed: int, out: Path, inputs: dict, args, tasks: dict) -> dict:
    folder = out / f"seed{seed}" / arm
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    common = [f"train.max_steps={args.steps}", f"train.seed={seed}", *args.overrides]
    settings = {
        "plain": [inputs["raw"], "train.hard_negatives=0", "train.refresh_every=0"],
        "filtered": [str(out / "filter"), "train.hard_negatives=0", "train.refresh_every=0"],
        "mined": [str(out / "mine"), "train.hard_negatives=1", "train.refresh_every=0"],
        "refresh": [str(out / "mine"), "train.hard_negatives=1", f"train.refresh_every={args.refresh_every}"],
        "kauto-mined": [str(out / "kauto-mine"), "train.hard_negatives=1", f"train.refresh_every={args.refresh_every}"],
        "kauto-inbatch": [str(out / "kauto-filter"), "train.hard_negatives=0", "train.refresh_every=0"],
        "e5-inbatch": [str(out / "e5-filter"), "train.hard_negatives=0", "train.refresh_every=0"],
        "dedup-mined": [str(out / "dedup-mine"), *web_settings("train"), "train.refresh_every=0"],
        "dedup-inbatch": [str(out / "dedup-filter"), "train.hard_negatives=0", "train.refresh_every=0"],
    }[arm]
    started = time.perf_counter()
    cli("train", settings[0], "-o", str(folder / "train"), *settings[1:], *common)
    train_stats = json.loads((folder / "train" / "stats.json").read_text())
    metrics = evaluate(str(folder / "train" / "model"), tasks)
    result = {"arm": arm, "seed": seed, "metrics": metrics, "steps": train_stats["train"]["steps"],
              "pairs": train_stats["kept"], "refresh": train_stats["train"].get("refresh"),
              "seconds": round(time.perf_counter() - started, 1)}
    result_path.write_text(json.dumps(result, indent=2))
    return result


@contextlib.contextmanager
def model_at(folder: Path, alpha: float):
    """The folder of a finished arm's model at ``alpha``: its own at 1, else base + alpha x (trained - base)
    in a temporary folder (``training.model.interpolate_with_base``, what ``train.wise_alpha`` exports)."""
    model = folder / "train" / "model"
    exported_at = json.loads((folder / "train" / "stats.json").read_text())["train"].get("wise_alpha", 1.0)
    if exported_at != 1.0:
        raise SystemExit(f"{folder} exported its model with train.wise_alpha={exported_at}: scoring it at an alpha needs "
                         "the trained weights (train it with train.wise_alpha=1)")
    if alpha == 1:
        yield str(model)
        return
    import tempfile

    from training.model import interpolate_with_base, setup_model

    st = setup_model(str(model), None, "cpu")
    interpolate_with_base(st, setup_model(None, None, "cpu"), alpha)
    with tempfile.TemporaryDirectory() as tmp:
        st.save(tmp)
        yield tmp


def score_wise(arm: str, seed: int, alpha: float, out: Path, tasks: dict) -> dict:
    """A finished arm's model moved back towards the bundled one, as ``train.wise_alpha=alpha`` exports
    it (``training.model.interpolate_with_base``), scored like the arm: the row ``<arm>@<alpha>``."""
    folder = out / f"seed{seed}" / arm
    path = folder / f"wise-{alpha}.json"
    if path.exists():
        return json.loads(path.read_text())
    arm_result = json.loads((folder / "result.json").read_text())
    with model_at(folder, alpha) as model:
        metrics = evaluate(model, tasks)
    result = {**arm_result, "arm": f"{arm}@{alpha}", "metrics": metrics, "wise_alpha": alpha}
    path.write_text(json.dumps(result, indent=2))
    print(f"[chain] seed {seed} {arm}@{alpha}: " + ", ".join(f"{t} {m['ndcg@10']:.4f}" for t, m in metrics.items()), flush=True)
    return result


def arm_order(name: str) -> tuple:
    arm, _, alpha = name.partition("@")
    return ARMS.index(arm), -float(alpha or 1)


def summarise(results: list[dict], base: dict, out: Path, jobs: dict) -> dict:
    import numpy as np

    table = {}
    for arm in sorted({r["arm"] for r in results}, key=arm_order):
        mine = [r for r in results if r["arm"] == arm]
        if not mine:
            continue
        row = {"seeds": [r["seed"] for r in mine], "pairs": mine[0]["pairs"], "steps": mine[0]["steps"]}
        for task in base:
            for metric in ("ndcg@10", "recall@10", "alignment", "uniformity"):
                values = np.array([r["metrics"][task][metric] for r in mine])
                row[f"{task} {metric}"] = {"mean": round(float(values.mean()), 4), "spread": round(float(np.ptp(values)), 4),
                                           "values": [round(float(v), 4) for v in values]}
        table[arm] = row
    summary = {"base": base, "arms": table, "jobs": jobs}
    (out / "chain.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_table(summary: dict) -> None:
    tasks = list(summary["base"])
    print(f"{'arm':<18} {'pairs':>6} {'steps':>5}  " + "  ".join(f"{t + ' nDCG@10 (mean ± spread)':>34}" for t in tasks))
    print(f"{'base':<18} {'':>6} {'':>5}  " + "  ".join(f"{summary['base'][t]['ndcg@10']:>34.4f}" for t in tasks))
    for arm, row in summary["arms"].items():
        cells = []
        for t in tasks:
            m = row[f"{t} ndcg@10"]
            cells.append(f"{m['mean']:.4f} ± {m['spread'] / 2:.4f} ({len(m['values'])} seeds)".rjust(34))
        print(f"{arm:<18} {row['pairs']:>6} {row['steps']:>5}  " + "  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tsv", help="name<TAB>summary registry file, e.g. ../shared/data/pypi_summaries.tsv.gz")
    parser.add_argument("-o", "--output", default="chain-out")
    parser.add_argument("--pairs", type=int, default=20_000, help="raw training pairs drawn from the registry")
    parser.add_argument("--heldout", type=int, default=2_000, help="held-out pairs (clean, by package name)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every arm")
    parser.add_argument("--refresh-every", type=int, default=40, help="refresh rounds of the refresh and kauto-mined arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--wise", type=float, nargs="+", default=[], metavar="ALPHA",
                        help="also score every arm's model at base + ALPHA x (trained - base), as train.wise_alpha exports "
                             "it (rows <arm>@ALPHA; no training: from the arm's model)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--mine", nargs="+", default=[], metavar="mine.key=value",
                        help="mining settings of the kauto-mined and dedup-mined arms, after configs/web.yaml's (another -o "
                             "for each: OUT's mined folders are reused as they are)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train settings for every arm, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    if any(not 0 < alpha < 1 for alpha in args.wise):
        parser.error(f"--wise {args.wise}: use values between 0 and 1 (1 is the arm itself)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pairmill import sample
    from pairmill.evaluate import load_task

    out = Path(args.output).resolve()
    lock = lock_output(out, "chain.py")  # noqa: F841 (held until exit)
    data = build_data(args.tsv, out / "data", args.pairs, args.heldout, args.data_seed)
    print(f"[chain] data: {json.dumps(data)}", flush=True)
    raw = str(out / "data" / "train_raw.jsonl.gz")
    jobs = {}
    tasks = {"registry": load_task(str(out / "data" / "heldout.jsonl.gz")), "bundled": load_task(str(sample.HELDOUT))}
    if set(args.arms) & {"filtered", "mined", "refresh"}:
        if not finished(out / "filter"):
            cli("filter", raw, "-o", str(out / "filter"), "--audit", "0.1")
        if set(args.arms) & {"mined", "refresh"} and not finished(out / "mine"):
            cli("mine", str(out / "filter"), "-o", str(out / "mine"))
    if set(args.arms) & {"kauto-mined", "kauto-inbatch"}:
        if not finished(out / "kauto-filter"):
            cli("filter", raw, "-o", str(out / "kauto-filter"), *web_settings("encoder", "read"), *KAUTO)
        if "kauto-mined" in args.arms and not finished(out / "kauto-mine"):
            cli("mine", str(out / "kauto-filter"), "-o", str(out / "kauto-mine"), *web_settings("encoder", "read", "mine"), *args.mine)
    if "e5-inbatch" in args.arms and not finished(out / "e5-filter"):
        # E5's order: the filter's model is one trained on the raw pairs first (the plain arm, seed 0).
        run_arm("plain", 0, out, {"raw": raw}, args, tasks)
        cli("filter", raw, "-o", str(out / "e5-filter"), "--model", str(out / "seed0" / "plain" / "train" / "model"),
            *web_settings("encoder", "read"), *KAUTO)
    if set(args.arms) & {"dedup-mined", "dedup-inbatch"}:
        if not finished(out / "dedup-filter"):
            cli("filter", raw, "-o", str(out / "dedup-filter"), *web_settings("encoder", "read", "filter"))
        if "dedup-mined" in args.arms and not finished(out / "dedup-mine"):
            cli("mine", str(out / "dedup-filter"), "-o", str(out / "dedup-mine"), *web_settings("encoder", "read", "mine"),
                *args.mine)
    for name in ("filter", "mine", "kauto-filter", "kauto-mine", "e5-filter", "dedup-filter", "dedup-mine"):
        if finished(out / name):
            stats = json.loads((out / name / "stats.json").read_text())
            jobs[name] = {key: stats.get(key) for key in ("input_rows", "kept", "dropped", "rejected", "consistency",
                                                          "audit", "negatives", "seconds")}
    base_path = out / "base.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(evaluate(None, tasks), indent=2))
    base = json.loads(base_path.read_text())
    for seed in args.seeds:
        for arm in args.arms:
            run_arm(arm, seed, out, {"raw": raw}, args, tasks)
            for alpha in args.wise:
                score_wise(arm, seed, alpha, out, tasks)
            summarise(finished_arms(out), base, out, jobs)
    print_table(summarise(finished_arms(out), base, out, jobs))
    return 0


def finished_arms(out: Path) -> list[dict]:
    """Every arm and seed finished in OUT so far, this run's and earlier runs' (a run may do a few)."""
    return [json.loads(p.read_text()) for pattern in ("seed*/*/result.json", "seed*/*/wise-*.json")
            for p in sorted(out.glob(pattern))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.exit(main())
