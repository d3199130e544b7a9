"""The ``pairmill`` command: one verb per job, each verb's ``main`` in its own module."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from pathlib import Path
from typing import get_origin, get_type_hints

from pairmill.config import SECTIONS, ConfigError, load_config
from pairmill.config_text import override_text
from pairmill.log import configure

# verb -> (module with main(args), config sections it reads, one-line help)
VERBS = {
    "embed": ("pairmill.embed", ("encoder", "read", "ray"), "texts or pairs -> embeddings (parquet)"),
    "eval": ("pairmill.evaluate", ("encoder", "read", "eval"), "retrieval metrics of a model on held-out data"),
    "filter": ("pipelines.filter", ("encoder", "read", "filter", "ray"), "raw pairs -> kept pairs (dedup, consistency filter, semantic dedup)"),
    "mine": ("mining.mine", ("encoder", "read", "mine", "ray"), "pairs -> pairs with mined hard negatives (+ the sharded index)"),
    "train": ("training.train", ("encoder", "read", "train", "eval", "mine", "ray"), "pairs (with or without negatives) -> a trained model in OUT/model"),
    "tune": ("tune.tune", ("tune", "encoder", "read", "train", "eval", "mine", "ray"),
             "many train runs (Ray Tune, ASHA) -> OUT/best_model + results.csv; the defaults are the first trial"),
    "run": ("pairmill.chain.run", ("run", "encoder", "read", "filter", "mine", "train", "eval", "ray"), "the whole chain (the bundled sample by default)"),
    "setfit": ("pairmill.chain.setfit", ("setfit", "encoder", "read", "train", "ray"),
               "labelled texts -> a few-shot classifier: pairs from labels, SupCon on Ray Train, a logistic-regression "
               "head (OUT/model, OUT/head); the bundled FOLDOC domains by default"),
    "classify": ("pairmill.classify", ("setfit", "encoder", "read"),
                 "texts -> classes by a `pairmill setfit` folder (--model): probabilities, nearest labelled neighbours' agreement"),
    "distill": ("pairmill.distill", ("encoder", "distill"),
                "a static-embedding model (model2vec) from --model: ~100x faster to encode on CPUs, for filtering at scale"),
}


# flag -> config key; flags win over the YAML file and key=value overrides
FLAG_KEYS = {
    "model": "encoder.model",
    "query_field": "read.query_field",
    "passage_field": "read.passage_field",
    "text_field": "read.text_field",
    "data": "eval.data",
    "eval_data": "eval.data",
    "refresh_every": "train.refresh_every",
    "num_samples": "tune.num_samples",
    "corpus": "eval.corpus",
    "decontaminate": "filter.decontaminate",
    "audit": "filter.audit",
}


def describe(sections: dict[str, type]) -> str:
    """The valid keys with defaults and help, for `--help` epilogues."""
    lines = []
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            default = repr(f.default) if isinstance(f.default, str) else "empty" if f.default is None else override_text(f.default)
            free = " (may change when a run resumes)" if f.metadata.get("resume_free") else ""
            lines.append(f"  {name}.{f.name} (default {default}): {f.metadata.get('help', '')}{free}")
    return "\n".join(lines)


def _flag(p: argparse.ArgumentParser, dest: str, help: str | None = None, **kw) -> None:
    """The flag ``--dest`` for the setting ``FLAG_KEYS[dest]``: typed (int, float, a list) as its
    field is, and helped by the field's own line unless the verb says more."""
    section, name = FLAG_KEYS[dest].split(".")
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    hint = get_type_hints(SECTIONS[section])[name]
    if get_origin(hint) is list:
        kw["nargs"] = "+"
    elif hint in (int, float):
        kw["type"] = hint
    p.add_argument("--" + dest.replace("_", "-"), help=f"{help or field.metadata['help']} ({FLAG_KEYS[dest]})", **kw)


def _add_common(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    p.add_argument("--config", help="YAML file with sections of settings (see the keys below)")
    _flag(p, "model", model_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. encoder.batch_size=64")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=logging.INFO, help="print warnings and errors only, not progress lines")
    shown.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       help="print debug lines too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairmill", description="Raw text pairs to trained embedding models, on Ray.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, (_, sections, help_text) in VERBS.items():
        epilog = "settings (--config FILE.yaml sections, or key=value):\n" + describe({s: SECTIONS[s] for s in sections})
        p = sub.add_parser(verb, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if verb == "embed":
            p.add_argument("input", help="JSONL(.gz), text lines, Parquet, a saved HF dataset, or a pairmill job folder")
            p.add_argument("-o", "--output", required=True, help="output folder (kept/, rejected/, stats.json)")
            _flag(p, "text_field", "embed one text column instead of (query, passage) pairs")
        if verb == "eval":
            _flag(p, "data", "held-out pairs file or BEIR folder")
            _flag(p, "corpus")
            p.add_argument("--json", help="write the metrics to this JSON file")
        if verb == "mine":
            p.add_argument("input", help="pairs: JSONL(.gz), Parquet, a saved HF dataset, or a pairmill job folder")
            p.add_argument("-o", "--output", required=True, help="output folder (kept/, rejected/, index/, stats.json)")
            p.add_argument("--corpus", dest="extra_corpus", help="extra passages to mine from (a `text` column)")
        if verb == "filter":
            p.add_argument("input", help="JSONL(.gz), Parquet, a saved HF dataset, or a pairmill job folder")
            p.add_argument("-o", "--output", required=True, help="output folder (kept/, dropped/, rejected/, stats.json)")
            _flag(p, "decontaminate", metavar="FILE")
            _flag(p, "audit", metavar="FRACTION")
        if verb == "train":
            p.add_argument("input", help="pairs: JSONL(.gz), Parquet, a saved HF dataset, or a pairmill job folder (e.g. mine's); "
                           "with train.simcse=true plain texts: a .txt file (one a line) or rows with a `text` column")
            p.add_argument("-o", "--output", required=True, help="output folder (model/, config.yaml, metrics.jsonl, checkpoints/, stats.json)")
            _flag(p, "eval_data", "held-out pairs file or BEIR folder evaluated during training")
            _flag(p, "refresh_every", "re-mine hard negatives with the current model every N steps, beside training", metavar="N")
        if verb == "tune":
            p.description = (
                f"{help_text}. Each trial is a whole `pairmill train` run; ASHA stops trials that trail on the held-out "
                "metric (tune.metric, reported every train.eval_every steps). The train section's own values are always "
                "the first trial, so the best trial is never worse than the defaults on that metric. Rerunning the same "
                "command into the same OUT resumes an interrupted run.")
            p.add_argument("input", nargs="?", help="pairs: JSONL(.gz), Parquet, a saved HF dataset, or a pairmill job "
                           "folder; empty = the bundled sample's train split (with no --config, sized to finish in minutes: "
                           "pairmill/sample/tune.yaml)")
            p.add_argument("-o", "--output", required=True, help="output folder (best_model/, results.csv, trials.png, "
                           "trials/, stats.json)")
            _flag(p, "num_samples", "trials, the default settings included", metavar="N")
            _flag(p, "eval_data", "held-out pairs file or BEIR folder the trials are ranked on; default: the bundled "
                  "held-out split when PAIRS is the bundled sample, else required")
        if verb == "setfit":
            p.add_argument("input", nargs="?", help="labelled texts: JSONL(.gz), Parquet or a saved HF dataset with `text` and "
                           "`label` columns (read.text_field, read.label_field); empty = the bundled FOLDOC domains, "
                           "held out on their own split")
            p.add_argument("-o", "--output", required=True, help="output folder (model/, head/, kept/, rejected/, pairs/, "
                           "train/, report.md, projection.png, stats.json)")
            p.add_argument("--eval-data", dest="labelled_eval", metavar="LABELLED",
                           help="held-out labelled texts: accuracy, macro-F1 and a per-class report before and after training")
        if verb == "classify":
            p.add_argument("input", help="texts to classify: JSONL(.gz), .txt, Parquet or a saved HF dataset with a `text` "
                           "column; a `label` column, where present, is scored against")
            p.add_argument("-o", "--output", required=True, help="output folder (kept/: predictions, rejected/, stats.json)")
        if verb == "setfit":
            p.description = (f"{help_text}. It trains with train.objective=supcon and train.group_by=source (SupCon over "
                             "the labels) whatever the config says; with no --config, pairmill/sample/setfit.yaml's settings "
                             "come first (key=value overrides win).")
        if verb in ("setfit", "classify"):
            _flag(p, "text_field", "input column holding the text")
        if verb == "distill":
            p.add_argument("-o", "--output", required=True, help="output folder: a sentence-transformers model (+ distill.json)")
        if verb == "run":
            p.add_argument("-o", "--output", default="pairmill-out", help="output folder (default ./pairmill-out)")
            p.add_argument("--force", action="store_true", help="redo every stage (default: reuse finished, unchanged ones)")
        if verb in ("embed", "eval", "mine", "filter", "train"):
            _flag(p, "query_field")
            _flag(p, "passage_field")
        _add_common(p, "the folder `pairmill setfit -o DIR` wrote (DIR, or DIR/model)" if verb == "classify" else None)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The verb's arguments, with ``config_sections`` loaded from --config, the flags and key=value
    overrides (a ConfigError naming the verb when a setting is bad). Starts nothing; ``main`` runs the verb."""
    parser = build_parser()
    # key=value may follow options (`embed IN -o OUT encoder.batch_size=64`), which argparse's
    # positional matching does not allow: collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    module, sections, _ = VERBS[args.verb]
    overrides = list(args.overrides) + extra
    if args.verb == "tune" and args.input and "=" in args.input and not Path(args.input).exists():
        overrides.insert(0, args.input)  # PAIRS is optional there: argparse took the first key=value for it
        args.input = None
    overrides += [f"{key}={override_text(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
                  if getattr(args, flag, None) is not None]
    # A verb's module may adjust the overrides first: `run` and `tune` add their sample-sized profile
    # when given no --config on the bundled sample (pairmill/sample/run.yaml, tune.yaml).
    hook = getattr(importlib.import_module(module), "cli_overrides", None)
    if hook is not None:
        overrides = hook(args, overrides)
    try:
        args.config_sections = load_config({s: SECTIONS[s] for s in sections}, args.config, overrides)
    except ConfigError as e:
        raise ConfigError(f"pairmill {args.verb}: {e}") from None
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    configure(args.log_level)  # what the verb's log lines show; its errors and summary print regardless
    if "encoder" in args.config_sections:  # a model that cannot load fails here, before any Ray work
        from pairmill.encoder import check_model

        try:
            check_model(args.config_sections["encoder"].model)
        except (ValueError, FileNotFoundError) as e:
            print(f"pairmill {args.verb}: {e}", file=sys.stderr)
            return 2
    return importlib.import_module(VERBS[args.verb][0]).main(args)


if __name__ == "__main__":
    sys.exit(main())
