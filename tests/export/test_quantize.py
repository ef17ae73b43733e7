"""INT8 / FP16 variants on a tiny ONNX classifier (no TensorFlow): calibration images,
keep-float rules, quantization, the accuracy report, atomic repository entries and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.errors import ConfigError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from export import optimize as opt  # noqa: E402
from export import quantize as quant  # noqa: E402

from repo_modes import assert_readable_by_others  # noqa: E402
from onnx_helpers import SIZE, image_folder, tiny_classifier, tiny_onnx, tiny_repo, write_image_folders  # noqa: E402,F401


# ---- options and calibration images ---------------------------------------------------------
def test_options_reject_bad_values():
    with pytest.raises(ConfigError, match="calibration method 'kl'"):
        quant.QuantizeOptions(method="kl")
    with pytest.raises(ConfigError, match="keep-float rule"):
        quant.QuantizeOptions(keep_float=("stem",))
    with pytest.raises(ConfigError, match="target"):
        quant.QuantizeOptions(target="gpu")
    with pytest.raises(ConfigError, match="max_images"):
        quant.QuantizeOptions(min_images=10, max_images=5)
    with pytest.raises(ConfigError, match="'sensitive' needs 'first_conv'"):
        quant.QuantizeOptions(keep_float=("sensitive",))


def _split(paths, holdout, seed=0):
    split = quant.hold_out(paths, holdout, seed=seed)
    return split.calibration, split.held


def test_split_is_stratified_deterministic_and_disjoint(tmp_path):
    paths = [tmp_path / c / f"{i}.jpg" for c in ("a", "b", "c") for i in range(10)]
    cal, held = _split(paths, 0.2, seed=0)
    assert len(cal) == 24 and len(held) == 6
    assert not set(cal) & set(held)
    assert sorted(p.parent.name for p in held) == ["a", "a", "b", "b", "c", "c"]
    assert _split(list(reversed(paths)), 0.2, seed=0) == (cal, held)
    # a class of two still contributes one held-out image
    cal2, held2 = _split([tmp_path / "x" / "1.jpg", tmp_path / "x" / "2.jpg"], 0.2)
    assert len(cal2) == 1 and len(held2) == 1
    with pytest.raises(ConfigError):
        quant.hold_out(paths, 1.0)


def test_interleave_covers_every_class_first(tmp_path):
    paths = [tmp_path / c / f"{i}.jpg" for c in ("a", "b") for i in range(3)]
    order = quant.interleave_classes(paths)
    assert [p.parent.name for p in order] == ["a", "b", "a", "b", "a", "b"]


def test_calibration_uses_the_serving_decode_and_reports_skips(image_folder):
    from serve import images as simages

    paths = simages.find_images(image_folder)
    options = quant.QuantizeOptions(min_images=10, max_images=30)
    loaded = quant.load_calibration(paths, SIZE, options, source=image_folder)
    assert loaded.images.shape == (30, *SIZE, 3) and loaded.images.dtype == np.uint8
    # exactly what the server computes for the same file
    np.testing.assert_array_equal(loaded.images[0], simages.load(loaded.paths[0], SIZE))
    # the limit takes classes round-robin
    assert {p.parent.name for p in loaded.paths[:3]} == {"class0", "class1", "class2"}
    everything = quant.load_images(paths, SIZE)
    assert len(everything) == 60 and [p.name for p, _ in everything.skipped] == ["broken.jpg"]


def test_too_few_calibration_images_is_refused_with_both_numbers(tmp_path):
    from serve import images as simages

    folder = write_image_folders(tmp_path / "few", per_class=2, classes=2)
    paths = simages.find_images(folder)
    with pytest.raises(ConfigError) as info:
        quant.load_calibration(paths, SIZE, quant.QuantizeOptions(min_images=32), source=folder)
    message = str(info.value)
    assert "received 4 usable images" in message and "at least 32" in message and "1 undecodable" in message


# ---- keep-float rules -----------------------------------------------------------------------
def test_keep_float_rules_find_the_right_nodes():
    model = tiny_classifier()
    kept = quant.keep_float_nodes(model, quant.DEFAULT_KEEP_FLOAT)
    assert kept == {
        "pre_cast": "preprocessing", "pre_mul": "preprocessing", "pre_add": "preprocessing",
        "pre_transpose": "preprocessing", "stem_conv": "first_conv", "stem_relu6": "first_conv",
        "fc_matmul": "classifier", "fc_bias": "classifier", "softmax": "classifier",
        "dw_conv": "sensitive", "dw_relu6": "sensitive",
    }
    assert quant.keep_float_nodes(model, ()) == {}
    prefix = quant.keep_float_nodes(model, (), float_prefix=2)  # stem + depthwise, and what lies before
    assert set(prefix) == {"pre_cast", "pre_mul", "pre_add", "pre_transpose", "stem_conv", "stem_relu6",
                           "dw_conv", "dw_relu6"}
    assert len(quant.keep_float_nodes(model, (), float_prefix=99)) == len(model.graph.node)
    with pytest.raises(ConfigError, match="float_prefix"):
        quant.QuantizeOptions(float_prefix=-1)


def test_quantize_writes_qdq_model_that_agrees(tiny_onnx, tmp_path):
    import onnxruntime as ort

    from serve.images import synthetic_images

    images = synthetic_images(40, SIZE, seed=3)
    out = tmp_path / "int8.onnx"
    # the keep-float rules as written (exact_input would lift first_conv/sensitive: test_exact_input.py)
    result = quant.quantize(tiny_onnx, out, images, quant.QuantizeOptions(min_images=16, method="minmax",
                                                                          exact_input=False))
    assert result.images_used == 40
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and result.quantized_nodes > 0
    # kept nodes are not fed by a DequantizeLinear; quantized convs are
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["stem_conv"].input[1] == "stem_w"  # float weight, no DequantizeLinear
    assert producers[by_name["expand_conv"].input[1]].op_type == "DequantizeLinear"
    # U8S8 for the CPU target: activations uint8
    q_types = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in model.graph.initializer
               if i.name.endswith("_zero_point")}
    assert np.dtype(np.uint8) in q_types
    # same contract, close outputs
    x = synthetic_images(8, SIZE, seed=9)
    ref = ort.InferenceSession(str(tiny_onnx)).run(None, {"images": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"images": x})[0]
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.max(np.abs(got - ref)) < 0.05


def test_float_layers_between_quantized_ones_are_reported(tiny_onnx, tmp_path):
    """Such layers are re-quantized by onnxruntime's default WeightBiasQuantization (Kestrel turns it off)."""
    from serve.images import synthetic_images

    images = synthetic_images(32, SIZE, seed=3)
    edges = quant.QuantizeOptions(min_images=16, keep_float=("preprocessing", "first_conv", "classifier"))
    assert quant.quantize(tiny_onnx, tmp_path / "a.onnx", images, edges).float_between_qdq == []  # input / end only
    # here the stem's output also feeds the (quantized) residual Add, so it is quantized and the float
    # depthwise conv after it reads a DequantizeLinear: the default "sensitive" rule makes such a layer
    old = quant.quantize(tiny_onnx, tmp_path / "d.onnx", images, quant.QuantizeOptions(min_images=16,
                                                                                       exact_input=False))
    assert old.float_between_qdq == ["dw_conv"]
    # the defaults quantize the stem and that depthwise conv (exact input): no float layer in the middle
    default = quant.quantize(tiny_onnx, tmp_path / "e.onnx", images, quant.QuantizeOptions(min_images=16))
    assert default.exact_input["applied"] and default.float_between_qdq == []
    middle = quant.quantize(tiny_onnx, tmp_path / "b.onnx", images, quant.QuantizeOptions(
        min_images=16, keep_float=("preprocessing",), exclude_nodes=("project_conv",)))
    assert middle.float_between_qdq == ["project_conv"]
    assert middle.summary()["float_between_qdq"] == ["project_conv"]


def test_tensorrt_target_is_symmetric_int8(tiny_onnx, tmp_path):
    from serve.images import synthetic_images

    out = tmp_path / "trt.onnx"
    quant.quantize(tiny_onnx, out, synthetic_images(20, SIZE), quant.QuantizeOptions(
        min_images=8, method="minmax", target="tensorrt"))
    model = onnx.load(str(out))
    zero_points = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not np.any(z) for z in zero_points)
    assert "Clip" in [n.op_type for n in model.graph.node]  # activations kept for TensorRT


# ---- the accuracy report --------------------------------------------------------------------
def test_compare_and_report_metrics():
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]], np.float32)
    got = ref.copy()
    got[3] = [0.4, 0.5, 0.1]  # flips the top-1 of image 3
    report = opt.make_report("m_int8", "int8", "onnx:m", ref, got, ["a", "b", "c", "d"], image_source="test",
                             min_agreement=0.95, labels=["cat", "dog", "eel"])
    assert report.top1_agreement == 0.75 and report.top5_agreement == 1.0
    assert not report.passed
    assert report.worst[0]["image"] == "d"
    assert report.worst[0]["reference_top1"] == "cat" and report.worst[0]["variant_top1"] == "dog"
    assert report.rel_l2_max == pytest.approx(np.linalg.norm([0.1, -0.1, 0]) / np.linalg.norm([0.5, 0.4, 0.1]))
    assert "FAIL" in report.text() and "75.00%" in report.text()
    assert json.loads(report.to_json())["top1_agreement"] == 0.75
    with pytest.raises(ConfigError):
        opt.compare(ref, got[:2])


def test_labelled_gate_is_accuracy_relative_to_the_reference():
    """With labels the gate is variant top-1 >= ratio x reference top-1, whatever the agreement."""
    rng = np.random.default_rng(0)
    truth = np.arange(100) % 4
    ref = np.full((100, 4), 0.1, np.float32)
    ref[np.arange(100), truth] = 0.7
    ref[:20] = np.roll(ref[:20], 1, axis=1)  # the reference is wrong on 20: 80 % top-1
    got = ref.copy()
    got[20:21] = np.roll(got[20:21], 1, axis=1)  # the variant loses one more: 79 % = 98.75 % of 80 %
    got[:10] = np.roll(got[:10], 1, axis=1)      # and changes 10 wrong answers into other wrong answers
    kw = dict(image_source="test", min_agreement=0.99, truth=truth)
    failing = opt.make_report("m_int8", "int8", "onnx:m", ref, got, [str(i) for i in range(100)], **kw)
    assert failing.gate == "accuracy" and failing.labelled_images == 100
    assert failing.reference_top1 == pytest.approx(0.80) and failing.variant_top1 == pytest.approx(0.79)
    assert failing.accuracy_ratio == pytest.approx(0.79 / 0.80) and not failing.passed
    assert failing.mcnemar_p == pytest.approx(1.0)  # 1 discordant pair: no evidence at all
    assert failing.top1_agreement == pytest.approx(0.89)  # agreement would have failed far worse
    assert "98.75% of the reference" in failing.text() and "FAIL" in failing.text()
    passing = opt.make_report("m_int8", "int8", "onnx:m", ref, got, [str(i) for i in range(100)],
                              min_accuracy_ratio=0.98, **kw)
    assert passing.passed
    # labels that mostly do not map: not a labelled set, the agreement gate decides
    unknown = np.where(rng.random(100) < 0.5, -1, truth)
    agreement = opt.make_report("m", "int8", "onnx:m", ref, got, [str(i) for i in range(100)], image_source="t",
                                min_agreement=0.85, truth=unknown)
    assert agreement.gate == "agreement" and agreement.variant_top1 is None


def test_unlabelled_gate_counts_only_confident_images():
    ref = np.full((40, 3), 0.0, np.float32)
    ref[:, 0] = 0.9
    ref[:, 1] = 0.1
    ref[30:] = [0.34, 0.33, 0.33]  # 10 ambiguous images
    got = ref.copy()
    got[30:] = [0.33, 0.34, 0.33]  # flips on every ambiguous image
    report = opt.make_report("m", "int8", "onnx:m", ref, got, [str(i) for i in range(40)], image_source="t",
                             min_agreement=0.98)
    assert report.top1_agreement == 0.75 and report.confident_images == 30
    assert report.confident_agreement == 1.0 and report.passed
    got[0] = [0.1, 0.9, 0.0]  # one confident image flipped
    report = opt.make_report("m", "int8", "onnx:m", ref, got, [str(i) for i in range(40)], image_source="t",
                             min_agreement=0.98)
    assert report.confident_agreement == pytest.approx(29 / 30) and not report.passed


def test_optimize_uses_the_labelled_gate_on_class_folders_named_by_labels(tiny_repo, tmp_path):
    from PIL import Image
    from serve.images import synthetic_images
    folder = tmp_path / "labelled"
    pictures = synthetic_images(30, (20, 20), seed=3)
    for i, picture in enumerate(pictures):
        (folder / f"class_{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"class_{i % 3}" / f"{i}.png")
    reports = opt.optimize(tiny_repo, "tiny", precisions="fp16", accuracy_images=folder, latency_runs=0,
                           progress=False, log=lambda *_: None)
    report = reports["tiny_fp16"]
    assert report.gate == "accuracy" and report.labelled_images == 30 and report.passed
    assert report.variant_top1 == pytest.approx(report.reference_top1, abs=0.04)
    saved = json.loads((tiny_repo / "tiny_fp16" / "accuracy.json").read_text())
    assert saved["gate"] == "accuracy" and saved["min_accuracy_ratio"] == 0.99
    forced = opt.optimize(tiny_repo, "tiny", precisions="fp16", accuracy_images=folder, latency_runs=0, force=True,
                          labelled=False, progress=False, log=lambda *_: None)
    assert forced["tiny_fp16"].gate == "agreement"


def test_variants_keep_the_resize_mode_of_their_source(tiny_repo, image_folder):
    from serve.repository import ModelRepository, read_config, write_config
    config = read_config(tiny_repo / "tiny" / "config.pbtxt")
    config.parameters["resize"].string_value = "crop"
    write_config(config, tiny_repo / "tiny")
    seen = []
    real = quant.load_images

    def spy(paths, size, **kw):
        seen.append(kw.get("mode"))
        return real(paths, size, **kw)

    import unittest.mock
    with unittest.mock.patch.object(quant, "load_images", spy):
        opt.optimize(tiny_repo, "tiny", precisions="fp16", calibration=image_folder, latency_runs=0,
                     progress=False, log=lambda *_: None)
    assert seen and set(seen) == {"crop"}
    assert ModelRepository(tiny_repo).entry("tiny_fp16").resize == "crop"


def test_parse_precisions():
    assert opt.parse_precisions("int8, fp16,int8") == ["int8", "fp16"]
    with pytest.raises(ConfigError, match="bf16"):
        opt.parse_precisions("bf16")
    with pytest.raises(ConfigError):
        opt.parse_precisions(",")


# ---- end to end: repository entries ---------------------------------------------------------
def _entry_ok(root: Path, name: str):
    from serve.backends import create_runner
    from serve.repository import ModelRepository

    entry = ModelRepository(root).entry(name)
    runner = create_runner(entry)
    with runner:
        out = runner.infer(np.zeros((2, *SIZE, 3), np.uint8))
    assert out.shape == (2, 5) and out.dtype == np.float32
    return entry


def test_optimize_builds_int8_and_fp16_entries(tiny_repo, image_folder):
    reports = opt.optimize(tiny_repo, "tiny", precisions="int8,fp16", calibration=image_folder,
                           quantize_options=quant.QuantizeOptions(min_images=16), latency_runs=3,
                           progress=False, log=lambda *_: None)
    assert set(reports) == {"tiny_int8", "tiny_fp16"}
    for name, precision in (("tiny_int8", "int8"), ("tiny_fp16", "fp16")):
        entry = _entry_ok(tiny_repo, name)
        assert entry.platform == "onnxruntime_onnx" and entry.labels()[0] == "class_0"
        assert entry.parameters == {"source": "tiny", "precision": precision}
        saved = json.loads((tiny_repo / name / "accuracy.json").read_text())
        assert saved["images"] == 12  # 20 % of 60, stratified, never calibrated on
        assert saved["reference"] == "onnx:tiny" and saved["passed"] is True
        assert saved["top1_agreement"] >= 0.95 and saved["latency"]["runs"] == 3
    cal = json.loads((tiny_repo / "tiny_int8" / "accuracy.json").read_text())["calibration"]
    assert cal["images_used"] == 48 and cal["images_skipped"] == 1
    assert not [p for p in tiny_repo.iterdir() if p.name.startswith(".")]  # no staging left over
    assert_readable_by_others(tiny_repo)  # 0644 / 0755: a server running as another user reads the variants
    # an existing entry is kept unless --force
    with pytest.raises(ConfigError, match="already exists"):
        opt.optimize(tiny_repo, "tiny", precisions="fp16", progress=False, log=lambda *_: None)


def test_optimize_loads_each_variant_once_for_accuracy_and_latency(tiny_repo, image_folder, monkeypatch):
    from serve.backends.onnxruntime import OnnxRuntimeRunner

    loads, closes, original = [], [], OnnxRuntimeRunner._load
    monkeypatch.setattr(OnnxRuntimeRunner, "_load", lambda self: (loads.append(self.name), original(self))[1])
    original_close = OnnxRuntimeRunner._close
    monkeypatch.setattr(OnnxRuntimeRunner, "_close", lambda self: (closes.append(self.name), original_close(self))[1])
    opt.optimize(tiny_repo, "tiny", precisions="int8,fp16", calibration=image_folder,
                 quantize_options=quant.QuantizeOptions(min_images=16), latency_runs=3, progress=False,
                 log=lambda *_: None)
    assert loads.count("tiny_int8") == 1 and loads.count("tiny_fp16") == 1
    assert sorted(closes) == sorted(loads)  # every session made is released


def test_variant_below_threshold_is_not_written_unless_forced(tiny_repo, image_folder, monkeypatch):
    # the reference is another (differently initialised) model, so the variant disagrees with it
    other = Path(tiny_repo).parent / "other.onnx"
    onnx.save(tiny_classifier(seed=7), str(other))
    monkeypatch.setattr(opt, "reference_runner",
                        lambda repo, name, base, reference="auto": (opt._onnx_runner(name, other, base), "onnx:other"))
    run = dict(precisions="fp16", accuracy_images=image_folder, latency_runs=0, progress=False, log=lambda *_: None)
    with pytest.raises(opt.AccuracyError) as info:
        opt.optimize(tiny_repo, "tiny", **run)
    assert "below the agreement threshold" in str(info.value) and info.value.report.passed is False
    assert "FAIL" in str(info.value) and "worst images" in str(info.value)
    assert not (tiny_repo / "tiny_fp16").exists()
    assert not [p for p in tiny_repo.iterdir() if p.name.startswith(".")]
    opt.optimize(tiny_repo, "tiny", force=True, **run)
    saved = json.loads((tiny_repo / "tiny_fp16" / "accuracy.json").read_text())
    assert saved["passed"] is False and saved["reference"] == "onnx:other"


def test_int8_without_calibration_is_a_clear_error(tiny_repo):
    with pytest.raises(ConfigError, match="--calibration"):
        opt.optimize(tiny_repo, "tiny", precisions="int8", progress=False, log=lambda *_: None)


def test_engine_without_tensorrt_fails_after_onnx_variants(tiny_repo, image_folder, monkeypatch):
    from export import tensorrt as trt_build

    monkeypatch.setattr(trt_build, "available", lambda module: False)
    with pytest.raises(trt_build.TensorRTUnavailableError, match="TensorRT and an NVIDIA GPU"):
        opt.optimize(tiny_repo, "tiny", precisions="fp16", accuracy_images=image_folder, engine=True,
                     latency_runs=0, progress=False, log=lambda *_: None)
    assert (tiny_repo / "tiny_fp16" / "1" / "model.onnx").is_file()
    assert not (tiny_repo / "tiny_trt_fp16").exists()


def test_cli_errors_are_one_line(tiny_repo, python_env):
    cmd = [sys.executable, "-m", "export.optimize", "tiny", "--repository", str(tiny_repo), "--precision", "int8",
           "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=python_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: INT8 needs calibration images")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd[:3] + ["missing", "--repository", str(tiny_repo)], capture_output=True, text=True,
                          env=python_env, timeout=120)
    assert proc.returncode == 2 and "model 'missing' is not in repository" in proc.stderr


def test_cli_builds_a_variant(tiny_repo, image_folder, python_env):
    cmd = [sys.executable, "-m", "export.optimize", "tiny", "--repository", str(tiny_repo), "--precision", "int8",
           "--calibration", str(image_folder), "--min-calibration-images", "16", "--latency-runs", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=python_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "calibration: 48 images" in proc.stdout and "top-1 agreement" in proc.stdout
    _entry_ok(tiny_repo, "tiny_int8")
    saved = json.loads((tiny_repo / "tiny_int8" / "accuracy.json").read_text())["calibration"]
    assert saved["exact_input"]["applied"] is True and saved["options"]["equalize"] == "none"
    # the old rules and range equalization, from the command line
    proc = subprocess.run(cmd + ["--no-exact-input", "--equalize", "all", "--variant-suffix", "_old"],
                          capture_output=True, text=True, env=python_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tiny_repo / "tiny_int8_old" / "accuracy.json").read_text())["calibration"]
    assert saved["exact_input"]["applied"] is False and saved["options"]["equalize"] == "all"
    assert "stem_conv" in saved["kept_float_by_rule"]["first_conv"]


def test_evaluation_images_combine_folders_and_holdout_without_overlap(tmp_path, image_folder):
    from serve.images import find_images

    photos = write_image_folders(tmp_path / "photos", per_class=3, classes=1, seed=4)
    options = quant.QuantizeOptions(min_images=16)
    imgs = opt.gather_images(SIZE, calibration=image_folder, accuracy_images=[photos], holdout=0.1, qoptions=options,
                             need_calibration=True, max_eval=100, progress=False)
    assert len(imgs.evaluation) == 6 + 3  # 10 % of each 20-image class, plus the photos folder
    assert not set(imgs.calibration.paths) & set(imgs.evaluation.paths)
    assert f"held out 6 of the 61 images of {image_folder}" in imgs.source
    assert imgs.holdout_note == "10% of each of its 3 class folders"
    assert str(photos) in imgs.source
    # with an accuracy folder and no --holdout, the whole calibration folder calibrates
    imgs = opt.gather_images(SIZE, calibration=image_folder, accuracy_images=str(photos), holdout=None,
                             qoptions=options, need_calibration=True, max_eval=100, progress=False)
    assert len(imgs.calibration) == 60 and len(imgs.evaluation) == 3
    with pytest.raises(ConfigError, match="also calibration images"):
        opt.gather_images(SIZE, calibration=image_folder, accuracy_images=image_folder / "class1", holdout=0,
                          qoptions=options, need_calibration=True, max_eval=100, progress=False)
    assert len(find_images(image_folder)) == 61


def test_calibration_is_collected_in_chunks():
    assert quant.chunk_size(300) == 30 and quant.chunk_size(64) == 32 and quant.chunk_size(31) == 31
    assert quant.chunk_size(37) == 1 and quant.chunk_size(1) == 1
    reader = quant._Reader("images", np.zeros((5, 2, 2, 3), np.uint8))
    reader.set_range(2, 4)
    assert [reader.get_next() is not None for _ in range(3)] == [True, True, False]
    reader.rewind()
    assert reader.get_next()["images"].shape == (1, 2, 2, 3) and len(reader) == 5


def test_nncf_quantizer_writes_a_qdq_model_onnxruntime_runs(tiny_onnx, tmp_path):
    pytest.importorskip("nncf")
    from serve.images import synthetic_images
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    from serve.repository import TensorSpec

    images = synthetic_images(24, SIZE, seed=2)
    out = tmp_path / "nncf.onnx"
    result = quant.quantize(tiny_onnx, out, images, quant.QuantizeOptions(min_images=8, quantizer="nncf"))
    assert result.quantized_nodes > 0 and result.options["quantizer"] == "nncf"
    model = onnx.load(str(out))
    kept = set(result.kept_float)
    # the keep-float rules are NNCF's ignored scope: the stem conv reads float, not a DequantizeLinear
    producer = {o: n for n in model.graph.node for o in n.output}
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    assert stem.name in kept and stem.input[1] not in producer  # its float weight, as exported
    quantized_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in kept]
    assert quantized_convs and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in quantized_convs)
    spec_in, spec_out = TensorSpec("images", np.uint8, (*SIZE, 3)), TensorSpec("probabilities", np.float32, (5,))
    with OnnxRuntimeRunner("fp32", tiny_onnx, spec_in, spec_out) as fp32, \
            OnnxRuntimeRunner("int8", out, spec_in, spec_out) as int8:
        a, b = fp32.infer(images), int8.infer(images)
    assert b.shape == a.shape and np.abs(a - b).max() < 0.2
    with pytest.raises(ConfigError, match="unknown quantizer 'tflite'"):
        quant.QuantizeOptions(quantizer="tflite")


def test_default_holdout_also_evaluates_the_calibration_images_not_calibrated_on(tiny_repo, image_folder):
    reports = opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=image_folder, latency_runs=0,
                           quantize_options=quant.QuantizeOptions(min_images=16, max_images=20),
                           progress=False, log=lambda *_: None)
    report = reports["tiny_int8"]
    assert report.calibration["images_used"] == 20
    assert report.images == 12 + 28  # the held-out 20 % plus the 28 of the other 48 never calibrated on
    assert "not calibrated on" in report.image_source

    suffixed = opt.optimize(tiny_repo, "tiny", precisions="fp16", suffix="_try", latency_runs=0, progress=False,
                            log=lambda *_: None)
    assert set(suffixed) == {"tiny_fp16_try"} and (tiny_repo / "tiny_fp16_try" / "config.pbtxt").is_file()
    with pytest.raises(ConfigError, match="invalid model name"):
        opt.optimize(tiny_repo, "tiny", precisions="fp16", suffix="/../x", progress=False, log=lambda *_: None)


def test_onnxruntime_calibration_chatter_stays_off_stdout_unless_verbose(tiny_onnx, tmp_path, capsys, monkeypatch):
    from serve import console
    from serve.images import synthetic_images

    images = synthetic_images(20, SIZE)
    # onnxruntime's own percentile calibrator prints its steps (Kestrel's in-graph one, the default, prints nothing)
    options = quant.QuantizeOptions(min_images=16, method="percentile", fast_calibration=False)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    quant.quantize(tiny_onnx, tmp_path / "quiet.onnx", images, options)
    assert "Collecting tensor data" not in capsys.readouterr().out
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    quant.quantize(tiny_onnx, tmp_path / "verbose.onnx", images, options)
    assert "Collecting tensor data" in capsys.readouterr().out  # --verbose shows what onnxruntime says


# ---- the hold-out and the report (issue #26: items 1 and 10) --------------------------------------------
def _one_image_per_folder(root: Path, folders: int, seed: int = 5) -> Path:
    from PIL import Image
    from serve.images import synthetic_images

    for i, picture in enumerate(synthetic_images(folders, (20, 20), seed=seed)):
        (root / f"kind_{i:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / f"kind_{i:02d}" / "only.png")
    return root


def test_hold_out_takes_whole_single_image_folders_when_per_class_gives_none(tmp_path):
    singles = [tmp_path / f"c{i:02d}" / "a.jpg" for i in range(48)]
    split = quant.hold_out(singles, 0.2)
    assert len(split.held) == 10 and len(split.calibration) == 38  # 20 % of 48, not 0
    assert not set(split.held) & set(split.calibration) and quant.hold_out(singles, 0.2) == split
    assert split.count("DIR") == "held out 10 of the 48 images of DIR"
    assert "10 of the 48 single-image folders whole" in split.why()
    # folders of two or more keep their rule (20 %, at least one each); singles only fill up to 20 % of all
    mixed = [tmp_path / "big" / f"{i}.jpg" for i in range(10)] + singles[:30]
    split = quant.hold_out(mixed, 0.2)
    assert len(split.held) == 8 and sum(p.parent.name == "big" for p in split.held) == 2
    many_pairs = [tmp_path / f"p{i}" / f"{j}.jpg" for i in range(10) for j in range(2)] + singles[:5]
    split = quant.hold_out(many_pairs, 0.2)  # 10 held from the pairs: 40 % of them, more than 20 % of all 25
    assert len(split.held) == 10 and all(p.parent.name.startswith("p") for p in split.held)
    assert "at least one from each (50% of their 20 images" in split.why()
    assert "the 5 single-image folders are all calibrated on" in split.why()
    flat = [tmp_path / "photos" / f"{i}.jpg" for i in range(13)]
    assert len(quant.hold_out(flat, 0.2).held) == 3


def test_int8_on_one_image_per_class_is_judged_on_real_held_out_images(tiny_repo, tmp_path):
    folder = _one_image_per_folder(tmp_path / "one_each", 40)
    lines: list[str] = []
    reports = opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=folder, latency_runs=0,
                           quantize_options=quant.QuantizeOptions(min_images=16), progress=False, log=lines.append)
    report = reports["tiny_int8"]
    assert report.images == 8 and "synthetic" not in report.image_source
    saved = json.loads((tiny_repo / "tiny_int8" / "accuracy.json").read_text())
    judged = {w["image"] for w in saved["worst"]}
    assert judged and all(Path(p).parent.parent == folder for p in judged)
    assert report.calibration["images_used"] == 32  # the other 32 calibrate: none of the 8 judged
    assert any(line.startswith("hold-out: 8 of the 40 single-image folders whole") for line in lines)


def test_real_images_that_leave_nothing_to_judge_on_are_refused_not_replaced(tiny_repo, tmp_path, image_folder):
    folder = _one_image_per_folder(tmp_path / "one_each", 40)
    with pytest.raises(ConfigError, match=r"no real images are left.*--holdout 0 holds none.*--accuracy-images"):
        opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=folder, holdout=0, latency_runs=0,
                     quantize_options=quant.QuantizeOptions(min_images=16), progress=False, log=lambda *_: None)
    assert not (tiny_repo / "tiny_int8").exists()
    # with no real image at all, synthetic images still stand in (FP16 needs no calibration)
    report = opt.optimize(tiny_repo, "tiny", precisions="fp16", latency_runs=0, progress=False,
                          log=lambda *_: None)["tiny_fp16"]
    assert "32 synthetic images" in report.image_source


def test_too_few_calibration_images_counts_the_held_out_ones(tmp_path):
    flat = write_image_folders(tmp_path / "flat", per_class=13, classes=1)
    (flat / "class0" / "broken.jpg").unlink()
    options = quant.QuantizeOptions(min_images=32)
    with pytest.raises(ConfigError) as info:
        opt.gather_images(SIZE, calibration=flat, accuracy_images=None, holdout=None, qoptions=options,
                          need_calibration=True, max_eval=100, progress=False)
    message = str(info.value)
    assert "received 10 usable images" in message and "13 image files found, 3 of them held out" in message
    assert "--holdout 0 with --accuracy-images" in message


def test_missing_calibration_is_named_before_an_existing_variant(tiny_repo, image_folder):
    (tiny_repo / "tiny_int8").mkdir()
    with pytest.raises(ConfigError, match="INT8 needs calibration images"):
        opt.optimize(tiny_repo, "tiny", precisions="int8", progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="--calibration .*no_such: the folder does not exist"):
        opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=tiny_repo / "no_such", progress=False,
                     log=lambda *_: None)
    with pytest.raises(ConfigError, match="already exists"):  # the inputs are right: now the existing entry
        opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=image_folder, progress=False,
                     log=lambda *_: None)


def test_every_variant_is_compared_with_one_fp32_latency(tiny_repo, image_folder, monkeypatch):
    calls = []
    real = opt.interleaved_latency

    def spy(runners, image, runs=opt.DEFAULT_LATENCY_RUNS, warmup=3):
        calls.append([r.name for r in runners])
        return real(runners, image, runs, warmup)

    monkeypatch.setattr(opt, "interleaved_latency", spy)
    lines: list[str] = []
    reports = opt.optimize(tiny_repo, "tiny", precisions="int8,fp16", calibration=image_folder, latency_runs=3,
                           quantize_options=quant.QuantizeOptions(min_images=16), progress=False, log=lines.append)
    assert calls == [["tiny", "tiny_fp16", "tiny_int8"]]  # FP32 measured once, interleaved with both
    (fp32,) = {r.latency["fp32_ms"] for r in reports.values()}
    for report in reports.values():
        assert report.latency["ratio"] == pytest.approx(report.latency["variant_ms"] / fp32)
    summary = [line for line in lines if line.startswith("batch-1 latency")]
    assert len(summary) == 1 and summary[0].count("FP32") == 1


def test_a_calibration_sample_reads_as_a_sample_in_a_log(image_folder, capsys, monkeypatch):
    from serve import console, images as simages

    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    quant.load_calibration(simages.find_images(image_folder), SIZE, quant.QuantizeOptions(min_images=10, max_images=30),
                           progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibration (a sample of 30 of 61 images): 30/30 img")
