"""A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1 for the session, and a fresh
bucket on it per test. pyarrow's GcsFileSystem reaches it through google-cloud-cpp's
``CLOUD_STORAGE_EMULATOR_ENDPOINT``, set per test; pairmill puts the endpoint into the filesystem
it sends to Ray workers, so they need no such variable (``pairmill.storage``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gcs_server() -> str:
    """The emulator's endpoint URL, on a free port. A child process, not a thread: pyarrow opens a
    GCS read stream lazily, in calls that hold the GIL (``NativeFile.size``), so an emulator thread
    in the same interpreter could never answer it (found with py-spy: a deadlock)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
               "--in-memory", "--quiet"]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()  # its health check
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start on {url}: {' '.join(command)}")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch) -> str:
    """``gs://<a new empty bucket>``, with CLOUD_STORAGE_EMULATOR_ENDPOINT naming the emulator for this test."""
    import json
    import urllib.request
    import uuid

    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs_server)
    name = f"pairmill-{uuid.uuid4().hex[:8]}"
    # The JSON API's buckets.insert (pyarrow's create_dir would need a project id from the environment)
    request = urllib.request.Request(f"{gcs_server}/storage/v1/b?project=pairmill-test", method="POST",
                                     data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    return f"gs://{name}"
