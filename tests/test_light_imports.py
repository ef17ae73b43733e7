"""Every Kestrel module imports, and the CLIs answer --help, with the heavy packages unavailable.

A meta-path hook makes tensorflow, keras, tf2onnx, onnx, onnxruntime and tensorrt
unimportable in a subprocess: `serve` must start without TensorFlow, and
everything must import on a machine without a GPU (Polygraphy's rule).
"""

import pkgutil
import subprocess
import sys
import textwrap

import pytest

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ["tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "tensorrt", "onnxconverter_common", "tf_keras"]
PACKAGES = ["serve", "export", "train", "benchmarks", "deploy", "kestrel"]
# Modules that patch the process on import (gevent) are checked by their own tests.
SKIP = {"benchmarks.locustfile", "benchmarks.locust_flask", "benchmarks.locust_http", "benchmarks._loadgen"}  # covered by make bench-smoke

BLOCKER = textwrap.dedent(
    f"""
    import sys
    BLOCKED = {BLOCKED!r}
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked by the light-import test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _modules():
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=package + "."):
            if info.name.endswith("__main__") or info.name in SKIP:
                continue
            names.append(info.name)
    return sorted(names)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_all_modules_import_without_heavy_packages():
    modules = _modules()
    assert "serve.repository" in modules and "serve.backends.onnxruntime" in modules
    code = textwrap.dedent(
        """
        import importlib, sys
        failed = []
        for name in sys.argv[1:]:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        leaked = [m for m in BLOCKED if m in sys.modules]
        print("FAILED", failed)
        print("LEAKED", leaked)
        sys.exit(1 if failed or leaked else 0)
        """
    )
    result = _run(code, *modules)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["serve", "export", "train"])
def test_cli_help_without_heavy_packages(package):
    if not (ROOT / package / "__main__.py").exists():
        pytest.skip(f"{package} has no CLI yet")
    code = f"import runpy, sys; sys.argv = ['{package}', '--help']; runpy.run_module('{package}', run_name='__main__')"
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" in result.stdout.lower()


KESTREL_COMMANDS = ["export", "optimize", "evaluate", "serve", "classify", "train", "bench", "bench inprocess",
                    "bench classify-latency", "bench docs", "demo", "doctor"]


@pytest.mark.parametrize("command", ["", *KESTREL_COMMANDS])
def test_kestrel_help_without_heavy_packages(command):
    """`kestrel --help` and `kestrel X --help` with TensorFlow, onnx, onnxruntime, tensorrt unimportable."""
    if command == "evaluate" and not (ROOT / "export" / "evaluate.py").exists():
        pytest.skip("export/evaluate.py is not in this checkout yet (the accuracy branch adds it)")
    argv = [*command.split(), "--help"]
    code = f"import sys; from kestrel.cli import main; sys.exit(main({argv!r}))"
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" in result.stdout.lower() and "examples:" in result.stdout
    leaked = [m for m in BLOCKED if f"{m} is blocked" in result.stderr]
    assert not leaked, result.stderr


def test_missing_runtime_names_the_extra():
    code = textwrap.dedent(
        """
        import numpy as np
        from serve.backends.onnxruntime import OnnxRuntimeRunner
        from serve.repository import TensorSpec
        from serve.errors import MissingDependencyError
        r = OnnxRuntimeRunner("m", "/nonexistent.onnx", TensorSpec("images", np.uint8, (4, 4, 3)),
                              TensorSpec("probabilities", np.float32, (2,)))
        try:
            r.load()
        except MissingDependencyError as exc:
            print(exc)
        """
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "pip install 'kestrel[cpu]'" in result.stdout
