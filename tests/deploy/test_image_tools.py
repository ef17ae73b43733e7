"""deploy/docker's image tools without building anything: `make image`, `make image-test` and friends stay out
of `make test`; the scripts that run before any venv exists use the standard library only; the serving stage of
the Dockerfile holds only the venv built in the first stage; the helpers parse what the tools print."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGE_TARGETS = ("base-image", "image", "image-repo", "image-test", "footprint", "arm64-wheels")


def _make_prerequisites(target: str) -> set[str]:
    """Every target `make TARGET` would run (prerequisites, recursively)."""
    text = (ROOT / "Makefile").read_text()
    rules = {m.group(1): m.group(2).split() for m in re.finditer(r"^([\w.-]+):(?!=)([^\n]*)", text, re.M)}
    seen, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [d for d in rules.get(name, []) if not d.startswith("$")]
    return seen


def test_image_targets_exist_and_are_not_part_of_make_test():
    text = (ROOT / "Makefile").read_text()
    for target in IMAGE_TARGETS:
        assert re.search(rf"^{target}:", text, re.M), f"no make target {target}"
    assert not _make_prerequisites("test") & set(IMAGE_TARGETS)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "docker" not in test_recipe and "image" not in test_recipe


@pytest.mark.parametrize("script", ["engine.py", "arm64_wheels.py"])
def test_scripts_run_before_the_venv_use_only_the_standard_library(script):
    tree = ast.parse((DOCKER / script).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    foreign = imported - set(sys.stdlib_module_names) - {"__future__", "engine"}
    assert not foreign, f"{script} imports {sorted(foreign)}: `make image` runs it with the system python3"


@pytest.mark.parametrize("script", ["engine.py", "image_test.py", "footprint.py", "arm64_wheels.py"])
def test_scripts_answer_help(script):
    done = subprocess.run([sys.executable, str(DOCKER / script), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_serving_stage_holds_only_the_built_venv():
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].split()[:3] == ["${BASE}", "AS", "build"]
    serving = [ln for ln in stages[1].splitlines()[1:] if ln.strip() and not ln.startswith("#")]
    copies = [ln for ln in serving if ln.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /opt/kestrel /opt/kestrel"], copies
    runs = [ln for ln in serving if ln.startswith("RUN")]
    assert runs == ["RUN useradd --uid 1000 --create-home kestrel"], runs  # no pip, no compilers, no sources
    build = stages[0]
    assert "pip uninstall -y -q pip setuptools" in build and "grpcio-tools" not in build.split("/opt/kestrel/bin/pip")[1]


def test_the_arm64_report_reads_wheel_tags():
    sys.path.insert(0, str(DOCKER))
    try:
        import arm64_wheels
    finally:
        sys.path.remove(str(DOCKER))
    assert arm64_wheels.wheel_glibc("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl") \
        == "glibc 2.27"
    assert arm64_wheels.wheel_glibc("grpcio-1.85.1-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl") \
        == "glibc 2.17"
    assert arm64_wheels.wheel_glibc("tqdm-4.70.1-py3-none-any.whl") == "any (pure Python)"
    assert arm64_wheels.PLATFORMS[0] == "manylinux2014_aarch64" and "manylinux_2_36_aarch64" in arm64_wheels.PLATFORMS
