"""`pairmill run`'s stage reuse (a finished stage with the same fingerprint is skipped) and its
report (report.md + PNGs rendered from the stage outputs alone)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from pairmill.chain.report import render_report
from pairmill.chain.run import Stages, fingerprint, input_identity


def _job(calls: list):
    def job(folder: str) -> dict:
        calls.append(folder)
        os.makedirs(folder, exist_ok=True)
        stats = {"input_rows": len(calls)}
        with open(os.path.join(folder, "stats.json"), "w") as f:
            json.dump(stats, f)
        open(os.path.join(folder, "_SUCCESS"), "w").close()
        return stats

    return job


def test_finished_unchanged_stage_is_reused(tmp_path):
    calls: list = []
    assert Stages(tmp_path, force=False).run("filter", "k1", _job(calls)) == {"input_rows": 1}
    assert Stages(tmp_path, force=False).run("filter", "k1", _job(calls)) == {"input_rows": 1}  # read back, not rerun
    assert len(calls) == 1
    Stages(tmp_path, force=False).run("filter", "k2", _job(calls))  # settings changed
    Stages(tmp_path, force=True).run("filter", "k2", _job(calls))  # --force
    assert len(calls) == 3


def test_unfinished_stage_runs_again(tmp_path):
    calls: list = []
    Stages(tmp_path, force=False).run("mine", "k", _job(calls))
    os.remove(tmp_path / "mine" / "_SUCCESS")  # a folder without its marker is not a finished stage
    Stages(tmp_path, force=False).run("mine", "k", _job(calls))
    assert len(calls) == 2


def test_fingerprint_follows_the_input_files(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "a", "passage": "b"}\n')
    before = fingerprint("filter", input_identity(str(data)), {"k": 2})
    assert before == fingerprint("filter", input_identity(str(data)), {"k": 2})
    assert before != fingerprint("filter", input_identity(str(data)), {"k": 3})
    data.write_text('{"query": "a", "passage": "b"}\n{"query": "c", "passage": "d"}\n')
    assert before != fingerprint("filter", input_identity(str(data)), {"k": 2})


def test_changed_settings_start_over_but_an_interrupted_stage_resumes(tmp_path):
    calls: list = []
    Stages(tmp_path, force=False).run("train", "k1", _job(calls))
    (tmp_path / "train" / "checkpoint").write_text("from k1")
    Stages(tmp_path, force=False).run("train", "k2", _job(calls))  # other settings: the old folder goes
    assert not (tmp_path / "train" / "checkpoint").exists()

    def dies(folder: str) -> dict:
        os.makedirs(folder, exist_ok=True)
        (tmp_path / "train" / "checkpoint").write_text("from k3")
        raise RuntimeError("killed")

    try:
        Stages(tmp_path, force=False).run("train", "k3", dies)
    except RuntimeError:
        pass
    Stages(tmp_path, force=False).run("train", "k3", _job(calls))  # same settings: resumes in place
    assert (tmp_path / "train" / "checkpoint").read_text() == "from k3"


def test_a_stage_redone_says_what_changed_and_removes_its_staging_folder(tmp_path, caplog):
    """A rerun with other train settings deletes the old train folder (checkpoints included) and the
    staging folder of an interrupted run, and says which settings changed."""
    from pairmill.output import resumable_staging

    caplog.set_level(logging.INFO, logger="pairmill")
    calls: list = []
    Stages(tmp_path, force=False).run("train", "k1", _job(calls), {"train": {"lr": 1e-4, "max_steps": 36}})
    resumable_staging(tmp_path / "train").mkdir()  # what an interrupted train run leaves
    (resumable_staging(tmp_path / "train") / "checkpoints").mkdir()
    caplog.clear()
    Stages(tmp_path, force=False).run("train", "k2", _job(calls), {"train": {"lr": 5e-5, "max_steps": 36}})
    out = caplog.text
    assert "train: train.lr changed since the last run: redoing it; deleted" in out
    assert str(tmp_path / "train") in out and str(resumable_staging(tmp_path / "train")) in out
    assert not resumable_staging(tmp_path / "train").exists() and len(calls) == 2
    caplog.clear()
    Stages(tmp_path, force=False).run("train", "k3", _job(calls), {"train": {"lr": 5e-5, "max_steps": 36}})
    assert "its input (a file, or an earlier stage's output) changed" in caplog.text
    caplog.clear()
    Stages(tmp_path, force=True).run("train", "k3", _job(calls), {"train": {"lr": 5e-5, "max_steps": 36}})
    assert "train: --force: redoing it" in caplog.text


def _metrics(ndcg: float, alignment: float) -> dict:
    return {"ndcg@10": ndcg, "recall@1": ndcg / 2, "recall@10": ndcg, "recall@100": 1.0, "mrr@10": ndcg * 0.9,
            "alignment": alignment, "uniformity": -2.5, "queries": 40, "corpus": 40}


def _stage(rows_in: int, kept: int, dropped: dict, steps: list) -> dict:
    return {"input_rows": rows_in, "kept": kept, "dropped": dropped, "rejected": {},
            "stages": [{"name": n, "rows_in": rows_in, "rows_out": kept, "seconds": 1.5} for n in steps]}


def _run_folder(out, *, curve: bool = True, embeddings: bool = True):
    """The stage outputs report.md is rendered from, as `pairmill run` writes them."""
    audit = {"fraction": 0.2, "k": 2, "pool": 100, "corrupted": 20, "clean": 100, "corrupted_removed": 0.9,
             "clean_kept": 0.7, "curve": {"1": {"corrupted_removed": 0.95, "clean_kept": 0.5},
                                          "2": {"corrupted_removed": 0.9, "clean_kept": 0.7}}}
    negatives = {"asked_per_pair": 4, "total": 280, "short_pairs": 3, "padded_random": 0, "pairs_without_negatives": 1,
                 "filtered_by_margin": 12, "near_duplicates": 7, "near_duplicate_rate": 0.025,
                 "mean_positive_score": 0.61, "mean_negative_score": 0.42}
    train = {**_stage(70, 70, {}, ["read+validate", "train", "export"]), "base_model": "tiny",
             "train": {"steps": 6, "pairs_trained": 48, "pairs_per_s": 3.2, "hard_negatives_per_pair": 1},
             "refresh": {"every": 2, "slices": 1, "rounds_started": 2, "rounds_finished": 1, "rounds_skipped": 1,
                         "refreshed_pairs_used": 16, "mean_staleness": 1.25, "seconds_per_round": 9.0,
                         "round_cost_in_steps": 3.0}}
    report = {"base": _metrics(0.40, 1.10), "trained": _metrics(0.55, 0.80), "seconds": 61.0,
              "stages": {"filter": {**_stage(100, 70, {"inconsistent": 25, "semantic_duplicate": 5}, ["encode", "consistency"]),
                                    "audit": audit},
                         "mine": {**_stage(70, 70, {}, ["index", "mine"]), "negatives": negatives},
                         "train": train},
              "config": {"run": {"train": None}, "eval": {"data": None}}}
    (out / "report.json").write_text(json.dumps(report))
    if curve:
        (out / "train").mkdir()
        lines = [{"step": s, "epoch": 0, "lr": 1e-5 * s, "loss": 2.0 - 0.1 * s,
                  **({"refresh_last_step": 2} if s >= 4 else {})} for s in (6, 1, 2, 3, 4, 5)]
        (out / "train" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if embeddings:
        rng = np.random.default_rng(0)
        (out / "eval").mkdir()
        arrays = {f"{m}_{side}": rng.normal(size=(25, 8)).astype(np.float32)
                  for m in ("base", "trained") for side in ("queries", "passages")}
        np.savez(out / "eval" / "embeddings.npz", **arrays)


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_report_md_and_plots_are_rendered_from_the_stage_outputs(tmp_path):
    _run_folder(tmp_path)
    text = render_report(tmp_path).read_text()
    assert "| ndcg@10 | 0.4000 | 0.5500 | +0.1500 |" in text
    assert "| alignment (lower is better) | 1.1000 | 0.8000 | -0.3000 |" in text
    assert "The trained model beats the base model on nDCG@10 (+0.1500)" in text
    assert "| filter | 100 | 70 | inconsistent 25, semantic_duplicate 5 | – | 3.0 |" in text
    assert "removed 0.900 of them and kept 0.700 of the clean pairs" in text and "| 1 | 0.950 | 0.500 |" in text
    assert "| mean cosine: query to its positive | 0.6100 |" in text and "| 0.0250 |" in text
    assert "2 round(s) started, 1 finished, 1 skipped" in text
    assert "Loss 1.9000 at step 1 → 1.4000 at step 6 (6 logged points" in text  # read back in step order
    assert "![training loss](training_curve.png)" in text and "![2-D projection" in text
    assert "25 held-out pairs" in text and "projected to 2-D by " in text
    assert "projected to 2-D by PCA (" in text  # it says which: 50 points are below UMAP_MIN_POINTS
    assert "plain" not in text  # no plain arm yet
    assert _is_png(tmp_path / "training_curve.png") and _is_png(tmp_path / "projection.png")

    # run.plain's arm, when present, adds a column and the verdict, honestly either way
    (tmp_path / "plain").mkdir()
    plain = {"plain": _metrics(0.60, 0.9), "steps": 6, "pairs": 100, "seconds": 20.0}
    (tmp_path / "plain" / "report.json").write_text(json.dumps(plain))
    text = render_report(tmp_path).read_text()
    assert "| ndcg@10 | 0.4000 | 0.5500 | 0.6000 | +0.1500 | +0.2000 |" in text
    assert "does **not** beat plain in-batch training on the raw pairs with the same budget of 6 steps" in text
    assert "(-0.0500)" in text


def test_report_without_curve_or_embeddings_says_so(tmp_path):
    _run_folder(tmp_path, curve=False, embeddings=False)
    text = render_report(tmp_path).read_text()
    assert "no curve" in text and "no projection" in text
    assert not (tmp_path / "training_curve.png").exists() and not (tmp_path / "projection.png").exists()


def test_report_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairmill run"):
        render_report(tmp_path)


def test_eval_stage_scores_each_model_and_keeps_a_sample_of_embeddings(tiny_model, tmp_path):
    from pairmill.config import EncoderConfig, EvalConfig
    from pairmill.evaluate import evaluate_model, load_task
    from pairmill.chain.run import evaluate_stage
    from tests.conftest import literal_pairs, write_jsonl

    heldout = write_jsonl(tmp_path / "heldout.jsonl", literal_pairs(30))
    encoder = EncoderConfig(model=tiny_model, device="cpu")
    stats = evaluate_stage(str(heldout), str(tmp_path / "eval"), {"base": encoder, "trained": encoder}, EvalConfig(), {})
    reference = evaluate_model(encoder, EvalConfig(), load_task(str(heldout)))
    assert stats["base"] == pytest.approx(reference) and stats["trained"] == pytest.approx(reference)
    assert json.loads((tmp_path / "eval" / "stats.json").read_text()) == stats
    assert (tmp_path / "eval" / "_SUCCESS").exists()
    with np.load(tmp_path / "eval" / "embeddings.npz") as data:
        assert sorted(data.files) == ["base_passages", "base_queries", "trained_passages", "trained_queries"]
        q, p = data["base_queries"], data["base_passages"]
    assert q.shape == p.shape == (30, 32)  # every pair (fewer than EVAL_SAMPLE_PAIRS), the tiny model's width
    # row i of both is one pair: the sampled queries sit closer to their own passage than to the others
    sims = q @ p.T
    assert np.mean(np.diag(sims)) > np.mean(sims)
