"""The Keras backend runs a repository's model.keras through a fixed-signature tf.function."""

from __future__ import annotations

import numpy as np
import pytest

from serve.backends import create_runner
from serve.errors import InvalidInputError, ModelLoadError
from serve.repository import BACKEND_KERAS, ModelRepository, TensorSpec, make_config, write_config

pytest.importorskip("tensorflow")


def _keras_entry(root, *, size=(16, 16), classes=4):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((*size, 3), dtype="uint8", name="images")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    folder = root / "tiny_keras"
    (folder / "1").mkdir(parents=True)
    model.save(folder / "1" / "model.keras")
    config = make_config("tiny_keras", BACKEND_KERAS, TensorSpec("images", np.uint8, (*size, 3)),
                         TensorSpec("probabilities", np.float32, (classes,)), max_batch_size=8)
    write_config(config, folder)
    (folder / "labels.txt").write_text("".join(f"l{i}\n" for i in range(classes)))
    return model, ModelRepository(root).entry("tiny_keras")


def test_keras_runner_matches_model_and_modes_agree(tmp_path):
    model, entry = _keras_entry(tmp_path)
    batch = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    with create_runner(entry) as runner:
        assert type(runner).__name__ == "KerasRunner" and runner.labels == ["l0", "l1", "l2", "l3"]
        out = runner.infer(batch)
        assert out.dtype == np.float32 and out.shape == (3, 4)
        np.testing.assert_allclose(out, np.asarray(model(batch)), rtol=1e-5, atol=1e-6)
        for size in (1, 5):  # one traced graph serves every batch size
            assert runner.infer(batch[:1].repeat(size, axis=0)).shape == (size, 4)
        with pytest.raises(InvalidInputError, match="received dtype float32, expected uint8"):
            runner.infer(batch.astype(np.float32))
    with create_runner(entry, mode="predict") as predict_runner:
        np.testing.assert_allclose(predict_runner.infer(batch), out, rtol=1e-5, atol=1e-6)


def test_keras_runner_reports_unloadable_file(tmp_path):
    _, entry = _keras_entry(tmp_path)
    entry.artifact().write_bytes(b"not a keras file")
    runner = create_runner(entry)
    with pytest.raises(ModelLoadError, match="Keras cannot load"):
        runner.load()
