"""The main job's benchmark: the full chain vs plain in-batch training, with the same step budget.

    HF_HUB_OFFLINE=1 python benchmarks/run.py [-o pairmill-out] [--config C.yaml] [key=value ...]

1. ``pairmill run`` into OUT with the given config and overrides (finished stages are reused, so
   on a folder a run already filled this step only re-reads it).
2. The plain arm: ``training.train.train`` on the run's *raw* pairs (``run.train``, the bundled
   sample's train split by default: no filter, no mined negatives), ``train.hard_negatives=0``,
   ``train.refresh_every=0``, ``train.max_steps`` = the steps the chain trained, every other setting
   the chain's own -> ``OUT/plain/train``; then the same held-out evaluation -> ``OUT/plain/report.json``
   (``{"plain": metrics, "steps", "pairs", "seconds"}``).
3. ``OUT/report.md`` re-rendered: it gains a "full chain vs plain" section and a ``plain`` column.

The plain arm is a stage of OUT/stages.json like the chain's (``plain``): rerunning reuses it while
the chain's training and the settings are unchanged. The raw pairs hold what decontamination
removes from the chain's (1 pair of the bundled sample duplicates a held-out text), a small
advantage to the plain arm that the report states.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def plain_arm(out: Path, cfg: dict, force: bool = False) -> dict:
    """Train and evaluate the plain arm into ``out/plain``; returns ``out/plain/report.json``'s content."""
    from pairmill import sample
    from pairmill.config import config_to_dict
    from pairmill.embed import read_kwargs
    from pairmill.run import Stages, evaluate_stage, fingerprint, input_identity
    from training.train import train as train_model

    chain_report = json.loads((out / "report.json").read_text())
    steps = chain_report["stages"]["train"]["train"]["steps"]
    raw = cfg["run"].train or str(sample.TRAIN)
    heldout = cfg["eval"].data or str(sample.HELDOUT)
    train_cfg = dataclasses.replace(cfg["train"], hard_negatives=0, refresh_every=0, refresh_slices=1, max_steps=steps)
    no_eval = dataclasses.replace(cfg["eval"], data=None)
    sections = config_to_dict({**cfg, "train": train_cfg})
    key = fingerprint("plain", input_identity(raw), sections["train"], cfg["encoder"].fingerprint(), sections["read"],
                      input_identity(heldout), sections["eval"])
    stages = Stages(out, force=force)
    started = time.perf_counter()
    print(f"[pairmill] bench run: plain arm on {raw}: {steps} steps, in-batch negatives only, no refresh")

    def job(folder: str) -> dict:
        os.makedirs(folder, exist_ok=True)
        train_stats = train_model(raw, str(Path(folder) / "train"), encoder=cfg["encoder"], read=cfg["read"],
                                  train_cfg=train_cfg, eval_cfg=no_eval, ray=cfg["ray"])
        plain_encoder = dataclasses.replace(cfg["encoder"], model=str(Path(folder) / "train" / "model"))
        scores = evaluate_stage(heldout, str(Path(folder) / "eval"), {"plain": plain_encoder}, cfg["eval"],
                                read_kwargs(cfg["read"]))
        result = {"plain": scores["plain"], "steps": train_stats["train"]["steps"], "pairs": train_stats["kept"],
                  "train_seconds": train_stats["seconds"], "seconds": round(time.perf_counter() - started, 1)}
        (Path(folder) / "report.json").write_text(json.dumps(result, indent=2))
        (Path(folder) / "stats.json").write_text(json.dumps(result, indent=2))
        (Path(folder) / "_SUCCESS").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return result

    return stages.run("plain", key, job)


def main(argv: list[str] | None = None) -> int:
    from pairmill.cli import VERBS
    from pairmill.cli import main as cli_main
    from pairmill.config import SECTIONS, load_config
    from pairmill.evaluate import format_table
    from pairmill.report import render_report
    from pairmill.run import sample_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", default="pairmill-out", help="the run's folder (default ./pairmill-out)")
    parser.add_argument("--config", help="YAML config, as for `pairmill run`")
    parser.add_argument("--model", help="as for `pairmill run`")
    parser.add_argument("--force", action="store_true", help="redo every stage, the plain arm included")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    run_args = ["run", "-o", args.output, *(["--config", args.config] if args.config else []),
                *(["--model", args.model] if args.model else []), *(["--force"] if args.force else []), *args.overrides]
    rc = cli_main(run_args)
    if rc:
        return rc
    overrides = list(args.overrides) + ([f"encoder.model={args.model}"] if args.model else [])
    cfg = load_config({s: SECTIONS[s] for s in VERBS["run"][1]}, args.config, sample_overrides(args.config, overrides))
    out = Path(args.output).resolve()
    plain = plain_arm(out, cfg, force=args.force)
    report = json.loads((out / "report.json").read_text())
    print(format_table({"base": report["base"], "trained (chain)": report["trained"], "plain": plain["plain"]}))
    print(f"[pairmill] bench run: report {render_report(out)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    sys.exit(main())
