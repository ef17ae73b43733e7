"""Helpers for the Keras export tests: tiny Keras models, untrained applications with usable outputs, a CLI runner.

(A separate module rather than conftest.py, which holds the ONNX-only fixtures of
the optimisation tests; import these with `from keras_helpers import ...`.)

Untrained applications (weights=None) mostly output a uniform distribution:
their activations shrink to ~1e-12 through dozens of layers, so a parity check
on them would pass whatever the conversion did. `calibrated_application`
fixes that the way data-dependent initialisation does: each BatchNormalization
gets the statistics of its input on a few synthetic images, so the network
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
            op.set_weights(weights[:-2] + [array.mean(axis=axes).astype(np.float32),
                                           (array.var(axis=axes) + 1e-6).astype(np.float32)])
            kwargs["training"] = False
            return op(x, *args, **kwargs)

        return call

    network._run_through_graph(keras.ops.convert_to_tensor(images), operation_fn=operation_fn)


def calibrated_application(name: str):
    """An untrained application in Kestrel's contract whose outputs are image-dependent (see module doc)."""
    from export import applications, contract
    from serve.images import synthetic_images

    app = applications.get(name)
    network = app.build(weights=None, classifier_activation=None)
    images = synthetic_images(4, app.input_size, seed=5).astype(np.float32)
    calibrate(network, np.asarray(app.reference_preprocess()(images.copy())))
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
