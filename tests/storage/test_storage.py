"""Object storage: URIs resolve to pyarrow filesystems without credentials from anywhere but the
environment, inputs read from a bucket give the rows and rejections a local read gives, and job
folders there commit by a ``_SUCCESS`` manifest that a killed attempt never fakes."""

from __future__ import annotations

import json
import pickle
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill import storage
from pairmill.output import BucketJobFolder, JobFolder, StatsMismatch, finished_files, is_finished, open_job, parquet_rows
from pairmill.read import count_input_rows, detect_format, load_parsed_local, read_parsed
from tests.pairmill.test_pairs import BAD_LINES, _bad_file
from tests.conftest import upload

SAMPLE = resources.files("pairmill") / "sample" / "train.jsonl.gz"


def test_uris_resolve_to_filesystems_that_carry_the_endpoint_but_no_credentials(bucket, s3_server, tmp_path):
    fs, path = storage.split(f"{bucket}/a/b.jsonl")
    assert fs.type_name == "s3" and path == f"{bucket[5:]}/a/b.jsonl"
    assert storage.split(str(tmp_path)) == (None, str(tmp_path)) and storage.split(tmp_path)[0] is None
    options = pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]  # what a Ray worker receives
    assert options["endpoint_override"] == s3_server and options["access_key"] is None
    for uri in ("s3://AKIDKEY:S3CR3T@bucket/x.jsonl", "s3://bucket/x.jsonl?access_key=AKIDKEY&secret_key=S3CR3T"):
        with pytest.raises(ValueError, match="credentials") as refused:
            storage.split(uri)
        assert "S3CR3T" not in str(refused.value) and "AKIDKEY" not in str(refused.value)
    assert storage.join(bucket, "out", "kept") == f"{bucket}/out/kept"


def _without_origin(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "origin"} for r in rows]


def test_reading_from_a_bucket_gives_the_local_rows_and_rejections(ray_session, bucket, tmp_path):
    """The bundled sample and a file of bad lines, read in-process and on Ray (whose workers reach
    the bucket with the filesystem they are sent), Parquet from its footers, a folder as a prefix,
    and saved HF datasets (a Dataset, a DatasetDict's train split) from their Arrow files."""
    bad = _bad_file(tmp_path / "bad.jsonl", gz=False)
    sample_uri = upload(SAMPLE, f"{bucket}/in/train.jsonl.gz")
    bad_uri = upload(bad, f"{bucket}/in/bad.jsonl")
    assert detect_format(f"{bucket}/in") == ("lines", [bad_uri, sample_uri])
    assert count_input_rows(sample_uri) == count_input_rows(str(SAMPLE)) == 2050

    local = load_parsed_local(bad).to_pylist()
    remote = load_parsed_local(bad_uri).to_pylist()
    assert _without_origin(remote) == _without_origin(local) and remote[4]["origin"] == f"{bad_uri}:5"
    on_ray = sorted(read_parsed(bad_uri).take_all(), key=lambda r: int(r["origin"].rsplit(":", 1)[1]))
    assert _without_origin(on_ray) == _without_origin(local)
    assert sorted(r["reason"] for r in on_ray if r["reason"]) == sorted(reason for _, reason in BAD_LINES)

    table = load_parsed_local(SAMPLE)
    assert _without_origin(load_parsed_local(sample_uri).to_pylist()) == _without_origin(table.to_pylist())
    pq.write_table(table.select(["id", "query", "passage"]), tmp_path / "sample.parquet")
    parquet_uri = upload(tmp_path / "sample.parquet", f"{bucket}/pq/sample.parquet")
    assert count_input_rows(parquet_uri) == table.num_rows
    assert load_parsed_local(f"{bucket}/pq")["id"].to_pylist() == table["id"].to_pylist()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(f"{bucket}/nothing.jsonl")

    import datasets

    rows = table.select(["id", "query", "passage"]).slice(0, 30).to_pylist() + [{"id": "x", "query": "q", "passage": ""}]
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "hf_dict"))
    for name in ("hf", "hf_dict"):
        storage.upload_folder(tmp_path / name, f"{bucket}/{name}")
        fmt, files = detect_format(f"{bucket}/{name}")
        assert fmt == "arrow" and len(files) == (2 if name == "hf" else 1) and count_input_rows(f"{bucket}/{name}") == 31
        local = _without_origin(load_parsed_local(tmp_path / name).to_pylist())
        assert _without_origin(load_parsed_local(f"{bucket}/{name}").to_pylist()) == local
        assert sorted(_without_origin(read_parsed(f"{bucket}/{name}").take_all()), key=str) == sorted(local, key=str)
        assert [r["reason"] for r in local].count("empty_text") == 1


def test_a_beir_folder_on_a_bucket_is_the_local_task(bucket, tiny_model, tmp_path):
    from pairmill.evaluate import load_task

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write = lambda name, lines: (folder / name).write_text("\n".join(lines) + "\n")  # noqa: E731
    write("corpus.jsonl", [json.dumps({"_id": f"d{i}", "title": "t", "text": f"doc {i}"}) for i in range(4)] + ["not json"])
    write("queries.jsonl", [json.dumps({"_id": f"q{i}", "text": f"query {i}"}) for i in range(3)])
    write("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q0\td0\t1", "q1\td1\t2", "q2\tmissing\t1", "bad"])
    storage.upload_folder(folder, f"{bucket}/beir")
    local, remote = load_task(str(folder)), load_task(f"{bucket}/beir/")
    assert (remote.queries, remote.corpus, remote.qrels, remote.exclude) == (local.queries, local.corpus, local.qrels, local.exclude)
    assert remote.inputs == {f"{bucket}/beir/{name}": counts for name, counts in zip(
        ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"), local.inputs.values())}
    assert remote.inputs[f"{bucket}/beir/qrels/test.tsv"]["rejected"] == {"bad_qrels_line": 1, "unknown_id": 1}
    # `pairmill eval` on it, its --json written to the bucket (not to a local folder named "s3:")
    from pairmill.cli import main

    assert main(["eval", "--model", tiny_model, "--data", f"{bucket}/beir/", "--json", f"{bucket}/eval/m.json"]) == 0
    written = json.loads(storage.read_text(f"{bucket}/eval/m.json"))
    assert set(written["inputs"]) == set(remote.inputs) and 0 <= written["ndcg@10"] <= 1
    assert not (Path.cwd() / "s3:").exists()


def test_classify_writes_its_folder_on_a_bucket(bucket, tiny_model, tmp_path):
    """``pairmill classify --model DIR s3://.../texts.jsonl -o s3://.../classified``: in-process, no Ray."""
    import shutil

    from pairmill.cli import main as cli
    from pairmill.encoder import Encoder
    from pairmill.head import fit_head
    from tests.conftest import write_jsonl

    texts = ["the data of a program", "a network of machines", "memory and disk", "a tree of nodes"]
    fit_head(Encoder(tiny_model, device="cpu").encode(texts, kind="query"), ["a", "b", "a", "b"]).save(tmp_path / "cls" / "head")
    shutil.copytree(tiny_model, tmp_path / "cls" / "model")
    lines = [json.dumps({"text": t, "label": y}) for t, y in zip(texts, "abab")] + ["not json"]
    texts_uri = upload(write_jsonl(tmp_path / "texts.jsonl", lines), f"{bucket}/texts.jsonl")
    assert cli(["classify", "--model", str(tmp_path / "cls"), texts_uri, "-o", f"{bucket}/classified"]) == 0
    stats = json.loads(storage.read_text(f"{bucket}/classified/stats.json"))
    assert stats["input_rows"] == 5 and stats["kept"] == 4 and stats["rejected"] == {"invalid_json": 1}
    assert is_finished(f"{bucket}/classified") and stats["metrics"]["rows"] == 4
    manifest = json.loads(storage.read_text(f"{bucket}/classified/_SUCCESS"))
    rows = [r for fs, path in map(storage.split, finished_files(f"{bucket}/classified", "kept"))
            for r in pq.read_table(path, filesystem=fs).to_pylist()]
    assert [r["text"] for r in rows] == texts and all(r["predicted"] in ("a", "b") for r in rows)
    assert set(manifest["files"]) == {f"kept/{manifest['attempt']}/part-0.parquet",
                                      f"rejected/{manifest['attempt']}/part-0.parquet", "stats.json"}


def _stats(kept: int) -> dict:
    return {"input_rows": kept, "kept": kept, "dropped": {}, "rejected": {}}


def _write_part(job, part: str, ids: list[str]) -> None:
    pq.write_table(pa.table({"id": ids}), f"{storage.split(job.path(part))[1]}/0.parquet", filesystem=job.filesystem)


def _kept_ids(out: str) -> list[str]:
    ids = []
    for uri in finished_files(out, "kept"):
        fs, path = storage.split(uri)
        ids += pq.read_table(path, filesystem=fs)["id"].to_pylist()
    return ids


def test_staged_files_reach_the_bucket_when_the_block_ends(bucket, tmp_path):
    """What a model save or np.savez writes into ``storage.staged``'s local folder is uploaded under
    the URI when the block ends; when it raises, only with upload_on_error. A local path is itself."""
    with storage.staged(f"{bucket}/ok") as local:
        (local / "model").mkdir()
        (local / "model" / "config.json").write_text("{}")
    assert storage.read_text(f"{bucket}/ok/model/config.json") == "{}" and not local.exists()
    for upload_on_error in (False, True):
        with pytest.raises(RuntimeError), storage.staged(f"{bucket}/failed{upload_on_error}",
                                                         upload_on_error=upload_on_error) as local:
            (local / "results.csv").write_text("trial\n")
            raise RuntimeError("the writer failed")
        assert storage.exists(f"{bucket}/failed{upload_on_error}/results.csv") == upload_on_error
    with storage.staged(tmp_path / "here") as local:
        assert local == tmp_path / "here"


def test_a_job_killed_before_success_is_not_finished_and_a_rerun_cleans_it(bucket, monkeypatch):
    out = f"{bucket}/job"
    job = open_job(out)
    assert isinstance(job, BucketJobFolder)
    _write_part(job, "kept", ["a", "b"])
    job.commit(_stats(2))
    assert is_finished(out) and _kept_ids(out) == ["a", "b"]
    manifest = json.loads(storage.read_text(f"{out}/_SUCCESS"))
    assert set(manifest["files"]) == {f"kept/{job.attempt}/0.parquet", "stats.json"}

    # A rerun killed after its parts and stats.json, before _SUCCESS (no abort runs on a kill).
    killed = open_job(out)
    _write_part(killed, "kept", ["c"])
    _write_part(killed, "rejected", ["x"])
    assert is_finished(out) and _kept_ids(out) == ["a", "b"]  # the last commit still stands meanwhile
    real_write = storage.write_text

    def die_at_success(path, text):
        if path.endswith("/_SUCCESS"):
            raise SystemExit("killed")
        return real_write(path, text)

    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(storage, "write_text", die_at_success)
        killed.commit(_stats(1))
    assert storage.exists(f"{out}/stats.json") and storage.exists(killed.path("kept"))
    assert not is_finished(out)
    with pytest.raises(ValueError, match="not a finished pairmill job folder"):
        detect_format(out)

    rerun = open_job(out)  # cleans what no manifest vouches for, before writing
    assert not storage.exists(killed.path("kept")) and not storage.exists(killed.path("rejected"))
    _write_part(rerun, "kept", ["d", "e", "f"])
    rerun.commit(_stats(3))
    assert is_finished(out) and _kept_ids(out) == ["d", "e", "f"] and parquet_rows(rerun.path("kept")) == 3
    assert [u[len(out) + 1:] for u, _ in storage.list_files(out)] == ["_SUCCESS", f"kept/{rerun.attempt}/0.parquet", "stats.json"]
    assert detect_format(out) == ("parquet", [f"{rerun.path('kept')}/0.parquet"])

    # A manifest names sizes: a listed file changed or gone is not trusted either.
    fs, inner = storage.split(f"{rerun.path('kept')}/0.parquet")
    fs.delete_file(inner)
    assert not is_finished(out)


def test_mine_reuses_the_embeddings_of_a_bucket_job_folder_its_manifest_lists(bucket):
    from mining.mine import reusable_embeddings

    job = open_job(f"{bucket}/filtered")
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.6, 0.8], pa.float32()), 2)
    pq.write_table(pa.table({"id": ["a"], "query_embedding": vectors, "passage_embedding": vectors}),
                   f"{storage.split(job.path('kept'))[1]}/0.parquet", filesystem=job.filesystem)
    job.commit({**_stats(1), "encoder_fingerprint": "e1"})
    assert reusable_embeddings(f"{bucket}/filtered", "e1") == [f"{job.path('kept')}/0.parquet"]
    assert reusable_embeddings(f"{bucket}/filtered", "e2") is None  # another encoder: encode again
    assert reusable_embeddings(f"{bucket}/nothing", "e1") is None


def test_a_failed_or_mismatched_job_leaves_no_parts(bucket):
    out = f"{bucket}/job"
    with pytest.raises(RuntimeError):
        with open_job(out) as job:
            _write_part(job, "kept", ["a"])
            raise RuntimeError("boom")
    assert storage.list_files(out) == []
    with pytest.raises(StatsMismatch, match="partial output left under"):
        with open_job(out) as job:
            _write_part(job, "kept", ["a"])
            job.commit({"input_rows": 2, "kept": 1, "dropped": {}, "rejected": {}})
    assert not is_finished(out) and storage.exists(job.path("kept"))  # kept to look at, cleaned by the next run
    with pytest.raises(ValueError, match="local or shared filesystem only"):
        JobFolder(f"{bucket}/train")  # jobs not yet on object storage say so, and write nothing


def filter_locally_and_on(bucket: str, tiny_model: str, tmp_path: Path) -> tuple[str, str]:
    """``pairmill filter`` of the same 49 lines (40 pairs, 3 repeats, 6 bad lines) from a local file
    to a local folder and from ``bucket/pairs.jsonl`` to ``bucket/filtered``, checked to count alike;
    (the input's URI, the bucket folder's stats.json text). The embedding stages are off: they touch
    no storage, and they would double the time."""
    from pairmill.cli import main as cli
    from tests.conftest import literal_pairs, write_jsonl

    rows = literal_pairs(40)
    lines = [json.dumps(r) for r in rows + rows[:3]] + [line.decode("utf-8", "replace") for line, _ in BAD_LINES[:6]]
    local_in = write_jsonl(tmp_path / "pairs.jsonl", lines)
    remote_in = upload(local_in, f"{bucket}/pairs.jsonl")
    settings = ["--model", tiny_model, "filter.consistency=false", "filter.semdedup=false"]
    assert cli(["filter", str(local_in), "-o", str(tmp_path / "filtered"), *settings]) == 0
    assert cli(["filter", remote_in, "-o", f"{bucket}/filtered", *settings]) == 0

    local = json.loads((tmp_path / "filtered" / "stats.json").read_text())
    text = storage.read_text(f"{bucket}/filtered/stats.json")
    remote = json.loads(text)
    for key in ("input_rows", "kept", "dropped", "rejected"):
        assert remote[key] == local[key], key
    assert local["input_rows"] == 49 and local["dropped"]["exact_duplicate"] == 3 and sum(local["rejected"].values()) == 6
    assert [(s["name"], s["rows_in"], s["rows_out"]) for s in remote["stages"]] == [(s["name"], s["rows_in"], s["rows_out"]) for s in local["stages"]]
    return remote_in, text


def test_filter_from_a_bucket_to_a_bucket_counts_what_the_local_run_counts(ray_session, tiny_model, bucket, tmp_path):
    """``pairmill filter s3://.../pairs.jsonl -o s3://.../filtered``: the same counts as on local
    files, a manifest-committed folder that the next job reads, and no credential in stats.json
    (mine, train and eval on the bucket: the `run` test); then ``pairmill embed`` bucket to bucket."""
    from pairmill.cli import main as cli

    remote_in, text = filter_locally_and_on(bucket, tiny_model, tmp_path)
    remote = json.loads(text)
    from tests.conftest import TEST_CREDENTIALS

    assert not any(value in text for value in TEST_CREDENTIALS.values())
    assert is_finished(f"{bucket}/filtered") and count_input_rows(f"{bucket}/filtered") == remote["kept"]
    assert not storage.list_files(f"{bucket}/filtered/_work")
    # mine bucket to bucket (its index part of the attempt) runs in the `run` test below

    # embed bucket to bucket: every line counted, the vectors read back through the manifest
    assert cli(["embed", remote_in, "-o", f"{bucket}/embedded", "--model", tiny_model]) == 0
    embedded = json.loads(storage.read_text(f"{bucket}/embedded/stats.json"))
    assert embedded["input_rows"] == 49 and embedded["kept"] + sum(embedded["rejected"].values()) == 49
    assert sum(embedded["rejected"].values()) >= 6 and is_finished(f"{bucket}/embedded")
    files = finished_files(f"{bucket}/embedded", "kept")
    vectors = [v for fs, path in map(storage.split, files) for v in pq.read_table(path, filesystem=fs)["query_embedding"].to_pylist()]
    assert len(vectors) == embedded["kept"] and {len(v) for v in vectors} == {32}
    assert not storage.list_files(f"{bucket}/embedded/_work")


def test_run_on_a_bucket_resumes_its_interrupted_train_stage_from_the_bucket(ray_session, tiny_model, bucket, tmp_path,
                                                                            monkeypatch):
    """``pairmill run -o s3://.../run1 run.train=s3://.../pairs/ run.plain=true`` on the file of every
    kind of bad line (tests/test_every_verb.py), so ``train`` reads that file too (the plain arm
    trains on the raw input): every stage's folder on the bucket (committed by its manifest), every
    job's counts adding up to the file's lines, and the train stage, killed after its step-2
    checkpoint, resumed from Ray Train's checkpoints on the bucket by the same command (not
    restarted), its model then read back from the bucket by the eval stage. Filter's embedding stages
    and refresh are off: they touch no storage (refresh rounds on a bucket:
    tests/training/test_refresh_train.py). One `run` pays for the bucket, the resume and the messy file."""
    import training.train
    from pairmill.cli import main as cli
    from tests.test_every_verb import GOOD_ROWS, check_counts, write_messy
    from training.loop import TestHooks

    messy = write_messy(tmp_path)
    upload(messy["path"], f"{bucket}/pairs/part-0.jsonl")
    heldout = upload(messy["heldout"], f"{bucket}/heldout.jsonl")
    out = f"{bucket}/run1"
    command = ["run", "-o", out, "--model", tiny_model, f"run.train={bucket}/pairs/", f"eval.data={heldout}", "run.plain=true",
               "filter.consistency=false", "filter.semdedup=false", "filter.decontaminate_eps=0", "encoder.batch_size=16",
               "mine.shard_cpus=0.5", "mine.num_negatives=2", "mine.range_max=8", "mine.margin_ratio=none",
               "train.num_workers=1", "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=2",
               "train.log_every=1", "train.max_failures=0"]

    real_train = training.train.train
    with monkeypatch.context() as interrupted:  # the train stage dies once, after its checkpoint of step 2
        interrupted.setattr(training.train, "train", lambda *a, **k: real_train(*a, **k, hooks=TestHooks(fail_at_step=2)))
        with pytest.raises(Exception, match="fail_at_step"):
            cli(command)
    assert is_finished(f"{out}/mine") and not is_finished(f"{out}/train")
    assert any("/step_0000002/" in uri for uri, _ in storage.list_files(f"{out}/train/checkpoints/train"))
    assert json.loads(storage.read_text(f"{out}/train/checkpoints/run.json"))["input"] == f"{out}/mine"

    assert cli(command) == 0
    stats = {stage: json.loads(storage.read_text(f"{out}/{stage}/stats.json")) for stage in ("filter", "mine", "train")}
    check_counts(stats["filter"], messy["lines"], messy["bad"])
    kept = stats["filter"]["kept"]
    assert kept >= GOOD_ROWS - 2 and stats["filter"]["dropped"] == {"exact_duplicate": 1}  # the copy without its id
    for stage in ("mine", "train"):  # they read the previous stage's kept rows
        check_counts(stats[stage], kept, [], duplicate_ids=None)
    assert stats["mine"]["kept"] == kept and stats["mine"]["negatives"]["total"] == kept * 2
    index_files = finished_files(f"{out}/mine", "index")  # the sharded index is part of mine's attempt
    assert any(f.endswith("manifest.json") for f in index_files) and any(f.endswith(".faiss") for f in index_files)
    assert not storage.list_files(f"{out}/mine/_work") and not storage.list_files(f"{out}/filter/_work")
    train = stats["train"]
    assert train["kept"] == kept and train["rejected"] == {}
    assert train["train"]["steps"] == 4 and train["train"]["resumed_from_step"] == 2  # resumed, not restarted
    lines = [json.loads(line) for line in storage.read_text(f"{out}/train/metrics.jsonl").splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]  # the killed attempt's lines up to its checkpoint, then the rerun's
    from training.loop import _metrics_copy

    assert not _metrics_copy(storage.split(f"{out}/train/metrics.jsonl")[1]).exists()  # rank 0's local copy goes when the run ends
    manifest = json.loads(storage.read_text(f"{out}/train/_SUCCESS"))
    assert {"config.yaml", "metrics.jsonl", "stats.json"} <= set(manifest["files"])
    assert any(f.startswith(f"model/{manifest['attempt']}/") and f.endswith("config.json") for f in manifest["files"])
    assert not storage.list_files(f"{out}/train/work")

    # run.plain: the raw messy pairs, the chain's step budget, the same held-out evaluation, in report.md
    plain = json.loads(storage.read_text(f"{out}/plain/report.json"))
    plain_train = json.loads(storage.read_text(f"{out}/plain/train/stats.json"))
    check_counts(plain_train, messy["lines"], messy["bad"])
    assert plain_train["train"]["steps"] == plain["steps"] == 4 and plain["plain"]["queries"] == 90 - GOOD_ROWS
    assert "## Full chain vs plain in-batch training" in storage.read_text(f"{out}/report.md")

    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["trained"]["queries"] == report["base"]["queries"] == 90 - GOOD_ROWS and report["trained"] != report["base"]
    assert storage.exists(f"{out}/report.md") and is_finished(f"{out}/eval")
    from tests.conftest import TEST_CREDENTIALS

    assert not any(value in storage.read_text(f"{out}/report.json") for value in TEST_CREDENTIALS.values())

    # refresh rounds of a train run on this mine folder re-mine its kept rows against its index's
    # texts, where they are: the attempt prefixes its _SUCCESS vouches for
    from training.rounds import _job_folders

    kept_rows = kept
    kept, index = _job_folders(f"{out}/mine")
    assert kept == finished_files(f"{out}/mine", "kept")[0].rsplit("/", 1)[0] and parquet_rows(kept) == kept_rows
    assert index.startswith(f"{out}/mine/index/") and any(f.endswith(".texts.parquet") for f in finished_files(f"{out}/mine", "index"))
