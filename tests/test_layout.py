"""The package layering: the core (``pairmill``) imports no job, and the jobs do not import the
chain that sits above them. Read from the source (every import statement, also those inside
functions), so a lazy import cannot slip past."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"pipelines", "mining", "training", "tune"}
CHAIN = "pairmill.chain"  # the face: `pairmill run` and its report, above every job
FORBIDDEN = {
    "pairmill": JOBS | {CHAIN},  # the core; pairmill/chain/ itself is checked only for what imports it
    "pipelines": {CHAIN, "training", "tune"},
    "mining": {CHAIN, "training", "tune"},
    "training": {CHAIN, "tune"},
    "tune": {CHAIN},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def forbidden(module: str, rules: set[str]) -> bool:
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    files = [p for p in sorted((ROOT / package).rglob("*.py")) if "chain" not in p.relative_to(ROOT).parts]
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if forbidden(m, FORBIDDEN[package]))
                 for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}
