"""pairmill setfit and pairmill classify end to end with the tiny model, on a hand-written set of
intents that share their words (plans vs things done): one short Ray Train run for the module."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pairmill.cli import main
from tests.conftest import write_jsonl

PLANS = ["we plan to build the pipeline", "we will write the code next week", "the team is going to test the model",
         "next month we plan to index the data", "we intend to train a new model", "they will search the network",
         "we are going to sort the list", "the plan is to cluster the vectors"]
DONE = ["we built the pipeline", "we wrote the code last week", "the team tested the model", "last month we indexed the data",
        "we trained a new model", "they searched the network", "we sorted the list", "the vectors were clustered"]
HELD_PLANS = ["we plan to write the index", "the team will build a tree"]
HELD_DONE = ["we wrote the index", "the team built a tree"]


@pytest.fixture(scope="module")
def setfit_run(ray_session, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("setfit")
    train = write_jsonl(folder / "train.jsonl", [{"text": t, "label": "plan"} for t in PLANS]
                        + [{"text": t, "label": "done"} for t in DONE] + [{"text": "no label"}, "not json"])
    held = write_jsonl(folder / "held.jsonl", [{"text": t, "label": "plan"} for t in HELD_PLANS]
                       + [{"text": t, "label": "done"} for t in HELD_DONE])
    out = folder / "out"
    rc = main(["setfit", str(train), "-o", str(out), "--eval-data", str(held), "--model", tiny_model, "-q",
               "setfit.pairs_per_class=8", "train.batch_size=8", "train.max_steps=2", "train.collapse_sample=0",
               "train.hard_negatives=1"])  # boundary negatives (the profile's default is none)
    assert rc == 0
    return {"out": out, "held": held, "folder": folder}


def test_setfit_writes_the_job_folder_model_head_and_report(setfit_run):
    out = setfit_run["out"]
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "_SUCCESS").exists() and (out / "model" / "modules.json").exists()
    assert (out / "head" / "head.json").exists() and (out / "projection.png").stat().st_size > 0
    assert stats["input_rows"] == 18 and stats["kept"] == 16 and stats["rejected"] == {"invalid_json": 1, "missing_label": 1}
    assert stats["classes"] == ["done", "plan"] and stats["per_class"] == {"done": 8, "plan": 8}
    assert stats["pairs"]["rows"] == 16 and stats["train"]["steps"] == 2
    for name in ("before", "after"):
        m = stats["eval"][name]
        assert m["rows"] == 4 and 0 <= m["accuracy"] <= 1 and set(m["per_class"]) == {"done", "plan"}
    pairs = pq.read_table(out / "pairs" / "kept").to_pylist()
    label = {t: "plan" for t in PLANS} | {t: "done" for t in DONE}
    assert all(label[r["query"]] == label[r["passage"]] == r["source"] != label[r["negatives"][0]] for r in pairs)
    assert "macro-F1" in (out / "report.md").read_text()


def test_classify_writes_probabilities_and_neighbour_agreement(setfit_run, capsys):
    out = setfit_run["folder"] / "classified"
    assert main(["classify", "--model", str(setfit_run["out"]), str(setfit_run["held"]), "-o", str(out)]) == 0
    rows = pq.read_table(out / "kept").to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    assert len(rows) == 4 and stats["input_rows"] == 4 and stats["classes"] == ["done", "plan"]
    probs = np.array([r["probabilities"] for r in rows])
    assert probs.shape == (4, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    for r in rows:
        assert r["predicted"] == stats["classes"][int(np.argmax(r["probabilities"]))]
        assert r["probability"] == pytest.approx(max(r["probabilities"])) and 0 <= r["neighbour_agreement"] <= 1
    assert stats["metrics"]["rows"] == 4 and "accuracy" in capsys.readouterr().out


def test_classify_needs_a_setfit_folder(tmp_path, tiny_model, capsys):
    assert main(["classify", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert main(["classify", "--model", tiny_model, str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "no classifier here" in capsys.readouterr().err
