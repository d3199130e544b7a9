"""``pairmill run``: the whole chain, on the bundled sample when given nothing.

Today the chain is: the pairs -> mine hard negatives (``OUT/mine``: encodes the pairs, builds the
sharded index in ``OUT/mine/index``) -> evaluate the base model on the held-out split ->
``OUT/report.json`` (``{"base": metrics, "stages": ...}``). Filter and train slot in around the
mine stage as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pairmill import sample
from pairmill.config import config_to_dict


def main(args) -> int:
    from mining.mine import format_summary, mine
    from pairmill.embed import read_kwargs
    from pairmill.evaluate import evaluate_model, format_table, load_task

    cfg = args.config_sections
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = cfg["run"].train or str(sample.TRAIN)
    heldout = cfg["eval"].data or str(sample.HELDOUT)
    print(f"[pairmill] run: pairs {train}\n[pairmill] run: held-out {heldout}\n[pairmill] run: output {out}")
    started = time.perf_counter()

    mine_stats = mine(train, str(out / "mine"), corpus_path=None, encoder=cfg["encoder"], read=cfg["read"],
                      mine_cfg=cfg["mine"], ray=cfg["ray"])
    print(format_summary(mine_stats, str(out / "mine")))

    task = load_task(heldout, cfg["eval"].corpus, read_kwargs(cfg["read"]))
    base = evaluate_model(cfg["encoder"], cfg["eval"], task)
    report = {
        "base": base,
        "stages": {"mine": {k: mine_stats[k] for k in ("input_rows", "kept", "dropped", "rejected", "negatives", "stages")}},
        "config": config_to_dict(cfg),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_table({"base": base}))
    print(f"[pairmill] report: {out / 'report.json'} ({report['seconds']}s)")
    return 0
