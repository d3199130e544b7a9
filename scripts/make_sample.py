"""Build the bundled sample (pairmill/sample/) from the FOLDOC and Jargon File pairs.

    python scripts/make_sample.py ../shared/data

Deterministic: a seeded draw of pairs from each file, then a held-out split by a hash of the
normalised query, so a query (and its duplicates) is never on both sides of the split.
"""

import gzip
import hashlib
import json
import random
import sys
from pathlib import Path

from pairmill.pairs import normalize_text

DRAW = {"foldoc_pairs.jsonl.gz": 1900, "jargon_pairs.jsonl.gz": 500}
HELDOUT_PERCENT = 15
SEED = 20261124


def heldout(query: str) -> bool:
    digest = hashlib.sha256(normalize_text(query).lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def main(data_dir: str, out_dir: str = "pairmill/sample") -> None:
    rng = random.Random(SEED)
    rows = []
    for name, n in DRAW.items():
        with gzip.open(Path(data_dir) / name, "rt", encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f]
        rows += rng.sample(pairs, n)
    rng.shuffle(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [r for r in rows if not heldout(r["query"])], "heldout": [r for r in rows if heldout(r["query"])]}
    for split, part in splits.items():
        # mtime=0 keeps the .gz bytes identical from run to run.
        with gzip.GzipFile(out / f"{split}.jsonl.gz", "wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode("utf-8"))
        print(f"{split}: {len(part)} pairs")


if __name__ == "__main__":
    main(*sys.argv[1:])
