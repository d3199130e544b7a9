import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill.output import JobFolder, StatsMismatch, count_by, is_finished, parquet_rows


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
