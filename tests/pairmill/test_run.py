"""`pairmill run`'s stage reuse: a finished stage with the same fingerprint is skipped."""

from __future__ import annotations

import json
import os

from pairmill.run import Stages, fingerprint, input_identity


def _job(calls: list):
    def job(folder: str) -> dict:
        calls.append(folder)
        os.makedirs(folder, exist_ok=True)
        stats = {"input_rows": len(calls)}
        with open(os.path.join(folder, "stats.json"), "w") as f:
            json.dump(stats, f)
        open(os.path.join(folder, "_SUCCESS"), "w").close()
        return stats

    return job


def test_finished_unchanged_stage_is_reused(tmp_path):
    calls: list = []
    assert Stages(tmp_path, force=False).run("filter", "k1", _job(calls)) == {"input_rows": 1}
    assert Stages(tmp_path, force=False).run("filter", "k1", _job(calls)) == {"input_rows": 1}  # read back, not rerun
    assert len(calls) == 1
    Stages(tmp_path, force=False).run("filter", "k2", _job(calls))  # settings changed
    Stages(tmp_path, force=True).run("filter", "k2", _job(calls))  # --force
    assert len(calls) == 3


def test_unfinished_stage_runs_again(tmp_path):
    calls: list = []
    Stages(tmp_path, force=False).run("mine", "k", _job(calls))
    os.remove(tmp_path / "mine" / "_SUCCESS")  # a folder without its marker is not a finished stage
    Stages(tmp_path, force=False).run("mine", "k", _job(calls))
    assert len(calls) == 2


def test_fingerprint_follows_the_input_files(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "a", "passage": "b"}\n')
    before = fingerprint("filter", input_identity(str(data)), {"k": 2})
    assert before == fingerprint("filter", input_identity(str(data)), {"k": 2})
    assert before != fingerprint("filter", input_identity(str(data)), {"k": 3})
    data.write_text('{"query": "a", "passage": "b"}\n{"query": "c", "passage": "d"}\n')
    assert before != fingerprint("filter", input_identity(str(data)), {"k": 2})


def test_changed_settings_start_over_but_an_interrupted_stage_resumes(tmp_path):
    calls: list = []
    Stages(tmp_path, force=False).run("train", "k1", _job(calls))
    (tmp_path / "train" / "checkpoint").write_text("from k1")
    Stages(tmp_path, force=False).run("train", "k2", _job(calls))  # other settings: the old folder goes
    assert not (tmp_path / "train" / "checkpoint").exists()

    def dies(folder: str) -> dict:
        os.makedirs(folder, exist_ok=True)
        (tmp_path / "train" / "checkpoint").write_text("from k3")
        raise RuntimeError("killed")

    try:
        Stages(tmp_path, force=False).run("train", "k3", dies)
    except RuntimeError:
        pass
    Stages(tmp_path, force=False).run("train", "k3", _job(calls))  # same settings: resumes in place
    assert (tmp_path / "train" / "checkpoint").read_text() == "from k3"
