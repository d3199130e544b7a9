"""Package-registry pairs: (package name -> its one-line summary) as (query -> passage), a large,
real, noisy pair source of CCPairs' kind (template summaries, copies under many names, empty
summaries, other languages).

    python scripts/make_registry_pairs.py ../shared/data/pypi_summaries.tsv.gz registry.jsonl.gz
    python scripts/make_registry_pairs.py TSV registry-250k.jsonl.gz --rows 250000

The input is a TSV with a header and the columns ``name`` and ``summary``. Every row becomes one
JSONL line ``{"id": name, "query": ..., "passage": summary, "source": "pypi"}``; the query is the
name with ``-``, ``_`` and ``.`` as spaces (``0-core-client`` -> ``0 core client``), the form a
person would type. Nothing is cleaned: empty summaries stay (pairmill rejects them as
``empty_text``), templates and copies stay (for the filter to find). ``--rows N`` keeps a seeded
random N of the rows, in input order. Nothing derived from the data is committed: the paths are
arguments.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys

SEPARATORS = re.compile(r"[-_.]+")


def query_of(name: str) -> str:
    return SEPARATORS.sub(" ", name).strip() or name


def read_rows(path: str):
    """(name, summary) per data line; a line without the two fields is reported and skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header[:2] != ["name", "summary"]:
            raise SystemExit(f"{path}: expected a header 'name<TAB>summary', found {header!r}")
        for number, line in enumerate(f, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                print(f"{path}:{number}: {len(fields)} fields, expected 2: skipped", file=sys.stderr)
                continue
            yield fields[0], fields[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", help="name<TAB>summary file (gzip or plain), e.g. ../shared/data/pypi_summaries.tsv.gz")
    parser.add_argument("out", help="output JSONL (.jsonl or .jsonl.gz)")
    parser.add_argument("--rows", type=int, help="keep a seeded random sample of this many rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = list(read_rows(args.tsv))
    if args.rows is not None and args.rows < len(rows):
        keep = set(random.Random(args.seed).sample(range(len(rows)), args.rows))
        rows = [row for i, row in enumerate(rows) if i in keep]
    opener = gzip.open if args.out.endswith(".gz") else open
    with opener(args.out, "wt", encoding="utf-8") as f:
        for name, summary in rows:
            f.write(json.dumps({"id": name, "query": query_of(name), "passage": summary, "source": "pypi"},
                               ensure_ascii=False) + "\n")
    empty = sum(not summary.strip() for _, summary in rows)
    print(f"{args.out}: {len(rows)} pairs ({empty} with an empty summary)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
