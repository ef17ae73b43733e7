"""export.exact_input: the uint8 image becomes the stem's quantized input, exactly."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
from export import exact_input  # noqa: E402
from export import quantize as quant  # noqa: E402
from onnx_helpers import SIZE, tiny_classifier, tiny_onnx  # noqa: E402,F401


def _run(model, x, output=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output] if output else None, {"images": x})[0]


def _with_output(model, name):
    """The model with an extra graph output `name` (to look at an intermediate tensor)."""
    model = copy.deepcopy(model)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def test_plan_finds_mobilenet_style_normalisation():
    plan, why = exact_input.plan(tiny_classifier())
    assert why == "" and plan is not None
    assert plan.chain == ["pre_cast", "pre_mul", "pre_add", "pre_transpose"] and plan.conv == "stem_conv"
    assert plan.perm == [0, 3, 1, 2] and plan.input_name == "images" and plan.tensor == "x_t"
    assert plan.scale == pytest.approx(1 / 127.5)
    assert plan.zero_point in (127, 128)  # x / 127.5 - 1: the zero point 127.5 is not an integer
    assert plan.offset_shift == pytest.approx([plan.scale * (127.5 - plan.zero_point)] * 3, abs=1e-6)
    assert plan.max_padding_shift > 0  # the stem pads: its border outputs move a little


def test_apply_keeps_the_float_model_computing_the_same_answer():
    model = tiny_classifier()
    plan, _ = exact_input.plan(model)
    shifted = copy.deepcopy(model)
    exact_input.apply(shifted, plan)
    x = np.random.default_rng(0).integers(0, 256, (6, *SIZE, 3), dtype=np.uint8)
    # the stem's input is now a * (x - z) exactly, on every channel ...
    stem_in = _run(_with_output(shifted, plan.tensor), x, plan.tensor)
    expected = plan.scale * (x.transpose(0, 3, 1, 2).astype(np.float64) - plan.zero_point)
    assert np.max(np.abs(stem_in - expected)) < 1e-6
    # ... and the stem's output moved only where it reads the zero padding (the border)
    before = _run(_with_output(model, "s"), x, "s")
    after = _run(_with_output(shifted, "s"), x, "s")
    assert np.max(np.abs(after - before)[:, :, 1:-1, 1:-1]) < 1e-5
    assert np.max(np.abs(after - before)) <= plan.max_padding_shift + 1e-5
    assert np.max(np.abs(_run(shifted, x) - _run(model, x))) < 1e-3


def test_quantize_feeds_the_uint8_image_to_the_quantized_stem(tiny_onnx, tmp_path):
    from serve.images import synthetic_images

    images = synthetic_images(40, SIZE, seed=3)
    out = tmp_path / "int8.onnx"
    options = quant.QuantizeOptions(min_images=16, method="minmax", keep_float=("preprocessing", "classifier"))
    result = quant.quantize(tiny_onnx, out, images, options)
    assert result.exact_input["applied"] is True, result.exact_input
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "Cast" not in ops and "Mul" not in ops  # the float normalisation is gone
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    (transpose,) = consumers["images"]
    assert transpose.op_type == "Transpose"  # on uint8 now
    (dq,) = consumers[transpose.output[0]]
    assert dq.op_type == "DequantizeLinear"
    stem = {n.name: n for n in model.graph.node}["stem_conv"]
    assert producers[stem.input[0]] is dq and producers[stem.input[1]].op_type == "DequantizeLinear"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    stem_w = inits[producers[stem.input[1]].input[0]]
    assert stem_w.dtype == np.int8 and stem_w.min() >= -64 and stem_w.max() <= 64  # 7-bit: no U8S8 saturation on AVX2
    assert float(inits[dq.input[1]]) == pytest.approx(1 / 127.5) and int(inits[dq.input[2]]) == result.exact_input["zero_point"]
    # what the quantized stem sees is the image itself: DQ(x) = a * (x - z), no rounding
    x = synthetic_images(8, SIZE, seed=9)
    seen = _run(_with_output(model, dq.output[0]), x, dq.output[0])
    expected = (x.transpose(0, 3, 1, 2).astype(np.float64) - result.exact_input["zero_point"]) / 127.5
    assert np.max(np.abs(seen - expected)) < 1e-6
    # and the model is no worse than the same rules with the normalised copy re-quantized
    rounded = tmp_path / "rounded.onnx"
    quant.quantize(tiny_onnx, rounded, images, quant.QuantizeOptions(
        min_images=16, method="minmax", keep_float=("preprocessing", "classifier"), exact_input=False))
    x = synthetic_images(64, SIZE, seed=9)
    ref = ort.InferenceSession(str(tiny_onnx)).run(None, {"images": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"images": x})[0]
    old = ort.InferenceSession(str(rounded)).run(None, {"images": x})[0]
    assert got.shape == ref.shape
    print("mean abs error: exact", np.mean(np.abs(got - ref)), "rounded", np.mean(np.abs(old - ref)))
    assert np.mean(np.abs(got - ref)) <= np.mean(np.abs(old - ref)) * 1.1


def test_default_rules_quantize_the_stem_only_when_its_input_is_exact(tiny_onnx, tmp_path):
    from onnx import numpy_helper

    from serve.images import synthetic_images

    images = synthetic_images(20, SIZE, seed=3)
    opts = dict(min_images=16, method="minmax")
    # defaults: first_conv and sensitive are lifted, since the stem sees the exact image (7-bit weights)
    default = quant.quantize(tiny_onnx, tmp_path / "d.onnx", images, quant.QuantizeOptions(**opts))
    assert default.exact_input["applied"] is True
    assert default.exact_input["lifted"] == ["dw_conv", "dw_relu6", "stem_conv", "stem_relu6"]
    assert set(default.kept_float.values()) == {"preprocessing", "classifier"}
    # off: the old path, stem and first depthwise float behind the re-quantized normalised input
    off = quant.quantize(tiny_onnx, tmp_path / "a.onnx", images, quant.QuantizeOptions(**opts, exact_input=False))
    assert off.exact_input == {"applied": False, "why_not": "off (exact_input=False)"}
    assert off.kept_float["stem_conv"] == "first_conv" and off.kept_float["dw_conv"] == "sensitive"
    # a stem the user keeps float stays float, and the input is left as it was
    user = quant.quantize(tiny_onnx, tmp_path / "b.onnx", images,
                          quant.QuantizeOptions(**opts, keep_float=("preprocessing", "classifier"),
                                                exclude_nodes=("stem_conv",)))
    assert user.exact_input["applied"] is False and "rule user" in user.exact_input["why_not"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node]
    assert "Cast" in ops and "Mul" in ops  # untouched: the float preprocessing and stem
    # also when the node the user names is one the default rules would have lifted
    named = quant.quantize(tiny_onnx, tmp_path / "n.onnx", images,
                           quant.QuantizeOptions(**opts, exclude_nodes=("stem_conv",)))
    assert named.exact_input["applied"] is False and named.kept_float["stem_conv"] == "first_conv"
    # a normalisation that cannot be made exact: first_conv keeps the stem float, as before
    model = tiny_classifier()
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    scale.CopyFrom(numpy_helper.from_array(np.array([1 / 58.4, 1 / 57.1, 1 / 57.4], np.float32), "scale"))
    path = tmp_path / "torch_style.onnx"
    onnx.save(model, str(path))
    other = quant.quantize(path, tmp_path / "c.onnx", images, quant.QuantizeOptions(**opts))
    assert other.exact_input["applied"] is False and "per-channel input scales" in other.exact_input["why_not"]
    assert other.kept_float["stem_conv"] == "first_conv"


def test_per_channel_scales_are_left_alone_with_the_reason():
    from onnx import numpy_helper

    model = tiny_classifier()
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    scale.CopyFrom(numpy_helper.from_array(np.array([1 / 58.4, 1 / 57.1, 1 / 57.4], np.float32), "scale"))
    plan, why = exact_input.plan(model)
    assert plan is None and "per-channel input scales" in why


def test_other_ops_in_the_normalisation_are_left_alone():
    model = tiny_classifier()
    node = next(n for n in model.graph.node if n.name == "pre_mul")
    node.op_type = "Pow"
    plan, why = exact_input.plan(model)
    assert plan is None and "Pow" in why
