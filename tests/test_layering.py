"""Imports flow one way: serve <- export <- train, and benchmarks on top; no cycles.

Checked on the source (every import statement, including those inside functions),
so a lazy import cannot hide a wrong-way dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> project packages it must never import
FORBIDDEN = {
    "serve": {"export", "train", "benchmarks", "deploy", "kestrel"},
    "export": {"train", "benchmarks", "deploy", "kestrel"},
    "train": {"benchmarks", "deploy", "kestrel"},
    "benchmarks": {"deploy", "kestrel"},
    "deploy": {"export", "train", "benchmarks", "kestrel"},  # deploy (Ray Serve, manifests) builds on serve only
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in files
        if _imports(path) & FORBIDDEN[package]
    }
    assert not wrong, f"{package} must not import {sorted(FORBIDDEN[package])}: {wrong}"
