"""Sizing work from the cluster and the settings large jobs change."""

from __future__ import annotations

import pytest

from pairmill import cluster


def test_model_malloc_raises_the_threshold_only_under_worker_env(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))

    monkeypatch.setattr("ctypes.CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cluster.model_malloc()
    assert calls == []  # glibc keeps its dynamic threshold: nothing to undo
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", cluster.WORKER_ENV["MALLOC_MMAP_THRESHOLD_"])
    cluster.model_malloc()
    assert calls == [(-3, cluster.MODEL_MMAP_THRESHOLD)]


def test_disk_shuffle_bounds_the_shuffle_batch(monkeypatch):
    from ray.data import DataContext

    monkeypatch.delenv("RAY_DATA_ENABLE_DISK_SHUFFLE", raising=False)
    monkeypatch.delenv("RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES", raising=False)
    ctx = DataContext.get_current()
    before = (ctx.use_disk_based_hash_shuffle, ctx.shuffle_input_batch_bytes)
    try:
        cluster.disk_shuffle(cluster.LARGE_BYTES)  # not over it
        assert not ctx.use_disk_based_hash_shuffle
        cluster.disk_shuffle(cluster.LARGE_BYTES + 1)
        assert ctx.use_disk_based_hash_shuffle
        assert ctx.shuffle_input_batch_bytes <= cluster.SHUFFLE_INPUT_BATCH_BYTES
        monkeypatch.setenv("RAY_DATA_ENABLE_DISK_SHUFFLE", "1")
        cluster.disk_shuffle(0)  # the environment asks for it: on whatever the job's size
        assert ctx.use_disk_based_hash_shuffle
    finally:
        ctx.use_disk_based_hash_shuffle, ctx.shuffle_input_batch_bytes = before


@pytest.mark.parametrize("shards, cpus", [(1, 2.0), (2, 1.0), (4, 0.5), (64, 0.5)])
def test_search_cpus_leave_half_the_cluster(ray_session, shards, cpus):
    # the session's Ray: one node of 4 logical CPUs
    assert cluster.search_cpus(shards) == cpus


def test_parquet_reader_follows_worker_env_unless_the_environment_says_otherwise(monkeypatch):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    try:
        monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
        ctx.use_datasource_v2 = True  # what Ray 2.60 defaults to when the variable is unset
        cluster.parquet_reader()
        assert ctx.use_datasource_v2 is False  # WORKER_ENV's reader: no footer-actor pool per read
        monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
        cluster.parquet_reader()
        assert ctx.use_datasource_v2 is True
    finally:
        ctx.use_datasource_v2 = before



class _Stdout:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [False, True])
def test_ray_data_console_keeps_warnings_and_errors(monkeypatch, tty):
    """Through Ray Data's own console handler: no INFO (its per-10-second progress dumps), not the
    no-free-CPU warning; other warnings and errors still show. Progress bars go off a terminal only."""
    import io
    import logging
    import sys

    from ray.data import DataContext

    ctx, data_logger = DataContext.get_current(), logging.getLogger("ray.data")
    console = next(h for h in data_logger.handlers if h.name == "console")  # Ray Data's default logging config
    shown = io.StringIO()
    before = (ctx.enable_progress_bars, data_logger.level, console.setStream(shown))
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL")  # unset here, and as it was after the test
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys, "stdout", _Stdout(tty))
    try:
        ctx.enable_progress_bars = True
        cluster.quiet_ray_console()
        logging.getLogger("ray.data._internal.progress.logging_progress").info("Total Progress: 5/40")
        logging.getLogger("ray.data.dataset").warning(cluster.HIDDEN_WARNINGS[0] + ". The Dataset job will hang")
        logging.getLogger("ray.data.dataset").warning("a warning that matters")
        logging.getLogger("ray.data._internal.execution").error("an error")
        assert "a warning that matters" in shown.getvalue() and "an error" in shown.getvalue()
        assert "Total Progress" not in shown.getvalue() and "will hang" not in shown.getvalue()
        assert ctx.enable_progress_bars is tty
        monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "INFO")  # the environment's level wins
        cluster.quiet_ray_console()
        logging.getLogger("ray.data._internal.progress.logging_progress").info("Total Progress: 6/40")
        assert "Total Progress: 6/40" in shown.getvalue()
    finally:
        ctx.enable_progress_bars = before[0]
        data_logger.setLevel(before[1])
        console.setStream(before[2])
