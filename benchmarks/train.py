"""Training benchmark: `pairmill train` vs sentence-transformers' trainer (MNRL), GradCache and
refresh cost, and held-out quality on the bundled sample.

    HF_HUB_OFFLINE=1 python benchmarks/train.py [--steps 20] [--max-length 128] [--one-forward-arm] [--json bench-out/train.json]
    HF_HUB_OFFLINE=1 python benchmarks/train.py --quality [--no-throughput] [--json ...]

Every arm uses the bundled all-MiniLM-L6-v2, batch 32 (--batch-size), one process / one Ray Train
worker, and the same max length for queries and passages (--max-length, the peer's single
``max_seq_length``), on this machine's CPUs. Arms run one after another in this process, so
quote ratios: other work on the machine slows both sides alike only when it is steady.

1. Throughput (on the raw train split of the sample, or --pairs; --steps optimizer steps per arm):
   ``training.train.train`` (Ray Train, 1 worker, in-batch negatives; ``log_every=1`` so
   ``metrics.jsonl`` holds every step's wall time, data wait included) against
   ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` (a ``TrainerCallback`` takes
   the time between step ends, likewise). Steady state = pairs/s over the steps after the first
   --warmup steps; wall = the whole call, start-up (Ray Train ~14 s), data read and export
   included. Also pairs per CPU-second of the training process (``time.process_time``: pairmill's
   ``metrics.jsonl`` ``cpu_seconds``, the callback's for ST): on a machine shared with other work
   read this one, because Ray starts its workers at nice 15 (``RAY_worker_niceness``), so under
   contention the Train worker gets far less CPU than the nice-0 process running ST's trainer.
   pairmill runs with its defaults, so each side's texts are encoded in length groups
   (``train.length_group_overhead``); --one-forward-arm adds pairmill with that off (one forward
   per side padded to its longest, as ST), which separates the grouping's gain from the rest.
   Then pairmill with GradCache (``mini_batch_size`` --mini-batch) on the same batch.
2. Refresh cost: a pairmill run on the mined pairs with ``refresh_every``; its ``stats.json``
   gives seconds per round, per step (while rounds ran) and the round's cost in steps.
3. Quality (--quality): the sample's train split filtered as ``pairmill run`` does
   (``filter_pairs``, decontaminated against the held-out split) and mined (``mine``); both are
   cached in --work and reused by a rerun. Arms, all 1 epoch on those pairs, nDCG@10 etc. on the
   held-out split with ``pairmill.evaluate`` (as ``pairmill eval``): the base model; ST MNRL; pairmill
   in-batch at temperature 0.05 (its default) and 0.01; pairmill with the mined hard negatives;
   and with mined negatives + refresh every ~1/3 of the run. ST gets pairmill's optimiser settings
   (lr 5e-5, 10% warmup, linear decay, weight decay 0.01, clipping 1.0), MNRL's scale 20 (=
   temperature 0.05), the NO_DUPLICATES batch sampler it recommends and drop_last (same steps).
Results: a table on stdout and, with --json, a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_WORK = ROOT / "bench-out" / "train"


# ---------------------------------------------------------------------------------------------
# Step timings -> pairs/s


def steady_pairs_per_s(step_seconds: list[float], batch: int, warmup: int) -> float | None:
    """Pairs/s over the steps after the first ``warmup`` (start-up, first data blocks, allocator)."""
    steady = step_seconds[warmup:]
    return round(batch * len(steady) / sum(steady), 3) if steady and sum(steady) > 0 else None


def step_summary(step_seconds: list[float], cpu_seconds: list[float], batch: int, warmup: int) -> dict:
    """Wall-clock pairs/s over the steady steps (mean), at their median and at their fastest step
    (the one least disturbed by other work on the machine), and pairs per CPU-second of the
    training process (every thread; load changes it much less than the wall time)."""
    steady, cpu = step_seconds[warmup:], cpu_seconds[warmup:]
    return {
        "steps_timed": len(step_seconds),
        "first_step_s": round(step_seconds[0], 3) if step_seconds else None,
        "steady_steps": len(steady),
        "steady_step_s_median": round(statistics.median(steady), 4) if steady else None,
        "steady_step_s_min": round(min(steady), 4) if steady else None,
        "steady_pairs_per_s": steady_pairs_per_s(step_seconds, batch, warmup),
        "median_step_pairs_per_s": round(batch / statistics.median(steady), 3) if steady else None,
        "best_step_pairs_per_s": round(batch / min(steady), 3) if steady else None,
        "pairs_per_cpu_s": round(batch * len(cpu) / sum(cpu), 3) if cpu and sum(cpu) > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# The two trainers


def pairmill_arm(pairs: str, out: Path, *, batch: int, max_length: int, steps: int | None, warmup: int,
                 temperature: float = 0.05, mini_batch: int | None = None, refresh_every: int = 0,
                 hard_negatives: int = 1, length_group_overhead: int | None = None) -> dict:
    """``training.train.train`` into a fresh ``out`` (a leftover folder would be resumed, not rerun)."""
    from pairmill.config import EncoderConfig, EvalConfig, MineConfig, RayConfig, ReadConfig, TrainConfig
    from training.train import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        epochs=1, max_steps=steps, batch_size=batch, temperature=temperature, mini_batch_size=mini_batch,
        query_max_length=max_length, passage_max_length=max_length, hard_negatives=hard_negatives,
        refresh_every=refresh_every, log_every=1, checkpoint_every=10**9, max_failures=0,
        length_group_overhead=length_group_overhead,
    )
    t0 = time.perf_counter()
    stats = train(pairs, str(out), encoder=EncoderConfig(), read=ReadConfig(), train_cfg=cfg, eval_cfg=EvalConfig(),
                  ray=RayConfig(), mine_cfg=MineConfig())
    wall = time.perf_counter() - t0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [m["seconds"] for m in lines]  # log_every=1: one line per step
    cpu = [m["cpu_seconds"] for m in lines if "cpu_seconds" in m]
    if [m["step"] for m in lines] != list(range(1, stats["train"]["steps"] + 1)):
        raise RuntimeError(f"{out}/metrics.jsonl does not hold one line per step; was training/train.py changed?")
    return {
        "trainer": "pairmill",
        "steps": stats["train"]["steps"],
        "pairs": stats["train"]["pairs_trained"],
        "hard_negatives_per_pair": stats["train"]["hard_negatives_per_pair"],
        "wall_s": round(wall, 2),
        "wall_pairs_per_s": round(stats["train"]["pairs_trained"] / wall, 3),
        **step_summary(seconds, cpu if len(cpu) == len(seconds) else [], batch, warmup),
        "step_seconds": seconds,
        "step_cpu_seconds": cpu,
        "refresh": stats.get("refresh"),
        "model": str(out / "model"),
    }


def st_arm(queries: list[str], passages: list[str], out: Path, *, batch: int, max_length: int, steps: int | None,
           warmup: int, seed: int = 0) -> dict:
    """sentence-transformers' trainer with MultipleNegativesRankingLoss, in this process."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import TrainerCallback

    from pairmill.encoder import load_sentence_transformer

    class StepTimes(TrainerCallback):
        """Wall time between step ends (the first from the start of training), data wait included."""

        def __init__(self) -> None:
            self.last = self.cpu_last = 0.0
            self.seconds: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.cpu_last = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            self.seconds.append(now - self.last)
            self.cpu.append(cpu - self.cpu_last)
            self.last, self.cpu_last = now, cpu

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    model = load_sentence_transformer(None, "cpu")
    model.max_seq_length = max_length
    dataset = Dataset.from_dict({"anchor": queries, "positive": passages})
    per_epoch = len(queries) // batch
    total = steps or per_epoch
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        max_steps=steps or -1,
        learning_rate=5e-5,  # pairmill's defaults, so the comparison is of the trainers, not of settings
        warmup_steps=int(0.1 * total),
        weight_decay=0.01,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # what ST recommends with MNRL
        dataloader_drop_last=True,  # whole batches, as pairmill (same number of steps)
        save_strategy="no",
        logging_steps=max(1, total // 5),
        report_to="none",
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    timer = StepTimes()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model), callbacks=[timer])
    threads = torch.get_num_threads()
    trainer.train()
    model.save(str(out / "model"))
    wall = time.perf_counter() - t0
    done = len(timer.seconds)
    return {
        "trainer": "sentence-transformers",
        "steps": done,
        "pairs": done * batch,
        "hard_negatives_per_pair": 0,
        "wall_s": round(wall, 2),
        "wall_pairs_per_s": round(done * batch / wall, 3),
        **step_summary(timer.seconds, timer.cpu, batch, warmup),
        "step_seconds": [round(s, 4) for s in timer.seconds],
        "step_cpu_seconds": [round(s, 4) for s in timer.cpu],
        "torch_threads": threads,
        "model": str(out / "model"),
    }


# ---------------------------------------------------------------------------------------------
# Data


def valid_pairs(path: str) -> tuple[list[str], list[str]]:
    """The rows `pairmill train` trains on (validated as its reader does), as two lists."""
    import pyarrow.compute as pc

    from pairmill.read import load_parsed_local

    table = load_parsed_local(path, "pairs")
    table = table.filter(pc.is_null(table.column("reason")))
    return table.column("query").to_pylist(), table.column("passage").to_pylist()


def prepared_pairs(work: Path) -> tuple[Path, Path]:
    """The sample's train split filtered (decontaminated against the held-out split) and mined, as
    ``pairmill run`` does; reused when a finished job folder is there."""
    from mining.mine import mine
    from pairmill import sample
    from pairmill.config import EncoderConfig, FilterConfig, MineConfig, RayConfig, ReadConfig
    from pipelines.filter import filter_pairs

    filtered, mined = work / "filter", work / "mine"
    if (filtered / "_SUCCESS").exists():
        print(f"[bench] filter: reusing {filtered}")
    else:
        print(f"[bench] filter: {sample.TRAIN} -> {filtered}")
        filter_pairs(str(sample.TRAIN), str(filtered), options=FilterConfig(decontaminate=[str(sample.HELDOUT)]),
                     encoder=EncoderConfig(), read=ReadConfig(), ray=RayConfig())
        (mined / "_SUCCESS").unlink(missing_ok=True)  # made from the old filter output
    if (mined / "_SUCCESS").exists():
        print(f"[bench] mine: reusing {mined}")
    else:
        print(f"[bench] mine: {filtered} -> {mined}")
        mine(str(filtered), str(mined), corpus_path=None, encoder=EncoderConfig(), read=ReadConfig(),
             mine_cfg=MineConfig(), ray=RayConfig())
    return filtered, mined


# ---------------------------------------------------------------------------------------------
# The parts


MEASURES = ("steady_pairs_per_s", "median_step_pairs_per_s", "best_step_pairs_per_s", "pairs_per_cpu_s")


def ratios(a: list[dict], b: list[dict]) -> dict[str, list[float]]:
    """Per round, a's pairs/s over b's, for each measure."""
    return {m: [round(x[m] / y[m], 3) for x, y in zip(a, b) if x.get(m) and y.get(m)] for m in MEASURES}


def throughput(args, work: Path) -> dict:
    from pairmill import sample

    pairs = args.pairs or str(sample.TRAIN)
    queries, passages = valid_pairs(pairs)
    print(f"[bench] throughput: {len(queries)} valid pairs of {pairs}, batch {args.batch_size}, "
          f"max length {args.max_length}, {args.steps} steps per arm, steady state after {args.warmup} steps")
    runs: dict[str, list[dict]] = {"pairmill": [], "sentence-transformers": [], "pairmill_one_forward": [],
                                   "pairmill_gradcache": []}
    common = dict(batch=args.batch_size, max_length=args.max_length, steps=args.steps, warmup=args.warmup)
    arms = {
        "pairmill": lambda: pairmill_arm(pairs, work / "tp-pairmill", **common),
        "sentence-transformers": lambda: st_arm(queries, passages, work / "tp-st", **common),
        # length grouping off: one forward per side padded to its longest, as sentence-transformers
        "pairmill_one_forward": lambda: pairmill_arm(pairs, work / "tp-pairmill-1f", length_group_overhead=0,
                                                     **common),
        "pairmill_gradcache": lambda: pairmill_arm(pairs, work / "tp-pairmill-gc", mini_batch=args.mini_batch, **common),
    }
    order = (["pairmill", "sentence-transformers"] + (["pairmill_one_forward"] if args.one_forward_arm else [])
             + (["pairmill_gradcache"] if args.mini_batch else []))
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate, so neither side always runs first
            print(f"[bench] throughput round {r + 1}/{args.repeats}: {name}")
            runs[name].append(arms[name]())
    return {
        "pairs": pairs, "valid_pairs": len(queries), "batch_size": args.batch_size,
        "max_length": args.max_length, "steps": args.steps, "warmup_steps_excluded": args.warmup,
        "gradcache_mini_batch": args.mini_batch, "cpus": os.cpu_count(), "runs": runs,
        "ratio_pairmill_over_st": ratios(runs["pairmill"], runs["sentence-transformers"]),
        "ratio_one_forward_over_st": ratios(runs["pairmill_one_forward"], runs["sentence-transformers"]),
        # > 1: a GradCache step costs that many plain steps
        "gradcache_step_cost": ratios(runs["pairmill"], runs["pairmill_gradcache"]),
    }


def quality(args, work: Path, save) -> dict:
    from pairmill import sample
    from pairmill.config import EncoderConfig, EvalConfig
    from pairmill.evaluate import evaluate_model, load_task

    filtered, mined = prepared_pairs(work)
    queries, passages = valid_pairs(str(filtered))
    steps = len(queries) // args.batch_size
    refresh_every = max(1, round(steps / 3))
    task = load_task(str(sample.HELDOUT))
    print(f"[bench] quality: {len(queries)} filtered pairs, {steps} steps (1 epoch, batch {args.batch_size}), "
          f"max length {args.max_length} for queries and passages in training; held-out {len(task.queries)} queries")
    common = dict(batch=args.batch_size, max_length=args.max_length, steps=None, warmup=args.warmup)
    arms: dict[str, dict] = {}

    def evaluated(name: str, run: dict | None, model: str | None) -> None:
        t0 = time.perf_counter()
        metrics = evaluate_model(EncoderConfig(model=model), EvalConfig(), task)
        arms[name] = {"metrics": metrics, "eval_seconds": round(time.perf_counter() - t0, 1), "run": run}
        print(f"[bench] quality: {name}: ndcg@10 {metrics['ndcg@10']:.4f} recall@10 {metrics['recall@10']:.4f} "
              f"mrr@10 {metrics['mrr@10']:.4f}")
        save({"arms": arms})  # partial results survive an interrupted run

    plan = [
        ("base", None),
        ("st-mnrl", lambda: st_arm(queries, passages, work / "q-st", **common)),
        ("pairmill t=0.05 (default), in-batch", lambda: pairmill_arm(str(filtered), work / "q-pm-t05", **common)),
        ("pairmill t=0.01, in-batch", lambda: pairmill_arm(str(filtered), work / "q-pm-t01", temperature=0.01, **common)),
        ("pairmill t=0.05 + mined negatives", lambda: pairmill_arm(str(mined), work / "q-pm-mined", **common)),
        (f"pairmill t=0.05 + mined + refresh every {refresh_every}",
         lambda: pairmill_arm(str(mined), work / "q-pm-refresh", refresh_every=refresh_every, **common)),
    ]
    for name, run_arm in plan:
        if args.arms and not any(a in name for a in args.arms):
            continue
        print(f"[bench] quality: {name}")
        run = run_arm() if run_arm else None
        evaluated(name, run, run["model"] if run else None)
    return {"pairs": str(filtered), "train_pairs": len(queries), "steps": steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "refresh_every": refresh_every, "heldout": str(sample.HELDOUT), "arms": arms}


# ---------------------------------------------------------------------------------------------
# Output


def _write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def format_throughput(t: dict) -> str:
    lines = [f"Throughput: batch {t['batch_size']}, max length {t['max_length']} (queries and passages), "
             f"{t['steps']} steps, steady = after the first {t['warmup_steps_excluded']} steps, {t['cpus']} CPUs",
             f"{'arm':<24} {'steady pairs/s':>14} {'median-step':>11} {'best-step':>9} {'pairs/CPU-s':>11} "
             f"{'first step s':>12} {'wall s':>7} {'wall pairs/s':>12}"]
    for name, runs in t["runs"].items():
        for r in runs:
            cells = [r[m] for m in MEASURES]
            lines.append(f"{name:<24} {cells[0]:>14.2f} {cells[1]:>11.2f} {cells[2]:>9.2f} {(cells[3] or 0):>11.2f} "
                         f"{r['first_step_s']:>12.2f} {r['wall_s']:>7.1f} {r['wall_pairs_per_s']:>12.2f}")
    lines.append("pairmill / sentence-transformers pairs/s, per round: "
                 + "; ".join(f"{m} {v}" for m, v in t["ratio_pairmill_over_st"].items()))
    # the host's speed drifts between rounds: the median round is the number to quote
    lines.append("  median over rounds: " + "; ".join(
        f"{m} {statistics.median(v):.3f}" for m, v in t["ratio_pairmill_over_st"].items() if v))
    if t["runs"].get("pairmill_one_forward"):
        lines.append("pairmill without length grouping / sentence-transformers pairs/s, per round: "
                     + "; ".join(f"{m} {v}" for m, v in t["ratio_one_forward_over_st"].items()))
    if t["runs"]["pairmill_gradcache"]:
        lines.append(f"GradCache (mini-batch {t['gradcache_mini_batch']}) step cost in plain steps, per round: "
                     + "; ".join(f"{m} {v}" for m, v in t["gradcache_step_cost"].items()))
    return "\n".join(lines)


def format_quality(q: dict) -> str:
    lines = [f"Quality: {q['train_pairs']} filtered pairs ({q['pairs']}), 1 epoch = {q['steps']} steps, batch "
             f"{q['batch_size']}, training max length {q['max_length']}; held-out {q['heldout']}",
             f"{'arm':<46} {'ndcg@10':>8} {'recall@1':>8} {'recall@10':>9} {'mrr@10':>8} {'steady pairs/s':>14} {'wall s':>7}"]
    for name, arm in q["arms"].items():
        m, r = arm["metrics"], arm["run"] or {}
        pps = r.get("steady_pairs_per_s")
        lines.append(f"{name:<46} {m['ndcg@10']:>8.4f} {m['recall@1']:>8.4f} {m['recall@10']:>9.4f} {m['mrr@10']:>8.4f} "
                     f"{(format(pps, '.2f') if pps else '-'):>14} {(format(r['wall_s'], '.0f') if r else '-'):>7}")
    for name, arm in q["arms"].items():
        refresh = (arm["run"] or {}).get("refresh")
        if refresh:
            lines.append(f"refresh ({name}): {refresh['rounds_finished']}/{refresh['rounds_started']} rounds finished, "
                         f"{refresh['seconds_per_round']} s per round, {refresh['seconds_per_step']} s per step meanwhile "
                         f"-> one round costs {refresh['round_cost_in_steps']} steps; model save {refresh['model_save_seconds_per_round']} s; "
                         f"mean staleness {refresh['mean_staleness']} steps")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput arm")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of steady-state pairs/s")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per query and per passage, every arm")
    parser.add_argument("--mini-batch", type=int, default=8, help="GradCache mini-batch of the GradCache arm; 0 = skip it")
    parser.add_argument("--one-forward-arm", action="store_true",
                        help="also run pairmill with train.length_group_overhead=0 (one padded forward per side, as ST)")
    parser.add_argument("--pairs", help="throughput: this pairs file or folder instead of the sample's raw train split "
                        "(e.g. bench-out/train/filter, the filtered pairs --quality makes)")
    parser.add_argument("--repeats", type=int, default=1, help="throughput rounds (pairmill, ST, GradCache each)")
    parser.add_argument("--quality", action="store_true", help="also run the quality arms (slow: ~6 trainings)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput part")
    parser.add_argument("--arms", nargs="*", help="quality: only the arms whose name contains one of these")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="work folder (cached filter/mine outputs, runs)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    for name in ("steps", "batch_size", "max_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.warmup >= args.steps:
        parser.error(f"--warmup must be >= 0 and below --steps ({args.steps})")
    if args.no_throughput and not args.quality:
        parser.error("--no-throughput without --quality leaves nothing to run")

    from pairmill.cluster import init_ray

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    init_ray()  # before any timed arm: Ray's own start-up is in neither trainer's wall time
    result: dict = {"command": " ".join(sys.argv)}
    if not args.no_throughput:
        result["throughput"] = throughput(args, work)
        if args.json:
            _write_json(args.json, result)
        print(format_throughput(result["throughput"]))
    if args.quality:
        def save(partial: dict) -> None:
            if args.json:
                _write_json(args.json, {**result, "quality_partial": partial})

        result["quality"] = quality(args, work, save)
        if args.json:
            _write_json(args.json, result)
        print(format_quality(result["quality"]))
    if "throughput" in result:
        print(format_throughput(result["throughput"]))
    if args.json:
        _write_json(args.json, result)
        print(f"[bench] results written to {args.json}")


if __name__ == "__main__":
    main()
