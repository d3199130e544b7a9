"""The classification head of pairmill setfit: multinomial logistic regression (scikit-learn) on
frozen, unit-length sentence embeddings, and the nearest labelled neighbours as a second opinion.

Saved beside the sentence-transformers folder as ``head/head.json`` (classes, the encoder
settings the embeddings were made with, the fit's settings) and ``head/head.npz`` (weights,
intercepts, and the labelled embeddings the neighbours come from): plain arrays, not a pickle, so
loading a head from anywhere runs no code (as checkpoints are read with ``weights_only=True``).
Probabilities are computed from the saved arrays (softmax of ``X W^T + b``; the logistic for two
classes), which is what scikit-learn's ``predict_proba`` computes (a test checks it).

Neighbour agreement: the share of a text's ``k`` nearest labelled examples (cosine) whose label is
the predicted one. Low agreement with a confident probability marks a text the head places by a
direction in the space rather than by examples like it: worth a look.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

HEAD_JSON = "head.json"
HEAD_NPZ = "head.npz"
C = 1.0  # scikit-learn's default inverse regularisation: SetFit's head uses it too
MAX_ITER = 1000


@dataclass
class ClassifierHead:
    classes: list[str]  # (K,) in the order of the probability columns
    coef: np.ndarray  # (K, D), or (1, D) for two classes (scikit-learn's binary form)
    intercept: np.ndarray  # (K,) or (1,)
    examples: np.ndarray  # (N, D) unit embeddings of the labelled texts
    example_labels: np.ndarray  # (N,) int64 index into classes
    settings: dict = field(default_factory=dict)  # encoder settings + fit settings, saved in head.json

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, K) class probabilities, rows summing to 1."""
        logits = np.asarray(x, dtype=np.float64) @ self.coef.T.astype(np.float64) + self.intercept  # (N, K) or (N, 1)
        if logits.shape[1] == 1:  # two classes: p(classes[1]) = sigmoid
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1 - p1, p1], 1)
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.probabilities(x).argmax(1)]

    def neighbour_agreement(self, x: np.ndarray, predicted: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """((N,) share of each text's k nearest labelled examples labelled as predicted, (N, k) their row indices)."""
        k = min(k, len(self.examples))
        scores = np.asarray(x, dtype=np.float32) @ self.examples.T  # (N, n): cosine, both sides unit length
        nearest = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
        index = {c: i for i, c in enumerate(self.classes)}
        predicted_ids = np.array([index[p] for p in predicted], dtype=np.int64)
        return (self.example_labels[nearest] == predicted_ids[:, None]).mean(1), nearest

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / HEAD_NPZ, coef=self.coef, intercept=self.intercept, examples=self.examples,
                 example_labels=self.example_labels)
        (folder / HEAD_JSON).write_text(json.dumps({"classes": self.classes, **self.settings}, indent=2))
        return folder


def fit_head(embeddings: np.ndarray, labels: Sequence[str], *, seed: int = 0, settings: dict | None = None) -> ClassifierHead:
    """Logistic regression on (N, D) embeddings; needs two classes at least."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes; the labelled rows have {classes}")
    model = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed).fit(embeddings, list(labels))
    assert list(model.classes_) == classes
    index = {c: i for i, c in enumerate(classes)}
    return ClassifierHead(classes, model.coef_.astype(np.float32), model.intercept_.astype(np.float32),
                          np.asarray(embeddings, dtype=np.float32), np.array([index[y] for y in labels], dtype=np.int64),
                          {**(settings or {}), "C": C, "max_iter": MAX_ITER, "seed": seed})


def load_head(folder: str | Path) -> ClassifierHead:
    folder = Path(folder)
    if not (folder / HEAD_JSON).exists():
        raise FileNotFoundError(f"{folder} holds no {HEAD_JSON}: give the folder `pairmill setfit` wrote (model/ and head/)")
    meta = json.loads((folder / HEAD_JSON).read_text())
    arrays = np.load(folder / HEAD_NPZ, allow_pickle=False)
    classes = meta.pop("classes")
    return ClassifierHead(classes, arrays["coef"], arrays["intercept"], arrays["examples"], arrays["example_labels"], meta)


def classification_report(true: Sequence[str], predicted: Sequence[str], classes: Sequence[str] | None = None) -> dict:
    """accuracy, macro_f1 and per class precision / recall / f1 / support (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    classes = sorted(set(true) | set(predicted)) if classes is None else list(classes)
    p, r, f, s = precision_recall_fscore_support(true, predicted, labels=classes, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(true, predicted)), 4),
        "macro_f1": round(float(f1_score(true, predicted, labels=classes, average="macro", zero_division=0)), 4),
        "rows": len(true),
        "per_class": {c: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4), "f1": round(float(f[i]), 4),
                          "support": int(s[i])} for i, c in enumerate(classes)},
    }
