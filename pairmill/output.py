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

Object storage (``s3://``, ``gs://``) has no rename, so there a job folder is committed by a
manifest instead (``BucketJobFolder``; ``open_job`` picks the kind from ``OUT``):
- each attempt writes its parts under its own prefix, ``OUT/kept/<attempt>/``, ``OUT/dropped/<attempt>/``,
  ``OUT/rejected/<attempt>/`` (scratch passes under ``OUT/_work/<attempt>/``);
- the commit deletes the old ``OUT/_SUCCESS``, writes ``OUT/stats.json``, then ``OUT/_SUCCESS``: JSON
  naming the attempt and every file it vouches for with its size, and finally deletes the files of
  other attempts;
- a reader (``finished_files``, ``is_finished``, ``pairmill.read.detect_format``) trusts a folder
  only when its ``_SUCCESS`` parses and every file listed is there at that size, and reads only
  the files listed, so a half-written attempt beside a committed one is never read;
- an attempt starts by deleting every file no trusted manifest lists (what a killed attempt left).
Objects appear whole when their upload completes, so a manifest is either there or not. Like the
local protocol, it assumes one writer per OUT at a time. Kept rows of a finished folder are
``OUT/kept/**/*.parquet``, which any Parquet reader lists recursively.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pairmill import storage

PARTS = ("kept", "dropped", "rejected")
SUCCESS = "_SUCCESS"
WORK = "_work"


class StatsMismatch(RuntimeError):
    pass


class OtherSettings(ValueError):
    """A rerun into a resumable job's folder whose run was started with other settings."""


def refuse_remote(out: str | Path) -> None:
    """``JobFolder`` commits by rename: a local (or NFS) folder only; ``open_job`` picks ``BucketJobFolder`` for a URI."""
    if storage.is_remote(out):
        raise ValueError(f"{out}: this job writes its folder on a local or shared filesystem only (`pairmill setfit` "
                         "and `distill`, so far); on object storage, `pairmill embed`, `filter`, `mine`, `train`, "
                         "`tune`, `classify` and `run` write their folders")


def resumable_staging(out: str | Path) -> Path:
    """The fixed staging folder of a resumable job writing ``out``."""
    final = Path(out).expanduser().resolve()
    return final.parent / f".{final.name}.partial"


def remove_job(out: str | Path) -> list:
    """Delete a job's folder and its resumable staging folder; returns what existed. On object
    storage the folder is its own staging (``BucketJobFolder``): the prefix goes."""
    if storage.is_remote(out):
        gone = [str(out)] if storage.list_files(str(out)) else []
        storage.remove(str(out))
        return gone
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

    filesystem = None  # Ray writes here with its default (local) filesystem

    def __init__(self, out: str | Path, parts: tuple[str, ...] = PARTS, *, resume: bool = False, in_place: bool = False):
        refuse_remote(out)
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

    def work(self, name: str) -> str:
        """A scratch folder for a pass too big for memory, removed by ``remove_work``."""
        return str(self.staging / "work" / name)

    def remove_work(self) -> None:
        shutil.rmtree(self.staging / "work", ignore_errors=True)

    def stage(self, name: str, rows_in: int, rows_out: int, seconds: float) -> None:
        self.stages.append({"name": name, "rows_in": rows_in, "rows_out": rows_out, "seconds": round(seconds, 3)})

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Check the accounting, write stats.json and _SUCCESS, and move the folder into place."""
        stats = {"stages": self.stages, **stats}
        check_accounting(stats, f"partial output left in {self.staging}")
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


def check_accounting(stats: dict[str, Any], left: str) -> None:
    """StatsMismatch unless ``input_rows == kept + sum(dropped) + sum(rejected)``; ``left`` says where the output stays."""
    accounted = stats["kept"] + sum(stats["dropped"].values()) + sum(stats["rejected"].values())
    if accounted != stats["input_rows"]:
        raise StatsMismatch(
            f"{stats['input_rows']} input rows but {accounted} accounted for "
            f"(kept {stats['kept']}, dropped {stats['dropped']}, rejected {stats['rejected']}); {left}"
        )


class BucketJobFolder:
    """``JobFolder``'s interface on object storage, committed by a manifest (the module's note).

    ``path(part)`` is this attempt's prefix of the part; Ray writes there with
    ``filesystem=job.filesystem``. ``files``: top-level files the manifest lists too, when there
    (a train run's metrics.jsonl and config.yaml, which a resumed run continues in place).
    ``staging`` is ``final``: the folder is written where it stays.
    """

    def __init__(self, out: str, parts: tuple[str, ...] = PARTS, files: tuple[str, ...] = ()):
        self.final = self.staging = out.rstrip("/")
        self.filesystem, _ = storage.split(self.final)
        self.parts = parts
        self.files = files
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.stages: list[dict[str, Any]] = []
        self._remove_unlisted(finished_manifest(self.final))  # what a killed attempt left behind

    def path(self, part: str) -> str:
        return f"{self.final}/{part}/{self.attempt}"

    def work(self, name: str) -> str:
        return f"{self.final}/{WORK}/{self.attempt}/{name}"

    def remove_work(self) -> None:
        storage.remove(f"{self.final}/{WORK}/{self.attempt}")

    stage = JobFolder.stage

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Check the accounting, then stats.json and the _SUCCESS manifest; then delete other attempts."""
        stats = {"stages": self.stages, **stats}
        check_accounting(stats, f"partial output left under {self.final}/*/{self.attempt}")
        files = {uri[len(self.final) + 1:]: size for part in self.parts for uri, size in storage.list_files(self.path(part))}
        files.update(_top_level_sizes(self.final, self.files))
        storage.remove(f"{self.final}/{SUCCESS}")  # from here until the new one, the folder is unfinished
        files["stats.json"] = storage.write_text(f"{self.final}/stats.json", json.dumps(stats, indent=2, default=str))
        manifest = {"attempt": self.attempt, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        storage.write_text(f"{self.final}/{SUCCESS}", json.dumps(manifest, indent=2))
        self._remove_unlisted(manifest)
        return stats

    def abort(self) -> None:
        for part in (*self.parts, WORK):
            storage.remove(f"{self.final}/{part}/{self.attempt}")

    def _remove_unlisted(self, manifest: dict | None) -> None:
        """Delete every attempt's prefix (and any stray file) under the parts that ``manifest`` does not vouch for."""
        keep = manifest["attempt"] if manifest else None
        fs, root = storage.split(self.final)
        for part in (*self.parts, WORK):
            for entry in fs.get_file_info(pafs.FileSelector(f"{root}/{part}", allow_not_found=True)):
                if entry.base_name == keep and part != WORK:
                    continue
                if entry.type == pafs.FileType.Directory:
                    fs.delete_dir(entry.path)
                else:
                    fs.delete_file(entry.path)

    __enter__ = JobFolder.__enter__

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and exc_type is not StatsMismatch:
            self.abort()


def _top_level_sizes(folder: str, names: tuple[str, ...]) -> dict[str, int]:
    fs, inner = storage.split(folder)
    infos = fs.get_file_info([f"{inner}/{name}" for name in names]) if names else []
    return {name: info.size for name, info in zip(names, infos) if info.type == pafs.FileType.File}


def write_manifest(folder: str, names: list[str]) -> None:
    """Commit a remote folder whose files are written in place (``pairmill run``'s eval and plain
    stages: no parts, no row counts): a ``_SUCCESS`` manifest naming them with their sizes."""
    folder = folder.rstrip("/")
    files = _top_level_sizes(folder, tuple(names))
    manifest = {"attempt": None, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    storage.write_text(f"{folder}/{SUCCESS}", json.dumps(manifest, indent=2))


def open_job(out: str | Path, parts: tuple[str, ...] = PARTS) -> JobFolder | BucketJobFolder:
    """The job folder for ``out``: committed by rename locally, by a manifest on object storage."""
    return BucketJobFolder(out, parts) if storage.is_remote(out) else JobFolder(out, parts)


def finished_manifest(folder: str) -> dict | None:
    """The ``_SUCCESS`` manifest of a job folder on object storage when every file it lists is there
    at its size; None when there is none, it is no manifest, or a file it names is missing or changed."""
    try:
        manifest = json.loads(storage.read_text(f"{folder}/{SUCCESS}"))
        listed = dict(manifest["files"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none; or not ours (a local job's _SUCCESS copied up)
        return None
    present = {uri[len(folder) + 1:]: size for uri, size in storage.list_files(folder)}
    return manifest if all(present.get(name) == size for name, size in listed.items()) else None


def finished_files(folder: str, part: str) -> list[str]:
    """URIs of the files of ``part`` that a remote job folder's manifest vouches for."""
    folder = folder.rstrip("/")
    manifest = finished_manifest(folder)
    if manifest is None:
        raise ValueError(
            f"{folder} is not a finished pairmill job folder: its _SUCCESS is missing or does not list the files "
            "there (a job still running, or killed before it committed). Rerun the job that writes it"
        )
    return sorted(f"{folder}/{name}" for name in manifest["files"] if name.startswith(f"{part}/"))


def open_resumable(out: str | Path, settings: dict, *, settings_file: str, has_work: Callable[[Path], bool],
                   in_place: bool = False, what: str = "run", parts: tuple[str, ...] = (),
                   files: tuple[str, ...] = ()) -> JobFolder | BucketJobFolder:
    """The one resume guard of the jobs whose work is checkpoints (``train``, ``tune``).

    ``settings`` = ``{"input": ..., "sections": {section: {key: value}}}``, saved in the job folder
    at ``settings_file``. A staging folder with work in it (``has_work``) is resumed when the
    settings are the same; a finished OUT with the same settings moves back into staging and is
    resumed (nothing is redone: the job only finishes again); anything else with other settings is
    refused with an ``OtherSettings`` naming them, and left untouched.

    On object storage OUT is its own staging (``in_place`` or not: a tune trial's folder is committed
    by its own manifest): ``has_work`` gets OUT's URI, the settings file is saved there, and the job
    is a ``BucketJobFolder`` whose manifest lists
    ``parts`` (under the attempt's prefix) and the top-level ``files``; what the run resumes from
    (checkpoints, the settings file) stays outside the manifest, so a rerun neither needs a rename
    nor breaks the last commit until it commits again."""
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back (tuples become lists)
    if storage.is_remote(out):
        final = str(out).rstrip("/")
        if has_work(final):
            _refuse_other_settings(final, settings, settings_file, what)
        bucket_job = BucketJobFolder(final, parts, files)
        storage.write_text(f"{final}/{settings_file}", json.dumps(settings, indent=2))
        return bucket_job
    refuse_remote(out)
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
    path = storage.join(folder, settings_file)
    if not storage.exists(path):
        return
    saved = json.loads(storage.read_text(path))
    changed = changed_settings(saved.get("sections", {}), settings["sections"])
    changed += ["input"] if saved.get("input") != settings["input"] else []
    if changed:
        raise OtherSettings(
            f"{folder} holds a {what} started with other settings ({', '.join(changed)}); rerunning the same "
            "command resumes it. Use a new -o folder, or delete this one to start over."
        )


def parquet_files(folder: str | Path) -> list:
    """The parquet files of a folder (Paths), or of a remote prefix (URIs), sorted."""
    if storage.is_remote(folder):
        return [uri for uri, _ in storage.list_files(folder) if uri.endswith(".parquet")]
    return sorted(Path(folder).glob("*.parquet"))


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The ``section.key`` names whose value differs between two ``{section: {key: value}}`` dicts
    (non-dict entries of ``current`` are left out), sorted: what a rerun into a job's folder changed.

    A key that ``saved`` lacks counts as its default there: the job was saved by a pairmill without
    that setting, which behaved as the default does (so a run started before a setting existed
    still resumes). A key without a known default counts as empty (None)."""

    def default_of(section: str, key: str):
        from pairmill.config import SECTIONS

        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
        if key not in fields or fields[key].default is dataclasses.MISSING:
            return None
        return json.loads(json.dumps(fields[key].default, default=str))  # as saved settings read back

    return sorted(
        f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
        for key in set(values) | set(saved.get(section, {}))
        if values.get(key) != saved.get(section, {}).get(key, default_of(section, key))
    )


def parquet_rows(folder: str | Path) -> int:
    """Rows in a folder of parquet files, from their footers (no data read)."""
    return sum(pq.read_metadata(inner, filesystem=fs).num_rows for fs, inner in map(storage.split, parquet_files(folder)))


def parquet_bytes(folder: str | Path) -> int:
    if storage.is_remote(folder):
        return sum(size for uri, size in storage.list_files(folder) if uri.endswith(".parquet"))
    return sum(f.stat().st_size for f in parquet_files(folder))


def count_by(folder: str | Path, column: str) -> dict[str, int]:
    """``{value: rows}`` of one column over a folder of parquet files."""
    counts: dict[str, int] = {}
    for fs, inner in map(storage.split, parquet_files(folder)):
        for value in pq.read_table(inner, columns=[column], filesystem=fs).column(column).to_pylist():
            counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def is_finished(folder: str | Path) -> bool:
    """A local folder with ``_SUCCESS``; a remote one whose ``_SUCCESS`` vouches for what is there."""
    if storage.is_remote(folder):
        return finished_manifest(str(folder).rstrip("/")) is not None
    return (Path(folder) / SUCCESS).exists()


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


def local_model(uri: str, cache: str | Path | None = None) -> str:
    """A model folder on object storage as a local folder, downloaded once into ``cache``
    (default ``~/.cache/pairmill/models``): a train job folder or its ``model``, a tune job folder
    or its ``best_model`` (the files the job's ``_SUCCESS`` lists under ``model/<attempt>/``), or any
    other prefix (every file under it).
    The copy is named by the URI and what was listed, so a recommitted model is fetched again."""
    import hashlib
    import tempfile

    uri = uri.rstrip("/")
    parent, leaf = uri.rsplit("/", 1)
    for job, name in ((parent, leaf), (uri, "model"), (uri, "best_model")):  # OUT/model or OUT/best_model; OUT
        manifest = finished_manifest(job)
        listed = sorted(f for f in (manifest or {}).get("files", {}) if f.startswith(f"{name}/"))
        if listed:
            break
    if listed:  # model/<attempt>/<file>: the attempt's prefix is not part of the folder
        files = [(f"{job}/{f}", f.split("/", 2)[2], manifest["files"][f]) for f in listed]
    else:
        files = [(u, u[len(uri) + 1:], size) for u, size in storage.list_files(uri)]
    if not files:
        raise FileNotFoundError(f"--model {uri}: no model there (neither a finished train job folder nor a prefix with files)")
    key = hashlib.sha256(json.dumps([uri, files]).encode()).hexdigest()[:16]
    root = Path(cache or Path.home() / ".cache" / "pairmill" / "models")
    folder = root / f"{uri.rsplit('/', 1)[-1]}-{key}"
    if not folder.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            for remote, relative, _ in files:
                storage.download(remote, Path(tmp) / relative)
            os.rename(tmp, folder)
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return str(folder)
