"""The package layering: the core (``pairmill``) imports no job, and the jobs do not import the
chain that sits above them. Read from the source (every import statement, also those inside
functions), so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"pipelines", "mining", "training", "tune"}
FORBIDDEN = {
    "pairmill": JOBS | {"chain"},
    "pipelines": {"chain", "training", "tune"},
    "mining": {"chain", "training", "tune"},
    "training": {"chain", "tune"},
    "tune": {"chain"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}
