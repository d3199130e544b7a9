"""Few-shot classification on the bundled FOLDOC domains (8 classes, held-out 40 a class): at n
examples a class, (a) logistic regression on the base model's embeddings, (b) pairmill setfit (pairs
from labels, SupCon on Ray Train, the same head), (c) the `setfit` library on the same texts and model.

    python benchmarks/setfit.py --out bench-setfit [--n 8 16 64] [--seeds 0 1 2] [--steps 32]
        [--setfit-python /tmp/setfitvenv/bin/python] [--lock /tmp/ray.lock]

Each (arm, n, seed) writes OUT/<arm>-n<n>-s<seed>/result.json (accuracy, macro-F1, wall seconds of
the whole arm: encoding, training, the head, the held-out scoring; Ray's start-up in (b)); a rerun
skips finished ones, and the table is printed from what is there. The n examples a class are a
seeded draw from the bundled training split, the same for every arm. The contrastive arms get equal
budgets: --steps optimizer steps of 32 pairs (pairmill: setfit.pairs_per_class = steps x 32 /
classes, one epoch, no boundary negative unless --pairmill-set train.hard_negatives=1; setfit:
max_steps, CosineSimilarityLoss, its default pair sampling), learning rate 2e-5, 128 tokens. (c) runs
in another Python (--setfit-python) where `pip install torch==2.13.0 setfit` works; it is skipped
when none is given. --more-heldout DATA_DIR also scores every arm on the FOLDOC entries of the same
domains that neither bundled split holds (more_accuracy, more_macro_f1 in result.json). --heldout rest
scores on the bundled training texts the draw left out (64 - n a class, a different set for every
seed; n < 64 only) instead of the bundled held-out split: a third set, disjoint from both others. Every
arm encodes in fp32 on a CPU (--cpu-precision), as the setfit library does.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pairmill import sample  # noqa: E402

BATCH = 32
SETFIT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
from datasets import Dataset
from setfit import SetFitModel, Trainer, TrainingArguments
from sklearn.metrics import accuracy_score, f1_score
args = json.loads(sys.argv[1])
train, held = [json.loads(l) for l in open(args["train"])], [json.loads(l) for l in open(args["held"])]
model = SetFitModel.from_pretrained(args["model"])
targs = TrainingArguments(output_dir=args["out"] + "/work", batch_size=args["batch"], max_steps=args["steps"],
                          body_learning_rate=2e-5, max_length=128, seed=args["seed"], show_progress_bar=False,
                          save_strategy="no", report_to="none")
trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(train))
trainer.train()
predicted = list(model.predict([r["text"] for r in held]))
true = [r["label"] for r in held]
result = {"accuracy": accuracy_score(true, predicted), "macro_f1": f1_score(true, predicted, average="macro"),
          "seconds": time.perf_counter() - t0}
if args.get("more"):
    more = [json.loads(l) for l in open(args["more"])]
    predicted, true = list(model.predict([r["text"] for r in more])), [r["label"] for r in more]
    result.update(more_accuracy=accuracy_score(true, predicted), more_macro_f1=f1_score(true, predicted, average="macro"),
                  more_rows=len(more))
print(json.dumps(result))
"""


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def draw(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n rows a class, a seeded draw (the same for every arm)."""
    rng = random.Random(seed * 1000 + n)
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    out = [r for label in sorted(by_class) for r in rng.sample(by_class[label], n)]
    rng.shuffle(out)
    return out


def more_heldout(data_dir: str, bundled: list[dict]) -> list[dict]:
    """Every FOLDOC entry labelled as scripts/make_labelled_sample.py labels them that neither bundled split
    holds: a second, larger held-out set (unbalanced: as many a class as FOLDOC has), not bundled."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_labelled_sample import labelled_rows

    bundled_texts = {r["text"].lower() for r in bundled}
    return [row for row in labelled_rows(data_dir) if row["text"].lower() not in bundled_texts]


def scored_more(head, model: str, more: list[dict], max_length: int) -> dict:
    """Accuracy and macro-F1 of a fitted head (and its model) on the larger held-out set."""
    from pairmill.config import EncoderConfig
    from pairmill.chain.setfit import encode, scores

    if not more:
        return {}
    m = scores(head, encode(model, [r["text"] for r in more], EncoderConfig(max_length=max_length)), [r["label"] for r in more])
    return {"more_accuracy": m["accuracy"], "more_macro_f1": m["macro_f1"], "more_rows": len(more)}


def arm_base(train: list[dict], held: list[dict], seed: int, more: list[dict]) -> dict:
    from pairmill.config import EncoderConfig
    from pairmill.chain.setfit import encode, scores
    from pairmill.encoder import resolve_model
    from pairmill.head import fit_head

    t0 = time.perf_counter()
    enc = EncoderConfig(max_length=128)
    model = resolve_model(None)
    head = fit_head(encode(model, [r["text"] for r in train], enc), [r["label"] for r in train], seed=seed)
    m = scores(head, encode(model, [r["text"] for r in held], enc), [r["label"] for r in held])
    seconds = time.perf_counter() - t0
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": seconds, **scored_more(head, model, more, 128)}


# Runs a command and prints its wall time: started under `flock LOCK` (--lock), the time waited for the
# lock is not the arm's.
TIMED = "import subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode; " \
        "print('WALL', time.perf_counter() - t); sys.exit(rc)"


def arm_pairmill(train_file: Path, held_file: Path, out: Path, classes: int, steps: int, seed: int, lock: str | None,
                 settings: list[str], more: list[dict]) -> dict:
    per_class = steps * BATCH // classes
    cmd = [sys.executable, "-m", "pairmill.cli", "setfit", str(train_file), "-o", str(out / "job"), "--eval-data",
           str(held_file), "-q", f"setfit.pairs_per_class={per_class}", f"train.batch_size={BATCH}", f"train.seed={seed}",
           *settings]
    timed = (["flock", lock] if lock else []) + [sys.executable, "-c", TIMED] + cmd
    done = subprocess.run(timed, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = float([line for line in done.stdout.splitlines() if line.startswith("WALL ")][-1].split()[1])
    m = json.loads((out / "job" / "stats.json").read_text())["eval"]["after"]
    result = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": seconds, "command": "pairmill " + " ".join(cmd[3:])}
    if more:
        from pairmill.head import load_head

        head = load_head(out / "job" / "head")
        result.update(scored_more(head, str(out / "job" / "model"), more, head.settings["max_length"]))
    return result


def arm_setfit(python: str, train_file: Path, held_file: Path, out: Path, steps: int, seed: int, more_file: Path | None) -> dict:
    from pairmill.encoder import resolve_model

    t0 = time.perf_counter()
    args = {"train": str(train_file), "held": str(held_file), "model": resolve_model(None), "out": str(out), "batch": BATCH,
            "steps": steps, "seed": seed, "more": str(more_file) if more_file else None}
    done = subprocess.run([python, "-c", SETFIT_SCRIPT, json.dumps(args)], check=True, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - t0}


def table(out: Path) -> str:
    import statistics

    results: dict[tuple[str, int], list[dict]] = {}
    for f in sorted(out.glob("*/result.json")):
        r = json.loads(f.read_text())
        results.setdefault((r["arm"], r["n"]), []).append(r)
    more = any("more_accuracy" in r for rs in results.values() for r in rs)
    lines = ["| arm | n/class | seeds | accuracy | macro-F1 | wall s |" + (" more: accuracy | more: macro-F1 |" if more else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if more else "")]
    for (arm, n), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def fmt(key, digits=3):
            values = [r[key] for r in rs]
            spread = f" ± {statistics.pstdev(values):.{digits}f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.{digits}f}{spread}"
        more_cells = (f" {fmt('more_accuracy')} | {fmt('more_macro_f1')} |" if all("more_accuracy" in r for r in rs)
                      else " – | – |") if more else ""
        lines.append(f"| {arm} | {n} | {len(rs)} | {fmt('accuracy')} | {fmt('macro_f1')} | {fmt('seconds', 0)} |" + more_cells)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--arms", nargs="+", default=["base-lr", "pairmill", "setfit"])
    parser.add_argument("--setfit-python", help="a Python with the setfit library (arm c); skipped without")
    parser.add_argument("--lock", help="run each pairmill arm under `flock LOCK` (one local Ray at a time on a shared machine)")
    parser.add_argument("--pairmill-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more settings for the pairmill arm (train.temperature=0.1); its results are an arm of their own")
    parser.add_argument("--more-heldout", metavar="DATA_DIR",
                        help="also score every arm on the FOLDOC entries of DATA_DIR/foldoc_pairs.jsonl.gz that neither "
                             "bundled split holds (labelled the same way; unbalanced): more_accuracy, more_macro_f1")
    parser.add_argument("--heldout", choices=("bundled", "rest"), default="bundled",
                        help="score on the bundled held-out split (320 texts), or on the training texts each draw left out")
    parser.add_argument("--cpu-precision", choices=("fp32", "bf16", "probe"), default="fp32",
                        help="how arms (a) and (b) encode on a CPU (PAIRMILL_CPU_PRECISION); the setfit library encodes in fp32")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Every arm encodes at one precision, so the arms differ only in their training. pairmill's
    # default (probe) picks bf16 where a speed probe says so, and load can flip that verdict: at
    # n = 8 seed 2 arm (a) scored 0.8187 one day and 0.8219 the next on the same draw.
    os.environ["PAIRMILL_CPU_PRECISION"] = args.cpu_precision  # this process (a) and pairmill's (b), Ray workers too
    out = Path(args.out)
    train_rows, held_rows = read(sample.LABELLED_TRAIN), read(sample.LABELLED_HELDOUT)
    classes = len({r["label"] for r in train_rows})
    held_file = out / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    more = more_heldout(args.more_heldout, train_rows + held_rows) if args.more_heldout else []
    more_file = out / "more_heldout.jsonl" if more else None
    if more_file:
        more_file.write_text("".join(json.dumps(r) + "\n" for r in more))
        print(f"more held-out: {len(more)} FOLDOC texts in neither bundled split", flush=True)
    if args.heldout == "rest" and max(args.n) >= len(train_rows) // classes:
        parser.error(f"--heldout rest needs n below {len(train_rows) // classes} a class: the draw leaves nothing out")
    for n in args.n:
        for seed in args.seeds:
            train = draw(train_rows, n, seed)
            if args.heldout == "rest":
                drawn = {r["text"] for r in train}
                held_rows = [r for r in train_rows if r["text"] not in drawn]
                held_file = out / f"rest-n{n}-s{seed}.jsonl"
                held_file.write_text("".join(json.dumps(r) + "\n" for r in held_rows))
            train_file = out / f"train-n{n}-s{seed}.jsonl"
            train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
            for arm in args.arms:
                label = " ".join(["pairmill", *args.pairmill_set]) if arm == "pairmill" else arm
                if arm != "setfit" and args.cpu_precision != "fp32":
                    label += f" {args.cpu_precision}"
                if args.heldout == "rest":  # its own arm name and folder: one --out never mixes the two sets
                    label += " rest"
                folder = out / f"{re.sub(r'[^A-Za-z0-9.=_-]+', '_', label)}-n{n}-s{seed}"
                if (folder / "result.json").exists() or (arm == "setfit" and not args.setfit_python):
                    continue
                folder.mkdir(exist_ok=True)
                if arm == "base-lr":
                    result = arm_base(train, held_rows, seed, more)
                elif arm == "pairmill":
                    result = arm_pairmill(train_file, held_file, folder, classes, args.steps, seed, args.lock, args.pairmill_set,
                                          more)
                else:
                    result = arm_setfit(args.setfit_python, train_file, held_file, folder, args.steps, seed, more_file)
                result.update(arm=label, n=n, seed=seed, steps=args.steps if arm != "base-lr" else 0, held_out=len(held_rows),
                              heldout=args.heldout)
                (folder / "result.json").write_text(json.dumps(result, indent=2))
                more_line = (f" | more held-out ({result['more_rows']}): accuracy {result['more_accuracy']:.4f} "
                             f"macro-F1 {result['more_macro_f1']:.4f}") if "more_accuracy" in result else ""
                print(f"{label} n={n} seed={seed}: accuracy {result['accuracy']:.4f} macro-F1 {result['macro_f1']:.4f} "
                      f"{result['seconds']:.0f}s{more_line}", flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
