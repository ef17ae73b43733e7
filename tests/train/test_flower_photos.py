"""The issue's targets on ../shared/datasets/flower_photos (native resolution) with the shared MobileNetV2 weights.

Slow: a cold run of the README's recipe with `--precision int8` (export, INT8
calibrated on the training photos and gated on the labelled test split), a
re-run that must take every feature from the cache, then both exported models
served by a real `serve.hub.ModelHub` answering, photo by photo, the labels
the report lists for the test split. Few-shot: one pair through the same
command the ten-pair runner uses.

The accuracy floors sit below what was measured (train/README.md) by a few
test images of run-to-run noise; timings are printed, never asserted (the
wall-time targets are measured by the benchmark commands in train/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# the module fixture (cold run with export and INT8, then a re-run) outlasts the suite's 300 s default on a
# loaded machine; nothing here asserts a time
pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.timeout(2400)]

RECIPE = ["--augment", "--flip-tta"]  # train/README.md: the recipe chosen on validation (+ default --pool-stages 3)
REACHED_TEST_ACCURACY = 0.90  # 0.933 measured (multi-scale features, head refit on train + val); 5 photos below
INT8_RATIO = 0.99  # the gate; measured 0.940 INT8 vs 0.933 FP32
FEWSHOT_PAIR_FLOOR = 0.83  # roses vs tulips, the hardest pair: 0.902 measured on 400 test photos (0.880 before the refit)
TEST_IMAGES = 150  # 10 % of 300 photos per class


def _train(args, env, cwd):
    proc = subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def flower_photos_dir(shared_dir):
    path = shared_dir / "datasets" / "flower_photos"
    if not path.is_dir():
        pytest.skip(f"needs {path}, which is absent")
    return path


@pytest.fixture(scope="module")
def env(keras_home):
    env = dict(os.environ, KERAS_HOME=str(keras_home), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return env


@pytest.fixture(scope="module")
def photos_run(env, flower_photos_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("flower_photos")
    common = [str(flower_photos_dir), "--name", "flower_photos", "--cache-dir", str(work / "cache"),
              "--no-progress", *RECIPE]
    _train(common + ["--precision", "int8", "--repository", str(work / "models"), "--output", str(work / "cold")],
           env, work)
    _train(common + ["--output", str(work / "rerun")], env, work)
    return {"work": work, "cold": json.loads((work / "cold" / "report.json").read_text()),
            "rerun": json.loads((work / "rerun" / "report.json").read_text())}


def test_flower_photos_accuracy(photos_run):
    report = photos_run["cold"]
    print(f"flower_photos: test accuracy {report['test_accuracy']}, seconds {report['seconds']}")
    assert report["test_images"] == TEST_IMAGES and report["skipped_images"] == []
    assert report["test_accuracy"] >= REACHED_TEST_ACCURACY
    assert report["refit"]["done"] and report["refit"]["photos"] == 1350  # training + validation photos
    assert report["export"]["parity"].startswith("parity PASS")


def test_flower_photos_rerun_uses_cached_features(photos_run):
    features = photos_run["rerun"]["features"]
    print(f"flower_photos re-run seconds {photos_run['rerun']['seconds']}")
    assert features["extracted_images"] == 0 and features["misses"] == [] and features["decoded_images"] == 0
    assert photos_run["rerun"]["test_accuracy"] >= REACHED_TEST_ACCURACY


def test_flower_photos_int8_keeps_99_percent_of_fp32(photos_run):
    q = photos_run["cold"]["int8"]
    print(f"flower_photos INT8: {q}")
    assert q["written"] and q["passed"] and q["test_images"] == TEST_IMAGES
    assert q["fp32_accuracy"] == photos_run["cold"]["test_accuracy"]
    assert q["int8_accuracy"] >= INT8_RATIO * q["fp32_accuracy"]


def test_served_models_answer_the_report_labels(photos_run):
    """A real ModelHub (the server's core) serving both exports answers what the report says, photo by photo."""
    from serve.hub import ModelHub

    report = photos_run["cold"]
    hub = ModelHub(photos_run["work"] / "models", models=["flower_photos", "flower_photos_int8"], strict=True).load()
    mismatches = []
    try:
        for row, int8_label in zip(report["test_predictions"], report["int8_test_predictions"], strict=True):
            with open(row["path"], "rb") as fh:
                answer = hub.classify(fh.read(), names=["flower_photos", "flower_photos_int8"], top=1)
            got = {a.model: a.predictions[0][0] for a in answer.models}
            if got != {"flower_photos": row["predicted"], "flower_photos_int8": int8_label}:
                mismatches.append((row["path"], got, row["predicted"], int8_label))
    finally:
        hub.close()
    assert len(report["test_predictions"]) == TEST_IMAGES
    assert mismatches == []


def test_fewshot_pair(env, flower_photos_dir, tmp_path):
    """The hardest pair measured (roses vs tulips) through the few-shot runner."""
    proc = subprocess.run([sys.executable, "-m", "train.fewshot", str(flower_photos_dir), "--pair", "roses,tulips",
                           "--output", str(tmp_path / "fs"), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    [row] = result["pairs"]
    print(f"few-shot roses vs tulips: {row}")
    assert row["train_images"] + row["val_images"] == 200 and row["test_images"] == 400
    assert row["test_accuracy"] >= FEWSHOT_PAIR_FLOOR
