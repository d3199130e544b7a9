"""Training with ANCE refresh rounds: a round re-mines negatives from a live mine job folder while
training keeps stepping, and later batches train on the refreshed negatives."""

from __future__ import annotations

import json
import time

import pytest

from pairmill.config import ConfigError, EncoderConfig, EvalConfig, MineConfig, RayConfig, ReadConfig, TrainConfig, SECTIONS, load_config
from tests.conftest import literal_pairs, write_jsonl
from training.loop import TestHooks
from training.rounds import RefreshSettings, refresh_settings
from training.train import train

SELECTION = {"num_negatives": 2, "range_max": 10, "margin_ratio": None}
CURRICULUM = {**SELECTION, "range_min": 6, "range_max": 12, "range_min_final": 0, "range_max_final": 6}


@pytest.mark.parametrize("override, named", [("train.refresh_every=-1", "train.refresh_every=-1"),
                                             ("train.refresh_slices=0", "train.refresh_slices=0")])
def test_bad_refresh_config_names_the_value(override, named):
    with pytest.raises(ConfigError) as e:
        load_config({"train": SECTIONS["train"]}, None, [override])
    assert named in str(e.value)


def test_train_verb_reads_the_mine_section_and_the_refresh_flag():
    from pairmill.cli import FLAG_KEYS, VERBS, build_parser

    assert "mine" in VERBS["train"][1]
    args = build_parser().parse_args(["train", "pairs.jsonl", "-o", "out", "--refresh-every", "50"])
    assert args.refresh_every == 50 and FLAG_KEYS["refresh_every"] == "train.refresh_every"


def test_refresh_reads_a_job_folders_kept_rows_and_live_index(ray_session, tmp_path):
    """A mine job folder: the round re-mines its kept/ rows from the texts of its index/; any other
    input is written once (validated) to OUT/refresh/pairs and its passages are the corpus."""
    job = tmp_path / "mined"
    for folder in ("kept", "index"):
        (job / folder).mkdir(parents=True)
    (job / "index" / "shard-0.texts.parquet").write_bytes(b"")
    (job / "_SUCCESS").write_text("done")
    cfg = refresh_settings(str(job), None, tmp_path / "out", None, EncoderConfig(), TrainConfig(refresh_every=5),
                          MineConfig(shard_cpus=2.0), None, train_gpus=0)
    assert cfg.pairs == str(job / "kept") and cfg.index_folder == str(job / "index")
    assert cfg.every == 5 and cfg.slices == 1 and cfg.mine_cfg.shard_cpus == 0.25
    assert cfg.pool.size == 1 and cfg.pool.num_cpus < 1 and cfg.encoder_kwargs["device"] == "cpu"

    import ray

    rows = ray.data.from_items([{"id": "a", "query": "q", "passage": "p", "negatives": None}])
    cfg = refresh_settings(str(tmp_path / "pairs.jsonl"), rows, tmp_path / "out", None, EncoderConfig(),
                          TrainConfig(refresh_every=5), MineConfig(), 2, train_gpus=0)
    assert cfg.pairs == str(tmp_path / "out" / "refresh" / "pairs") and cfg.index_folder is None
    assert ray.data.read_parquet(cfg.pairs).take_all()[0]["id"] == "a" and cfg.pool.size == 2


def expected_use(rounds: list[dict], steps: int, batch: int) -> tuple[float, int]:
    """Mean staleness and refreshed rows used when each batch takes the newest round finished
    before it (all queries refreshed per round), else the step-0 negatives."""
    stale, used = 0, 0
    for s in range(steps):  # s = steps done before this batch
        mined = max([r["step"] for r in rounds if r["finished_by_step"] <= s], default=0)
        stale += s - mined
        used += batch if mined else 0
    return round(stale / steps, 3), used


OVERLAP = 3


def test_a_refresh_round_swaps_negatives_while_training_goes_on(ray_session, tiny_model, bucket, tmp_path):
    """refresh_every=10 on two workers (rank 0 runs the rounds, both read the store): rounds start
    every 10 steps unless one is in flight (skipped); each finishes while training steps on, then
    batches train on its negatives. The test seam waits
    for a round once it has been in flight OVERLAP steps, so rounds finish within this short run on
    2 cores (a sleep per step used to stand in for an accelerator's free CPUs: slower and less sure).
    OUT is on an S3 bucket: the rounds' models, indexes and negatives are written there, by rank 0 and
    by the round's task and actors, which get the driver's filesystem (no endpoint in their environment).
    The rounds mine from a rank window moved by the curriculum (mine.range_min_final / range_max_final)."""
    from pairmill import storage
    from pairmill.output import is_finished

    rows = literal_pairs(40)
    for i, row in enumerate(rows):  # the "mine job" negatives (step 0): two other passages
        row["negatives"] = [rows[(i + k + 1) % len(rows)]["passage"] for k in range(2)]
        row["id"] = f"r{i}"
    # two later rows reuse ids with other pairs: the store of refreshed negatives is keyed by id, so
    # they must be rejected (duplicate_id), or a round's negatives for one land on the other
    reused = [{"id": "r3", "query": "a reused id", "passage": "another pair's text"},
              {"id": "r5", "query": "also reused", "passage": "yet another text"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows + reused)
    out = f"{bucket}/train"
    encoder = EncoderConfig(model=tiny_model, query_prefix="query: ", passage_prefix="passage: ", batch_size=16)
    settings = dict(num_workers=2, batch_size=8, max_steps=30, lr=1e-3, hard_negatives=2, query_max_length=16,
                    passage_max_length=48, checkpoint_every=1000, log_every=25, max_failures=0, refresh_every=10)
    t0 = time.perf_counter()
    stats = train(str(pairs), out, encoder=encoder, read=ReadConfig(), train_cfg=TrainConfig(**settings),
                  eval_cfg=EvalConfig(), ray=RayConfig(), mine_cfg=MineConfig(**CURRICULUM),
                  hooks=TestHooks(round_overlap_steps=OVERLAP))
    print(f"train {time.perf_counter() - t0:.1f}s")
    print(json.dumps(stats["refresh"]))

    refresh = stats["refresh"]
    assert stats["train"]["steps"] == 30 and is_finished(out)
    assert stats["rejected"] == {"duplicate_id": 2} and stats["kept"] == 40 and stats["input_rows"] == 42
    assert refresh["rounds_finished"] >= 1 and refresh["rounds_started"] >= refresh["rounds_finished"]
    assert refresh["rounds_started"] + refresh["rounds_skipped"] == 2  # due at steps 10 and 20 (not at the last)
    assert refresh["rounds_finished"] == 2 and refresh["unfinished_at_end"] is None
    first, last = refresh["rounds"][0], refresh["rounds"][-1]
    assert first["step"] == 10 and first["refreshed"] == 40 and first["slice"] == [0, 1]
    # the curriculum: the rank window moves from [6, 12) at step 0 towards [0, 6) at step 30
    assert [r["window"] for r in refresh["rounds"]] == [[4, 10], [2, 8]]
    # training did not wait: it stepped on while the round ran, and later batches used its negatives
    assert first["step"] + 1 < first["finished_by_step"] <= first["step"] + OVERLAP
    # every batch after a round was seen finished used its negatives; one may have used them a step
    # earlier (the store write is the swap, rank 0 notices the task's end at its next step), and rank 1's
    # half of one a step later (the seam holds rank 0 alone: rank 1 may read the store before the write;
    # seen: 132 refreshed rows used of 136, mean staleness 6.833 for 6.5)
    staleness, used = expected_use(refresh["rounds"], 30, 8)
    late = 4 * len(refresh["rounds"])  # rank 1's rows, one step a round, on the negatives of 10 steps before
    assert used - late <= refresh["refreshed_pairs_used"] <= used + 8 * len(refresh["rounds"])
    assert staleness - 2 * len(refresh["rounds"]) <= refresh["mean_staleness"] <= staleness + late * 10 / (30 * 8)
    live = f"{out}/refresh/step-{last['step']}"
    assert storage.exists(f"{live}/index/manifest.json") and not storage.list_files(f"{live}/work")
    for older in refresh["rounds"][:-1]:  # the newest round holds the live index; older ones are removed
        assert not storage.list_files(f"{out}/refresh/step-{older['step']}")
    import pyarrow.parquet as pq

    refreshed = pq.read_table(storage.split(f"{live}/negatives")[1], filesystem=storage.split(live)[0]).to_pylist()
    assert len(refreshed) == len({r["id"] for r in refreshed}) == 40
    by_id = {r["id"]: r for r in refreshed}
    for i in (3, 5):  # mined for the pair that kept the id: its own passage is never its negative
        assert rows[i]["passage"] not in by_id[f"r{i}"]["negatives"]
    assert storage.exists(f"{live}/model/modules.json")
    assert [json.loads(line)["step"] for line in storage.read_text(f"{out}/refresh/rounds.jsonl").splitlines()] == [10, 20]
    assert refresh["seconds_per_round"] > 0 and refresh["seconds_per_step"] > 0
    final = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()][-1]
    assert final["refresh_rounds_finished"] == refresh["rounds_finished"] and "negative_staleness" in final


def test_a_round_that_would_land_after_the_last_step_is_not_started(tmp_path, monkeypatch):
    """The last round took 12 steps: one due at step 24 of 36 would finish at the end, unused."""
    import mining.refresh
    from training.rounds import RefreshRounds

    started = []
    monkeypatch.setattr(mining.refresh, "start_refresh", lambda *a, **k: started.append(a) or "ref")
    rounds = RefreshRounds(RefreshSettings(folder=str(tmp_path), every=12, slices=2, pairs="", index_folder=None,
                                           encoder_kwargs={}, mine_cfg=MineConfig(), store=None, pool=None),
                           save_model=lambda folder: folder)
    rounds.start(12, total=36)
    assert len(started) == 1 and rounds.started == 1
    rounds.inflight = None
    rounds.finished.append({"step": 12, "steps_trained_meanwhile": 12, "seconds": 100.0, "save_seconds": 0.1})
    rounds.start(24, total=36)  # 24 + 12 >= 36
    assert len(started) == 1 and (rounds.skipped, rounds.late_skipped) == (1, 1)
    rounds.start(24, total=40)  # 24 + 12 < 40: still useful
    assert len(started) == 2 and rounds.started == 2
    assert rounds.summary()["rounds_skipped_as_too_late"] == 1


def test_a_round_still_running_at_the_end_is_cancelled_not_awaited(ray_session, tmp_path):
    import ray

    from training.rounds import RefreshRounds

    started = tmp_path / "started"

    @ray.remote(num_cpus=0)
    def slow_round():
        started.touch()
        time.sleep(600)

    rounds = RefreshRounds(RefreshSettings(folder=str(tmp_path), every=10, slices=1, pairs="", index_folder=None,
                                           encoder_kwargs={}, mine_cfg=MineConfig(), store=None, pool=None),
                           save_model=lambda folder: folder)
    ref = slow_round.remote()
    # running, as a round at the end of training is: cancelled right after it was submitted, the task
    # sometimes went on, and ray.get below then only timed out (60 s; a GetTimeoutError is a RayError too)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the round's task never started"
    rounds.inflight = {"ref": ref, "step": 10, "t0": time.perf_counter(), "save_seconds": 0.0, "skipped": 0}
    t0 = time.perf_counter()
    rounds.close(step=15)
    assert time.perf_counter() - t0 < 60 and rounds.inflight is None
    assert rounds.summary()["unfinished_at_end"] == {"step": 10, "action": "cancelled", "at_step": 15}
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(ref, timeout=30)
