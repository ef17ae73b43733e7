"""Plain helpers for tests/serve (importable as `serve_helpers`; conftest modules are not
importable by name reliably when several test folders have one)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHARED = (ROOT.parent / "shared").resolve()
PHOTOS = SHARED / "photos"

LABELS = [f"label_{i}" for i in range(10)]


def png_bytes(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save)
    return buf.getvalue()


def write_tiny_onnx(root: Path, name: str = "tiny", *, classes: int = 4, size=(16, 16), seed: int = 0,
                    max_batch_size: int = 8, max_queue_delay_us: int = 2000) -> Path:
    """A real ONNX image classifier: uint8 NHWC -> Cast -> /255 -> Transpose -> GlobalAveragePool
    -> Flatten -> MatMul + Add -> Softmax. Returns the model folder (config, labels, 1/model.onnx)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from serve.repository import PLATFORM_ONNX, TensorSpec, make_config, write_config

    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 8, (3, classes)).astype(np.float32)
    bias = rng.normal(0, 0.5, classes).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size[0], size[1], 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
                     numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = Path(root) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))
    config = make_config(name, PLATFORM_ONNX, TensorSpec("images", np.uint8, (size[0], size[1], 3)),
                         TensorSpec("probabilities", np.float32, (classes,)), max_batch_size=max_batch_size,
                         max_queue_delay_us=max_queue_delay_us)
    write_config(config, folder)
    (folder / "labels.txt").write_text("\n".join(f"tiny_{i}" for i in range(classes)) + "\n")
    return folder


def tiny_onnx_expected(batch: np.ndarray, classes: int = 4, seed: int = 0) -> np.ndarray:
    """What write_tiny_onnx's model computes, in numpy."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 8, (3, classes)).astype(np.float32)
    bias = rng.normal(0, 0.5, classes).astype(np.float32)
    logits = (batch.astype(np.float32) / 255).mean(axis=(1, 2)) @ weights + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition()` every 5 ms; AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Gate:
    """Wraps a runner's _infer: records each batch that reaches the model, which then waits until the gate
    opens (`open.set()`); `restore()` opens it and puts the runner's own _infer back."""

    def __init__(self, runner):
        self.runner, self.original = runner, runner._infer
        self.calls: list[int] = []
        self.open = threading.Event()

        def infer(batch):
            self.calls.append(int(batch.shape[0]))
            assert self.open.wait(10), "the test never opened the gate"
            return self.original(batch)

        runner._infer = infer

    def restore(self):
        self.open.set()
        self.runner._infer = self.original
