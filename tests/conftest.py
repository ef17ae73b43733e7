"""Shared test fixtures and marker handling.

Markers (declared in pyproject.toml, strict):
- slow: big models / long load tests; `make test` deselects them, `make test-all` runs them.
- gpu: needs an NVIDIA GPU and TensorRT; skipped here with the reason.
- shared_data: needs ../shared (weights, photos, flowers); skipped with the reason when absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared").resolve()


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'kestrel[gpu]' on a machine with an NVIDIA GPU)"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU found (nvidia-smi is missing)"
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi found but no usable NVIDIA GPU"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_reason = _gpu_reason()
    shared_reason = None if (SHARED / "README.md").is_file() else f"needs the shared data folder {SHARED}, which is absent"
    for item in items:
        if gpu_reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if shared_reason and "shared_data" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=shared_reason))


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


def pytest_collection_finish(session):
    if _gevent_patched():
        pytest.exit("a test module imported locust (or called gevent.monkey.patch_all) during collection: "
                    "the whole pytest process is now gevent-patched; run locust in a subprocess", returncode=3)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    if _gevent_patched():
        pytest.exit(f"{item.nodeid} gevent-patched the pytest process (imported locust?); "
                    "later tests would deadlock: run locust in a subprocess", returncode=3)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (skips the test when absent)."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"needs the shared data folder {SHARED}, which is absent")
    return SHARED


@pytest.fixture(scope="session")
def photos_dir(shared_dir) -> Path:
    return shared_dir / "photos"


@pytest.fixture(scope="session")
def flowers_dir(shared_dir) -> Path:
    return shared_dir / "datasets" / "flowers"


@pytest.fixture(scope="session")
def keras_home(shared_dir, tmp_path_factory) -> Path:
    """A writable copy of ../shared/keras_home, exported as KERAS_HOME for the session."""
    target = tmp_path_factory.mktemp("keras_home")
    shutil.copytree(shared_dir / "keras_home", target, dirs_exist_ok=True)
    os.chmod(target, 0o755)
    for path in target.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    previous = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(target)
    # Keras reads KERAS_HOME once, when it is first imported; an earlier test in
    # this process may have imported it already (a user's process sets it first).
    config = sys.modules.get("keras.src.backend.config")
    previous_dir = getattr(config, "_KERAS_DIR", None)
    if config is not None:
        config._KERAS_DIR = str(target)
    yield target
    if config is not None:
        config._KERAS_DIR = previous_dir
    if previous is None:
        os.environ.pop("KERAS_HOME", None)
    else:
        os.environ["KERAS_HOME"] = previous


@pytest.fixture
def python_env() -> dict:
    """Environment for subprocesses running this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
