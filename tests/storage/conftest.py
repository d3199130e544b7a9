"""A real S3-compatible server for the object-storage tests: moto's server mode on 127.0.0.1.

Credentials reach Ray workers only through their environment, which they inherit from the driver
when Ray starts, and the session's one local Ray (``ray_session``) may be started by any test that
runs before these. So the dummy credentials are set when pytest imports this file (collection, before
any test runs); they are forced, not defaulted, so no test ever signs with a real account's keys.
The endpoint is set per test (``bucket``): the workers do not need it, since the filesystem pairmill
hands them carries it (``pairmill.storage``).
"""

from __future__ import annotations

import os
import uuid

import pytest

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "pairmill-test-key-id", "AWS_SECRET_ACCESS_KEY": "pairmill-test-secret"}
os.environ.update(TEST_CREDENTIALS, AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
os.environ.pop("AWS_SESSION_TOKEN", None)


@pytest.fixture(scope="session")
def s3_server() -> str:
    """The server's endpoint URL (a free port, picked by the OS)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """``s3://<a new empty bucket>``, with AWS_ENDPOINT_URL naming the test server for this test."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"pairmill-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(local, uri: str) -> str:
    """Copy a local file to ``uri``; returns the URI."""
    from pathlib import Path

    from pairmill import storage

    fs, inner = storage.split(uri)
    with fs.open_output_stream(inner, compression=None) as f:  # the bytes as they are, .gz or not
        f.write(Path(local).read_bytes())
    return uri
