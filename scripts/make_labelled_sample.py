"""Build the bundled labelled sample (pairmill/sample/labelled_*.jsonl.gz) for pairmill setfit and
classify: FOLDOC entries labelled by their one <domain> tag.

    python scripts/make_labelled_sample.py ../shared/data

A FOLDOC definition opens with its domain in angle brackets ("<networking> A protocol ..."). Entries
with exactly one tag from CLASSES are kept; the tag is removed from the text (it is the label),
cross-reference braces are dropped ("{TCP}" -> "TCP") and the closing date "(1998-09-17)" too. The
text is "headword: definition", cut at a word boundary near MAX_CHARS. Entries shorter than
MIN_CHARS are mostly pointers to another entry ("<networking> {Transmission Control Protocol}")
and are left out, which also keeps an abbreviation and its expansion from straddling the split.
Deterministic: per class a seeded draw of HELDOUT held-out and TRAIN training entries.
"""

import gzip
import json
import random
import re
import sys
from pathlib import Path

CLASSES = ("language", "networking", "operating system", "hardware", "company", "mathematics", "storage", "database")
TRAIN, HELDOUT = 64, 40
MIN_CHARS, MAX_CHARS = 80, 360
SEED = 20261202
TAG = re.compile(r"<([^<>]{1,60})>")


def labelled(row: dict) -> dict | None:
    passage = row["passage"]
    match = TAG.search(passage[:300])
    if not match:
        return None
    tags = [t.strip() for t in match.group(1).split(",")]
    if len(tags) != 1 or tags[0] not in CLASSES:
        return None
    body = passage[match.end():]
    body = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", body).replace("{", "").replace("}", "")
    body = " ".join(body.split())
    if len(body) < MIN_CHARS:
        return None
    text = f"{row['query']}: {body}"
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
    return {"text": text, "label": tags[0]}


def labelled_rows(data_dir: str) -> list[dict]:
    """Every FOLDOC entry with one tag of CLASSES, labelled, in file order; a text seen before (case
    ignored) is left out."""
    rows, seen = [], set()
    with gzip.open(Path(data_dir) / "foldoc_pairs.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = labelled(json.loads(line))
            if row and row["text"].lower() not in seen:
                seen.add(row["text"].lower())
                rows.append(row)
    return rows


def main(data_dir: str, out_dir: str = "pairmill/sample") -> None:
    rng = random.Random(SEED)
    by_class: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for row in labelled_rows(data_dir):
        by_class[row["label"]].append(row)
    splits = {"train": [], "heldout": []}
    for label, rows in by_class.items():
        if len(rows) < TRAIN + HELDOUT:
            raise SystemExit(f"{label}: only {len(rows)} entries, need {TRAIN + HELDOUT}")
        drawn = rng.sample(rows, TRAIN + HELDOUT)
        splits["heldout"] += drawn[:HELDOUT]
        splits["train"] += drawn[HELDOUT:]
    for split, rows in splits.items():
        rng.shuffle(rows)
        # mtime=0 keeps the .gz bytes identical from run to run.
        with gzip.GzipFile(Path(out_dir) / f"labelled_{split}.jsonl.gz", "wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        print(f"labelled_{split}: {len(rows)} rows, {len(CLASSES)} classes")


if __name__ == "__main__":
    main(*sys.argv[1:])
