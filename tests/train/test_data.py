"""Dataset scanning, the stratified split, views and metrics: no TensorFlow needed."""

from __future__ import annotations

import numpy as np
import pytest

from serve.errors import ConfigError
from train import data as data_lib
from train import features as features_lib
from train import report as report_lib


def test_scan_lists_classes_files_and_ignored(tiny_dataset):
    ds = data_lib.scan(tiny_dataset)
    assert ds.classes == ["blue_checks", "green_horizontal", "red_vertical"]
    counts = ds.counts()
    assert counts == {"blue_checks": 8, "green_horizontal": 8, "red_vertical": 9}  # the corrupt file is listed
    assert all(ds.classes[label] == path.parent.name for path, label in zip(ds.paths, ds.labels))
    assert ds.ignored == []


def test_scan_reports_files_outside_class_folders(tmp_path, dataset_factory):
    root = dataset_factory(tmp_path / "d", per_class=2)
    stray = root / "stray.png"
    stray.write_bytes((root / "blue_checks" / "blue_checks_00.png").read_bytes())
    ds = data_lib.scan(root)
    assert ds.ignored == [stray]
    assert stray not in ds.paths
    assert data_lib.summary(ds)["ignored_outside_class_folders"] == [str(stray)]


def test_scan_rejects_folders_that_are_not_datasets(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        data_lib.scan(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="at least 2"):
        data_lib.scan(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="empty_class"):
        data_lib.scan(tmp_path)


def test_imbalance_names_largest_and_smallest():
    info = data_lib.imbalance({"a": 10, "b": 40, "c": 20})
    assert (info["largest"], info["smallest"], info["ratio"], info["balanced"]) == ("b", "a", 4.0, False)
    assert data_lib.imbalance({"a": 10, "b": 12})["balanced"] is True


def test_dataset_line_says_equal_class_sizes_once():
    # was "class sizes 300 (daisy) .. 300 (daisy)" for five classes of 300
    equal = {name: 300 for name in ("daisy", "dandelion", "roses", "sunflowers", "tulips")}
    assert data_lib.describe_sizes(1500, equal) == "1500 images in 5 classes, 300 in each"
    line = data_lib.describe_sizes(70, {"a": 10, "b": 40, "c": 20})
    assert line.startswith("70 images in 3 classes; class sizes 10 (a) .. 40 (b), imbalance ratio 4.0")
    assert line.endswith("unbalanced, using balanced class weights")
    assert data_lib.describe_sizes(22, {"a": 10, "b": 12}).endswith("imbalance ratio 1.2")


def test_split_is_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    split = data_lib.stratified_split(labels, val=0.2, test=0.1, seed=3)
    together = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(together.tolist()) == list(range(len(labels)))  # every image exactly once
    for cls, n in enumerate([100, 50, 30, 20]):
        assert (labels[split["test"]] == cls).sum() == round(n * 0.1)
        assert (labels[split["val"]] == cls).sum() == round(n * 0.2)
        assert (labels[split["train"]] == cls).sum() == n - round(n * 0.1) - round(n * 0.2)


def test_split_is_seeded():
    labels = np.repeat(np.arange(3), 40)
    a = data_lib.stratified_split(labels, val=0.2, test=0.1, seed=7)
    b = data_lib.stratified_split(labels, val=0.2, test=0.1, seed=7)
    c = data_lib.stratified_split(labels, val=0.2, test=0.1, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in data_lib.SPLITS)
    assert not np.array_equal(a["test"], c["test"])


def test_split_gives_small_classes_one_image_per_split_or_refuses():
    split = data_lib.stratified_split(np.array([0, 0, 0, 1, 1, 1]), val=0.2, test=0.1, seed=0)
    assert [len(split[k]) for k in data_lib.SPLITS] == [2, 2, 2]
    with pytest.raises(ConfigError, match="too few"):
        data_lib.stratified_split(np.array([0, 0, 1, 1, 1]), val=0.2, test=0.1, seed=0)
    with pytest.raises(ConfigError):
        data_lib.stratified_split(np.array([0, 1]), val=0.6, test=0.5, seed=0)


def test_fingerprint_changes_with_file_contents(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    ds = data_lib.scan(root)
    before = ds.fingerprint()
    assert ds.fingerprint() == before
    path = ds.paths[0]
    path.write_bytes(path.read_bytes() + b"\0")
    assert ds.fingerprint() != before
    assert ds.fingerprint([1, 2]) != ds.fingerprint([1, 3])


def test_views_keep_shape_and_flip_mirrors():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    assert np.array_equal(features_lib.apply_view(batch, "plain"), batch)
    assert np.array_equal(features_lib.apply_view(batch, "flip"), batch[:, :, ::-1])
    for view in features_lib.VIEWS:
        out = features_lib.apply_view(batch, view)
        assert out.shape == batch.shape and out.dtype == np.uint8
    crop = features_lib.apply_view(batch, "crop_tl")
    assert not np.array_equal(crop, batch)
    with pytest.raises(ValueError, match="unknown view"):
        features_lib.apply_view(batch, "rotate")


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    matrix = report_lib.confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    stats = report_lib.per_class(matrix, ["a", "b", "c"])
    assert stats["a"] == {"precision": 1.0, "recall": round(2 / 3, 4), "f1": 0.8, "support": 3}
    assert stats["b"]["precision"] == 0.5 and stats["b"]["recall"] == 0.5
    assert stats["c"]["precision"] == 0.5 and stats["c"]["recall"] == 1.0
    text = report_lib.matrix_text(matrix, ["a", "b", "c"])
    assert text.splitlines()[1].split() == ["a", "2", "1", "0"]
