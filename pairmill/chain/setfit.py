"""``pairmill setfit [LABELLED] -o OUT [--eval-data LABELLED]``: few-shot classification the SetFit
way (Tunstall et al. 2022) on pairmill's stages: labelled texts in, a fine-tuned sentence-
transformers model and a classification head out.

Design note
-----------
1. Read: ``text`` and ``label`` rows (``pairmill.labelled``: bad rows counted in ``rejected/``, the
   valid ones in ``kept/``), and the held-out set the same way (its rejects counted in
   ``stats.json["eval"]``). No LABELLED: the bundled FOLDOC set (8 domains, 64 texts each) and its
   held-out split (40 each).
2. Before: every text encoded by the base model, in this process (few-shot sets are small); a
   logistic-regression head fitted on those embeddings is the baseline ("before").
3. Pairs from labels (``mining.label_pairs``): ``setfit.pairs_per_class`` positive pairs per class
   (k texts make k(k-1): sampled down, or repeated up, so classes are balanced), each with
   ``train.hard_negatives`` texts of other classes the base model puts nearest the anchor (the
   mining index, the same-label rule: never a negative with the anchor's label). Written as the
   job folder ``OUT/pairs/`` (its ``kept/``), with the label in ``source``.
4. Contrastive stage: ``pairmill train`` as it is (``training.train.train``, Ray Train), with
   ``train.objective=supcon`` and ``train.group_by=source``: all rows of a class in the global batch
   are positives of each other. Its folder is ``OUT/train`` (metrics.jsonl, stats.json; its
   checkpoints are removed once the model is out), its model moves to ``OUT/model``.
5. After: the head is fitted again on the trained model's embeddings and saved in ``OUT/head``
   (``pairmill.head``); both heads are scored on the held-out set (accuracy, macro-F1, a per-class
   report), and ``OUT/projection.png`` shows the held-out texts, base and trained, coloured by class.

Not resumable: an interrupted run starts again (the contrastive stage is minutes at few-shot sizes).
Cost: two in-process encodes of the labelled and held-out texts per model, one exact (n, n)
search, and the train job's steps (``setfit.pairs_per_class`` x classes / ``train.batch_size``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pairmill import sample

log = logging.getLogger(__name__)
PROJECTION_PNG = "projection.png"
PROJECTED = 400  # held-out texts drawn in the projection, at most
PROFILE = "setfit"  # pairmill/sample/setfit.yaml: the train settings setfit runs with when there is no --config


def cli_overrides(args, overrides: list[str]) -> list[str]:
    """The CLI's hook: LABELLED is optional, so argparse may have taken a key=value for it; with no
    --config the setfit profile (pairmill/sample/setfit.yaml) comes first and the user's settings win."""
    if args.input and "=" in args.input and not Path(args.input).exists():
        overrides = [args.input] + list(overrides)
        args.input = None
    return list(overrides) if args.config is not None else sample.profile_first(PROFILE, overrides)


def encode(model: str, texts: list[str], encoder_cfg) -> np.ndarray:
    """(N, D) unit embeddings, encoded as the head's texts always are (as queries: ``classify`` too)."""
    from pairmill.encoder import Encoder

    enc = Encoder(model, query_prefix=encoder_cfg.query_prefix, passage_prefix=encoder_cfg.passage_prefix,
                  max_length=encoder_cfg.max_length, batch_size=encoder_cfg.batch_size, device=encoder_cfg.device,
                  precision=encoder_cfg.precision)
    return enc.encode(texts, kind="query")


def scores(head, x: np.ndarray, labels: list[str]) -> dict | None:
    from pairmill.head import classification_report

    return classification_report(labels, head.predict(x), head.classes) if labels else None


def setfit(input_path: str | None, out: str, *, eval_path: str | None, encoder, read, train_cfg, setfit_cfg, ray) -> dict:
    """Run the setfit job; returns the stats written to ``OUT/stats.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mining.label_pairs import label_pair_rows
    from pairmill.config import EvalConfig, ReadConfig, read_kwargs
    from pairmill.encoder import resolve_model
    from pairmill.head import fit_head
    from pairmill.labelled import label_counts, read_labelled, reject_counts, write_rows
    from pairmill.output import JobFolder
    from training.train import train

    started = time.perf_counter()
    if input_path is None:
        input_path, eval_path = str(sample.LABELLED_TRAIN), eval_path or str(sample.LABELLED_HELDOUT)
    kwargs = {k: v for k, v in read_kwargs(read).items() if k not in ("query_field", "passage_field")}
    with JobFolder(out) as job:
        t0 = time.perf_counter()
        valid, rejected, truncated, input_rows = read_labelled(input_path, label_field=read.label_field, **kwargs)
        write_rows(valid, job.path("kept"))
        write_rows(rejected, job.path("rejected"))
        texts, labels = valid.column("text").to_pylist(), valid.column("label").to_pylist()
        if len(set(labels)) < 2:
            raise ValueError(f"{input_path}: {len(labels)} valid labelled rows in {len(set(labels))} class(es); "
                             "a classifier needs at least 2 classes")
        held = read_labelled(eval_path, label_field=read.label_field, **kwargs) if eval_path else None
        eval_texts = held[0].column("text").to_pylist() if held else []
        eval_labels = held[0].column("label").to_pylist() if held else []
        unseen = sorted(set(eval_labels) - set(labels))
        if unseen:
            log.warning(f"setfit: held-out classes missing from the training rows (always wrong): {unseen}")
        job.stage("read+validate", input_rows, valid.num_rows, time.perf_counter() - t0)

        t0 = time.perf_counter()
        base = resolve_model(encoder.model)
        x_base, e_base = encode(base, texts, encoder), encode(base, eval_texts, encoder) if eval_texts else None
        before = fit_head(x_base, labels, seed=train_cfg.seed)
        job.stage("encode+head (base)", len(texts) + len(eval_texts), len(texts), time.perf_counter() - t0)

        t0 = time.perf_counter()
        rows, pair_report = label_pair_rows(texts, labels, x_base, per_class=setfit_cfg.pairs_per_class,
                                            negatives=train_cfg.hard_negatives, seed=train_cfg.seed)
        # a finished job folder whose ids are known unique: the train job reads its kept/ without a shuffle by id
        pairs_dir = Path(job.path("pairs"))
        (pairs_dir / "kept").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
            ("id", pa.string()), ("query", pa.string()), ("passage", pa.string()), ("source", pa.string()),
            ("negatives", pa.list_(pa.string()))])), pairs_dir / "kept" / "pairs.parquet")
        (pairs_dir / "stats.json").write_text(json.dumps({"input_rows": len(rows), "kept": len(rows), "dropped": {},
                                                          "rejected": {}, "unique_ids": True, "pairs": pair_report}))
        (pairs_dir / "_SUCCESS").write_text("")
        job.stage("pairs from labels", valid.num_rows, len(rows), time.perf_counter() - t0)

        t0 = time.perf_counter()
        contrastive = dataclasses.replace(train_cfg, objective="supcon", group_by="source")
        train_dir = job.staging / "train"
        train_stats = train(str(pairs_dir), str(train_dir), encoder=encoder, read=ReadConfig(), train_cfg=contrastive,
                            eval_cfg=EvalConfig(), ray=ray)
        shutil.move(str(train_dir / "model"), job.path("model"))
        shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)  # full weights twice over; the model is out
        job.stage("contrastive (train)", len(rows), train_stats["train"]["pairs_trained"], time.perf_counter() - t0)

        t0 = time.perf_counter()
        x_new, e_new = encode(job.path("model"), texts, encoder), encode(job.path("model"), eval_texts, encoder) if eval_texts else None
        head = fit_head(x_new, labels, seed=train_cfg.seed, settings={
            "model": str(Path(out).expanduser().resolve() / "model"), "base_model": base, "kind": "query",
            "query_prefix": encoder.query_prefix, "passage_prefix": encoder.passage_prefix, "max_length": encoder.max_length})
        head.save(job.path("head"))
        job.stage("encode+head (trained)", len(texts) + len(eval_texts), len(texts), time.perf_counter() - t0)

        evaluation = None
        if held:
            evaluation = {"data": str(eval_path), "input_rows": held[3], "rows": held[0].num_rows,
                          "rejected": reject_counts(held[1]), "unseen_classes": unseen,
                          "before": scores(before, e_base, eval_labels), "after": scores(head, e_new, eval_labels)}
        shown = (e_base, e_new, eval_labels) if held and eval_texts else (x_base, x_new, labels)
        projection = plot_by_class(shown[0], shown[1], shown[2], job.staging / PROJECTION_PNG, seed=train_cfg.seed)
        projection["texts"] = "held-out" if held and eval_texts else "training"
        stats = {
            "input_rows": input_rows, "kept": valid.num_rows, "dropped": {}, "rejected": reject_counts(rejected),
            "truncated": truncated, "unique_ids": True, "classes": head.classes, "per_class": label_counts(labels),
            "pairs": pair_report, "train": {k: train_stats["train"][k] for k in ("steps", "pairs_trained", "pairs_per_s")},
            "eval": evaluation, "projection": projection, "base_model": base,
            "seconds": round(time.perf_counter() - started, 3),
        }
        (job.staging / "report.md").write_text(format_report(stats))
        return job.commit(stats)


def plot_by_class(base: np.ndarray, trained: np.ndarray, labels: list[str], path: Path, seed: int = 0) -> dict:
    """Base and trained embeddings of the same texts side by side, each projected on its own, coloured by class."""
    from pairmill.chain.report import _save, project_2d
    from pairmill.plot import pyplot

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(labels), size=min(PROJECTED, len(labels)), replace=False))
    classes = sorted(set(labels))
    colour = {c: i for i, c in enumerate(classes)}
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), dpi=110)
    method = ""
    for ax, name, x in zip(axes, ("base", "trained"), (base, trained)):
        xy, method = project_2d(x[rows], seed)
        for c in classes:
            mine = np.array([labels[r] == c for r in rows])
            ax.scatter(xy[mine, 0], xy[mine, 1], s=9, color=cmap(colour[c] % cmap.N), label=c)
        ax.set_title(f"{name} model")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="best", fontsize=7, markerscale=1.5)
    fig.suptitle(f"{len(rows)} texts by class, {method}, each model projected on its own", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return {"method": method, "points": int(len(rows)), "file": PROJECTION_PNG}


def format_report(stats: dict) -> str:
    """OUT/report.md: the held-out scores before and after, per class, and the projection."""
    lines = ["# pairmill setfit", "", f"{stats['kept']} labelled texts in {len(stats['classes'])} classes "
             f"({stats['input_rows']} input rows, rejected: {stats['rejected'] or 'none'}); {stats['pairs']['rows']} pairs "
             f"({stats['pairs']['pairs_per_class']} per class), {stats['train']['steps']} SupCon steps.", ""]
    ev = stats["eval"]
    if ev:
        b, a = ev["before"], ev["after"]
        lines += [f"Held-out: {ev['rows']} texts ({ev['data']}).", "", "| | accuracy | macro-F1 |", "|---|---|---|",
                  f"| base model + head | {b['accuracy']:.4f} | {b['macro_f1']:.4f} |",
                  f"| contrastive stage + head | {a['accuracy']:.4f} | {a['macro_f1']:.4f} |", "",
                  "| class | support | F1 base | F1 trained | precision | recall |", "|---|---|---|---|---|---|"]
        for c, m in a["per_class"].items():
            lines.append(f"| {c} | {m['support']} | {b['per_class'][c]['f1']:.3f} | {m['f1']:.3f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} |")
    else:
        lines.append("No held-out set (--eval-data): no scores.")
    p = stats["projection"]
    lines += ["", f"{p['points']} {p['texts']} texts embedded by the base and the trained model, each projected to 2-D by "
              f"{p['method']} on its own, coloured by class: training should pull each class together.", "",
              f"![2-D projection by class, base and trained]({PROJECTION_PNG})", ""]
    return "\n".join(lines)


def format_summary(stats: dict, out: str) -> str:
    from pairmill.output import format_summary as job_summary

    lines = [job_summary(stats, out), f"    classes             {len(stats['classes'])}: {stats['per_class']}",
             f"    pairs               {stats['pairs']['rows']}, {stats['train']['steps']} steps"]
    if stats["eval"]:
        for name in ("before", "after"):
            m = stats["eval"][name]
            lines.append(f"    held-out {name:<10} accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f} ({m['rows']} texts)")
    lines.append(f"    model, head         {Path(out) / 'model'}, {Path(out) / 'head'}  (pairmill classify --model {out})")
    lines.append(f"    report              {Path(out) / 'report.md'}")
    return "\n".join(lines)


def main(args) -> int:
    """``pairmill setfit [LABELLED] -o OUT [--eval-data LABELLED]``."""
    cfg = args.config_sections
    stats = setfit(args.input, args.output, eval_path=args.labelled_eval, encoder=cfg["encoder"], read=cfg["read"],
                   train_cfg=cfg["train"], setfit_cfg=cfg["setfit"], ray=cfg["ray"])
    print(format_summary(stats, args.output))
    return 0
