"""The applications table and the in-graph preprocessing (checked against Keras' own preprocess_input)."""

from __future__ import annotations

import numpy as np
import pytest

from export import applications
from serve.errors import ConfigError

REQUIRED = {"vgg16", "resnet50", "xception", "mobilenet_v2", "efficientnet_b0", "inception_v3", "densenet121"}


def test_table_lists_the_required_applications():
    assert REQUIRED <= set(applications.APPLICATIONS)
    for app in applications.APPLICATIONS.values():
        assert app.preprocessing in applications.PREPROCESSING_MODES
        assert app.weights_file.endswith(".h5")
    assert applications.get("xception").input_size == (299, 299)
    assert applications.get("vgg16").preprocessing == "caffe"
    assert applications.get("densenet121").preprocessing == "torch"
    assert applications.get("efficientnet_b0").preprocessing == "none"


def test_unknown_application_lists_known_names():
    with pytest.raises(ConfigError) as info:
        applications.get("resnet51")
    message = str(info.value)
    assert "resnet51" in message
    for name in REQUIRED:
        assert name in message


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_preprocessing_layers_match_keras_preprocess_input(name):
    """Each mode (caffe, tf, torch, none) equals keras.applications.<app>.preprocess_input on uint8 pixels."""
    import keras

    from export import contract

    app = applications.get(name)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    x = inputs
    for layer in contract.preprocessing_layers(app.preprocessing):
        x = layer(x)
        contract._set_fixed_weights(layer)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)  # a known pixel: channel order shows
    ours = np.asarray(model(pixels))
    theirs = np.asarray(app.reference_preprocess()(pixels.astype(np.float32)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=2e-6)


def test_preprocessing_is_saved_without_lambda(tmp_path):
    """The wrapper uses built-in layers only: it round-trips through .keras with safe_mode=True."""
    import keras

    from export import contract

    network = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                                keras.layers.Dense(4)], name="net")
    model = contract.wrap(network, input_size=(16, 16), mode="caffe", softmax=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert loaded.inputs[0].dtype == "uint8"
    assert loaded.layers[-1].name == "probabilities"
    np.testing.assert_allclose(np.asarray(loaded(pixels)), np.asarray(model(pixels)), rtol=1e-6)
    assert not any(type(layer).__name__ == "Lambda" for layer in loaded.layers)
