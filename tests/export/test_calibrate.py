"""export/calibrate.py: percentile ranges from in-graph top values equal the exact quantile of every activation,
stay within a histogram bin of onnxruntime's own calibrator, and quantize() falls back to onnxruntime's when the
values to keep would not fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from export import calibrate  # noqa: E402
from export import quantize as quant  # noqa: E402

from onnx_helpers import SIZE, tiny_onnx  # noqa: E402,F401


@pytest.fixture
def prepared(tiny_onnx, tmp_path):
    return quant.preprocess(tiny_onnx, tmp_path / "prepared.onnx")


@pytest.fixture
def images():
    from serve.images import synthetic_images

    return synthetic_images(23, SIZE, seed=4)  # 23: batches of 3 leave a remainder


def _activations(model_path, tensors, images) -> dict[str, np.ndarray]:
    """Every value of each tensor over all images: the tensors made graph outputs, run without optimisation."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    typed = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    del model.graph.output[:]
    model.graph.output.extend(typed[t] for t in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {"images": images[i : i + 1]}) for i in range(len(images))]
    return {t: np.concatenate([o[k].ravel() for o in outputs]) for k, t in enumerate(tensors)}


def test_quantile_rank_is_the_smallest_value_with_percentile_below_or_at_it():
    assert calibrate.quantile_rank(10_000, 99.999) == 1  # the maximum
    assert calibrate.quantile_rank(100_000, 99.999) == 2  # 99,999 of 100,000 at or below the second largest
    assert calibrate.quantile_rank(1_000_000, 99.999) == 11
    assert calibrate.quantile_rank(1000, 99.0) == 11
    assert calibrate.quantile_rank(1000, 100.0) == 1
    values = np.random.default_rng(0).random(1000)
    k = calibrate.quantile_rank(len(values), 99.0)
    q = np.sort(values)[-k]
    assert np.mean(values <= q) >= 0.99 and np.mean(values < q) < 0.99


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.999])
def test_ranges_are_the_exact_quantile_of_every_activation(prepared, images, percentile):
    ranges = calibrate.percentile_ranges(prepared, images, percentile=percentile, batch=3)
    tensors = list(ranges)
    assert tensors == calibrate.select_tensors(onnx.shape_inference.infer_shapes(onnx.load(str(prepared))),
                                               calibrate.default_op_types())
    assert len(tensors) >= 8  # convs, activations, add, matmul... of the tiny classifier
    values = _activations(prepared, tensors, images)
    for name in tensors:
        v = values[name]
        k = calibrate.quantile_rank(v.size, percentile)
        q = np.sort(np.abs(v))[v.size - k]
        assert ranges[name] == (max(-q, v.min()), min(q, v.max())), name
        assert math.ceil(v.size * percentile / 100) - 1 == v.size - k  # the ascending index of the quantile


def test_ranges_agree_with_onnxruntimes_histogram_calibrator(prepared, images):
    from onnxruntime.quantization import calibrate as ort_calibrate

    ours = calibrate.percentile_ranges(prepared, images, percentile=99.9)
    theirs = ort_calibrate.create_calibrator(prepared, calibrate.default_op_types(),
                                             calibrate_method=ort_calibrate.CalibrationMethod.Percentile,
                                             extra_options={"percentile": 99.9})
    theirs.collect_data(quant._Reader("images", images))
    data = theirs.compute_data()
    assert set(ours) == set(data.keys())
    for name, (low, high) in ours.items():
        their_low, their_high = (float(x) for x in data[name].range_value)
        bin_width = max(abs(their_low), abs(their_high), abs(low), abs(high)) / 2048
        assert abs(high - their_high) <= 2 * bin_width + 1e-6, name
        assert abs(low - their_low) <= 2 * bin_width + 1e-6, name


def test_quantize_uses_the_cache_and_the_model_agrees_with_onnxruntimes_calibration(tiny_onnx, tmp_path, images):
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    from serve.repository import TensorSpec

    options = quant.QuantizeOptions(min_images=8)
    fast = quant.quantize(tiny_onnx, tmp_path / "fast.onnx", images, options)
    slow = quant.quantize(tiny_onnx, tmp_path / "slow.onnx", images, quant.QuantizeOptions(min_images=8,
                                                                                          fast_calibration=False))
    assert fast.quantized_nodes == slow.quantized_nodes > 0 and fast.kept_float == slow.kept_float
    spec_in, spec_out = TensorSpec("images", np.uint8, (*SIZE, 3)), TensorSpec("probabilities", np.float32, (5,))
    with OnnxRuntimeRunner("fast", tmp_path / "fast.onnx", spec_in, spec_out) as a, \
            OnnxRuntimeRunner("slow", tmp_path / "slow.onnx", spec_in, spec_out) as b:
        pa, pb = a.infer(images), b.infer(images)
    assert np.abs(pa - pb).max() < 0.05 and (pa.argmax(1) == pb.argmax(1)).mean() >= 0.9


def test_too_many_values_to_keep_falls_back_to_onnxruntimes_calibrator(tiny_onnx, tmp_path, images, monkeypatch):
    from serve import console

    monkeypatch.setattr(calibrate, "MAX_KEPT", 1)
    assert calibrate.fits({"t": 1000}, 10, 99.999) and not calibrate.fits({"t": 1000}, 10, 99.0)
    with pytest.raises(ValueError, match="keeps more than 1 values"):
        calibrate.percentile_ranges(quant.preprocess(tiny_onnx, tmp_path / "p.onnx"), images, percentile=99.0)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # onnxruntime's calibrator prints its steps when verbose
    result = quant.quantize(tiny_onnx, tmp_path / "fallback.onnx", images,
                            quant.QuantizeOptions(min_images=8, percentile=99.0))
    assert result.quantized_nodes > 0 and (tmp_path / "fallback.onnx").is_file()
