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
    assert set(metrics) == {"ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "alignment", "uniformity", "queries", "corpus"}
    assert metrics["queries"] == 30 and metrics["corpus"] == 32
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "1 rows left out as invalid: {'invalid_json': 1}" in out
