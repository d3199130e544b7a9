"""``pairmill run``: the whole chain, on the bundled sample when given nothing.

The chain: the pairs -> ``OUT/filter`` (exact dedup, consistency filter, semantic dedup,
decontamination against the held-out split; encodes the pairs once) -> ``OUT/mine`` (hard
negatives, reusing the filter's embeddings; the sharded index in ``OUT/mine/index``) ->
``OUT/train`` (Ray Train; ``OUT/train/model``) -> the base and the trained model evaluated on the
held-out split -> ``OUT/report.json``. Training never sees the held-out split: no checkpoint is
chosen by it (the final one is exported), so the trained score is not selected on the test data.
With ``run.plain=true`` the chain also trains the comparison it must win (``OUT/plain``): plain
in-batch InfoNCE on the *raw* pairs (no filter, no mined negatives, no refresh) with the steps the
chain trained and every other setting the chain's, evaluated on the same held-out split; report.md
gains a "full chain vs plain" section. The raw pairs hold what decontamination removes from the
chain's, a small advantage to the plain arm that the report states.

Each stage's folder is reused on a rerun when it finished and its fingerprint (the stage's input
and the config it reads) is unchanged, so a failed run resumes at the failed stage; ``--force``
redoes every stage. Fingerprints live in ``OUT/stages.json``.

OUT may be on object storage (``-o s3://bucket/run1``, inputs too): each job commits its folder by
a ``_SUCCESS`` manifest there (``pairmill.output``), the eval and plain stages by a manifest of
their files, stages.json is one object replaced whole, a stage's input is fingerprinted by its
listing (names, sizes, mtimes), and report.md is rendered in a local folder and uploaded.

The base and trained models' held-out metrics (and a fixed sample of their held-out embeddings,
for the report's 2-D projection) are a stage too, ``OUT/eval``. ``OUT/report.md`` (with
``training_curve.png`` and ``projection.png``) is rendered from the folders by ``pairmill.chain.report``.

Sizes. The generic defaults of each section serve ``pairmill filter/mine/train`` at any scale.
``pairmill run`` on the bundled sample with no ``--config`` uses the settings of
``pairmill/sample/run.yaml`` instead (the reason for each is in the file): sized to finish in under
10 minutes on 2 CPUs with the bundled model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from pairmill import sample, storage
from pairmill.config import config_to_dict
from pairmill.output import changed_settings
from pairmill.output import is_finished, remove_job, resumable_staging, write_manifest

log = logging.getLogger(__name__)

EVAL_SAMPLE_PAIRS = 300  # held-out pairs whose embeddings (base and trained) are kept for the report's projection


def sample_overrides(config_path: str | None, overrides: list[str]) -> list[str]:
    """The overrides `pairmill run` loads its config with: the sample profile first (the user's
    settings win) when there is no --config file and the pairs are the bundled sample."""
    if config_path is not None or any(o.split("=", 1)[0].strip() == "run.train" for o in overrides):
        return list(overrides)
    return sample.profile_first("run", overrides)


def cli_overrides(args, overrides: list[str]) -> list[str]:
    """The CLI's hook (``pairmill.cli`` calls it before loading the config): ``sample_overrides``."""
    return sample_overrides(args.config, overrides)


def input_identity(path: str) -> list:
    """What a stage's input is, cheaply: every file's relative path, size and mtime."""
    if storage.is_remote(path):  # a job folder's listing names its attempt: a recommit changes it
        return [list(info) for info in storage.file_infos(path)]
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(f.relative_to(root) if f != root else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs the chain's stages, skipping those whose finished folder has the same fingerprint.
    ``out`` is a local folder or a URI on object storage (stages.json is then one object, replaced whole)."""

    def __init__(self, out: Path | str, force: bool):
        self.out = out
        self.force = force
        self.state_file = storage.join(out, "stages.json")
        self.state = json.loads(storage.read_text(self.state_file)) if storage.exists(self.state_file) else {}

    def run(self, name: str, key: str, job: Callable[[str], dict], settings: dict | None = None) -> dict:
        """``job(folder)`` unless ``OUT/name`` finished with fingerprint ``key``. ``settings``
        (``{section: {key: value}}``, what the stage reads) name what changed when it is redone."""
        folder = storage.join(self.out, name)
        if not self.force and self.state.get(name) == key and is_finished(folder):
            log.info(f"run: {name}: reusing {folder} (same input and settings; --force to redo)")
            return json.loads(storage.read_text(storage.join(folder, "stats.json")))
        # A stage that started with these settings and did not finish keeps its folder, so the job
        # resumes (training from its last checkpoint); other settings, or --force, start it over.
        if self.force or self.state.get(f"{name}:started") != key:
            gone = remove_job(folder)  # the folder and a resumable job's staging folder (checkpoints)
            if gone:
                log.info(f"run: {name}: {self._why(name, key, settings)}: redoing it; deleted "
                         f"{', '.join(str(p) for p in gone)}")
        elif storage.exists(folder) or (not storage.is_remote(folder) and resumable_staging(folder).exists()):
            log.info(f"run: {name}: resuming the unfinished run in {folder} (same input and settings)")
        self.state.pop(name, None)
        self.state[f"{name}:started"] = key
        self.state[f"{name}:settings"] = json.loads(json.dumps(settings or {}, default=str))
        self._save()
        stats = job(folder)
        self.state[name] = key
        self._save()
        return stats

    def _why(self, name: str, key: str, settings: dict | None) -> str:
        if self.force:
            return "--force"
        before = self.state.get(f"{name}:settings")
        changed = changed_settings(before, json.loads(json.dumps(settings or {}, default=str))) if before is not None else []
        if changed:
            return f"{', '.join(changed)} changed since the last run"
        if self.state.get(f"{name}:started") is None:
            return "it has no record in stages.json"
        return "its input (a file, or an earlier stage's output) changed since the last run"

    def _save(self) -> None:
        if storage.is_remote(self.state_file):  # an object appears whole when its upload completes
            storage.write_text(self.state_file, json.dumps(self.state, indent=2))
            return
        tmp = Path(self.state_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)


def main(args) -> int:
    from mining.mine import format_summary as mine_summary
    from mining.mine import mine
    from pairmill.output import format_summary
    from pairmill.config import read_kwargs
    from pairmill.evaluate import format_table
    from pairmill.chain.report import render_report
    from pipelines.filter import filter_pairs
    from training.train import format_summary as train_summary
    from training.train import train as train_model

    cfg = args.config_sections
    out = args.output.rstrip("/") if storage.is_remote(args.output) else Path(args.output).resolve()
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    train = cfg["run"].train or str(sample.TRAIN)
    heldout = cfg["eval"].data or str(sample.HELDOUT)
    log.info(f"run: pairs {train}")
    log.info(f"run: held-out {heldout}")
    log.info(f"run: output {out}")
    started = time.perf_counter()
    stages = Stages(out, force=getattr(args, "force", False))
    sections = config_to_dict(cfg)
    encoder_key = cfg["encoder"].fingerprint()

    filter_cfg = cfg["filter"]
    if cfg["run"].decontaminate:
        filter_cfg = dataclasses.replace(filter_cfg, decontaminate=[*filter_cfg.decontaminate, heldout])
    filter_key = fingerprint("filter", input_identity(train), dataclasses.asdict(filter_cfg), encoder_key,
                             sections["read"], [input_identity(p) for p in filter_cfg.decontaminate])
    filter_stats = stages.run("filter", filter_key, lambda folder: filter_pairs(
        train, folder, options=filter_cfg, encoder=cfg["encoder"], read=cfg["read"], ray=cfg["ray"]),
        {"filter": dataclasses.asdict(filter_cfg), "encoder": sections["encoder"], "read": sections["read"]})
    print(format_summary(filter_stats, storage.join(out, "filter")))
    if not filter_stats["kept"]:
        print(f"pairmill run: the filter kept no pairs (see {storage.join(out, 'filter', 'stats.json')} and dropped/); "
              "nothing to mine or train on. Loosen filter.k / filter.eps or switch stages off.", file=sys.stderr)
        return 1

    mine_key = fingerprint("mine", filter_key, sections["mine"], encoder_key, sections["read"])
    mine_stats = stages.run("mine", mine_key, lambda folder: mine(
        storage.join(out, "filter"), folder, corpus_path=None, encoder=cfg["encoder"], read=cfg["read"],
        mine_cfg=cfg["mine"], ray=cfg["ray"]), {s: sections[s] for s in ("mine", "encoder", "read")})
    print(mine_summary(mine_stats, storage.join(out, "mine")))

    train_key = fingerprint("train", mine_key, sections["train"], encoder_key, sections["read"])
    no_eval = dataclasses.replace(cfg["eval"], data=None)  # held-out data is for the report only
    train_stats = stages.run("train", train_key, lambda folder: train_model(
        storage.join(out, "mine"), folder, encoder=cfg["encoder"], read=cfg["read"], train_cfg=cfg["train"],
        eval_cfg=no_eval, ray=cfg["ray"], mine_cfg=cfg["mine"]), {s: sections[s] for s in ("train", "encoder", "read")})
    print(train_summary(train_stats, storage.join(out, "train")))

    eval_key = fingerprint("eval", train_key, input_identity(heldout), sections["eval"], sections["encoder"],
                           sections["read"], EVAL_SAMPLE_PAIRS)
    trained_encoder = dataclasses.replace(cfg["encoder"], model=storage.join(out, "train", "model"))
    scores = stages.run("eval", eval_key, lambda folder: evaluate_stage(
        heldout, folder, {"base": cfg["encoder"], "trained": trained_encoder}, cfg["eval"], read_kwargs(cfg["read"])),
        {s: sections[s] for s in ("eval", "encoder", "read")})
    base, trained = scores["base"], scores["trained"]
    counts = ("input_rows", "kept", "dropped", "rejected", "stages")
    report = {
        "base": base,
        "trained": trained,
        "train_data": train,
        "heldout_data": heldout,
        "stages": {
            "filter": {**{k: filter_stats[k] for k in counts}, **({"audit": filter_stats["audit"]} if "audit" in filter_stats else {})},
            "mine": {**{k: mine_stats[k] for k in counts}, "negatives": mine_stats["negatives"]},
            "train": {k: v for k, v in train_stats.items() if k not in ("config",)},
        },
        "config": sections,
        "seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=2, default=str))
    columns = {"base": base, "trained": trained}
    if cfg["run"].plain:
        plain = plain_stage(stages, cfg, train, heldout, train_key, train_stats["train"]["steps"])
        columns["plain"] = plain["plain"]
    report_md = render_report(out) if not storage.is_remote(out) else render_remote_report(out)
    print(format_table(columns))
    print(f"[pairmill] report: {report_md} and {storage.join(out, 'report.json')} ({report['seconds']}s)")
    return 0


def plain_stage(stages: Stages, cfg: dict, raw: str, heldout: str, train_key: str, steps: int) -> dict:
    """The plain arm into ``OUT/plain`` (a stage: reused while the chain's training and the settings
    are unchanged); returns ``OUT/plain/report.json``'s content, ``{"plain": metrics, "steps", "pairs", ...}``."""
    from pairmill.config import read_kwargs
    from training.train import train as train_model

    train_cfg = dataclasses.replace(cfg["train"], hard_negatives=0, refresh_every=0, refresh_slices=1, max_steps=steps)
    sections = config_to_dict({**cfg, "train": train_cfg})
    key = fingerprint("plain", train_key, input_identity(raw), sections["train"], cfg["encoder"].fingerprint(),
                      sections["read"], input_identity(heldout), sections["eval"])
    log.info(f"run: plain arm on {raw}: {steps} steps, in-batch negatives only, no refresh")

    def job(folder: str) -> dict:
        started = time.perf_counter()
        if not storage.is_remote(folder):
            os.makedirs(folder, exist_ok=True)
        train_stats = train_model(raw, storage.join(folder, "train"), encoder=cfg["encoder"], read=cfg["read"],
                                  train_cfg=train_cfg, eval_cfg=dataclasses.replace(cfg["eval"], data=None), ray=cfg["ray"])
        plain_encoder = dataclasses.replace(cfg["encoder"], model=storage.join(folder, "train", "model"))
        scores = evaluate_stage(heldout, storage.join(folder, "eval"), {"plain": plain_encoder}, cfg["eval"],
                                read_kwargs(cfg["read"]))
        result = {"plain": scores["plain"], "steps": train_stats["train"]["steps"], "pairs": train_stats["kept"],
                  "train_seconds": train_stats["seconds"], "seconds": round(time.perf_counter() - started, 1)}
        for name in ("report.json", "stats.json"):
            storage.write_text(storage.join(folder, name), json.dumps(result, indent=2))
        _mark_finished(folder, ["report.json", "stats.json"])
        return result

    return stages.run("plain", key, job, {"train": sections["train"]})


def evaluate_stage(heldout: str, folder: str, encoders: dict, eval_cfg, read_kwargs: dict) -> dict:
    """Each encoder's held-out metrics -> ``folder/stats.json`` (``{name: metrics}``), and the
    embeddings of a fixed sample of positive pairs -> ``folder/embeddings.npz`` (``{name}_queries``,
    ``{name}_passages``: (n, D) float32, row i of both = pair i) for the report's projection."""
    import numpy as np

    from pairmill.evaluate import evaluate_model, load_task

    task = load_task(heldout, eval_cfg.corpus, read_kwargs)
    rng = np.random.default_rng(0)
    sample_pairs = rng.permutation(len(task.positives))[:EVAL_SAMPLE_PAIRS]
    qi = np.array([task.positives[i][0] for i in sample_pairs], dtype=np.int64)
    ci = np.array([task.positives[i][1] for i in sample_pairs], dtype=np.int64)
    metrics, arrays = {}, {}
    for name, encoder_cfg in encoders.items():
        log.info(f"run: evaluating the {name} model on {len(task.queries)} held-out queries")
        embeddings: dict = {}
        metrics[name] = evaluate_model(encoder_cfg, eval_cfg, task, keep=embeddings)
        arrays[f"{name}_queries"], arrays[f"{name}_passages"] = embeddings["query"][qi], embeddings["passage"][ci]
    storage.remove(folder)
    with storage.staged(folder) as path:
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "embeddings.npz", **arrays)
    storage.write_text(storage.join(folder, "stats.json"), json.dumps(metrics, indent=2))
    _mark_finished(folder, ["embeddings.npz", "stats.json"])
    return metrics


def _mark_finished(folder: str, names: list[str]) -> None:
    """A stage folder without rows is finished by its _SUCCESS: a time stamp locally, a manifest of
    ``names`` on object storage (``pairmill.output.write_manifest``)."""
    if storage.is_remote(folder):
        write_manifest(folder, names)
    else:
        (Path(folder) / "_SUCCESS").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def render_remote_report(out: str) -> str:
    """``render_report`` for an OUT on object storage: the files it reads are fetched into a local
    folder, rendered there, and report.md with its pictures uploaded beside report.json."""
    from pairmill.chain.report import render_report

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("report.json", "train/metrics.jsonl", "eval/embeddings.npz", "plain/report.json"):
            if storage.exists(storage.join(out, name)):
                storage.download(storage.join(out, name), Path(tmp) / name)
        render_report(tmp)
        for made in sorted(Path(tmp).glob("*")):
            if made.is_file() and made.suffix in (".md", ".png"):
                storage.write_bytes(storage.join(out, made.name), made.read_bytes())
    return storage.join(out, "report.md")
