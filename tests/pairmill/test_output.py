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
