"""Shared fixtures: one local Ray per session, a tiny random BERT saved as a sentence-transformers
folder (no download), a few literal pairs, and an S3-compatible server with a fresh bucket per test.

The S3 server is moto's server mode on 127.0.0.1. Credentials reach Ray workers only through their
environment, which they inherit from the driver when Ray starts, and the session's one local Ray
(``ray_session``) may be started by any test. So the dummy credentials are set when pytest imports
this file (before any test runs); they are forced, not defaulted, so no test ever signs with a real
account's keys. The endpoint is set per test (``bucket``): the workers do not need it, since the
filesystem pairmill hands them carries it (``pairmill.storage``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

# Before Ray starts: a hung Ray Data pipeline fails instead of hanging CI, and no token prompts.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "60")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare vectors to 1e-6: the same precision on every machine (bf16 where the CPU has it
# would be the default; tests/pairmill/test_encoder.py tests that choice itself).
os.environ.setdefault("PAIRMILL_CPU_PRECISION", "fp32")
# The worker environment a local Ray of pairmill's gets (init_ray), so tests run what users run.
from pairmill.cluster import LOCAL_RAY_ENV, WORKER_ENV  # noqa: E402  (imports nothing heavy)

for _name, _value in {**WORKER_ENV, **LOCAL_RAY_ENV}.items():
    os.environ.setdefault(_name, _value)
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "pairmill-test-key-id", "AWS_SECRET_ACCESS_KEY": "pairmill-test-secret"}
os.environ.update(TEST_CREDENTIALS, AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
os.environ.pop("AWS_SESSION_TOKEN", None)

@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    """The multi-node cases (tests/cluster/test_multinode.py) run in a child pytest, in their place,
    nothing else running. PAIRMILL_TEST_MULTINODE=beside starts them now instead, beside the rest of the
    suite, and moves the tests that report them last: on 2 cores that was ~50 s slower in two
    side-by-side pairs of runs, 175 CPU-s dearer in the one timed for CPU (docs/benchmarks.md, "The tests")."""
    multinode = [item for item in items if item.path.name == "test_multinode.py" and item.path.parent.name == "cluster"]
    beside = os.environ.get("PAIRMILL_TEST_MULTINODE", "alone") == "beside"
    if multinode and beside and not config.option.collectonly:
        from tests.cluster.test_multinode import start

        items[:] = [item for item in items if item not in multinode] + multinode
        start()


def pytest_sessionfinish(session):
    from tests.cluster.test_multinode import stop

    stop()


@pytest.fixture(autouse=True)
def unconfigured_logging():
    """Each test starts with the project's loggers as a library user has them (no handler, level
    unset, propagating to the root and so to ``caplog``): a CLI call's ``pairmill.log.configure``
    does not carry over into the next test."""
    yield
    from pairmill.log import PACKAGES

    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


WORDS = (
    "the a of to and in is for on with as by an be this that from or at are it can data "
    "computer program language system file memory network code software machine user process "
    "function error protocol unix internet bit byte hacker jargon term word text query passage "
    "index search model vector cluster node disk cpu graph tree list string number value type"
).split()


def write_tiny_model(folder: Path, seed: int = 0, normalize: bool = True) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocab, saved as a ST folder; with
    ``normalize=False`` it ends in mean pooling (vectors of any norm), as many hub models do."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the modules; older releases have them in .models
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    hf_dir = folder / "hf"
    hf_dir.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + [str(d) for d in range(10)]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores vocab_file= here (every word became [UNK]); vocab= takes the file.
    tokenizer = BertTokenizerFast(vocab=str(hf_dir / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    modules = [transformer, pooling] + ([models.Normalize()] if normalize else [])
    model = SentenceTransformer(modules=modules, device="cpu")
    out = folder / "st"
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (4 logical CPUs avoid small-machine deadlocks)."""
    import ray

    from pairmill.cluster import LOCAL_RAY_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            # Ray Train V2's placement-group cleaner asks the state API (served by the dashboard)
            # whether the train controller lives; without it, it logged failures every few seconds
            # and under load removed a live run's placement group. Localhost only; a busy port moves on.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            configure_logging=False,
            _system_config=LOCAL_RAY_SYSTEM_CONFIG,  # workers reused across operators and tests
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> str:
    """The S3 server's endpoint URL (a free port, picked by the OS)."""
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
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"pairmill-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(local, uri: str) -> str:
    """Copy a local file to ``uri``; returns the URI."""
    from pairmill import storage

    fs, inner = storage.split(uri)
    with fs.open_output_stream(inner, compression=None) as f:  # the bytes as they are, .gz or not
        f.write(Path(local).read_bytes())
    return uri


def literal_pairs(n: int = 60) -> list[dict]:
    """Deterministic pairs made of the tiny vocab's words."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
        rows.append({"query": f"{q} {i}", "passage": f"{p} {i}", "source": "test"})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
