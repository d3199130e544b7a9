"""Multi-node tests (issue #6): the cases in ``multinode_cases.py`` on a four-node Ray cluster on this
machine, run by a fresh ``pytest`` process and reported here one test per case.

Why a subprocess: a process is connected to one Ray at a time, and the rest of the suite shares a
local Ray started once per session (``ray_session``). Shutting that down for a cluster and starting it
again would depend on test order. The child gets its own ``RAY_TMPDIR``, so the cluster it starts
never becomes the "current cluster" that a plain ``ray.init()`` elsewhere on the machine joins.

The child starts when the first report test below runs, and the others wait for it; with
``PAIRMILL_TEST_MULTINODE=beside`` it starts as soon as the suite is collected (``tests/conftest.py``)
and runs beside the rest, which on 2 cores measured slower (the two compete for the cores).
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("multinode_cases.py")
ROOT = Path(__file__).resolve().parents[2]
NAMES = [node.name for node in ast.parse(CASES.read_text()).body
         if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
TIMEOUT_S = 1500  # from its start: a hang fails the module instead of holding CI; Ray Data stalls fail sooner (180 s)


class Cases:
    """The child ``pytest`` on ``multinode_cases.py``, started once per session by ``start``."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="pm-multinode-"))
        # Short: Ray puts its unix sockets under it, and their paths must stay under 107 characters.
        self.ray_tmp = tempfile.mkdtemp(prefix="pm-ray-")
        # Four nodes on a few cores beside the rest of the suite: one read task waited over 60 s for a
        # CPU on a loaded 2-core machine, so a Ray Data stall fails after 180 s here (the suite: 60 s).
        env = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **os.environ,
               "RAY_TMPDIR": self.ray_tmp, "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "180"}
        env.pop("RAY_ADDRESS", None)
        command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                   f"--basetemp={self.folder / 'tmp'}", f"--junitxml={self.folder / 'junit.xml'}"]
        self.log = open(self.folder / "output.txt", "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def results(self) -> dict[str, tuple[str, str]]:
        """Wait for the cases; ``{case: (passed | failed | error | skipped, message)}``."""
        try:
            self.proc.wait(timeout=max(1, TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the multi-node cases ran past {TIMEOUT_S} s; their output ended:\n{self.output()[-6000:]}")
        finally:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        results = {}
        if (self.folder / "junit.xml").exists():
            for case in ET.parse(self.folder / "junit.xml").getroot().iter("testcase"):
                problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
                outcome = "passed" if problem is None else problem.tag
                results[case.get("name")] = (outcome, "" if problem is None else (problem.text or problem.get("message", "")))
        return results


_started: list[Cases] = []


def start() -> Cases:
    """Start the cases (once): the first report test below does, or with PAIRMILL_TEST_MULTINODE=beside
    the suite's conftest as soon as it has collected them (it then moves the report tests to the end)."""
    if not _started:
        _started.append(Cases())
    return _started[0]


def stop() -> None:
    """End the session's cases if they still run (the suite stopped early), and remove their folders."""
    for cases in _started:
        if cases.proc.poll() is None:
            cases.proc.send_signal(signal.SIGINT)  # pytest then shuts its cluster down
            try:
                cases.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cases.proc.kill()
        cases.log.close()
        shutil.rmtree(cases.ray_tmp, ignore_errors=True)
        shutil.rmtree(cases.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def outcomes() -> tuple[Cases, dict[str, tuple[str, str]]]:
    cases = start()
    return cases, cases.results()


@pytest.mark.parametrize("case", NAMES)
def test_multinode(case, outcomes):
    cases, results = outcomes
    if case not in results:
        pytest.fail(f"{case} did not run; the multi-node pytest exited {cases.proc.returncode}:\n{cases.output()[-6000:]}")
    outcome, message = results[case]
    assert outcome == "passed", f"{case} {outcome} on the multi-node cluster:\n{message[-6000:]}"
