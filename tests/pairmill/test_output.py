import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill.output import (
    JobFolder,
    OtherSettings,
    StatsMismatch,
    count_by,
    is_finished,
    open_resumable,
    parquet_rows,
    resumable_staging,
)


def _stats(kept, rejected):
    return {"input_rows": kept + sum(rejected.values()), "kept": kept, "dropped": {}, "rejected": rejected}


def test_commit_is_atomic_and_replaces_an_old_folder(tmp_path):
    out = tmp_path / "out"
    job = JobFolder(out)
    pq.write_table(pa.table({"id": ["a", "b"]}), job.path("kept") + "/0.parquet")
    assert not out.exists()  # nothing visible before commit
    job.commit(_stats(2, {}))
    assert is_finished(out) and parquet_rows(out / "kept") == 2

    job = JobFolder(out)  # a rerun into the same folder
    pq.write_table(pa.table({"id": ["c"]}), job.path("kept") + "/1.parquet")
    pq.write_table(pa.table({"reason": ["x", "x", "y"]}), job.path("rejected") + "/0.parquet")
    stats = job.commit(_stats(1, {"x": 2, "y": 1}))
    assert sorted(p.name for p in (out / "kept").iterdir()) == ["1.parquet"]  # no old file mixed in
    assert count_by(out / "rejected", "reason") == {"x": 2, "y": 1}
    assert json.loads((out / "stats.json").read_text()) == stats
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


def test_accounting_mismatch_is_refused(tmp_path):
    job = JobFolder(tmp_path / "out")
    with pytest.raises(StatsMismatch, match="5 input rows but 4 accounted"):
        job.commit({"input_rows": 5, "kept": 3, "dropped": {"dup": 1}, "rejected": {}})
    assert not (tmp_path / "out").exists()


def test_failed_job_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with JobFolder(tmp_path / "out"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_resumable_job_keeps_its_staging_folder_until_it_commits(tmp_path):
    """train/tune: the staging folder has a fixed name, survives a failure, and is continued by the
    next run; a commit still checks the counts and replaces OUT."""
    from pairmill.output import remove_job, resumable_staging

    out = tmp_path / "train"
    with pytest.raises(RuntimeError):
        with JobFolder(out, parts=(), resume=True) as job:
            (job.staging / "checkpoint").write_text("step 4")
            raise RuntimeError("killed")
    assert not out.exists() and (resumable_staging(out) / "checkpoint").read_text() == "step 4"
    job = JobFolder(out, parts=(), resume=True)  # the rerun finds it
    assert (job.staging / "checkpoint").exists()
    with pytest.raises(StatsMismatch):
        job.commit({"input_rows": 3, "kept": 2, "dropped": {}, "rejected": {}})
    assert not out.exists() and resumable_staging(out).exists()
    job.commit({"input_rows": 3, "kept": 2, "dropped": {}, "rejected": {"bad_id": 1}})
    assert is_finished(out) and (out / "checkpoint").exists() and not resumable_staging(out).exists()
    assert remove_job(out) == [out] and not out.exists()


def test_an_in_place_job_writes_success_last_in_its_own_folder(tmp_path):
    out = tmp_path / "trial"
    out.mkdir()
    (out / "_SUCCESS").write_text("old")
    job = JobFolder(out, parts=("rejected",), in_place=True)
    assert job.staging == out.resolve() and not is_finished(out)  # being rewritten
    job.commit(_stats(1, {}))
    assert is_finished(out) and json.loads((out / "stats.json").read_text())["kept"] == 1


def _settings(lr: float, input_: str = "/data/pairs.jsonl") -> dict:
    return {"input": input_, "sections": {"train": {"lr": lr, "targets": ("query", "value")}}}


def _work(folder):
    return (folder / "checkpoints").is_dir()


def _finish(job: JobFolder) -> None:
    (job.staging / "checkpoints").mkdir(exist_ok=True)
    job.commit({"input_rows": 0, "kept": 0, "dropped": {}, "rejected": {}})


def test_the_resume_guard_resumes_same_settings_and_refuses_others(tmp_path):
    """train and tune share it: staging with work resumes; a finished OUT reopens into staging with
    the same settings; other settings (or another input) are refused and nothing is touched."""
    out = tmp_path / "job"
    job = open_resumable(out, _settings(1e-3), settings_file="run.json", has_work=_work)
    assert job.staging == resumable_staging(out) and (job.staging / "run.json").exists()
    (job.staging / "checkpoints").mkdir()  # an interrupted run: work in staging
    with pytest.raises(OtherSettings, match=r"other settings \(train.lr\)"):
        open_resumable(out, _settings(2e-3), settings_file="run.json", has_work=_work)
    with pytest.raises(OtherSettings, match=r"\(input\)"):
        open_resumable(out, _settings(1e-3, "/data/other.jsonl"), settings_file="run.json", has_work=_work)
    job = open_resumable(out, _settings(1e-3), settings_file="run.json", has_work=_work)  # tuples read back as lists
    _finish(job)
    assert is_finished(out) and not resumable_staging(out).exists()

    with pytest.raises(OtherSettings, match="train.lr"):
        open_resumable(out, _settings(5e-4), settings_file="run.json", has_work=_work)
    assert is_finished(out) and not resumable_staging(out).exists()  # a refused rerun leaves OUT as it was
    job = open_resumable(out, _settings(1e-3), settings_file="run.json", has_work=_work)
    assert not out.exists() and job.staging == resumable_staging(out) and (job.staging / "checkpoints").is_dir()
    assert not (job.staging / "_SUCCESS").exists()  # back in staging until the rerun commits


def test_the_resume_guard_in_place_checks_the_folder_itself(tmp_path):
    out = tmp_path / "trial"
    job = open_resumable(out, _settings(1e-3), settings_file="s/run.json", has_work=_work, in_place=True)
    assert job.staging == out and (out / "s" / "run.json").exists()
    (out / "checkpoints").mkdir()
    with pytest.raises(OtherSettings):
        open_resumable(out, _settings(2e-3), settings_file="s/run.json", has_work=_work, in_place=True)
    assert open_resumable(out, _settings(1e-3), settings_file="s/run.json", has_work=_work, in_place=True).staging == out
