"""Helpers for the Keras export tests: tiny Keras models, untrained applications with usable outputs, a CLI runner.

(A separate module rather than conftest.py, which holds the ONNX-only fixtures of
the optimisation tests; import these with `from keras_helpers import ...`.)

Untrained applications (weights=None) mostly output a uniform distribution:
their activations shrink to ~1e-12 through dozens of layers, so a parity check
on them would pass whatever the conversion did. `calibrated_application`
fixes that the way data-dependent initialisation does: each BatchNormalization
gets the statistics of its input on the parity check's synthetic images, the
classifier is scaled so its logits have a standard deviation of 2 there, so the network
gives peaked, image-dependent probabilities and a wrong conversion shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT.parent / "shared").resolve()


def cli(args: list[str], *, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m export ARGS` from the checkout; returns the completed process (text)."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The CLI's own message: the last non-empty stderr line (TensorFlow may log before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def calibrate(network, images: np.ndarray) -> None:
    """Data-dependent init for an untrained network taking float images: BN statistics from `images`.

    One pass through the functional graph: each BatchNormalization first takes
    the mean/variance of the input it receives, then normalises it.
    """
    import keras

    def operation_fn(op):
        if not isinstance(op, keras.layers.BatchNormalization):
            return op

        def call(x, *args, **kwargs):
            array = np.asarray(x, dtype=np.float64)
            axes = tuple(range(array.ndim - 1))
            weights = op.get_weights()
            var = array.var(axis=axes)
            # A floor on the variance: a channel that is nearly constant on these few images must not be
            # amplified by 1/sqrt(epsilon) (that would make the network ill-conditioned, unlike trained ones).
            var = np.maximum(var, 1e-2 * var.mean() + 1e-6)
            op.set_weights(weights[:-2] + [array.mean(axis=axes).astype(np.float32), var.astype(np.float32)])
            kwargs["training"] = False
            return op(x, *args, **kwargs)

        return call

    network._run_through_graph(keras.ops.convert_to_tensor(images), operation_fn=operation_fn)


def calibrated_application(name: str):
    """An untrained application in Kestrel's contract whose outputs are image-dependent (see module doc)."""
    import keras

    from export import applications, contract
    from export.parity import parity_images

    app = applications.get(name)
    keras.utils.set_random_seed(0)
    network = app.build(weights=None, classifier_activation=None)
    # Calibrated on the images the parity check uses by default, so its activations stay in range there.
    images = parity_images(app.input_size)[0].astype(np.float32)
    floats = np.asarray(app.reference_preprocess()(images.copy()))
    calibrate(network, floats)
    # Scale the classifier so the logits spread (std 2 on these images): peaked, image-dependent outputs
    # even for networks without BatchNorm (VGG16).
    head = network.layers[-1]
    features = np.asarray(keras.Model(network.inputs, head.input)(floats))
    kernel, bias = head.get_weights()
    logits = features @ kernel + bias
    factor = 2.0 / max(float((logits - logits.mean(axis=0)).std()), 1e-12)
    head.set_weights([kernel * factor, bias * factor])
    return contract.wrap(network, input_size=app.input_size, mode=app.preprocessing, softmax=True, name=app.name)


def tiny_keras_classifier(*, size=(32, 32), classes=3, uint8=False, softmax=True, channels=3, seed=0):
    """A small CNN classifier. uint8=True: it takes uint8 images and rescales itself (like train/ builds)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size[0], size[1], channels), dtype="uint8" if uint8 else "float32")
    x = keras.layers.Rescaling(1 / 255.0)(inputs) if uint8 else inputs
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax" if softmax else None)(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def labels_file(tmp_path):
    def make(count: int, name: str = "labels.txt", folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.write_text("".join(f"class {i}\n" for i in range(count)))
        return path

    return make


def float64_probabilities(name: str, model, pixels: np.ndarray) -> np.ndarray:
    """The exact answer of `model` (a calibrated_application) computed in float64, as a ground truth.

    Random networks are far less well-conditioned than trained ones: their
    float32 Keras outputs themselves drift ~1e-5..1e-4 from the float64 result,
    so "ONNX vs Keras" is judged against this truth instead.
    """
    import keras

    from export import applications

    app = applications.get(name)
    network = model.layers[-2]  # images -> preprocessing -> network -> softmax
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        twin = app.build(weights=None, classifier_activation=None)
        twin.set_weights([w.astype(np.float64) for w in network.get_weights()])
        logits = np.asarray(twin(np.asarray(app.reference_preprocess()(pixels.astype(np.float64)))), np.float64)
    finally:
        keras.config.set_dtype_policy(previous)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)
