"""``pairmill run``: the whole chain, on the bundled sample when given nothing.

Today the chain is: read the pairs -> embed them (``OUT/embed``) -> evaluate the base model on
the held-out split -> ``OUT/report.json`` (``{"base": metrics, ...}``). Later stages (filter,
mine, train) slot in between as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pairmill import sample
from pairmill.config import config_to_dict


def main(args) -> int:
    from pairmill.embed import embed, format_summary, read_kwargs
    from pairmill.evaluate import evaluate_model, format_table, load_task

    cfg = args.config_sections
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = cfg["run"].train or str(sample.TRAIN)
    heldout = cfg["eval"].data or str(sample.HELDOUT)
    print(f"[pairmill] run: pairs {train}\n[pairmill] run: held-out {heldout}\n[pairmill] run: output {out}")
    started = time.perf_counter()

    embed_stats = embed(train, str(out / "embed"), mode="pairs", encoder=cfg["encoder"], read=cfg["read"], ray=cfg["ray"])
    print(format_summary(embed_stats, str(out / "embed")))

    task = load_task(heldout, cfg["eval"].corpus, read_kwargs(cfg["read"]))
    base = evaluate_model(cfg["encoder"], cfg["eval"], task)
    report = {
        "base": base,
        "stages": {"embed": {k: embed_stats[k] for k in ("input_rows", "kept", "dropped", "rejected", "truncated")}},
        "config": config_to_dict(cfg),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_table({"base": base}))
    print(f"[pairmill] report: {out / 'report.json'} ({report['seconds']}s)")
    return 0
