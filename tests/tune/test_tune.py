"""The tune job: search-space and resource rules in memory; then on Ray, once each: an ASHA sweep
that stops a trial early still finishes and exports, and a run interrupted by Ctrl-C resumes
without redoing its finished trial (optuna's search, on a file of every kind of bad line), that
one with its input, held-out BEIR folder and OUT on an S3 bucket."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
from ray.tune import Callback

from pairmill.config import SECTIONS, ConfigError, TrainConfig, load_config
from tests.conftest import literal_pairs, write_jsonl
from tests.test_every_verb import check_counts, write_messy
from tune.tune import BadInput, check_space, max_concurrent_trials, trial_resources, tune_runs, with_defaults

TUNE_SECTIONS = ("tune", "encoder", "read", "train", "eval", "mine", "ray")

# ----------------------------------------------------------------------------- in memory


def test_search_space_from_config_and_bad_keys_are_clear():
    cfg = load_config({"tune": SECTIONS["tune"]}, None, ["tune.lr=[1e-5,1e-4]", "tune.batch_size=[16,64]", "tune.temperature="])
    assert cfg["tune"].space() == {"lr": ("log", [1e-5, 1e-4]), "batch_size": ("choice", [16, 64])}
    # the defaults are the first trial: a choice list gets the train section's value
    space, default = with_defaults(cfg["tune"].space(), TrainConfig())
    assert default == {"lr": 5e-5, "batch_size": 32} and space["batch_size"] == ("choice", [32, 16, 64])

    with pytest.raises(ConfigError, match=r"unknown key 'tune.dropout'; valid keys: .*tune.lr"):
        load_config({"tune": SECTIONS["tune"]}, None, ["tune.dropout=[0.1,0.2]"])
    with pytest.raises(ConfigError, match=r"tune.lr=\[0.0001\]; use a range \[low, high\]"):
        load_config({"tune": SECTIONS["tune"]}, None, ["tune.lr=[1e-4]"])
    with pytest.raises(ConfigError, match="tune.lora_rank: 'x' is not an integer"):
        load_config({"tune": SECTIONS["tune"]}, None, ["tune.lora_rank=x"])
    # a choice train itself refuses, named before any trial starts
    with pytest.raises(ConfigError, match="tune.batch_size holds 3, which train refuses: train.batch_size=3"):
        check_space({"batch_size": ("choice", [4, 3])}, TrainConfig(num_workers=2))


def test_cli_rejects_a_bad_search_key_and_missing_eval_data(tmp_path, capsys, monkeypatch):
    from pairmill.cli import main

    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", literal_pairs(10)))
    assert main(["tune", pairs, "-o", str(tmp_path / "out"), "tune.dropout=[0.1,0.2]"]) == 2
    assert "unknown key 'tune.dropout'" in capsys.readouterr().err
    assert main(["tune", pairs, "-o", str(tmp_path / "out")]) == 2  # not the bundled sample: no default held-out
    assert "--eval-data" in capsys.readouterr().err
    import importlib.util

    # optuna asked for where it is not installed (the dev extra installs it): say how to get it
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    assert main(["tune", pairs, "-o", str(tmp_path / "out"), "--eval-data", pairs, "tune.search=optuna"]) == 2
    assert "pip install optuna" in capsys.readouterr().err


def test_concurrent_trials_fit_the_cluster():
    one_worker = trial_resources(1, 1.0, use_gpu=False)
    assert max_concurrent_trials({"CPU": 4.0}, one_worker, cores=2) == 1  # a local 2-core Ray: one at a time
    assert max_concurrent_trials({"CPU": 16.0}, one_worker) == 8  # each trial: its worker + its data ingest
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 2.0}, trial_resources(1, 1.0, use_gpu=True)) == 2
    with pytest.raises(BadInput, match="lower train.num_workers"):
        max_concurrent_trials({"CPU": 4.0}, trial_resources(4, 1.0, use_gpu=False))


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune_data")
    rows = literal_pairs(300)
    return {"pairs": str(write_jsonl(folder / "pairs.jsonl", rows[:240])),
            "heldout": str(write_jsonl(folder / "heldout.jsonl", rows[240:]))}


def settings(data, tiny_model, *overrides) -> list[str]:
    # trial 1 (the defaults) trains with lr 1e-3; trial 2 draws lr 0.5..1, which wrecks the model in
    # a step, so ASHA stops it at the first rung (step 2), where it trails the defaults
    return [f"encoder.model={tiny_model}", f"eval.data={data['heldout']}", "train.batch_size=16",
            "train.max_steps=6", "train.lr=1e-3", "train.eval_every=2", "train.log_every=2", "train.max_failures=0",
            "tune.num_samples=2", "tune.grace_period=2", "tune.lr=[0.5,1.0]", "tune.temperature=", *overrides]


def sections(data, tiny_model, *overrides):
    return load_config({s: SECTIONS[s] for s in TUNE_SECTIONS}, None, settings(data, tiny_model, *overrides))


def read_results(out: Path | str) -> list[dict]:
    import io

    from pairmill import storage

    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "results.csv")))))


def test_asha_stops_a_trial_and_the_sweep_finishes_with_the_best_model(ray_session, tiny_model, data, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "tune"
    stats = tune_runs(data["pairs"], str(out), sections=sections(data, tiny_model))

    rows = read_results(out)
    assert [r["status"] for r in rows] == ["finished", "stopped early"]
    assert rows[0]["default"] == "True" and float(rows[0]["lr"]) == 1e-3
    assert 0.5 <= float(rows[1]["lr"]) <= 1.0
    assert int(rows[0]["steps"]) == 6 and int(rows[1]["steps"]) == 2
    assert float(rows[0]["ndcg@10"]) > float(rows[1]["ndcg@10"])
    t = stats["tune"]
    assert (t["trials"], t["finished"], t["stopped_early"], t["max_concurrent"], t["resumed"]) == (2, 1, 1, 1, False)
    assert t["best"]["trial_id"] == rows[0]["trial_id"] and t["best"]["ndcg@10"] >= t["default"]["ndcg@10"]
    assert stats["input_rows"] == stats["kept"] == 240
    assert (out / "_SUCCESS").exists() and json.loads((out / "stats.json").read_text())["tune"]["trials"] == 2
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lr: 0.001" in (out / "best_config.yaml").read_text()

    # best_model is the best report's checkpoint, exported as a sentence-transformers folder
    model = SentenceTransformer(str(out / "best_model"), device="cpu")
    from training.model import load_trainable_state, setup_model
    import torch

    reference = setup_model(tiny_model, None)
    load_trainable_state(reference, torch.load(Path(t["best"]["checkpoint"]) / "model.pt"))
    texts = ["the data of a program", "memory and disk 3"]
    assert abs(model.encode(texts) - reference.encode(texts)).max() < 1e-6


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    return write_messy(tmp_path_factory.mktemp("messy"))


class InterruptOnce(Callback):
    """Ctrl-C after the first trial completes, once (a flag file, because Tune restores its
    callbacks with the experiment)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.path.exists(self.flag):
            os.remove(self.flag)
            os.kill(os.getpid(), signal.SIGINT)


def write_beir(folder: Path, rows: list[dict]) -> Path:
    """``rows`` as a BEIR folder: a query each, its passage the one relevant document."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["passage"]}) + "\n" for i, r in enumerate(rows)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n" for i, r in enumerate(rows)))
    (folder / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(len(rows))))
    return folder


def test_interrupted_run_resumes_without_redoing_finished_trials(ray_session, tiny_model, messy, bucket, tmp_path):
    """tune.search=optuna (its searcher is restored with the run), on the file of every kind of bad
    line that tests/test_every_verb.py sends through the other verbs: the counts add up to its lines.
    All on a bucket: Tune keeps its experiment there and restores it, each trial is a train job
    folder there with its own manifest, and the tune job commits by its own."""
    from pairmill import storage
    from pairmill.output import finished_manifest, is_finished, local_model
    from tests.conftest import upload

    out = f"{bucket}/tune"
    storage.upload_folder(write_beir(tmp_path / "beir", literal_pairs(300)[260:]), f"{bucket}/heldout")
    data = {"pairs": upload(messy["path"], f"{bucket}/messy.jsonl"), "heldout": f"{bucket}/heldout"}
    overrides = ("tune.scheduler=none", "tune.search=optuna", "train.max_steps=4", "train.eval_every=4")
    cfg = sections(data, tiny_model, *overrides)
    flag = tmp_path / "interrupt"
    flag.touch()
    from tune.tune import Interrupted

    with pytest.raises(Interrupted, match="rerun the same command"):
        tune_runs(data["pairs"], out, sections=cfg, callbacks=[InterruptOnce(flag)])
    # nothing is finished at OUT until the job commits; Tune's experiment and the trials are there
    assert not flag.exists() and not is_finished(out) and storage.exists(f"{out}/tune")
    trials = {uri[len(out) + 8:].split("/")[0] for uri, _ in storage.list_files(f"{out}/trials")}
    finished = [t for t in trials if is_finished(f"{out}/trials/{t}")]
    assert len(finished) == 1
    first_done = storage.read_text(f"{out}/trials/{finished[0]}/_SUCCESS")

    # the same command again, as a user reruns it (the CLI builds the same settings)
    from pairmill.cli import main

    assert main(["tune", data["pairs"], "-o", out, *settings(data, tiny_model, *overrides)]) == 0
    stats = json.loads(storage.read_text(f"{out}/stats.json"))
    assert stats["tune"]["resumed"] and stats["tune"]["finished"] == 2
    assert storage.read_text(f"{out}/trials/{finished[0]}/_SUCCESS") == first_done  # not trained again
    assert [r["status"] for r in read_results(out)] == ["finished", "finished"]
    manifest = finished_manifest(out)
    assert {"stats.json", "results.csv", "trials.png", "best_config.yaml"} <= set(manifest["files"])
    assert stats["tune"]["best"]["checkpoint"].startswith(f"{out}/trials/")
    assert (Path(local_model(f"{out}/best_model")) / "modules.json").exists()  # what --model s3://.../best_model reads
    check_counts(stats, messy["lines"], messy["bad"])

    # the same OUT with other settings is refused, not mixed
    with pytest.raises(BadInput, match=r"other settings \(tune.num_samples\)"):
        tune_runs(data["pairs"], out, sections=sections(data, tiny_model, *overrides, "tune.num_samples=3"))
