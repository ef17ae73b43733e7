"""benchmarks.ensemble_latency on fake members: the pipeline runs and reports; no speed is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.backends.fake import write_fake_model

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_reports_every_member_the_ensemble_and_the_ratio(tmp_path, python_env):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.ensemble_latency", "--smoke", "--repeats", "4",
                             "--warmup", "1", "--quiet", "--json", str(out)],
                            cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["members"] == ["fake_fast", "fake_mid", "fake_slow"] and data["ensemble"] == "fake_trio"
    assert set(data["median_ms"]) == {"fake_fast", "fake_mid", "fake_slow", "fake_trio"}
    # lower bounds only (simulated compute is a sleep): the ensemble waits for its slowest member
    assert data["median_ms"]["fake_slow"] >= 30 and data["median_ms"]["fake_trio"] >= 30
    assert data["member_compute_median_ms_in_ensemble"]["fake_slow"] >= 30
    # the medians in the JSON are rounded to 0.01 ms and the ratio (of the unrounded ones) to 0.001
    assert data["ratio_to_slowest"] == pytest.approx(data["median_ms"]["fake_trio"] / data["median_ms"]["fake_slow"],
                                                     abs=2e-3)
    assert "ensemble / slowest member (fake_slow)" in result.stdout and "CPU:" in result.stdout


def test_command_line_ensemble_and_bad_input(tmp_path, python_env):
    repo = tmp_path / "models"
    for name, seed in (("a", 1), ("b", 2)):
        write_fake_model(repo, name, seed=seed)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "one.png")
    args = [sys.executable, "-m", "benchmarks.ensemble_latency", "--repository", str(repo), "--images",
            str(tmp_path / "one.png"), "--repeats", "2", "--warmup", "0", "--quiet"]
    result = subprocess.run(args + ["--ensemble", "pair=a,b:majority"], cwd=ROOT, env=python_env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pair (ensemble)" in result.stdout
    result = subprocess.run(args + ["--ensemble", "missing"], cwd=ROOT, env=python_env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "ensemble 'missing' is not in repository" in result.stderr
