"""End to end on a tiny generated dataset with a small base (MobileNetV2 alpha 0.35, 96x96, no weights).

One cold run (augmented) and one re-run with other head settings share a module
fixture; the re-run must load every feature view from the cache and extract
nothing (asserted on the cache counters, not on timings).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")

from train.pipeline import OUTPUT_FILES, TrainOptions, train  # noqa: E402

SMALL = dict(base="mobilenet_v2", alpha=0.35, image_size=96, weights="none", progress=False)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_runs")
    cache = work / "cache"
    first = train(TrainOptions(data_dir=tiny_dataset, output=work / "first", cache_dir=cache, epochs=3,
                               augment=True, heads=("linear", "mlp"), **SMALL))
    second = train(TrainOptions(data_dir=tiny_dataset, output=work / "second", cache_dir=cache, epochs=2,
                                augment=True, heads=("linear",), batch_size=8, **SMALL))
    return {"first": first, "second": second, "cache": cache, "work": work}


def test_cold_run_writes_every_output(runs):
    result = runs["first"]
    for name in OUTPUT_FILES:
        path = result.output / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert not [p for p in result.output.iterdir() if p.name.startswith(".tmp")]  # no staging left
    assert (result.output / "labels.txt").read_text().split() == ["blue_checks", "green_horizontal", "red_vertical"]
    assert (result.output / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_metrics_split_and_timings(runs):
    report = json.loads((runs["first"].output / "report.json").read_text())
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["test_images"] == 3  # one per class: round(8 * 0.1) -> at least one
    assert set(report["per_class"]) == {"blue_checks", "green_horizontal", "red_vertical"}
    for stats in report["per_class"].values():
        assert set(stats) == {"precision", "recall", "f1", "support"}
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == report["test_images"]
    assert "true \\ predicted" in report["confusion_matrix_text"]
    assert report["dataset"]["imbalance"]["largest"] == "red_vertical"  # 9 files listed, one corrupt
    for phase in ("scan", "base", "features", "heads", "evaluate", "save", "total"):
        assert report["seconds"][phase] >= 0
    # the default multi-scale features: three stages' averages, and the saved model computes the same
    assert report["base"]["pooled_layers"] == ["out_relu", "block_13_expand_relu", "block_6_expand_relu"]
    assert report["features"]["feature_shape"] == [1280 + 192 + 96]
    check = report["joined_model_check"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    split = report["split"]
    assert [split[k]["images"] for k in ("train", "val", "test")] == [15, 6, 3]  # 8 decodable per class
    assert all(n == 2 for n in split["val"]["per_class"].values())
    assert {h["kind"] for h in report["heads"]} == {"linear", "mlp"}
    assert report["chosen_head"] == report["heads"][0]["kind"]


def test_corrupt_file_is_reported_not_fatal(runs):
    report = runs["first"].report
    skipped = report["skipped_images"]
    assert [os.path.basename(s["path"]) for s in skipped] == ["corrupt.jpg"]
    assert "cannot decode" in skipped[0]["reason"]
    assert report["split"]["train"]["per_class"]["red_vertical"] == 5  # 8 decodable: 1 test, 2 val, 5 train


def test_saved_model_follows_the_serving_contract(runs):
    import keras

    model = keras.saving.load_model(runs["first"].model_path, compile=False, safe_mode=True)
    assert model.inputs[0].name == "images" and str(model.inputs[0].dtype) == "uint8"
    assert tuple(model.inputs[0].shape) == (None, 96, 96, 3)
    assert model.outputs[0].name.startswith("probabilities") or model.layers[-1].name == "probabilities"
    batch = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    probs = np.asarray(model.predict(batch, verbose=0))
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    check = runs["first"].report["joined_model_check"]
    assert check["images"] == 3 and check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4


def test_the_readme_exports_what_train_wrote(runs, tmp_path, python_env):
    """The tour's `kestrel export runs/flower_photos/model.keras --labels runs/flower_photos/labels.txt --name
    flowers`, on a train output folder: the model and its labels.txt become a served entry."""
    import subprocess
    import sys

    from serve.repository import ModelRepository

    out = runs["first"].output
    repo = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "kestrel", "export", str(out / "model.keras"), "--labels",
                             str(out / "labels.txt"), "--name", "flowers", "--repository", str(repo), "--quiet"],
                            capture_output=True, text=True, env=python_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity PASS" in result.stdout
    entry = ModelRepository(repo).entry("flowers")
    assert entry.labels() == (out / "labels.txt").read_text().split()
    assert entry.input_spec.shape[:2] == (96, 96)


def test_first_run_extracts_and_rerun_hits_the_cache(runs):
    cold = runs["first"].report["features"]
    # plain: every photo; flip and zoom of the training photos, then of the validation photos (for the refit)
    assert cold["misses"] == ["plain", "flip", "zoom", "flip", "zoom"] and cold["hits"] == []
    assert cold["extracted_images"] == 24 + 2 * 15 + 2 * 6
    assert cold["extractor_converted"] is True
    warm = runs["second"].report["features"]
    assert warm["hits"] == ["plain", "flip", "zoom", "flip", "zoom"] and warm["misses"] == []
    assert warm["extracted_images"] == 0 and warm["decoded_images"] == 0
    assert warm["extractor_converted"] is False
    assert runs["second"].report["skipped_images"] == runs["first"].report["skipped_images"]
    assert [h["kind"] for h in runs["second"].report["heads"]] == ["linear"]


def test_copied_dataset_hits_and_changed_file_misses(runs, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)  # same relative paths, sizes and mtimes: the same images
    copied = train(TrainOptions(data_dir=data, output=tmp_path / "a", cache_dir=runs["cache"], epochs=1,
                                heads=("linear",), **SMALL))
    assert copied.report["features"]["hits"] == ["plain"] and copied.report["features"]["extracted_images"] == 0
    skipped = copied.report["skipped_images"]
    assert [s["path"] for s in skipped] == [str(data / "red_vertical" / "corrupt.jpg")]  # this copy's path
    assert str(data) in skipped[0]["reason"]
    victim = data / "blue_checks" / "blue_checks_01.jpg"
    victim.write_bytes(victim.read_bytes() + b"\0\0")  # size changes: the list's fingerprint changes
    again = train(TrainOptions(data_dir=data, output=tmp_path / "b", cache_dir=runs["cache"], epochs=1,
                               heads=("linear",), **SMALL))
    features = again.report["features"]
    assert features["misses"] == ["plain"] and features["extracted_images"] == 24
    assert features["extractor_reused"] is True  # the converted base is reused: same base, same weights


def test_interrupt_leaves_no_half_written_model(runs, tiny_dataset, tmp_path, monkeypatch):
    from train import report as report_lib

    output = tmp_path / "out"
    output.mkdir()
    (output / "model.keras").write_bytes(b"previous model")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_lib, "plot_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(data_dir=tiny_dataset, output=output, cache_dir=runs["cache"], epochs=1,
                           heads=("linear",), **SMALL))
    assert (output / "model.keras").read_bytes() == b"previous model"
    assert sorted(p.name for p in output.iterdir()) == ["model.keras"]


def test_flip_tta_model_averages_both_views_as_the_report_says(runs, tiny_dataset, tmp_path):
    """--flip-tta: the saved model mirrors the photo itself; the feature path averaged the cached flip view."""
    import keras

    result = train(TrainOptions(data_dir=tiny_dataset, output=tmp_path / "tta", cache_dir=runs["cache"], epochs=1,
                                flip_tta=True, **SMALL))
    report = result.report
    assert report["base"]["flip_tta"] is True and report["base"]["base_passes_per_image"] == 2
    features = report["features"]
    assert features["hits"] == ["plain"] and features["misses"] == ["flip"]
    assert features["extracted_images"] == 24  # the mirror image of every decodable photo
    assert features["views"] == ["plain", "flip"]  # the flipped training photos are a training view for free
    check = report["joined_model_check"]
    assert check["images"] == 3 and check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    model = keras.saving.load_model(result.model_path, compile=False, safe_mode=True)
    batch = np.random.default_rng(1).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(batch[:, :, ::-1])
    np.testing.assert_allclose(np.asarray(model(batch)), np.asarray(model(mirrored)), atol=1e-5)  # flip-invariant


def test_horizontal_flip_layers_mirror_exactly():
    import keras

    from train import bases

    x = keras.Input(shape=(5, 7, 3))
    model = keras.Model(x, bases.horizontal_flip(x))
    images = np.random.default_rng(0).normal(0, 50, (2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(images)), images[:, :, ::-1])


def _head_mean(model_path):
    import keras

    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    layer = next(l for l in model._flatten_layers() if l.name == "head_normalize")  # noqa: E741
    return np.asarray(layer.mean).ravel()


def test_linear_head_is_refit_on_training_and_validation_photos(runs, tiny_dataset, tmp_path):
    """After validation chose the L2 strength the head is fitted again on train + val views; --no-refit keeps
    the training-only head (the standardisation statistics tell which photos each head was fitted on)."""
    from train import head as head_lib

    refit = runs["second"].report["refit"]
    assert refit["done"] is True and refit["photos"] == 15 + 6 and refit["views"] == ["plain", "flip", "zoom"]
    assert refit["feature_vectors"] == 3 * 21 and refit["l2"] in head_lib.L2_GRID
    assert refit["l2"] == runs["second"].report["heads"][0]["l2"]  # the strength validation chose
    assert runs["second"].report["seconds"]["refit"] >= 0
    kept = train(TrainOptions(data_dir=tiny_dataset, output=tmp_path / "no_refit", cache_dir=runs["cache"],
                              augment=True, refit=False, **SMALL))
    assert kept.report["refit"] == {"done": False, "why": "--no-refit"}
    assert kept.report["features"]["hits"] == ["plain", "flip", "zoom"]  # no validation views needed
    drop_time = lambda heads: [{k: v for k, v in h.items() if k != "seconds"} for h in heads]  # noqa: E731
    assert drop_time(kept.report["heads"]) == drop_time(runs["second"].report["heads"])  # the same choice ...
    # ... then different weights: the refit head standardises with train + val statistics
    train_only, train_val = _head_mean(kept.model_path), _head_mean(runs["second"].model_path)
    assert np.abs(train_only - train_val).max() > 1e-3 * np.abs(train_only).max()  # (random weights: small values)
    # the report's accuracy is the saved model's (joined check) in both
    for result in (kept, runs["second"]):
        assert result.report["joined_model_check"]["top1_agreement"] == 1.0


def test_refit_is_skipped_where_validation_still_decides(runs):
    first = runs["first"].report  # linear and mlp heads: the mlp stops early on validation, it is not refit
    if first["chosen_head"] == "mlp":
        assert first["refit"] == {"done": False, "why": "the mlp head stops early on validation"}
    else:
        assert first["refit"]["done"] is True
    assert TrainOptions(data_dir="d").refit is True
