"""The job folder contract (DESIGN.md): ``kept/``, ``dropped/``, ``rejected/``, ``stats.json``,
then ``_SUCCESS`` last, written atomically.

A job writes into a hidden staging folder beside ``OUT`` and renames it into place only after
``stats.json`` and ``_SUCCESS`` are written, so a reader never sees a half-written folder and a
rerun into an existing ``OUT`` never mixes old and new files. Staging needs ``OUT``'s parent to
be a local or shared (NFS) filesystem that every Ray node writes to.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

PARTS = ("kept", "dropped", "rejected")


class StatsMismatch(RuntimeError):
    pass


class JobFolder:
    def __init__(self, out: str | Path):
        self.final = Path(out).expanduser().resolve()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.final.parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        for part in PARTS:
            (self.staging / part).mkdir()
        self.stages: list[dict[str, Any]] = []

    def path(self, part: str) -> str:
        return str(self.staging / part)

    def stage(self, name: str, rows_in: int, rows_out: int, seconds: float) -> None:
        self.stages.append({"name": name, "rows_in": rows_in, "rows_out": rows_out, "seconds": round(seconds, 3)})

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Check the accounting, write stats.json and _SUCCESS, and move the folder into place."""
        stats = {"stages": self.stages, **stats}
        accounted = stats["kept"] + sum(stats["dropped"].values()) + sum(stats["rejected"].values())
        if accounted != stats["input_rows"]:
            raise StatsMismatch(
                f"{stats['input_rows']} input rows but {accounted} accounted for "
                f"(kept {stats['kept']}, dropped {stats['dropped']}, rejected {stats['rejected']}); "
                f"partial output left in {self.staging}"
            )
        (self.staging / "stats.json").write_text(json.dumps(stats, indent=2, default=str))
        (self.staging / "_SUCCESS").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.final, old)
        os.rename(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old)
        return stats

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "JobFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and exc_type is not StatsMismatch:
            self.abort()


def parquet_rows(folder: str | Path) -> int:
    """Rows in a folder of parquet files, from their footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(folder).glob("*.parquet")))


def count_by(folder: str | Path, column: str) -> dict[str, int]:
    """``{value: rows}`` of one column over a folder of parquet files."""
    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.parquet")):
        for value in pq.read_table(f, columns=[column]).column(column).to_pylist():
            counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / "_SUCCESS").exists()
