"""Multi-node tests (issue #6): the cases in ``multinode_cases.py`` on a four-node Ray cluster on this
machine, run by a fresh ``pytest`` process and reported here one test per case.

Why a subprocess: a process is connected to one Ray at a time, and the rest of the suite shares a
local Ray started once per session (``ray_session``). Shutting that down for a cluster and starting it
again would depend on test order. The child gets its own ``RAY_TMPDIR``, so the cluster it starts
never becomes the "current cluster" that a plain ``ray.init()`` elsewhere on the machine joins.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("multinode_cases.py")
ROOT = Path(__file__).resolve().parents[2]
NAMES = [node.name for node in ast.parse(CASES.read_text()).body
         if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
TIMEOUT_S = 1200  # a hang fails the module instead of holding CI; Ray Data stalls fail sooner (180 s)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> tuple[subprocess.CompletedProcess | None, dict[str, tuple[str, str]]]:
    """Run every case once; ``{case: (passed | failed | error | skipped, message)}``."""
    folder = tmp_path_factory.mktemp("multinode")
    # Short: Ray puts its unix sockets under it, and their paths must stay under 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="pm-ray-")
    # Four nodes on a few cores: one read task waited over 60 s for a CPU on a loaded 2-core machine,
    # so a Ray Data stall fails after 180 s here (the rest of the suite: 60 s).
    env = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **os.environ,
           "RAY_TMPDIR": ray_tmp, "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "180"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
               f"--basetemp={folder / 'tmp'}", f"--junitxml={folder / 'junit.xml'}"]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"the multi-node cases ran past {TIMEOUT_S} s; their output ended:\n{out[-6000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = {}
    if (folder / "junit.xml").exists():
        for case in ET.parse(folder / "junit.xml").getroot().iter("testcase"):
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            outcome = "passed" if problem is None else problem.tag
            results[case.get("name")] = (outcome, "" if problem is None else (problem.text or problem.get("message", "")))
    return proc, results


@pytest.mark.parametrize("case", NAMES)
def test_multinode(case, outcomes):
    proc, results = outcomes
    if case not in results:
        pytest.fail(f"{case} did not run; the multi-node pytest exited {proc.returncode}:\n"
                    f"{(proc.stdout + proc.stderr)[-6000:]}")
    outcome, message = results[case]
    assert outcome == "passed", f"{case} {outcome} on the multi-node cluster:\n{message[-6000:]}"
