"""One file with every kind of bad line pair IO knows, 1 MB texts, duplicate ids, a BOM and CRLF
endings goes through every verb (embed, filter, mine, eval here; run and train, as run's plain arm,
in tests/storage/test_storage.py, on a bucket; tune in tests/tune/test_tune.py) with the tiny model:
each finishes, and every job's counts add up to the lines of the file, counted from the file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pairmill.cli import main
from tests.conftest import WORDS, literal_pairs
from tests.pairmill.test_pairs import BAD_LINES

GOOD_ROWS = 64


def _long_text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_chars // 3)]  # at least 2 characters and a space each
    return " ".join(words)[:n_chars]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    return write_messy(tmp_path_factory.mktemp("messy"))


def write_messy(folder: Path) -> dict:
    """The messy training file and a held-out file in ``folder``, with their line counts."""
    good = [{"id": f"g{i}", **row} for i, row in enumerate(literal_pairs(GOOD_ROWS))]
    good[10]["passage"] = _long_text(1 << 20, 1)  # 1 MB texts: truncated to read.max_chars and counted
    good[11]["query"] = "long query " + _long_text(1 << 20, 2)
    extra = [
        {"id": "g3", "query": "a different pair", "passage": "reusing the id of line four"},  # duplicate_id
        {"id": "g7", "query": "another one", "passage": "reusing the id of line eight"},  # duplicate_id
        {k: v for k, v in good[20].items() if k != "id"},  # a copy of a pair without its id
        {"query": "nul \u0000 inside", "passage": "kept as it is \u0000", "id": 12345},
    ]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good + extra] + [line for line, _ in BAD_LINES]
    path = folder / "messy.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    heldout_rows = [json.dumps(r).encode() for r in literal_pairs(90)[GOOD_ROWS:]] + [line for line, _ in BAD_LINES]
    heldout = folder / "heldout.jsonl"
    heldout.write_bytes(b"\r\n".join(heldout_rows) + b"\n")
    return {"path": str(path), "lines": len(lines), "heldout": str(heldout), "heldout_lines": len(heldout_rows),
            "bad": sorted({reason for _, reason in BAD_LINES}), "folder": folder}


def check_counts(stats: dict, lines: int, bad: list[str], duplicate_ids: int | None = 2) -> None:
    assert stats["input_rows"] == lines
    assert stats["kept"] + sum(stats["dropped"].values()) + sum(stats["rejected"].values()) == lines
    assert set(bad) <= set(stats["rejected"]), set(bad) - set(stats["rejected"])
    if duplicate_ids is not None:
        assert stats["rejected"]["duplicate_id"] == duplicate_ids


def job_stats(folder: Path) -> dict:
    assert (folder / "_SUCCESS").exists()
    return json.loads((folder / "stats.json").read_text())


ENC = ["encoder.batch_size=16"]
MINE = ["mine.shard_cpus=0.5", "mine.num_negatives=2", "mine.range_max=8", "mine.margin_ratio=none"]  # a random model scores all alike


def test_embed_filter_mine_and_eval(ray_session, tiny_model, messy, tmp_path):
    out = tmp_path
    assert main(["embed", messy["path"], "-o", str(out / "embed"), "--model", tiny_model, *ENC]) == 0
    stats = job_stats(out / "embed")
    # the copy without an id hashes to its own id: embed keeps both rows (no exact dedup there)
    check_counts(stats, messy["lines"], messy["bad"])
    assert stats["truncated"] == 2 and stats["kept"] == GOOD_ROWS + 2

    assert main(["filter", messy["path"], "-o", str(out / "filter"), "--model", tiny_model, "filter.k=10", *ENC]) == 0
    stats = job_stats(out / "filter")
    check_counts(stats, messy["lines"], messy["bad"])
    assert stats["dropped"].get("exact_duplicate") == 1 and stats["unique_ids"]

    assert main(["mine", messy["path"], "-o", str(out / "mine"), "--model", tiny_model, *ENC, *MINE]) == 0
    stats = job_stats(out / "mine")
    check_counts(stats, messy["lines"], messy["bad"])
    assert stats["negatives"]["total"] > 0 and stats["index"]["devices"] == ["cpu"]

    assert main(["eval", "--model", tiny_model, "--data", messy["heldout"], "--json", str(out / "m.json")]) == 0
    inputs = json.loads((out / "m.json").read_text())["inputs"][messy["heldout"]]
    assert inputs["input_rows"] == messy["heldout_lines"] and inputs["used"] == 90 - GOOD_ROWS
    assert set(messy["bad"]) <= set(inputs["rejected"])


