"""The setfit head (pairmill.head) and labelled input (pairmill.labelled), without Ray or a model:
probabilities as scikit-learn computes them, save/load, prediction shapes, neighbours' agreement,
and bad labelled rows counted as rejections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pairmill.head import classification_report, fit_head, load_head
from pairmill.labelled import read_labelled
from tests.conftest import write_jsonl


def blobs(classes: int, per_class: int = 6, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    x = np.concatenate([c + 0.3 * rng.normal(size=(per_class, d)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [f"class {i}" for i in range(classes) for _ in range(per_class)]
    return x, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_probabilities_match_sklearn_and_survive_save_and_load(classes, tmp_path):
    from sklearn.linear_model import LogisticRegression

    x, labels = blobs(classes)
    head = fit_head(x, labels, seed=0, settings={"query_prefix": "q: "})
    reference = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(x, labels)
    probs = head.probabilities(x)
    assert probs.shape == (len(x), classes) and np.allclose(probs.sum(1), 1)
    np.testing.assert_allclose(probs, reference.predict_proba(x), atol=1e-5)
    assert head.predict(x) == list(reference.predict(x))

    loaded = load_head(head.save(tmp_path / "head"))
    assert loaded.classes == head.classes and loaded.settings["query_prefix"] == "q: "
    np.testing.assert_array_equal(loaded.probabilities(x), probs)
    assert json.loads((tmp_path / "head" / "head.json").read_text())["classes"] == sorted(set(labels))


def test_neighbour_agreement_is_the_share_of_nearest_examples_labelled_as_predicted():
    x, labels = blobs(3, per_class=5, seed=2)
    head = fit_head(x, labels)
    agreement, nearest = head.neighbour_agreement(x[:2], ["class 0", "class 2"], k=4)
    assert nearest.shape == (2, 4) and nearest[0, 0] == 0  # a labelled text's nearest is itself
    scores = x[:2] @ x.T
    for i, predicted in enumerate(["class 0", "class 2"]):
        top = np.argsort(-scores[i])[:4]
        assert agreement[i] == pytest.approx(np.mean([labels[j] == predicted for j in top]))


def test_one_class_is_refused():
    x, _ = blobs(1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_head(x, ["only"] * len(x))


def test_report_has_accuracy_macro_f1_and_every_class():
    report = classification_report(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert report["accuracy"] == 0.5 and report["rows"] == 4
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert report["per_class"]["c"]["f1"] == 0.0
    assert report["macro_f1"] == pytest.approx(round((2 / 3 + 0.5 + 0) / 3, 4))


def test_labelled_rows_are_validated_and_every_bad_one_counted(tmp_path):
    path = write_jsonl(tmp_path / "labelled.jsonl", [
        {"text": "we plan to build it", "label": "plan"},
        {"text": "we built it", "label": 3},  # an integer label reads as "3"
        {"text": "no label here"},
        {"text": "a float label", "label": 0.5},
        {"text": "an empty label", "label": " "},
        {"text": "", "label": "plan"},
        {"id": "x", "text": "first with id x", "label": "plan"},
        {"id": "x", "text": "second with id x", "label": "plan"},
        "not json",
    ])
    valid, rejected, truncated, rows = read_labelled(path)
    assert rows == 9 and truncated == 0
    assert valid.column("label").to_pylist() == ["plan", "3", "plan"]
    reasons = sorted(rejected.column("reason").to_pylist())
    assert reasons == ["bad_label", "bad_label", "duplicate_id", "empty_text", "invalid_json", "missing_label"]
    assert valid.num_rows + rejected.num_rows == rows
    unlabelled, rejected, _, _ = read_labelled(path, required=False)  # classify: a label is optional
    assert unlabelled.column("label").to_pylist()[2] is None and "missing_label" not in rejected.column("reason").to_pylist()


def test_label_reject_reasons_are_in_the_documented_table():
    from pathlib import Path

    from pairmill.labelled import LABEL_REJECT_REASONS

    readme = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()  # "Rejection reasons", linked from the README
    table = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    assert set(LABEL_REJECT_REASONS) <= table
