"""`make demo`-style output with no terminal (CI logs, `make demo 2>&1 | tee`): one line per step, no
carriage-return bar updates, no TensorFlow/absl/CUDA-stub lines.

- fake models (like test_demo.py): the demo's own steps, through the real server and client processes;
- the export's step bar and a TensorFlow import in a process whose stderr is a pipe, with a stand-in
  `tensorflow` that writes TensorFlow's real start-up lines to file descriptor 2 as its C++ code does;
- slow: the real thing, `python -m export.demo` exporting mobilenet_v2 (--weights none) with TensorFlow.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.backends.fake import write_fake_model

ROOT = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"absl::InitializeLog|cudart_stub|cuda_platform|cpu_feature_guard|cuInit|oneDNN custom operations")


def _photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"p{i}.png")
    return folder


def _env(python_env):
    env = {k: v for k, v in python_env.items() if k not in ("KESTREL_VERBOSE", "KESTREL_PROGRESS",
                                                             "TF_CPP_MIN_LOG_LEVEL")}
    return env


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with str output that keeps carriage returns (text=True turns each "\r" into "\n")."""
    result = subprocess.run(cmd, capture_output=True, **kwargs)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


def _no_terminal_noise(text: str):
    assert "\r" not in text, "carriage-return progress updates in a log"
    bad = [line for line in text.splitlines() if NOISE.search(line)]
    assert not bad, bad


def test_demo_with_fake_models_prints_each_step_once(tmp_path, python_env):
    repo = tmp_path / "models"
    labels = [f"kind_{i}" for i in range(10)]
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_fake_model(repo, name, labels=labels, seed=seed)
        write_fake_model(repo, f"{name}_keras", labels=labels, seed=seed)
    photos = _photos(tmp_path / "photos")
    result = _run(
        [sys.executable, "-m", "kestrel", "demo", "--models", "alpha,beta", "--repository", str(repo), "--port", "0",
         "--http-port", "0", "--photos", str(photos)],
        cwd=ROOT, env=_env(python_env), timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("[demo] ")]
    expected = [r"alpha: already in .*, skipping export", r"beta: already in .*, skipping export",
                r"ensemble imagenet: defining it in .* \(imagenet=alpha,beta:mean\)",  # a repository ensemble
                r"starting the server: -m serve --repository .* --models alpha,beta,imagenet .*",
                r"server SERVING on 127\.0\.0\.1:\d+; web page http://127\.0\.0\.1:\d+/; classifying 2 photos"]
    assert len(steps) == len(expected), steps
    for line, pattern in zip(steps, expected):
        assert re.fullmatch(r"\[demo\] " + pattern, line), (line, pattern)
    _no_terminal_noise(result.stdout + result.stderr)


STEPS_CODE = """
    import sys
    from serve import console
    console.quiet_native_logs()
    import tensorflow  # the stand-in: writes TensorFlow's start-up lines to fd 2
    from export.pipeline import _Steps
    steps = _Steps(True, 4, "mobilenet_v2")
    for label in ("loading Keras model", "converting to ONNX", "checking the ONNX model", "parity check"):
        steps.step(label)
        steps.note("comparing 64 images")  # a note inside a step is not a line of its own
    steps.close()
    print("done", file=sys.stderr)
"""


def test_export_steps_and_tensorflow_import_in_a_log(tmp_path, python_env):
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    stub.joinpath("__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1796156329.453416   12476 cudart_stub.cc:31] Could not find cuda drivers on "
                    b"your machine, GPU will not be used.\\n")
        os.write(2, b"E0000 00:00:1796156348.457402   12476 cuda_platform.cc:52] failed call to cuInit: UNKNOWN\\n")
    """))
    env = _env(python_env)
    env["PYTHONPATH"] = f"{stub.parent}:{env['PYTHONPATH']}"
    result = _run([sys.executable, "-c", textwrap.dedent(STEPS_CODE)], cwd=ROOT, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [re.sub(r" \[[^]]*\]$", "", ln) for ln in lines] == [
        "export mobilenet_v2: 1/4 loading Keras model: comparing 64 images",
        "export mobilenet_v2: 2/4 converting to ONNX: comparing 64 images",
        "export mobilenet_v2: 3/4 checking the ONNX model: comparing 64 images",
        "export mobilenet_v2: 4/4 parity check: comparing 64 images",
        "done",
    ]
    _no_terminal_noise(result.stderr)


@pytest.mark.slow
def test_real_demo_export_output_in_a_log(tmp_path, python_env):
    """The demo exporting a real model with TensorFlow, its output piped: the export's 5 steps one line each."""
    photos = _photos(tmp_path / "photos", 1)
    result = _run(
        [sys.executable, "-m", "export.demo", "--models", "mobilenet_v2", "--weights", "none", "--repository",
         str(tmp_path / "models"), "--port", "0", "--http-port", "0", "--photos", str(photos), "--limit", "1"],
        cwd=ROOT, env=_env(python_env), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [ln for ln in result.stderr.splitlines() if ln.startswith("export mobilenet_v2: ")]
    counts = [re.match(r"export mobilenet_v2: (\d+)/(\d+) ", ln).groups() for ln in steps]
    total = int(counts[0][1])
    assert [int(n) for n, _ in counts] == list(range(1, total + 1)), steps
    _no_terminal_noise(result.stdout + result.stderr)
