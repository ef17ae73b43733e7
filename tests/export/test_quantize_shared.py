"""INT8 on real images from ../shared: the serving decode path on real JPEG/BMP files, and (slow)
the real MobileNetV2 against its Keras model on held-out labelled ImageNet images."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from export import optimize as opt  # noqa: E402
from export import quantize as quant  # noqa: E402

from onnx_helpers import tiny_onnx, tiny_repo  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.shared_data


def test_tiny_model_calibrated_on_real_flowers_and_photos(tiny_repo, flowers_dir, photos_dir):
    reports = opt.optimize(tiny_repo, "tiny", precisions="int8", calibration=flowers_dir, holdout=0.01,
                           accuracy_images=photos_dir, quantize_options=quant.QuantizeOptions(max_images=40),
                           max_eval_images=20, latency_runs=0, progress=False, log=lambda *_: None)
    report = reports["tiny_int8"]
    assert report.calibration["images_used"] == 40
    assert report.images == 20 + 13  # held-out flowers (capped) + every photo
    assert any("photos" in w["image"] or "flowers" in w["image"] for w in report.worst)
    assert report.passed


@pytest.mark.slow
@pytest.mark.timeout(1800)  # export + 300-image Percentile calibration + Keras reference: minutes on 2 cores
def test_mobilenet_v2_int8_against_keras(tmp_path, keras_home, shared_dir):
    """The defaults (exact 8-bit input, stem and first depthwise conv quantized) on in-distribution
    calibration: a labelled gate on 250 held-out ImageNet images.
    (Calibrated on the 128 px flowers this once asserted >= 85 % top-1 *agreement* on flowers: not an
    accuracy measure, see export/QUANTIZATION.md; measured there on ImageNet labels instead.)"""
    from export.pipeline import export_model
    from serve import cpuinfo

    root = tmp_path / "models"
    export_model("mobilenet_v2", repository=root, progress=False, parity=False)
    data = shared_dir / "datasets" / "imagenet_val"
    reports = opt.optimize(root, "mobilenet_v2", precisions="int8", calibration=data, max_eval_images=250,
                           latency_runs=30, min_accuracy_ratio=0.97, progress=False, log=lambda *_: None)
    report = reports["mobilenet_v2_int8"]
    assert report.reference == "keras:mobilenet_v2_keras"
    assert report.gate == "accuracy" and report.passed and report.labelled_images == report.images == 250
    assert report.calibration["images_used"] == 300
    assert report.calibration["exact_input"]["applied"] is True
    assert report.top5_agreement >= 0.98
    saved = json.loads((root / "mobilenet_v2_int8" / "accuracy.json").read_text())
    assert saved["accuracy_ratio"] >= 0.97
    # a speed sanity check, not a goal (benchmarks hold those): INT8 batch-1 is faster than FP32,
    # by more with VNNI (0.50-0.62x measured) than on AVX2 alone (0.74-0.79x)
    limit = 0.8 if cpuinfo.has_vnni(cpuinfo.instruction_sets()) else 0.95
    assert report.latency["ratio"] < limit


@pytest.mark.slow
@pytest.mark.timeout(2400)  # export + 300-image calibration + Keras reference on ~500 held-out images
def test_mobilenet_v2_int8_and_fp16_keep_imagenet_accuracy(tmp_path, keras_home, shared_dir):
    """The README's example with the defaults: calibrated on imagenet_val, gated on its labelled
    held-out 20 % (accuracy gate: >= 99 % of the Keras model's top-1)."""
    from export.pipeline import export_model

    root = tmp_path / "models"
    export_model("mobilenet_v2", repository=root, progress=False, parity=False)
    data = shared_dir / "datasets" / "imagenet_val"
    reports = opt.optimize(root, "mobilenet_v2", precisions="int8,fp16", calibration=data, latency_runs=0,
                           progress=False, log=lambda *_: None)
    int8, fp16 = reports["mobilenet_v2_int8"], reports["mobilenet_v2_fp16"]
    for report in (int8, fp16):
        assert report.gate == "accuracy" and report.passed
        assert report.labelled_images == report.images == 1000  # held out + not calibrated on, all labelled
    assert int8.calibration["images_used"] == 300
    assert abs(fp16.variant_top1 - fp16.reference_top1) <= 0.002
    saved = json.loads((root / "mobilenet_v2_int8" / "accuracy.json").read_text())
    assert saved["gate"] == "accuracy" and saved["accuracy_ratio"] >= 0.99
