"""`make demo`'s orchestration: skip what is exported, serve, classify through the client, stop.

The export step itself is covered by test_export.py; here the repository already
holds (fake-backend) models, so the demo runs without TensorFlow in seconds.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from serve.backends.fake import write_fake_model

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_and_prints_each_models_top3_and_the_ensemble(tmp_path, python_env):
    repo = tmp_path / "models"
    labels = [f"kind_{i}" for i in range(10)]
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_fake_model(repo, name, labels=labels, seed=seed)
        write_fake_model(repo, f"{name}_keras", labels=labels, seed=seed)  # "already exported"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")

    result = subprocess.run(
        [sys.executable, "-m", "export.demo", "--models", "alpha,beta", "--repository", str(repo),
         "--port", "0", "--http-port", "0", "--photos", str(photos)],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "alpha: already in" in out and "beta: already in" in out
    for photo in ("p0.png", "p1.png"):
        assert photo in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("alpha", "beta", "imagenet"))]
    assert {row[0] for row in rows} == {"alpha", "beta", "imagenet"}
    # each row names three labels (the top 3)
    assert all(sum(token.startswith("kind_") for token in row) == 3 for row in rows)
    assert "server stopped" in result.stderr


def test_demo_without_any_exportable_model_fails_clearly(tmp_path, python_env):
    result = subprocess.run(
        [sys.executable, "-m", "export.demo", "--models", "not_an_app", "--repository", str(tmp_path / "m"),
         "--port", "0", "--photos", str(tmp_path)],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "unknown" in result.stderr.lower() and "no model could be exported" in result.stderr
