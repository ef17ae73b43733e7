"""Few-shot split and runner, class subsets, label smoothing, and the INT8 gate (tiny generated data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from repo_modes import assert_readable_by_others
from serve.errors import ConfigError
from train import data as data_lib
from train import fewshot
from train import int8 as int8_lib


# ---- no TensorFlow needed -------------------------------------------------------------------
def test_per_class_split_takes_n_per_class_and_tests_on_the_rest():
    labels = np.repeat([0, 1], [30, 20])
    split = data_lib.per_class_split(labels, per_class=10, val=0.2, seed=3)
    for cls, total in ((0, 30), (1, 20)):
        assert (labels[split["train"]] == cls).sum() == 8
        assert (labels[split["val"]] == cls).sum() == 2
        assert (labels[split["test"]] == cls).sum() == total - 10
    together = np.concatenate(list(split.values()))
    assert len(together) == len(set(together.tolist())) == 50  # disjoint, nothing lost
    again = data_lib.per_class_split(labels, per_class=10, val=0.2, seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = data_lib.per_class_split(labels, per_class=10, val=0.2, seed=4)
    assert not np.array_equal(split["test"], other["test"])
    capped = data_lib.per_class_split(labels, per_class=10, val=0.2, seed=3, test_per_class=5)
    assert len(capped["test"]) == 10 and np.array_equal(capped["train"], split["train"])


def test_per_class_split_needs_test_images_left():
    with pytest.raises(ConfigError, match="leaves none for the test set"):
        data_lib.per_class_split(np.repeat([0, 1], [10, 12]), per_class=10, val=0.2, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        data_lib.per_class_split(np.repeat([0, 1], 5), per_class=1, val=0.2, seed=0)


def test_scan_keeps_only_the_classes_asked_for(tiny_dataset):
    ds = data_lib.scan(tiny_dataset, ("red_vertical", "blue_checks"))
    assert ds.classes == ["blue_checks", "red_vertical"]
    assert {p.parent.name for p in ds.paths} == {"blue_checks", "red_vertical"}
    with pytest.raises(ConfigError, match="no class folder purple"):
        data_lib.scan(tiny_dataset, ("red_vertical", "purple"))


def test_int8_gate_is_a_ratio_of_labelled_accuracies():
    assert int8_lib.gate(0.95, 0.95, 0.99) == (1.0, True)
    ratio, passed = int8_lib.gate(0.95, 0.941, 0.99)  # 99.05 % of FP32
    assert passed and math.isclose(ratio, 0.941 / 0.95)
    ratio, passed = int8_lib.gate(0.95, 0.94, 0.99)  # 98.95 %
    assert not passed and ratio < 0.99
    assert int8_lib.gate(0.95, 0.93, 0.97)[1]  # configurable
    assert int8_lib.gate(0.90, 0.95, 0.99) == (pytest.approx(0.95 / 0.90), True)  # INT8 may be better
    with pytest.raises(ConfigError, match="int8-min-ratio"):
        int8_lib.gate(0.9, 0.9, 1.5)


def test_fewshot_pairs_summary_and_table():
    assert fewshot.pairs_of(["c", "a", "b"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert len(fewshot.pairs_of([str(i) for i in range(5)])) == 10
    rows = [{"pair": f"p{i}", "train_images": 160, "val_images": 40, "test_images": 400, "test_accuracy": acc,
             "seconds": s, "phases": {"features": 1.0, "heads": 2.0}}
            for i, (acc, s) in enumerate([(0.9, 10.0), (0.97, 30.5), (0.99, 12.0)])]
    summary = fewshot.summarize(rows)
    assert summary["median_accuracy"] == 0.97 and summary["min_accuracy"] == 0.9
    assert summary["max_seconds"] == 30.5 and summary["slowest_pair"] == "p1"
    table = fewshot.markdown(rows, summary, "title")
    assert "| p1 | 160 | 40 | 400 | 0.970 | 30.5 |" in table and "median test accuracy 0.97" in table



def test_fewshot_passes_its_training_options_to_every_pair(tmp_path):
    from train.__main__ import options_from_args
    from train.__main__ import parser as train_parser

    def pair_options(*extra):
        args = fewshot.parser().parse_args([str(tmp_path), *extra])
        return options_from_args(train_parser().parse_args(fewshot.train_args(tmp_path, "a", "b", args)))

    default = pair_options()
    assert default.classes == ("a", "b") and default.train_per_class == 100 and default.refit is True
    assert default.pool_stages == 3 and default.flip_tta is False
    chosen = pair_options("--no-refit", "--pool-stages", "1", "--flip-tta", "--per-class", "50")
    assert chosen.refit is False and chosen.pool_stages == 1 and chosen.flip_tta is True
    assert chosen.train_per_class == 50

# ---- TensorFlow, tf2onnx, onnxruntime: a tiny base without weights ---------------------------
SMALL = dict(base="mobilenet_v2", alpha=0.35, image_size=96, weights="none", progress=False)


def _need_training_stack():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")


def test_label_smoothing_changes_the_loss_floor():
    _need_training_stack()
    from train import head as head_lib

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    x = (np.repeat(np.eye(3)[y], 6, axis=1) * 4 + rng.normal(0, 0.3, (120, 18))).astype(np.float32)
    common = dict(classes=3, kinds=("linear",), epochs=25, batch_size=32, progress=False, patience=30)
    plain = head_lib.train_heads(x, y, x, y, **common)[0]
    smooth = head_lib.train_heads(x, y, x, y, label_smoothing=0.3, **common)[0]
    assert plain.val_accuracy >= 0.95 and smooth.val_accuracy >= 0.95
    assert smooth.options["label_smoothing"] == 0.3
    # targets (0.8, 0.1, 0.1): cross-entropy cannot fall below their entropy
    floor = -(0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1))
    assert min(smooth.history["loss"]) >= floor
    assert min(plain.history["loss"]) < floor


@pytest.mark.timeout(900)  # train + export + quantize: about a minute alone, much more on a loaded machine
def test_fewshot_runner_trains_every_pair(tiny_dataset, tmp_path):
    _need_training_stack()
    args = fewshot.parser().parse_args([str(tiny_dataset), "--per-class", "5", "--val-split", "0.4",
                                        "--weights", "none", "--alpha", "0.35", "--image-size", "96",
                                        "--epochs", "3", "--output", str(tmp_path / "fs"),
                                        "--cache-dir", str(tmp_path / "cache")])
    result = fewshot.run(args)
    assert [r["classes"] for r in result["pairs"]] == [["blue_checks", "green_horizontal"],
                                                       ["blue_checks", "red_vertical"],
                                                       ["green_horizontal", "red_vertical"]]
    for row in result["pairs"]:
        assert row["train_images"] == 6 and row["val_images"] == 4  # 3 + 2 per class
        assert row["refit_photos"] == 10  # the linear head's final fit sees training + validation photos
        assert row["test_images"] == 6  # 8 decodable per class, 5 used for training
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["seconds"] > 0
        report = json.loads((tmp_path / "fs" / "pairs" / "__".join(row["classes"]) / "report.json").read_text())
        assert report["dataset"]["classes"] == row["classes"] and report["test_accuracy"] == row["test_accuracy"]
    saved = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert saved["summary"]["pairs"] == 3 and saved["summary"] == fewshot.summarize(saved["pairs"])
    assert "| blue_checks vs red_vertical |" in (tmp_path / "fs" / "fewshot.md").read_text()


@pytest.fixture(scope="module")
def int8_run(dataset_factory, tmp_path_factory):
    _need_training_stack()
    from train.pipeline import TrainOptions, train

    work = tmp_path_factory.mktemp("int8")
    # 24 decodable images per class: 6 test, 5 validation, 13 training -> 39 training images, 35 calibrated on
    # (--calibration-images; 32 needed)
    data = dataset_factory(work / "shapes", per_class=24, seed=1)
    opts = dict(data_dir=data, name="tiny", output=work / "out", cache_dir=work / "cache", epochs=3,
                test_split=0.25, repository=work / "models", precision="int8", latency_runs=3,
                calibration_method="minmax", calibration_images=35, **SMALL)  # percentile histograms fail on random weights' ranges
    # min_ratio at its floor: with random weights INT8 may lose a test image; the gate's math is tested above
    result = train(TrainOptions(**opts, int8_min_ratio=1e-6, force=True))
    return {"work": work, "result": result, "opts": opts}


@pytest.mark.timeout(900)  # train + export + quantize: about a minute alone, much more on a loaded machine
def test_int8_variant_is_written_and_reported(int8_run):
    report = int8_run["result"].report
    q = report["int8"]
    assert report["export"]["name"] == "tiny"  # --precision int8 implies --export
    assert q["variant"] == "tiny_int8" and q["written"] is True
    assert q["test_images"] == report["test_images"] == 18
    assert report["split"]["train"]["images"] == 39
    assert q["calibration_images"] == 35  # --calibration-images caps the training photos calibrated on
    labels = [p["label"] for p in report["test_predictions"]]
    fp32 = [p["predicted"] for p in report["test_predictions"]]
    int8 = report["int8_test_predictions"]
    assert q["int8_accuracy"] == round(float(np.mean([a == b for a, b in zip(labels, int8)])), 4)
    assert q["fp32_accuracy"] == report["test_accuracy"]  # the exported ONNX answers as the trained model
    assert set(q["latency"]) >= {"int8_ms", "fp32_ms", "ratio"} and q["latency"]["int8_ms"] > 0
    folder = int8_run["work"] / "models" / "tiny_int8"
    assert (folder / "1" / "model.onnx").is_file() and (folder / "labels.txt").is_file()
    assert json.loads((folder / "accuracy.json").read_text())["int8_accuracy"] == q["int8_accuracy"]
    assert not [p for p in (int8_run["work"] / "models").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.timeout(900)  # train + export + quantize: about a minute alone, much more on a loaded machine
def test_served_fp32_and_int8_answer_the_report_labels(int8_run):
    from serve import images
    from serve.hub import ModelHub

    report = int8_run["result"].report
    hub = ModelHub(int8_run["work"] / "models", models=["tiny", "tiny_int8"], strict=True).load()
    try:
        # train decodes with serve.images' default resize; both entries must record that mode, not export's
        assert {hub.models[n].resize for n in ("tiny", "tiny_int8")} == {images.DEFAULT_RESIZE}
        for row, int8_label in zip(report["test_predictions"], report["int8_test_predictions"]):
            with open(row["path"], "rb") as fh:
                answer = hub.classify(fh.read(), names=["tiny", "tiny_int8"], top=1)
            got = {a.model: a.predictions[0][0] for a in answer.models}
            assert got == {"tiny": row["predicted"], "tiny_int8": int8_label}, row["path"]
    finally:
        hub.close()


@pytest.mark.timeout(900)  # train + export + quantize: about a minute alone, much more on a loaded machine
def test_int8_below_the_gate_writes_nothing_and_carries_the_report(int8_run, monkeypatch, tmp_path):
    import shutil

    from serve.repository import ModelRepository

    repo = ModelRepository(tmp_path / "models")  # the FP32 entry alone, no INT8 variant yet
    shutil.copytree(int8_run["work"] / "models" / "tiny", repo.root / "tiny")
    report = int8_run["result"].report
    test_paths = [p["path"] for p in report["test_predictions"]]
    pixels = data_lib.decode(test_paths, (96, 96))[0]
    y = np.array([report["dataset"]["classes"].index(p["label"]) for p in report["test_predictions"]])
    calibration = [p for p in data_lib.scan(report["dataset"]["root"]).paths if p.name != "corrupt.jpg"]
    monkeypatch.setattr(int8_lib, "gate", lambda fp32, q, m: (0.5, m <= 0.5))  # INT8 at half of FP32's accuracy
    from export.quantize import QuantizeOptions

    kwargs = dict(calibration=calibration, test_images=pixels, test_labels=y, latency_runs=0, log=lambda m: None,
                  quantize_options=QuantizeOptions(method="minmax"))
    with pytest.raises(int8_lib.Int8GateError, match="below the gate") as info:
        int8_lib.build_int8(repo.root, "tiny", min_ratio=0.99, **kwargs)
    assert info.value.report.passed is False and info.value.report.written is False
    assert info.value.report.test_images == len(y)
    assert sorted(p.name for p in repo.root.iterdir()) == ["tiny"]  # no variant, no staging folder left
    forced = int8_lib.build_int8(repo.root, "tiny", min_ratio=0.99, force=True, **kwargs)
    assert forced.passed is False and forced.written is True and (repo.root / "tiny_int8" / "1" / "model.onnx").is_file()
    with pytest.raises(ConfigError, match="already exists"):
        int8_lib.build_int8(repo.root, "tiny", **kwargs)


def test_rerun_without_force_stops_before_any_work_when_the_int8_variant_exists(int8_run):
    """Re-running the same --precision int8 command: refused at once, the FP32 export it was made from untouched
    (it used to retrain, replace the FP32 model, then refuse the INT8 variant: a pair that no longer matched)."""
    from train.pipeline import TrainOptions, train

    fp32 = int8_run["work"] / "models" / "tiny" / "1" / "model.onnx"
    before = fp32.stat().st_mtime_ns
    report = (int8_run["work"] / "out" / "report.json").read_text()
    with pytest.raises(ConfigError, match=r"tiny_int8 already exists \(an earlier --precision int8 run\); pass --force"):
        train(TrainOptions(**int8_run["opts"]))
    assert fp32.stat().st_mtime_ns == before
    assert (int8_run["work"] / "out" / "report.json").read_text() == report


def test_int8_keeps_the_entry_layers_of_every_branch_in_float(tmp_path):
    """A --flip-tta model runs the base twice: both copies' first Conv and first depthwise Conv stay float."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def weight(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, [0.1] * int(np.prod(shape)))

    nodes, inits = [helper.make_node("Transpose", ["x"], ["xt"], name="m/flip_width_last_1/transpose")], []
    for branch, source in (("a", "x"), ("b", "xt")):
        inits += [weight(f"{branch}_w1", [4, 3, 3, 3]), weight(f"{branch}_wd", [4, 1, 3, 3]),
                  weight(f"{branch}_w2", [4, 4, 1, 1])]
        nodes += [
            helper.make_node("Conv", [source, f"{branch}_w1"], [f"{branch}1"], name=f"{branch}/conv1"),
            helper.make_node("Relu", [f"{branch}1"], [f"{branch}1r"], name=f"{branch}/relu1"),
            helper.make_node("Conv", [f"{branch}1r", f"{branch}_wd"], [f"{branch}2"], name=f"{branch}/depthwise",
                             group=4),
            helper.make_node("Relu", [f"{branch}2"], [f"{branch}2r"], name=f"{branch}/relu2"),
            helper.make_node("Conv", [f"{branch}2r", f"{branch}_w2"], [f"{branch}3"], name=f"{branch}/project"),
        ]
    nodes.append(helper.make_node("Add", ["a3", "b3"], ["y"], name="mean"))
    graph = helper.make_graph(nodes, "two_branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    kept = int8_lib.branch_entry_nodes(path)
    assert set(kept) == {"m/flip_width_last_1/transpose", "a/conv1", "a/relu1", "a/depthwise", "a/relu2",
                         "b/conv1", "b/relu1", "b/depthwise", "b/relu2"}


@pytest.mark.timeout(900)
def test_train_export_writes_files_another_users_server_can_read(int8_run):
    """train --export (and its INT8 variant) into the repository, and the training outputs (report.json is
    rewritten atomically after the export): 0644 files and 0755 folders, no temporary files left."""
    assert assert_readable_by_others(int8_run["work"] / "models") >= 8  # tiny, tiny_keras, tiny_int8
    assert assert_readable_by_others(int8_run["work"] / "out") >= 3
