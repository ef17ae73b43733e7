"""export/calibrate.py: percentile ranges from in-graph top values are the quantile of every activation rounded
to its bin's edge on onnxruntime's histogram grid, equal onnxruntime's own calibrator's, and quantize() falls back
to onnxruntime's when the values to keep would not fit."""

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
def test_ranges_are_the_quantile_of_every_activation_at_its_histogram_bins_edge(prepared, images, percentile):
    """First pass 7 images, batches of 3 (never across the pass): the grid comes from images 0-6 only."""
    ranges = calibrate.percentile_ranges(prepared, images, percentile=percentile, batch=3, first_pass=7)
    tensors = list(ranges)
    assert tensors == calibrate.select_tensors(onnx.shape_inference.infer_shapes(onnx.load(str(prepared))),
                                               calibrate.default_op_types())
    assert len(tensors) >= 8  # convs, activations, add, matmul... of the tiny classifier
    values = _activations(prepared, tensors, images)
    first = _activations(prepared, tensors, images[:7])
    for name in tensors:
        v, a = values[name], np.abs(values[name])
        k = calibrate.quantile_rank(v.size, percentile)
        q = np.sort(a)[v.size - k]
        assert math.ceil(v.size * percentile / 100) - 1 == v.size - k  # the ascending index of the quantile
        edges = np.histogram_bin_edges(np.abs(first[name]), bins=calibrate.NUM_BINS).astype(np.float32)
        if a.max() > edges[-1]:
            width = edges[1] - edges[0]
            edges = np.hstack((edges, np.arange(edges[-1] + width, a.max() + width, width, dtype=np.float32)))
        edge = edges[min(np.searchsorted(edges, q, side="right") - 1, len(edges) - 2)]
        assert edge <= q and (q - edge) <= (edges[1] - edges[0]) * 1.001
        # (the calibration graph runs optimised, these activations unoptimised: equal up to float rounding)
        assert ranges[name] == pytest.approx((max(-edge, v.min()), min(edge, v.max())), rel=1e-5, abs=1e-6), name


def test_histogram_edge_rounds_down_to_the_grid_and_extends_it():
    assert calibrate.histogram_edge(5.0, 0.0, 2048.0, 2048.0) == 5.0  # bins of 1: an edge
    assert calibrate.histogram_edge(5.7, 0.0, 2048.0, 2048.0) == 5.0
    assert calibrate.histogram_edge(2048.0, 0.0, 2048.0, 2048.0) == 2047.0  # the last bin is closed
    assert calibrate.histogram_edge(3000.5, 0.0, 2048.0, 3100.0) == 3000.0  # grid grown by bins of 1


def test_ranges_agree_with_onnxruntimes_histogram_calibrator(prepared, images, tmp_path):
    from onnxruntime.quantization import calibrate as ort_calibrate

    ours = calibrate.percentile_ranges(prepared, images, percentile=99.9)
    theirs = ort_calibrate.create_calibrator(prepared, calibrate.default_op_types(),
                                             augmented_model_path=str(tmp_path / "augmented_model.onnx"),
                                             calibrate_method=ort_calibrate.CalibrationMethod.Percentile,
                                             extra_options={"percentile": 99.9})
    theirs.collect_data(quant._Reader("images", images))
    data = theirs.compute_data()
    assert set(ours) == set(data.keys())
    for name, (low, high) in ours.items():
        their_low, their_high = (float(x) for x in data[name].range_value)
        assert high == pytest.approx(their_high, rel=1e-5, abs=1e-6), name
        assert low == pytest.approx(their_low, rel=1e-5, abs=1e-6), name


def test_quantize_writes_the_scales_onnxruntimes_calibrator_would(tiny_onnx, tmp_path):
    """40 images: both collect in passes of 20 (CalibStridedMinMax), the histogram grid from the first."""
    from onnx import numpy_helper

    from serve.images import synthetic_images

    images = synthetic_images(40, SIZE, seed=6)
    fast = quant.quantize(tiny_onnx, tmp_path / "fast.onnx", images, quant.QuantizeOptions(min_images=8))
    slow = quant.quantize(tiny_onnx, tmp_path / "slow.onnx", images,
                          quant.QuantizeOptions(min_images=8, fast_calibration=False))
    assert fast.quantized_nodes == slow.quantized_nodes > 0 and fast.kept_float == slow.kept_float

    def scales(path):
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in graph.node if n.op_type == "QuantizeLinear"}

    ours, theirs = scales(tmp_path / "fast.onnx"), scales(tmp_path / "slow.onnx")
    assert set(ours) == set(theirs) and ours
    for tensor, (scale, zero) in ours.items():
        np.testing.assert_allclose(scale, theirs[tensor][0], rtol=1e-4, err_msg=tensor)
        assert np.array_equal(zero, theirs[tensor][1]), tensor


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


def test_a_tapped_graph_that_fails_to_run_is_a_value_error_the_quantizer_falls_back_on(prepared, images,
                                                                                        monkeypatch):
    """onnxruntime failing inside session.run (not only when the session is made) is the ValueError quantize()
    falls back to onnxruntime's calibrator on; the progress bar is closed on the way out."""
    from serve import console

    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.closed = False
            bars.append(self)

        def update(self, n):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(console, "progress", Bar)
    wrong = images.astype(np.float32)  # the model takes uint8: onnxruntime refuses the feed at run time
    with pytest.raises(ValueError, match="cannot run the tapped graph"):
        calibrate.percentile_ranges(prepared, wrong, batch=3, progress=True)
    assert [bar.closed for bar in bars] == [True]


def test_calibration_reports_its_progress_in_one_line_when_piped(prepared, images, capsys, monkeypatch):
    from serve import console

    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    calibrate.percentile_ranges(prepared, images, batch=3, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("calibrating: 23/23 img ["), lines
    calibrate.percentile_ranges(prepared, images, batch=3)
    assert capsys.readouterr().err == ""
