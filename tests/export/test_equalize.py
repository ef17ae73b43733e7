"""export.equalize: channel ranges moved from a Conv into the depthwise Conv after it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
from export import equalize  # noqa: E402
from export import quantize as quant  # noqa: E402
from onnx_helpers import SIZE, tiny_classifier  # noqa: E402


def _narrow_stem(model, channel: int = 0, factor: float = 0.01):
    """Make one stem output channel tiny (as MobileNetV2's stem has): weights and bias scaled down."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name in ("stem_w", "stem_b"):
            value = numpy_helper.to_array(init).copy()
            value[channel] *= factor
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def _model(narrow: float | None = 0.01):
    """tiny_classifier with the residual Add reading the depthwise output instead of the stem's
    (in tiny_classifier the stem's output also feeds the residual Add, which rules the pair out)."""
    model = tiny_classifier()
    add = next(n for n in model.graph.node if n.name == "residual_add")
    for i, name in enumerate(add.input):
        if name == "s6":
            add.input[i] = "d6"
    if not narrow:
        return model
    from onnx import numpy_helper

    for init in model.graph.initializer:  # what the narrow channel carries still matters downstream
        if init.name == "pw_w":
            value = numpy_helper.to_array(init).copy()
            value[:, 0] /= narrow
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return _narrow_stem(model, factor=narrow)


def _run(model, x, outputs=None):
    probe = copy.deepcopy(model)
    if outputs:
        for name in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})


def test_finds_conv_relu6_depthwise_pairs():
    pairs = equalize.find_pairs(_model(None))
    assert [(p.conv, p.activation, p.depthwise, p.clip) for p in pairs] == [("stem_conv", "stem_relu6", "dw_conv", 6.0)]
    # a stem whose output also feeds something else (here the residual Add) cannot be rescaled
    assert equalize.find_pairs(tiny_classifier()) == []


def test_equalize_keeps_the_answer_and_lifts_the_narrow_channel():
    from serve.images import synthetic_images

    model = _model()
    images = synthetic_images(24, SIZE, seed=1)
    before = _run(model, images, ["s6", "d6"])
    eq = copy.deepcopy(model)
    pairs = equalize.equalize(eq, images)
    assert len(pairs) == 1 and pairs[0].as_dict()["channels_rescaled"] >= 1
    after = _run(eq, images, ["s6", "d6"])
    k = np.asarray(pairs[0].scales)
    # the stem's output channels are multiplied by k, the depthwise output is unchanged, so is the answer
    assert np.allclose(after[1], before[1] * k[None, :, None, None], rtol=1e-4, atol=1e-5)
    assert np.allclose(after[2], before[2], rtol=1e-4, atol=1e-5)
    assert np.allclose(after[0], before[0], atol=1e-5)
    # the narrow channel now spans at least half the clip range on these images (it had ~1 %)
    peak_before = before[1].max(axis=(0, 2, 3))
    peak_after = after[1].max(axis=(0, 2, 3))
    assert peak_before[0] < 0.1 * peak_before.max()
    assert peak_after[0] == pytest.approx(6.0 / equalize.MARGIN, rel=1e-3) or k[0] == equalize.MAX_SCALE
    assert k.min() >= 1.0 and k.max() <= equalize.MAX_SCALE


def test_equalized_int8_gives_the_narrow_channel_many_levels(tmp_path):
    """Quantized per tensor, the narrow channel has a handful of levels; equalized, it has many."""
    from onnx import numpy_helper

    from serve.images import synthetic_images

    path = tmp_path / "narrow.onnx"
    onnx.save(_model(0.02), str(path))
    images = synthetic_images(40, SIZE, seed=3)
    levels = {}
    for mode in ("none", "all"):
        out = tmp_path / f"int8_{mode}.onnx"
        result = quant.quantize(path, out, images, quant.QuantizeOptions(
            min_images=16, method="minmax", keep_float=("classifier",), equalize=mode))
        assert bool(result.equalized) == (mode == "all")
        model = onnx.load(str(out))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("s", "s6")]
        k = np.asarray(result.equalized[0]["scales"]) if result.equalized else np.ones(8)
        peak = _run(onnx.load(str(path)), images, ["s6"])[1].max(axis=(0, 2, 3)) * k  # the channel as quantized
        levels[mode] = float(peak[0] / float(inits[q.input[1]]))
    assert levels["none"] < 10 and levels["all"] > 50, levels


def test_pairs_kept_float_are_not_touched(tmp_path):
    from serve.images import synthetic_images

    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    result = quant.quantize(path, tmp_path / "int8.onnx", synthetic_images(20, SIZE, seed=3),
                            quant.QuantizeOptions(min_images=16, method="minmax"))  # default rules: stem and dw float
    assert result.equalized == []


def test_unknown_mode_is_refused():
    with pytest.raises(quant.ConfigError, match="equalization"):
        quant.QuantizeOptions(equalize="sometimes")
