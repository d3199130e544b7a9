"""``OUT/report.md`` of ``pairmill run``: a pure function of the run's folder.

Design note. Everything here reads what the stages already wrote and writes three files beside
them, so a report can be re-rendered (``render_report(OUT)``) without running anything again:

    OUT/report.json            base/trained metrics, per-stage stats, the resolved config (run.py)
    OUT/train/metrics.jsonl    training loss per logged step (training/train.py)
    OUT/eval/embeddings.npz    held-out query and positive-passage embeddings of a fixed sample,
                               base and trained (run.py's eval stage)
    OUT/plain/report.json      optional: plain in-batch training on the raw pairs with the same step
                               budget, evaluated the same way (``run.plain=true``)
 -> OUT/report.md, OUT/training_curve.png, OUT/projection.png

The projection is UMAP when ``umap`` is importable (umap-learn is a dependency; its numba kernels
compile on the first projection in a process, 15-20 s on 2 cores, then a projection of the run's 600
points takes about 2 s) and the sample has at least ``UMAP_MIN_POINTS``, else PCA (scikit-learn);
the report names which. Each model's sample is
projected on its own (the two embedding spaces are different functions), queries and passages
together, with a line from each query to its positive passage: training should shorten them.
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pairmill.plot import pyplot

METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "alignment", "uniformity")
LOWER_IS_BETTER = {"alignment", "uniformity"}
CURVE_PNG = "training_curve.png"
PROJECTION_PNG = "projection.png"
EMBEDDINGS = Path("eval") / "embeddings.npz"
PLAIN_REPORT = Path("plain") / "report.json"
LINKED_PAIRS = 60  # query-passage lines drawn per panel (all points are drawn)


# ----------------------------------------------------------------------------- inputs


def read_curve(path: Path) -> list[dict]:
    """The logged training steps, in step order (a resumed run may have rewritten the tail)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


# Below this many points (a held-out split of under 50 pairs) PCA: UMAP's 15-neighbour graph over so
# few points says little, and its one-time compile would cost more than the rest of the report.
UMAP_MIN_POINTS = 100


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) and the method's name: UMAP when installed (and N >= UMAP_MIN_POINTS), else PCA."""
    umap = None
    if len(x) >= UMAP_MIN_POINTS:
        try:
            import umap  # umap-learn: a dependency, absent only from an install made without it
        except ImportError:
            umap = None
    if umap is not None:
        # init="pca": a deterministic start that compiled and ran in about half the time of the
        # spectral one on a fresh process here (the projection shows neighbourhoods, not a global shape)
        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=15, init="pca")
        return reducer.fit_transform(x), "UMAP (cosine)"
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(x)
    share = pca.explained_variance_ratio_.sum()
    return pca.transform(x), f"PCA ({share:.0%} of the variance)"


# ----------------------------------------------------------------------------- plots


def plot_curve(curve: list[dict], path: Path) -> None:
    """Loss per logged step, with the learning rate on a second axis."""
    plt = pyplot()
    steps = [r["step"] for r in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(steps, [r["loss"] for r in curve], marker="o", markersize=3, color="tab:blue", label="InfoNCE loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean since the previous point)")
    lr = ax.twinx()
    lr.plot(steps, [r.get("lr", np.nan) for r in curve], color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
    lr.set_ylabel("learning rate")
    refreshed = [r["step"] for r in curve if r.get("refresh_last_step") is not None]
    if refreshed:  # the first logged step that trains on a finished refresh round's negatives
        ax.axvline(refreshed[0], color="tab:green", linewidth=1, linestyle=":", label="first refresh round in use")
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    ax.set_title("training loss")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_projection(embeddings: dict[str, np.ndarray], path: Path, seed: int = 0) -> dict:
    """Base and trained samples side by side; returns the method and the sample size."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=110)
    n = len(embeddings["base_queries"])
    method = ""
    for ax, model in zip(axes, ("base", "trained")):
        q, p = embeddings[f"{model}_queries"], embeddings[f"{model}_passages"]  # (n, D) each, row i = pair i
        xy, method = project_2d(np.concatenate([q, p]), seed)
        qxy, pxy = xy[:n], xy[n:]  # (n, 2) each
        for i in range(min(LINKED_PAIRS, n)):
            ax.plot([qxy[i, 0], pxy[i, 0]], [qxy[i, 1], pxy[i, 1]], color="0.6", linewidth=0.6, zorder=1)
        ax.scatter(pxy[:, 0], pxy[:, 1], s=9, color="tab:orange", label="passages", zorder=2)
        ax.scatter(qxy[:, 0], qxy[:, 1], s=9, color="tab:blue", marker="^", label="queries", zorder=3)
        ax.set_title(f"{model} model")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{n} held-out pairs, {method}; lines join {min(LINKED_PAIRS, n)} queries to their passages", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return {"method": method, "pairs": n}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- markdown


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _reasons(counts: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "–"


def metrics_table(columns: dict[str, dict]) -> list[str]:
    """One row per metric, one column per model, and each model's change over the first column."""
    names = list(columns)
    first = names[0]
    head = ["metric", *names, *(f"{n} − {first}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in METRICS:
        better = "lower is better" if key in LOWER_IS_BETTER else ""
        values = [columns[n][key] for n in names]
        deltas = [f"{v - values[0]:+.4f}" for v in values[1:]]
        label = f"{key} ({better})" if better else key
        lines.append("| " + " | ".join([label, *(_num(v) for v in values), *deltas]) + " |")
    return lines


def comparison_verdict(chain: dict, plain: dict, steps: int | None) -> str:
    """The sentence the issue asks for: does the full chain beat plain in-batch training, by how much."""
    gap = chain["ndcg@10"] - plain["ndcg@10"]
    budget = f" with the same budget of {steps} steps" if steps else ""
    if gap > 0:
        return (f"The full chain (filter + mined negatives + refresh) beats plain in-batch training on the raw pairs"
                f"{budget}: nDCG@10 {chain['ndcg@10']:.4f} vs {plain['ndcg@10']:.4f} ({gap:+.4f}).")
    return (f"The full chain (filter + mined negatives + refresh) does **not** beat plain in-batch training on the raw "
            f"pairs{budget}: nDCG@10 {chain['ndcg@10']:.4f} vs {plain['ndcg@10']:.4f} ({gap:+.4f}).")


def format_report(report: dict, curve: list[dict], plain: dict | None, projection: dict | None) -> str:
    base, trained = report["base"], report["trained"]
    stages = report["stages"]
    train_stats = stages["train"]
    t = train_stats.get("train", {})
    cfg = report.get("config", {})
    lines = [
        "# pairmill run report",
        "",
        f"Pairs: `{report.get('train_data', cfg.get('run', {}).get('train') or 'bundled sample (train split)')}`; "
        f"held-out: `{report.get('heldout_data', cfg.get('eval', {}).get('data') or 'bundled sample (held-out split)')}`; "
        f"base model `{train_stats.get('base_model', '?')}`; trained model `train/model`; "
        f"{_num(report.get('seconds'), 1)} s in all. Every number below is in `report.json`.",
        "",
        "## Held-out retrieval: base vs trained",
        "",
        f"{base['queries']} queries against a corpus of {base['corpus']} passages; the held-out split never reaches "
        "training (decontaminated, and no checkpoint is chosen by it).",
        "",
    ]
    columns = {"base": base, "trained": trained}
    if plain:
        columns["plain"] = plain["plain"]
    lines += metrics_table(columns)
    lines += ["", f"The trained model {'beats' if trained['ndcg@10'] > base['ndcg@10'] else 'does **not** beat'} the base "
              f"model on nDCG@10 ({trained['ndcg@10'] - base['ndcg@10']:+.4f})."]
    if plain:
        lines += [
            "",
            "## Full chain vs plain in-batch training",
            "",
            comparison_verdict(trained, plain["plain"], plain.get("steps")),
            "",
            f"Plain: `training.train.train` on the raw pairs ({plain.get('pairs', '?')} pairs: no filter, no mined "
            f"negatives, no refresh; they still hold any pair decontamination removes from the chain's), `train.hard_negatives=0`, `train.refresh_every=0`, the other train settings and "
            f"the step budget ({plain.get('steps', '?')} steps) the same; {_num(plain.get('seconds'), 1)} s. "
            "Made by `pairmill run run.plain=true`.",
        ]
    lines += ["", "## Counts per stage", "",
              "| stage | input rows | kept | dropped (by reason) | rejected (by reason) | seconds |", "|---|---|---|---|---|---|"]
    for name in ("filter", "mine", "train"):
        s = stages[name]
        # the job's wall time (its steps overlap in a streaming pipeline and leave out start-up)
        seconds = s.get("seconds", sum(x["seconds"] for x in s.get("stages", [])))
        lines.append(f"| {name} | {s['input_rows']} | {s['kept']} | {_reasons(s['dropped'])} | {_reasons(s['rejected'])} | {seconds:.1f} |")
    lines += ["", "Steps within each stage:", "", "| stage | step | rows in | rows out | seconds |", "|---|---|---|---|---|"]
    for name in ("filter", "mine", "train"):
        for step in stages[name].get("stages", []):
            lines.append(f"| {name} | {step['name']} | {step['rows_in']} | {step['rows_out']} | {step['seconds']:.1f} |")
    audit = stages["filter"].get("audit")
    if audit:
        lines += [
            "", "## Filter audit", "",
            f"{audit['corrupted']} corrupted pairs (a query given another pair's passage, {audit['fraction']:.0%} of the "
            f"input) were mixed in and scored against a pool of {audit['pool']}. With k={audit['k']} the consistency filter "
            f"removed {_num(audit['corrupted_removed'], 3)} of them and kept {_num(audit['clean_kept'], 3)} of the clean pairs.",
            "", "| k | corrupted removed | clean kept |", "|---|---|---|",
        ]
        lines += [f"| {k} | {_num(v['corrupted_removed'], 3)} | {_num(v['clean_kept'], 3)} |" for k, v in audit["curve"].items()]
    auto = stages["filter"].get("consistency", {}).get("auto")
    if auto:
        share = auto["curve"][str(auto["k"])]
        looks = "" if auto.get("mismatched") is None else f"; up to {_num(auto['mismatched'], 3)} of the pairs look mismatched"
        lines += ["", f"filter.k=auto chose **k={auto['k']}**: {auto['rule']}, measured before filtering on {auto['clean']} "
                  f"pairs and {auto['corrupted']} corrupted ones{looks} (at k={auto['k']}: {_num(share['clean_kept'], 3)} of "
                  f"the pairs kept, {_num(share['corrupted_removed'], 3)} of the corrupted ones removed)."]
    neg = stages["mine"].get("negatives", {})
    if neg:
        lines += [
            "", "## Hard negatives", "",
            "| | |", "|---|---|",
            f"| negatives asked per pair | {neg.get('asked_per_pair')} |",
            f"| negatives mined | {neg.get('total')} |",
            f"| pairs short of the asked count / without any | {neg.get('short_pairs')} / {neg.get('pairs_without_negatives')} |",
            f"| candidates dropped by the positive-aware margin | {neg.get('filtered_by_margin')} |",
            f"| mean cosine: query to its positive | {_num(neg.get('mean_positive_score'))} |",
            f"| mean cosine: query to its negatives | {_num(neg.get('mean_negative_score'))} |",
            f"| near-duplicate rate (negative ≥ 0.95 cosine to the positive passage) | {_num(neg.get('near_duplicate_rate'))} |",
        ]
    lines += ["", "## Training", ""]
    if t:
        lines.append(f"{t.get('steps')} steps, {t.get('pairs_trained')} pairs ({t.get('pairs_per_s')} pairs/s), "
                     f"{t.get('hard_negatives_per_pair')} hard negative(s) per pair.")
    refresh = train_stats.get("refresh")
    if refresh:
        lines.append(
            f"Negative refresh every {refresh['every']} steps ({refresh['slices']} slice(s)): {refresh['rounds_started']} "
            f"round(s) started, {refresh['rounds_finished']} finished, {refresh['rounds_skipped']} skipped "
            f"(due while the previous round still ran), {refresh['refreshed_pairs_used']} pair-steps trained on refreshed negatives, mean "
            f"staleness {_num(refresh.get('mean_staleness'), 2)} steps; a round took {_num(refresh.get('seconds_per_round'), 1)} s "
            f"= {_num(refresh.get('round_cost_in_steps'), 1)} steps."
        )
    if curve:
        lines += ["", f"Loss {curve[0]['loss']:.4f} at step {curve[0]['step']} → {curve[-1]['loss']:.4f} at step "
                  f"{curve[-1]['step']} ({len(curve)} logged points, `train/metrics.jsonl`).", "",
                  f"![training loss]({CURVE_PNG})"]
    else:
        lines.append("No logged training steps (`train/metrics.jsonl` is missing or empty): no curve.")
    lines += ["", "## Embeddings before and after training", ""]
    if projection:
        lines += [
            f"{projection['pairs']} held-out pairs (a fixed sample), each query and its positive passage, embedded by "
            f"the base and the trained model and projected to 2-D by {projection['method']}, each model on its own. "
            f"Alignment (mean squared distance of a query to its positive, whole held-out split): "
            f"{base['alignment']:.4f} → {trained['alignment']:.4f}; uniformity: {base['uniformity']:.4f} → "
            f"{trained['uniformity']:.4f} (both lower is better).",
            "", f"![2-D projection of held-out embeddings, base and trained]({PROJECTION_PNG})",
        ]
    else:
        lines.append(f"No `{EMBEDDINGS}`: no projection.")
    lines += ["", "## Settings", "", "The resolved configuration of every section is `config` in `report.json`; the "
              "train job's own copy is `train/config.yaml`."]
    return "\n".join(lines) + "\n"


def render_report(out: str | Path) -> Path:
    """Read the run folder's outputs; write report.md and its PNGs there; return report.md's path."""
    out = Path(out)
    report_path = out / "report.json"
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path} not found: run `pairmill run -o {out}` first")
    report = json.loads(report_path.read_text())
    curve = read_curve(out / "train" / "metrics.jsonl")
    if curve:
        plot_curve(curve, out / CURVE_PNG)
    projection = None
    if (out / EMBEDDINGS).exists():
        with np.load(out / EMBEDDINGS) as data:
            projection = plot_projection({k: data[k] for k in data.files}, out / PROJECTION_PNG)
    plain = json.loads((out / PLAIN_REPORT).read_text()) if (out / PLAIN_REPORT).exists() else None
    text = format_report(report, curve, plain, projection)
    tmp = out / ".report.md.partial"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    return out / "report.md"
