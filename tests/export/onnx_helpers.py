"""Helpers and fixtures for the optimize tests (INT8/FP16/TensorRT): a tiny MobileNet-shaped ONNX
classifier built with onnx.helper (no TensorFlow), a repository holding it, and small class
folders of real image files. Imported by name like keras_helpers (tests/export has no package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE = (16, 16)
CLASSES = 5


def tiny_classifier(seed: int = 0):
    """uint8 NHWC [N,16,16,3] -> Cast/Mul/Add/Transpose (preprocessing) -> Conv+Clip (stem)
    -> depthwise Conv+Clip -> 1x1 Conv (project) -> residual Add -> 1x1 Conv+Clip
    -> GlobalAveragePool -> Flatten -> MatMul+Add -> Softmax -> "probabilities" [N,5]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = 8

    def w(name, *shape, scale=0.4):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "shift"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        w("stem_w", c, 3, 3, 3), w("stem_b", c, scale=0.1),
        w("dw_w", c, 1, 3, 3), w("dw_b", c, scale=0.1),
        w("pw_w", c, c, 1, 1), w("pw_b", c, scale=0.1),
        w("ex_w", 2 * c, c, 1, 1), w("ex_b", 2 * c, scale=0.1),
        w("fc_w", 2 * c, CLASSES, scale=1.0), w("fc_b", CLASSES, scale=0.1),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["images"], ["x_f"], to=TensorProto.FLOAT, name="pre_cast"),
        n("Mul", ["x_f", "scale"], ["x_m"], name="pre_mul"),
        n("Add", ["x_m", "shift"], ["x_a"], name="pre_add"),
        n("Transpose", ["x_a"], ["x_t"], perm=[0, 3, 1, 2], name="pre_transpose"),
        n("Conv", ["x_t", "stem_w", "stem_b"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem_conv"),
        n("Clip", ["s", "zero", "six"], ["s6"], name="stem_relu6"),
        n("Conv", ["s6", "dw_w", "dw_b"], ["d"], pads=[1, 1, 1, 1], group=c, name="dw_conv"),
        n("Clip", ["d", "zero", "six"], ["d6"], name="dw_relu6"),
        n("Conv", ["d6", "pw_w", "pw_b"], ["p"], name="project_conv"),
        n("Add", ["p", "s6"], ["r"], name="residual_add"),
        n("Conv", ["r", "ex_w", "ex_b"], ["e"], name="expand_conv"),
        n("Clip", ["e", "zero", "six"], ["e6"], name="expand_relu6"),
        n("GlobalAveragePool", ["e6"], ["g"], name="gap"),
        n("Flatten", ["g"], ["f"], name="flatten"),
        n("MatMul", ["f", "fc_w"], ["logits0"], name="fc_matmul"),
        n("Add", ["logits0", "fc_b"], ["logits"], name="fc_bias"),
        n("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE[0], SIZE[1], 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save(tiny_classifier(), str(path))
    return path


@pytest.fixture
def tiny_repo(tmp_path, tiny_onnx) -> Path:
    """models/tiny/ : config.pbtxt, labels.txt, 1/model.onnx (the FP32 export contract)."""
    from serve.repository import TensorSpec, make_config, write_config

    root = tmp_path / "models"
    folder = root / "tiny"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    config = make_config("tiny", "onnxruntime_onnx", TensorSpec("images", np.uint8, (*SIZE, 3)),
                         TensorSpec("probabilities", np.float32, (CLASSES,)), max_batch_size=8)
    write_config(config, folder)
    (folder / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(CLASSES)))
    return root


def write_image_folders(root: Path, per_class: int, classes: int = 3, size=(20, 24), seed: int = 0) -> Path:
    """root/<class>/<i>.png|jpg real image files (smooth synthetic pictures), plus one broken file."""
    from PIL import Image

    from serve.images import synthetic_images

    images = synthetic_images(per_class * classes, size, seed=seed)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(images[k * per_class + i]).save(folder / f"img{i:03d}{suffix}")
    (root / "class0" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 20 images (60) + one undecodable file."""
    return write_image_folders(tmp_path_factory.mktemp("calib"), per_class=20)
