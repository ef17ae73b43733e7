"""MobileNet (v1) joins the applications: --alpha picks the width, the weights file and the repository name."""

from __future__ import annotations

import numpy as np
import pytest

from keras_helpers import cli, error_line

from export import applications, pipeline
from serve.errors import ConfigError
from serve.repository import ModelRepository


def test_mobilenet_is_in_the_table_with_its_alphas():
    app = applications.get("mobilenet")
    assert app.constructor == "MobileNet" and app.preprocessing == "tf" and app.input_size == (224, 224)
    assert app.weights_file_for(None) == app.weights_file_for(1.0) == "mobilenet_1_0_224_tf.h5"
    assert app.weights_file_for(0.25) == "mobilenet_2_5_224_tf.h5"
    assert app.weights_file_for(0.5) == "mobilenet_5_0_224_tf.h5"
    assert app.weights_file_for(0.75) == "mobilenet_7_5_224_tf.h5"
    assert applications.get("mobilenet_v2").weights_file_for(0.35) == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224.h5"
    assert app.default_name(None) == app.default_name(1.0) == "mobilenet"
    assert app.default_name(0.25) == "mobilenet_0.25"


def test_bad_alphas_are_rejected_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match="expected one of 0.25, 0.5, 0.75, 1"):
        applications.get("mobilenet").check_alpha(0.3)
    with pytest.raises(ConfigError, match="--alpha applies to mobilenet, mobilenet_v2 only, not resnet50"):
        pipeline.export_model("resnet50", alpha=0.5, repository=tmp_path)
    model_file = tmp_path / "m.keras"
    model_file.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: passes the precheck
    with pytest.raises(ConfigError, match="not to a model file"):
        pipeline.export_model(model_file, alpha=0.5, repository=tmp_path)
    result = cli(["mobilenet", "--alpha", "0.3", "--repository", str(tmp_path / "r")])
    assert result.returncode == 2 and "received alpha 0.3" in error_line(result.stderr)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.shared_data
def test_mobilenet_alpha_025_exports_with_real_weights(keras_home, tmp_path):
    """The 2 MB alpha-0.25 weights: the CLI names it mobilenet_0.25 and the ONNX model equals
    keras.applications.MobileNet(alpha=0.25) with Keras' own preprocess_input."""
    import keras
    import onnxruntime

    from serve.images import synthetic_images

    assert (keras_home / "models" / applications.get("mobilenet").weights_file_for(0.25)).is_file()
    root = tmp_path / "models"
    result = cli(["mobilenet", "--alpha", "0.25", "--repository", str(root), "--quiet"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity PASS" in result.stdout and "alpha=0.25" in result.stdout
    entry = ModelRepository(root).entry("mobilenet_0.25")
    assert entry.input_spec.shape == (224, 224, 3) and entry.output_spec.shape == (1000,)
    assert entry.labels()[:2] == ["tench", "goldfish"]
    assert ModelRepository(root).entry("mobilenet_0.25_keras").platform == "keras"

    pixels = synthetic_images(4, (224, 224), seed=5)
    reference = keras.applications.MobileNet(alpha=0.25, weights="imagenet")
    expected = np.asarray(reference.predict(keras.applications.mobilenet.preprocess_input(
        pixels.astype(np.float32)), verbose=0))
    session = onnxruntime.InferenceSession(str(entry.artifact()))
    got = session.run(None, {"images": pixels})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
