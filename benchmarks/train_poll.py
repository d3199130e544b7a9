"""A Ray Train run's fixed cost at two controller poll intervals (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).

    python benchmarks/train_poll.py [--intervals 2,0.25] [--runs 4] [--rounds 2]

Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` seconds (2 by
default) and moves on (workers up, training done) only at a poll; a local Ray of pairmill's polls
every 0.25 s (``pairmill.cluster.LOCAL_RAY_ENV``). For each round and each interval, in turn, one
child process starts a local Ray with that interval and runs ``--runs`` one-worker ``pairmill
train`` jobs of 4 steps (the tests' tiny model, 64 bundled-sample pairs, 36 held-out): the first
run pays for Ray's cold workers, so the summary is over the runs after it. Prints, per run, its wall
time, the machine's busy CPU-seconds over it (``/proc/stat``, Linux) and the train stage's seconds;
then the mean of each per interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suite_cpu import machine_seconds  # benchmarks/, this script's folder

ROOT = Path(__file__).resolve().parents[1]


def child(runs: int) -> None:
    """One local Ray (the interval is in the environment), ``runs`` train jobs; a JSON line each."""
    import gzip

    sys.path.insert(0, str(ROOT))
    from tests.conftest import write_jsonl, write_tiny_model  # the tests' environment and tiny model

    from pairmill import sample
    from pairmill.cluster import init_ray
    from pairmill.config import EncoderConfig, EvalConfig, RayConfig, ReadConfig, TrainConfig
    from training.train import train

    tmp = Path(tempfile.mkdtemp(prefix="train-poll-"))
    model = str(write_tiny_model(tmp / "model"))
    with gzip.open(sample.TRAIN, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(100), f)]
    pairs, held = write_jsonl(tmp / "pairs.jsonl", rows[:64]), write_jsonl(tmp / "held.jsonl", rows[64:])
    init_ray(None, None)
    for i in range(runs):
        cpu, t0 = machine_seconds()[0], time.perf_counter()
        stats = train(str(pairs), str(tmp / f"out{i}"), encoder=EncoderConfig(model=model), read=ReadConfig(),
                      train_cfg=TrainConfig(batch_size=8, max_steps=4, log_every=2, checkpoint_every=4, max_failures=0),
                      eval_cfg=EvalConfig(data=str(held)), ray=RayConfig())
        stage = next(s["seconds"] for s in stats["stages"] if s["name"] == "train")
        print(json.dumps({"run": i, "wall": time.perf_counter() - t0, "cpu": machine_seconds()[0] - cpu, "train": stage}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="2,0.25")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.runs)
        return
    warm: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for interval in args.intervals.split(","):
            env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
            out = subprocess.run([sys.executable, __file__, "--child", "--runs", str(args.runs)], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                if line.startswith("{"):
                    m = json.loads(line)
                    print(f"round {r} interval {interval:>5} s  run {m['run']}: wall {m['wall']:5.1f} s  "
                          f"busy {m['cpu']:5.1f} CPU-s  train stage {m['train']:5.2f} s", flush=True)
                    if m["run"] > 0:
                        warm.setdefault(interval, []).append(m)
    for interval, ms in warm.items():
        mean = {k: statistics.mean(m[k] for m in ms) for k in ("wall", "cpu", "train")}
        print(f"interval {interval:>5} s, {len(ms)} warm runs: wall {mean['wall']:.1f} s  busy {mean['cpu']:.1f} CPU-s  "
              f"train stage {mean['train']:.2f} s")


if __name__ == "__main__":
    main()
