import json

from pairmill.cli import main
from tests.conftest import literal_pairs, write_jsonl


def test_unknown_key_fails_with_the_valid_keys(capsys):
    assert main(["eval", "--data", "x.jsonl", "encoder.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'encoder.bogus'" in err and "encoder.batch_size" in err and "eval.query_batch" in err


def test_eval_writes_json(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "heldout.jsonl", literal_pairs(30) + ["not json"])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "extra passage one"}, {"text": "extra two"}])
    rc = main(["eval", "--model", tiny_model, "--data", str(data), "--corpus", str(corpus), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "alignment", "uniformity", "queries",
                            "corpus", "inputs"}
    assert metrics["queries"] == 30 and metrics["corpus"] == 32
    assert metrics["inputs"] == {str(data): {"input_rows": 31, "used": 30, "rejected": {"invalid_json": 1}},
                                 str(corpus): {"input_rows": 2, "used": 2, "rejected": {}}}
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "1 of 31 rows left out as invalid: {'invalid_json': 1}" in out


def test_a_model_that_is_neither_a_folder_nor_on_the_hub_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A mistyped relative folder ("trained/model") reads like a hub name "org/name": offline it must
    fail at once, naming both readings, instead of starting Ray (or, online, downloading)."""
    import pairmill.cluster

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(pairmill.cluster, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", literal_pairs(4))
    assert main(["embed", str(data), "-o", "out", "--model", "trained/model"]) == 2
    err = capsys.readouterr().err
    assert "neither a model folder here" in err and str(tmp_path / "trained" / "model") in err
    assert "HF_HUB_OFFLINE" in err and not (tmp_path / "out").exists()
    (tmp_path / "trained" / "model").mkdir(parents=True)  # a folder, but no model in it
    assert main(["filter", str(data), "-o", "out", "--model", "trained/model"]) == 2
    assert "holds no model" in capsys.readouterr().err


def test_hub_names_are_checked_against_the_hub_when_online(monkeypatch):
    """Online, a name the hub knows passes (the code path users with network rely on), one it does
    not know fails with the hub's answer; the lookup is faked here, as the hub is not reachable."""
    import huggingface_hub

    from pairmill.encoder import ModelNotFound, check_model

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    asked = []

    def model_info(repo, timeout=None):
        asked.append(repo)
        if repo != "intfloat/e5-small-v2":
            from types import SimpleNamespace

            response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the error reads of a response
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo} not found", response=response)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    assert check_model("intfloat/e5-small-v2") == "intfloat/e5-small-v2"
    try:
        check_model("trained/model")
        raise AssertionError("no error")
    except ModelNotFound as e:
        assert "the hub has no model 'trained/model'" in str(e)
    # a name without an organisation is asked as sentence-transformers does
    asked.clear()
    try:
        check_model("my-model")
    except ModelNotFound:
        pass
    assert asked == ["sentence-transformers/my-model", "my-model"]
