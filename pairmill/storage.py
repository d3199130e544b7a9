"""Where data lives: a local path, or a URI on object storage (``s3://``, ``gs://``, and any other
scheme ``pyarrow.fs`` or fsspec resolves), as a ``pyarrow.fs`` filesystem and a path in it.

Local paths stay what they were: ``split`` returns ``(None, path)`` for them, and every pyarrow or
Ray call given ``filesystem=None`` does what it did before object storage existed.

Credentials never come from pairmill's config or command line (both end up in ``stats.json``):
S3 and GCS take them from the environment or the cloud's default chain (an instance role,
``~/.aws``, gcloud's application-default credentials), on the driver and on each Ray worker alike.
A filesystem sent to a worker carries none: pyarrow pickles only keys given to it explicitly, and
pairmill gives none, so every node uses its own. A URI that holds credentials
(``s3://KEY:SECRET@bucket``, ``?access_key=...``) is refused.

A custom S3 endpoint (MinIO, a test server) is the standard ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), as the AWS tools read it. ``pyarrow.fs.FileSystem.from_uri`` honours it
(checked with pyarrow 26; the bare ``S3FileSystem()`` constructor does not) and stores it in the
filesystem's options, so the workers, which get the filesystem pickled, need only credentials.
Code that runs in a Ray task or actor and is handed URIs (a tune trial's train run, a refresh
round, its encoder actors) gets the driver's filesystems with them (``carried``) and ``adopt``s
them first, so a URI resolves there as it did on the driver.

A GCS emulator (the tests use gcp-storage-emulator) is google-cloud-cpp's
``CLOUD_STORAGE_EMULATOR_ENDPOINT=http://host:port``. pyarrow's ``from_uri`` leaves it to the client
library, which then still asks the default chain for an OAuth token first (no emulator checks one;
off GCP that is retried for minutes, then fails). So pairmill builds that filesystem itself,
anonymous, with the endpoint in its options: it rides to the workers as the S3 endpoint does.
"""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CLOUD_STORAGE_EMULATOR_ENDPOINT")
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}  # (scheme, bucket, endpoint vars) -> filesystem


def is_remote(path: str | Path) -> bool:
    """True for a URI with a scheme other than ``file://`` (a local path never has one)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return urlsplit(path).scheme.lower() not in ("", "file")


def _filesystem(uri: str) -> pafs.FileSystem:
    import os

    parts = urlsplit(uri)
    if parts.username or parts.password or parts.query:
        raise ValueError(
            f"{parts.scheme}://{parts.hostname}{parts.path}: a URI with credentials or options in it (user:secret@, "
            "?access_key=...) is refused, since paths are written to stats.json. Give credentials through the "
            "environment or the cloud's default chain (AWS_ACCESS_KEY_ID / AWS_PROFILE / an instance role; "
            "gcloud auth application-default login), a custom S3 endpoint as AWS_ENDPOINT_URL, a GCS emulator as "
            "CLOUD_STORAGE_EMULATOR_ENDPOINT"
        )
    key = (parts.scheme.lower(), parts.netloc, *(os.environ.get(name) for name in ENDPOINT_VARS))
    emulator = os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    if key not in _FILESYSTEMS and emulator and parts.scheme.lower() in ("gs", "gcs"):
        endpoint = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        _FILESYSTEMS[key] = pafs.GcsFileSystem(anonymous=True, scheme=endpoint.scheme, endpoint_override=endpoint.netloc)
    if key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[key] = pafs.FileSystem.from_uri(uri)[0]
        except pa.ArrowInvalid as pyarrow_error:  # a scheme pyarrow has no filesystem for: fsspec's, if it has one
            if "Unrecognized filesystem type" not in str(pyarrow_error):
                raise
            import fsspec

            _FILESYSTEMS[key] = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.core.url_to_fs(uri)[0]))
    return _FILESYSTEMS[key]


def carried(*paths) -> dict[str, pafs.FileSystem]:
    """``{"scheme://bucket": filesystem}`` of the URIs among ``paths`` (others are skipped), resolved
    here: what a Ray task or actor handed these URIs ``adopt``s."""
    return {f"{urlsplit(p).scheme.lower()}://{urlsplit(p).netloc}": _filesystem(p) for p in map(str, paths) if is_remote(p)}


def adopt(filesystems: dict[str, pafs.FileSystem] | None) -> None:
    """Resolve URIs under each ``scheme://bucket`` of ``filesystems`` (``carried``) to the filesystem
    given, in this process: a worker's environment may lack the endpoint the driver resolved with."""
    import os

    for root, fs in (filesystems or {}).items():
        scheme, bucket = root.split("://", 1)
        _FILESYSTEMS[(scheme, bucket, *(os.environ.get(name) for name in ENDPOINT_VARS))] = fs


def split(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path in it) of a URI; ``(None, path)`` unchanged for a local path."""
    if not is_remote(path):
        return None, str(path)
    parts = urlsplit(path)
    return _filesystem(path), (parts.netloc + parts.path).rstrip("/")


def join(base: str | Path, *names: str) -> str:
    """``base/names...`` for a URI or a local path."""
    return posixpath.join(base, *names) if is_remote(base) else str(Path(base).joinpath(*names))


def _uri(like: str, path: str) -> str:
    """A filesystem path back as a URI of the same scheme as ``like``."""
    return f"{urlsplit(like).scheme}://{path}"


def uri_of(like: str | Path, path: str) -> str:
    """A path that Ray (Train, Tune) reports inside ``like``'s filesystem (``bucket/key``, no
    scheme) as a URI of ``like``'s scheme; unchanged when ``like`` is local or ``path`` has one."""
    return _uri(str(like), path) if is_remote(like) and not is_remote(path) else path


def exists(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, inner = split(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def list_files(folder: str) -> list[tuple[str, int]]:
    """(URI, bytes) of every file under a remote folder (recursively), sorted; [] when there is none."""
    fs, inner = split(folder)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted((_uri(folder, f.path), f.size) for f in found if f.type == pafs.FileType.File)


def sizes(paths: list[str]) -> list[int]:
    """Bytes of each remote file (one metadata request each)."""
    if not paths:
        return []
    fs, _ = split(paths[0])
    return [f.size for f in fs.get_file_info([split(p)[1] for p in paths])]


def open_input(path: str | Path):
    """A binary stream of a file, gunzipped when its name ends in .gz."""
    import gzip

    if not is_remote(path):
        return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    fs, inner = split(path)
    return fs.open_input_stream(inner, compression="gzip" if inner.endswith(".gz") else None)


def read_text(path: str | Path) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    fs, inner = split(path)
    with fs.open_input_stream(inner, compression=None) as f:
        return f.read().decode("utf-8")


def write_text(path: str | Path, text: str) -> int:
    """Write a whole file; on object storage it appears at once, when the upload completes."""
    if not is_remote(path):
        return Path(path).write_text(text)
    fs, inner = split(path)
    data = text.encode("utf-8")
    with fs.open_output_stream(inner, compression=None) as f:  # pyarrow would gzip a name ending in .gz
        f.write(data)
    return len(data)


def remove(path: str | Path) -> None:
    """Delete a file or everything under a folder (local or remote); nothing when it is not there."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
        return
    fs, inner = split(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.File:
        fs.delete_file(inner)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(inner)


def file_infos(path: str) -> list[tuple[str, int, int]]:
    """(name relative to ``path``, bytes, mtime in ns) of a remote file, or of every file under a
    remote folder, sorted; what ``pairmill run`` fingerprints a stage's input by."""
    fs, inner = split(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        found = [info]
    else:
        found = [f for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
                 if f.type == pafs.FileType.File]
    return sorted((posixpath.relpath(f.path, inner) if f.path != inner else f.base_name, f.size, f.mtime_ns or 0)
                  for f in found)


def upload_folder(local: str | Path, uri: str) -> None:
    """Copy a local folder's files (recursively) under ``uri``."""
    fs, inner = split(uri)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def staged(uri: str | Path, *, upload_on_error: bool = False) -> Iterator[Path]:
    """A local folder for files that belong under ``uri``: ``uri`` itself when it is local; for
    object storage a temporary folder, uploaded under ``uri`` when the block ends (also when it
    raises, with ``upload_on_error``). For writers that take only local paths: sentence-transformers'
    ``save``, ``np.savez``, matplotlib."""
    if not is_remote(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            yield Path(tmp)
        except BaseException:
            if upload_on_error:
                upload_folder(tmp, str(uri))
            raise
        upload_folder(tmp, str(uri))


def download(uri: str, local: str | Path) -> None:
    """Copy one remote file to a local path."""
    fs, inner = split(uri)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def write_bytes(uri: str, data: bytes) -> None:
    fs, inner = split(uri)
    with fs.open_output_stream(inner, compression=None) as f:
        f.write(data)
