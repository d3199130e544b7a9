"""The job folder contract (DESIGN.md): ``kept/``, ``dropped/``, ``rejected/``, ``stats.json``,
then ``_SUCCESS`` last, written atomically.

A job writes into a hidden staging folder beside ``OUT`` and renames it into place only after
``stats.json`` and ``_SUCCESS`` are written, so a reader never sees a half-written folder and a
rerun into an existing ``OUT`` never mixes old and new files. Staging needs ``OUT``'s parent to
be a local or shared (NFS) filesystem that every Ray node writes to.

Jobs that resume (``train``, ``tune``: their checkpoints are the work) stage in a folder with a
fixed name, ``.OUT.partial``, which an interrupted run leaves behind and a rerun continues in.
Every commit checks ``input_rows == kept + sum(dropped) + sum(rejected)``, where ``input_rows`` is
counted from the input itself (``pairmill.read.count_input_rows``), not from the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

PARTS = ("kept", "dropped", "rejected")


class StatsMismatch(RuntimeError):
    pass


class OtherSettings(ValueError):
    """A rerun into a resumable job's folder whose run was started with other settings."""


def resumable_staging(out: str | Path) -> Path:
    """The fixed staging folder of a resumable job writing ``out``."""
    final = Path(out).expanduser().resolve()
    return final.parent / f".{final.name}.partial"


def remove_job(out: str | Path) -> list[Path]:
    """Delete a job's folder and its resumable staging folder; returns what existed."""
    gone = [p for p in (Path(out).expanduser().resolve(), resumable_staging(out)) if p.exists()]
    for path in gone:
        shutil.rmtree(path)
    return gone


class JobFolder:
    """``path(part)`` to write into, ``stage`` to record, ``commit(stats)`` to finish.

    resume: stage in ``resumable_staging(out)`` (created if missing, kept when the job fails) so a
    rerun continues there; else in a fresh uniquely named folder, removed when the job fails.
    in_place: write ``out`` itself and commit by writing stats.json and then _SUCCESS (for a folder
    inside another job's staging folder, such as a tune trial's train run).
    """

    def __init__(self, out: str | Path, parts: tuple[str, ...] = PARTS, *, resume: bool = False, in_place: bool = False):
        self.final = Path(out).expanduser().resolve()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.resume = resume or in_place
        self.in_place = in_place
        if in_place:
            self.staging = self.final
        elif resume:
            self.staging = resumable_staging(self.final)
        else:
            self.staging = self.final.parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir(exist_ok=self.resume)
        (self.staging / "_SUCCESS").unlink(missing_ok=True)  # in place: the folder is being (re)written
        for part in parts:
            (self.staging / part).mkdir(exist_ok=self.resume)
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
        if self.in_place:
            return stats
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
        # A resumable job keeps its staging folder: the rerun continues from its checkpoints.
        if exc_type is not None and exc_type is not StatsMismatch and not self.resume:
            self.abort()


def open_resumable(out: str | Path, settings: dict, *, settings_file: str, has_work: Callable[[Path], bool],
                   in_place: bool = False, what: str = "run") -> JobFolder:
    """The one resume guard of the jobs whose work is checkpoints (``train``, ``tune``).

    ``settings`` = ``{"input": ..., "sections": {section: {key: value}}}``, saved in the job folder
    at ``settings_file``. A staging folder with work in it (``has_work``) is resumed when the
    settings are the same; a finished OUT with the same settings moves back into staging and is
    resumed (nothing is redone: the job only finishes again); anything else with other settings is
    refused with an ``OtherSettings`` naming them, and left untouched."""
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back (tuples become lists)
    final = Path(out).expanduser().resolve()
    staging = final if in_place else resumable_staging(final)
    if has_work(staging):
        _refuse_other_settings(staging, settings, settings_file, what)
    elif not in_place and not staging.exists() and is_finished(final) and has_work(final):
        _refuse_other_settings(final, settings, settings_file, what)
        os.rename(final, staging)
    job = JobFolder(final, parts=(), resume=True, in_place=in_place)
    path = job.staging / settings_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
    return job


def _refuse_other_settings(folder: Path, settings: dict, settings_file: str, what: str) -> None:
    from pairmill.config import changed_settings

    path = folder / settings_file
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    changed = changed_settings(saved.get("sections", {}), settings["sections"])
    changed += ["input"] if saved.get("input") != settings["input"] else []
    if changed:
        raise OtherSettings(
            f"{folder} holds a {what} started with other settings ({', '.join(changed)}); rerunning the same "
            "command resumes it. Use a new -o folder, or delete this one to start over."
        )


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


def format_summary(stats: dict, out: str) -> str:
    """The lines a job prints when it ends: rows in and out, by reason and stage."""
    lines = [f"[pairmill] {out}: {stats['input_rows']} input rows -> {stats['kept']} kept"]
    for part in ("dropped", "rejected"):
        for reason, n in stats[part].items():
            lines.append(f"    {part:<9} {reason:<20} {n}")
    if stats.get("truncated"):
        lines.append(f"    truncated (kept)    {stats['truncated']}")
    for stage in stats["stages"]:
        lines.append(f"    stage {stage['name']:<15} {stage['rows_in']} -> {stage['rows_out']} rows in {stage['seconds']:.1f}s")
    return "\n".join(lines)
