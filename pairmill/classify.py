"""``pairmill classify --model DIR INPUT -o OUT``: texts -> classes, with the head `pairmill setfit`
saved beside its model (``pairmill.head``).

INPUT is read as labelled input is (``pairmill.labelled``): a ``text`` column, ids as every job
reads them, bad rows counted in ``rejected/``; a ``label`` column is optional, and when rows have
one, ``stats.json["metrics"]`` scores the predictions against it. ``kept/`` holds one row per text:
``id``, ``text``, ``label`` (given, or null), ``predicted``, ``probability`` (of the predicted
class), ``probabilities`` (every class, in ``stats.json["classes"]`` order) and
``neighbour_agreement``: the share of the ``setfit.neighbours`` nearest labelled training texts
labelled as predicted. Texts are encoded in this process with the prefix and max length the head
was fitted with (``head/head.json``), which win over the encoder section's. OUT may be on object
storage (``s3://...``): its parts then go under the attempt's prefix and ``_SUCCESS`` lists them
(``pairmill.output.BucketJobFolder``); the classifier folder (``--model``) is local.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pairmill.config import ConfigError

log = logging.getLogger(__name__)
HEAD_DIR = "head"
MODEL_DIR = "model"


def classifier_folders(folder: str | Path) -> tuple[Path, Path]:
    """(model folder, head folder) of a `pairmill setfit` output (``model/`` and ``head/``), or of
    its ``model/`` folder given directly (the head beside it)."""
    folder = Path(folder).expanduser().resolve()
    if (folder / HEAD_DIR).is_dir() and (folder / MODEL_DIR).is_dir():
        return folder / MODEL_DIR, folder / HEAD_DIR
    if (folder.parent / HEAD_DIR).is_dir():
        return folder, folder.parent / HEAD_DIR
    raise FileNotFoundError(f"{folder}: no classifier here; --model takes the folder `pairmill setfit -o OUT` wrote "
                            "(OUT, holding model/ and head/) or its OUT/model")


def cli_overrides(args, overrides: list[str]) -> list[str]:
    """--model names the setfit folder; the encoder section gets its model/ folder."""
    given = [o for o in overrides if o.startswith("encoder.model=")]
    if not given:
        raise ConfigError("classify needs --model DIR: the folder `pairmill setfit -o DIR` wrote")
    try:
        model, _ = classifier_folders(given[-1].split("=", 1)[1])
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return [o for o in overrides if not o.startswith("encoder.model=")] + [f"encoder.model={model}"]


def predict(texts: list[str], head, encoder, neighbours: int) -> dict[str, list]:
    """Columns for ``kept/``: predicted, probability, probabilities, neighbour_agreement."""
    x = encoder.encode(texts, kind=head.settings.get("kind", "query")) if texts else np.zeros((0, head.coef.shape[1]), np.float32)
    probs = head.probabilities(x)  # (N, K)
    predicted = [head.classes[i] for i in probs.argmax(1)]
    agreement, _ = head.neighbour_agreement(x, predicted, neighbours) if texts else (np.zeros(0), None)
    return {"predicted": predicted, "probability": probs.max(1).round(6).tolist() if texts else [],
            "probabilities": probs.round(6).tolist(), "neighbour_agreement": agreement.round(4).tolist()}


def classify(input_path: str, out: str, *, model_dir: str, encoder_cfg, read, neighbours: int) -> dict:
    from pairmill.config import read_kwargs
    from pairmill.encoder import Encoder
    from pairmill.head import classification_report, load_head
    from pairmill.labelled import read_labelled, reject_counts, write_rows
    from pairmill.output import open_job

    started = time.perf_counter()
    model, head_dir = classifier_folders(model_dir)
    head = load_head(head_dir)
    with open_job(out) as job:  # a local folder, or a prefix on object storage committed by a manifest
        t0 = time.perf_counter()
        kwargs = {k: v for k, v in read_kwargs(read).items() if k not in ("query_field", "passage_field")}
        valid, rejected, truncated, input_rows = read_labelled(input_path, label_field=read.label_field, required=False, **kwargs)
        write_rows(rejected, job.path("rejected"))
        job.stage("read+validate", input_rows, valid.num_rows, time.perf_counter() - t0)

        t0 = time.perf_counter()
        encoder = Encoder(str(model), query_prefix=head.settings.get("query_prefix", ""),
                          passage_prefix=head.settings.get("passage_prefix", ""),
                          max_length=head.settings.get("max_length", encoder_cfg.max_length), batch_size=encoder_cfg.batch_size,
                          device=encoder_cfg.device, precision=encoder_cfg.precision)
        texts = valid.column("text").to_pylist()
        columns = predict(texts, head, encoder, neighbours)
        table = valid
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, pa.list_(pa.float64()) if name == "probabilities" else None))
        write_rows(table, job.path("kept"))
        job.stage("classify", valid.num_rows, valid.num_rows, time.perf_counter() - t0)
        given = [(y, p) for y, p in zip(valid.column("label").to_pylist(), columns["predicted"]) if y is not None]
        stats = {
            "input_rows": input_rows, "kept": valid.num_rows, "dropped": {}, "rejected": reject_counts(rejected),
            "truncated": truncated, "unique_ids": True, "classes": head.classes, "model": str(model),
            "predicted": {c: columns["predicted"].count(c) for c in head.classes},
            "mean_neighbour_agreement": round(float(np.mean(columns["neighbour_agreement"])), 4) if texts else None,
            "metrics": classification_report([y for y, _ in given], [p for _, p in given], head.classes) if given else None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return job.commit(stats)


def main(args) -> int:
    """``pairmill classify --model DIR INPUT -o OUT``."""
    from pairmill.output import format_summary

    cfg = args.config_sections
    stats = classify(args.input, args.output, model_dir=cfg["encoder"].model, encoder_cfg=cfg["encoder"], read=cfg["read"],
                     neighbours=cfg["setfit"].neighbours)
    print(format_summary(stats, args.output))
    print(f"    predicted           {stats['predicted']}")
    if stats["metrics"]:
        m = stats["metrics"]
        print(f"    against the labels  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f} ({m['rows']} labelled rows)")
    return 0
