"""gs:// as s3:// is: a ``pairmill filter`` job read from and written to a GCS bucket (an emulator,
tests/storage/conftest.py) counts what the same job counts on local files, and commits its folder by
the ``_SUCCESS`` manifest that the next read trusts."""

from __future__ import annotations

import json
import pickle

import pyarrow.parquet as pq

from pairmill import storage
from pairmill.output import finished_files, is_finished
from pairmill.read import count_input_rows, detect_format
from tests.conftest import literal_pairs
from tests.storage.test_storage import filter_locally_and_on


def test_filter_from_a_gcs_bucket_to_a_gcs_bucket_counts_what_the_local_run_counts(ray_session, tiny_model, gcs_bucket,
                                                                                    gcs_server, tmp_path):
    fs, inner = storage.split(f"{gcs_bucket}/pairs.jsonl")
    options = pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]  # what a Ray worker receives: the endpoint, no key
    assert fs.type_name == "gcs" and inner == f"{gcs_bucket[5:]}/pairs.jsonl"
    assert f"{options['scheme']}://{options['endpoint_override']}" == gcs_server and options["anonymous"]

    _, text = filter_locally_and_on(gcs_bucket, tiny_model, tmp_path)
    out, kept = f"{gcs_bucket}/filtered", json.loads(text)["kept"]

    manifest = json.loads(storage.read_text(f"{out}/_SUCCESS"))
    assert "stats.json" in manifest["files"] and is_finished(out)
    assert not storage.list_files(f"{out}/_work")
    # a second read of the folder, as the next job reads it: only what _SUCCESS lists
    assert count_input_rows(out) == kept == 40
    fmt, files = detect_format(out)
    assert fmt == "parquet" and files == finished_files(out, "kept")
    rows = [r for fs, path in map(storage.split, files) for r in pq.read_table(path, filesystem=fs).to_pylist()]
    assert sorted(r["query"] for r in rows) == sorted(r["query"] for r in literal_pairs(40))
