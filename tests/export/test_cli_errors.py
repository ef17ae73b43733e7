"""Bad input to `python -m export`: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import os

import pytest

from keras_helpers import cli, error_line, tiny_keras_classifier


def _check(result, *fragments: str, code: int = 2) -> str:
    line = error_line(result.stderr)
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert line.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_unknown_application(tmp_path):
    result = cli(["resnet51", "--repository", str(tmp_path / "models")])
    _check(result, "unknown application 'resnet51'", "mobilenet_v2", "vgg16", ".keras")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_name_escaping_the_repository(tmp_path, name):
    result = cli(["mobilenet_v2", "--name", name, "--repository", str(tmp_path / "models")])
    _check(result, "invalid model name")
    assert not (tmp_path / "escape").exists()


def test_missing_model_file(tmp_path):
    result = cli([str(tmp_path / "nope.keras"), "--repository", str(tmp_path / "models")])
    _check(result, "does not exist", "nope.keras")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_corrupt_model_file(tmp_path, suffix):
    bad = tmp_path / f"broken{suffix}"
    bad.write_bytes(b"PK\x03\x04 this is not a keras archive")
    result = cli([str(bad), "--repository", str(tmp_path / "models"), "--quiet"])
    _check(result, "cannot load Keras model", f"broken{suffix}", "corrupt")
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_truncated_keras_archive(tmp_path):
    """A real .keras file cut short: caught before TensorFlow starts."""
    import keras

    inputs = keras.Input((8, 8, 3))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "whole.keras")
    data = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    result = cli([str(tmp_path / "cut.keras"), "--repository", str(tmp_path / "models"), "--quiet"])
    _check(result, "cannot load Keras model", "cut.keras")


def test_weights_unavailable_offline(tmp_path):
    """No weights in KERAS_HOME and no network (a dead proxy): the message says how to provide them."""
    home = tmp_path / "keras_home"
    home.mkdir()
    env = dict(os.environ, KERAS_HOME=str(home), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"c{i}\n" for i in range(1000)))
    result = cli(["resnet50", "--weights", "imagenet", "--labels", str(labels), "--repository",
                  str(tmp_path / "models"), "--quiet"], env=env)
    _check(result, "KERAS_HOME", "models/resnet50_weights_tf_dim_ordering_tf_kernels.h5", "--weights PATH")


def test_input_is_not_an_image_and_output_not_a_distribution(tmp_path):
    """Two bad models in one process run each (TensorFlow start-up dominates)."""
    import keras

    inputs = keras.Input((10,))
    vector_model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    vector_model.save(tmp_path / "vector.keras")
    tiny_keras_classifier(softmax=False).save(tmp_path / "logits.keras")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")

    result = cli([str(tmp_path / "vector.keras"), "--repository", str(tmp_path / "models"), "--quiet"])
    _check(result, "not an image", "(None, 10)")
    result = cli([str(tmp_path / "logits.keras"), "--repository", str(tmp_path / "models"), "--quiet"])
    _check(result, "not a class distribution", "softmax")
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_unknown_precision_is_a_usage_error(tmp_path):
    result = cli(["mobilenet_v2", "--precision", "fp8", "--repository", str(tmp_path / "models")])
    assert result.returncode == 2 and "unknown precision" in result.stderr and "Traceback" not in result.stderr


def test_a_mistyped_application_gets_a_did_you_mean(tmp_path):
    # `kestrel export mobilenetv2` listed the names without saying which one was meant
    result = cli(["mobilenetv2", "--repository", str(tmp_path / "models")])
    line = _check(result, "unknown application 'mobilenetv2'; did you mean mobilenet_v2?", "vgg16")
    assert not (tmp_path / "models").exists()
    assert "did you mean resnet50?" in _check(cli(["ResNet-50", "--repository", str(tmp_path / "m")]))
    assert "did you mean" not in _check(cli(["alexnet", "--repository", str(tmp_path / "m")])), line


LABELS_FIRST = """
import sys
from export.__main__ import main
code = main(sys.argv[1:])
print("tensorflow imported:", "tensorflow" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("with_flag", [True, False])
def test_missing_labels_are_found_before_the_model_loads(tmp_path, python_env, with_flag):
    """export loaded the Keras model (4 s, TensorFlow included) before it noticed a missing --labels file."""
    import subprocess
    import sys
    import zipfile

    model = tmp_path / "flowers.keras"
    with zipfile.ZipFile(model, "w") as archive:  # a .keras archive TensorFlow would fail to load: never reached
        archive.writestr("config.json", "{}")
    args = [str(model), "--repository", str(tmp_path / "models")]
    if with_flag:
        args += ["--labels", str(tmp_path / "no_such_labels.txt")]
    result = subprocess.run([sys.executable, "-c", LABELS_FIRST, *args], capture_output=True, text=True,
                            env=python_env, timeout=120)
    expected = ("cannot read labels file", "no_such_labels.txt") if with_flag else (
        "no class labels for model 'flowers'", "put labels.txt beside", "--labels FILE")
    _check(result, *expected)
    assert "tensorflow imported: False" in result.stdout
    assert not (tmp_path / "models").exists()


def test_int8_without_calibration_is_refused_before_the_export(tmp_path):
    result = cli(["mobilenet_v2", "--weights", "none", "--precision", "fp32,int8", "--repository",
                  str(tmp_path / "models")])
    _check(result, "INT8 needs calibration images", "--calibration DIR")
    assert not (tmp_path / "models").exists()  # nothing exported first
    result = cli(["mobilenet_v2", "--weights", "none", "--precision", "int8", "--calibration",
                  str(tmp_path / "no_such"), "--repository", str(tmp_path / "models")])
    _check(result, "--calibration", "no_such: the folder does not exist")
