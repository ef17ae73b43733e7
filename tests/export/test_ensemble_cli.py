"""python -m export.ensemble: create an ensemble folder, fit its temperatures on labelled images, show it;
export.evaluate reads it back (fake models: no TensorFlow, seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from repo_modes import assert_readable_by_others
from serve import images
from serve.backends.fake import fake_probabilities, write_fake_model
from serve.ensemble import Ensemble, fit_temperature
from serve.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
LABELS = [f"kind_{i}" for i in range(6)]


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "export.ensemble", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)


def _labelled(tmp_path, count=60):
    """Images labelled with member a's answer 70 % of the time (else a random class)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "labelled"
    truth = []
    for i in range(count):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        pixels[:, : rng.integers(1, 40)] //= np.uint8(rng.integers(1, 5))
        seen = images.resize(images.decode(_png(pixels)), (32, 32))[None]
        label = int(fake_probabilities(seen, 6, seed=1).argmax()) if rng.random() < 0.7 else int(rng.integers(6))
        folder = data / LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        truth.append((seen, label))
    return data, truth


def _png(pixels):
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_create_fit_show_and_evaluate(tmp_path, python_env):
    repo = tmp_path / "models"
    for name, seed in (("a", 1), ("b", 2)):
        write_fake_model(repo, name, classes=6, labels=LABELS, seed=seed)
    result = _run(["create", "pair=a,b:geometric", "--repository", str(repo)], python_env)
    assert result.returncode == 0, result.stderr
    assert Ensemble.from_entry(ModelRepository(repo).ensemble("pair")) == Ensemble("pair", ("a", "b"), "geometric")

    data, truth = _labelled(tmp_path)
    result = _run(["fit", "pair", str(data), "--repository", str(repo), "--quiet"], python_env)
    assert result.returncode == 0, result.stderr[-2000:]
    stored = ModelRepository(repo).ensemble("pair")
    assert stored.fusion == "geometric" and set(stored.temperatures) == {"a", "b"}
    # the same fit, computed here from the fake models' known outputs on the same decoded images
    pixels = np.concatenate([seen for seen, _ in truth])
    labels = np.array([label for _, label in truth])
    for name, seed in (("a", 1), ("b", 2)):
        expected = fit_temperature(fake_probabilities(pixels, 6, seed), labels)  # the NLL ignores order
        assert abs(stored.temperatures[name] - expected) < 1e-3 * expected
    assert stored.temperatures["a"] < stored.temperatures["b"]  # a is right 70 %: sharpened; b is noise
    assert "temperature" in result.stderr and "NLL" in result.stderr

    shown = _run(["show", "pair", "--repository", str(repo)], python_env)
    assert shown.returncode == 0 and "a,b:geometric T=" in shown.stdout and "fitted on" in shown.stdout
    assert_readable_by_others(repo)  # the ensemble's config (created, then fitted) is 0644 like the models'

    evaluated = subprocess.run(
        [sys.executable, "-m", "export.evaluate", str(data), "--repository", str(repo), "--ensemble", "pair",
         "--latency-runs", "0", "--no-plot", "--quiet", "--out", str(tmp_path / "eval")],
        cwd=ROOT, env=python_env, text=True, capture_output=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "stored temperatures were fitted on these images" in evaluated.stdout
    for row in ("pair:geometric |", "pair:geometric +T (stored)", "pair:geometric +T (cv)", "pair:mean +T (cv)",
                "pair:oracle"):
        assert row in evaluated.stdout, row


def test_bad_requests_fail_clearly(tmp_path, python_env):
    repo = tmp_path / "models"
    write_fake_model(repo, "a", classes=6, labels=LABELS, seed=1)
    write_fake_model(repo, "odd", classes=4, seed=1)
    result = _run(["create", "pair=a,ghost", "--repository", str(repo)], python_env)
    assert result.returncode == 2 and "ghost not in repository" in result.stderr
    result = _run(["create", "pair=a,odd", "--repository", str(repo)], python_env)
    assert result.returncode == 2 and "share one label set" in result.stderr
    result = _run(["fit", "nothing", str(tmp_path), "--repository", str(repo)], python_env)
    assert result.returncode == 2 and "ensemble 'nothing' is not in repository" in result.stderr
    assert not ModelRepository(repo).ensemble_names()
