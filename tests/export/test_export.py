"""Export end to end: CLI, repository layout, Triton-readable configs, parity, fine-tuned models, atomicity."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_helpers import calibrated_application, cli, float64_probabilities, labels_file, repository  # noqa: F401
from keras_helpers import tiny_keras_classifier as tiny_classifier

from export import pipeline
from repo_modes import assert_readable_by_others
from export.parity import ParityError
from serve.repository import ModelRepository

ALL_APPS = ["mobilenet_v2", "efficientnet_b0", "resnet50", "xception", "inception_v3", "densenet121", "vgg16"]
FAST_APPS = {"mobilenet_v2"}


def _app_params():
    return [pytest.param(name, marks=() if name in FAST_APPS else pytest.mark.slow) for name in ALL_APPS]


# ---- the CLI, mobilenet_v2 --weights none ---------------------------------------------------------
@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "models"
    labels = root.parent / "imagenet_labels.txt"
    labels.write_text("".join(f"imagenet class {i}\n" for i in range(1000)))
    result = cli(["mobilenet_v2", "--weights", "none", "--repository", str(root), "--labels", str(labels)])
    return root, result


def test_cli_exports_mobilenet_v2_layout(cli_export):
    root, result = cli_export
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity PASS" in result.stdout
    for rel in ["mobilenet_v2/config.pbtxt", "mobilenet_v2/labels.txt", "mobilenet_v2/1/model.onnx",
                "mobilenet_v2/1/parity.json", "mobilenet_v2/1/export.json", "mobilenet_v2_keras/config.pbtxt",
                "mobilenet_v2_keras/labels.txt", "mobilenet_v2_keras/1/model.keras"]:
        assert (root / rel).is_file(), rel
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    report = json.loads((root / "mobilenet_v2/1/parity.json").read_text())
    assert report["passed"] and report["relative_l2"] <= 1e-4 and report["images"] == 8
    assert report["top1_agreement"] == 1.0
    labels = (root / "mobilenet_v2/labels.txt").read_text().splitlines()
    assert labels[0] == "imagenet class 0" and len(labels) == 1000

    repo = ModelRepository(root)
    onnx_entry, keras_entry = repo.entry("mobilenet_v2"), repo.entry("mobilenet_v2_keras")
    assert onnx_entry.platform == "onnxruntime_onnx" and keras_entry.platform == "keras"
    for entry in (onnx_entry, keras_entry):
        assert entry.input_spec.name == "images" and entry.input_spec.dtype == np.uint8
        assert entry.input_spec.shape == (224, 224, 3)
        assert entry.output_spec.name == "probabilities" and entry.output_spec.shape == (1000,)
        assert entry.resize == "crop"  # the default resize mode, recorded with the model (docs/accuracy.md)


def test_onnx_model_interface(cli_export):
    onnxruntime = pytest.importorskip("onnxruntime")
    root, result = cli_export
    assert result.returncode == 0, result.stderr[-3000:]
    session = onnxruntime.InferenceSession(str(root / "mobilenet_v2/1/model.onnx"))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("images", "tensor(uint8)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [224, 224, 3]  # dynamic batch
    assert out.name == "probabilities" and out.shape[1] == 1000
    for batch in (1, 3):
        probs = session.run(None, {"images": np.zeros((batch, 224, 224, 3), np.uint8)})[0]
        assert probs.shape == (batch, 1000)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


TRITON_CHECK = r"""
import json, sys
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
out = {}
for path in sys.argv[1:]:
    config = text_format.Parse(open(path).read(), mc.ModelConfig())
    inp, outp = config.input[0], config.output[0]
    out[config.name] = {
        "platform": config.platform, "backend": config.backend, "max_batch_size": config.max_batch_size,
        "input": [inp.name, mc.DataType.Name(inp.data_type), list(inp.dims), mc.ModelInput.Format.Name(inp.format)],
        "output": [outp.name, mc.DataType.Name(outp.data_type), list(outp.dims), outp.label_filename],
    }
print(json.dumps(out))
"""


def test_configs_parse_with_tritonclient(cli_export):
    """Triton's own message definitions read both config.pbtxt files (separate process: see brief)."""
    if importlib.util.find_spec("tritonclient") is None:  # never import it here: it clashes with serve._proto
        pytest.skip("tritonclient is not installed (pip install 'kestrel[dev]')")
    root, result = cli_export
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [str(root / "mobilenet_v2/config.pbtxt"), str(root / "mobilenet_v2_keras/config.pbtxt")]
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    configs = json.loads(done.stdout)
    onnx_cfg, keras_cfg = configs["mobilenet_v2"], configs["mobilenet_v2_keras"]
    assert onnx_cfg["platform"] == "onnxruntime_onnx" and onnx_cfg["max_batch_size"] == 32
    assert keras_cfg["backend"] == "keras"
    for cfg in (onnx_cfg, keras_cfg):
        assert cfg["input"] == ["images", "TYPE_UINT8", [224, 224, 3], "FORMAT_NHWC"]
        assert cfg["output"] == ["probabilities", "TYPE_FP32", [1000], "labels.txt"]


# ---- every application: parity on a network with image-dependent outputs --------------------------
@pytest.mark.parametrize("name", _app_params())
def test_application_exports_with_parity(name, repository):
    """Untrained weights, BatchNorm statistics calibrated (keras_helpers) so the outputs depend on the image.

    These random networks are ill-conditioned (their own float32 Keras outputs
    are 1e-5..1e-4 away from float64), so the ONNX model is held to the float64
    truth: at least as close to it as Keras float32 is (twice the error at most).
    """
    onnxruntime = pytest.importorskip("onnxruntime")
    from export.parity import parity_images

    model = calibrated_application(name)
    labels = [f"c{i}" for i in range(1000)]
    report = pipeline.export_model(model, name=name, repository=repository, labels=labels, progress=False,
                                   parity_threshold=1e-3)
    parity = report.parity
    pixels = parity_images(report.input_size)[0]
    keras32 = np.asarray(model.predict(pixels, verbose=0), np.float64)
    onnx32 = onnxruntime.InferenceSession(str(report.onnx_path)).run(None, {"images": pixels})[0].astype(np.float64)
    truth = float64_probabilities(name, model, pixels)
    keras_err = float(np.linalg.norm(keras32 - truth) / np.linalg.norm(truth))
    onnx_err = float(np.linalg.norm(onnx32 - truth) / np.linalg.norm(truth))
    print(f"{name}: {parity.summary()}; vs float64: keras {keras_err:.3g}, onnx {onnx_err:.3g}; {report.seconds}")
    assert parity.passed and parity.top1_agreement == 1.0
    assert onnx_err <= 2 * keras_err + 1e-6
    assert (truth.argmax(axis=1) == onnx32.argmax(axis=1)).all()
    # The check is meaningful: the outputs are far from uniform and differ between images.
    assert truth.max(axis=1).mean() > 10 / 1000
    assert np.abs(truth - truth.mean(axis=0)).max() > 1e-2
    assert (repository / name / "1" / "model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_APPS if n not in FAST_APPS])
def test_application_weights_none(name, repository):
    """The `--weights none` route (the CLI's) for every application."""
    labels = [f"c{i}" for i in range(1000)]
    report = pipeline.export_model(name, weights="none", repository=repository, labels=labels, progress=False)
    print(f"{name}: {report.summary()}")
    assert report.parity.passed
    assert ModelRepository(repository).entry(name).input_spec.shape == (*report.input_size, 3)


# ---- a fine-tuned model ----------------------------------------------------------------------------
def _fine_tuned(uint8: bool):
    import keras

    from keras_helpers import calibrate
    from serve.images import synthetic_images

    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
    calibrate(base, synthetic_images(4, (96, 96), seed=2).astype(np.float32) / 127.5 - 1)
    base.trainable = False
    inputs = keras.Input((96, 96, 3), dtype="uint8" if uint8 else "float32")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs) if uint8 else inputs
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="flowers")


def test_fine_tuned_float_model_with_labels_beside_it(tmp_path, repository):
    """A .keras file taking float images in [-1, 1]: --preprocessing tf is prepended; labels.txt beside it."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _fine_tuned(uint8=False)
    folder = tmp_path / "trained"
    folder.mkdir()
    model.save(folder / "flowers.keras")
    (folder / "labels.txt").write_text("daisy\nrose\ntulip\n")
    report = pipeline.export_model(folder / "flowers.keras", repository=repository, preprocessing="tf",
                                   progress=False)
    assert report.name == "flowers" and report.parity.passed and report.classes == 3
    assert (repository / "flowers/labels.txt").read_text().splitlines() == ["daisy", "rose", "tulip"]
    assert (repository / "flowers_keras/labels.txt").read_text().splitlines() == ["daisy", "rose", "tulip"]
    entry = ModelRepository(repository).entry("flowers")
    assert entry.input_spec.shape == (96, 96, 3) and entry.output_spec.shape == (3,)
    # The ONNX model on raw pixels equals the original model on preprocessed pixels.
    from serve.images import synthetic_images

    pixels = synthetic_images(3, (96, 96), seed=9)
    session = onnxruntime.InferenceSession(str(entry.artifact()))
    ours = session.run(None, {"images": pixels})[0]
    theirs = np.asarray(model(pixels.astype(np.float32) / 127.5 - 1))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(theirs - 1 / 3).max() > 1e-3  # not a degenerate uniform output


def test_in_memory_uint8_model_with_label_option(repository, labels_file):
    """A model that already takes uint8 images (as train/ builds them), labels from a file option."""
    model = tiny_classifier(uint8=True, seed=4)
    report = pipeline.export_model(model, name="flowers_u8", repository=repository, labels=labels_file(3),
                                   progress=False)
    assert report.parity.passed and report.preprocessing == "none"
    assert (repository / "flowers_u8/labels.txt").read_text().splitlines() == ["class 0", "class 1", "class 2"]


def test_wrong_label_count_is_rejected(repository, labels_file):
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match="4 labels, but the model outputs 3 classes"):
        pipeline.export_model(tiny_classifier(uint8=True), name="tiny", repository=repository,
                              labels=labels_file(4), progress=False)
    assert list(repository.iterdir()) == []


# ---- atomicity ----------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def exported_tiny(repository):
    pipeline.export_model(tiny_classifier(uint8=True, seed=0), name="tiny", repository=repository,
                          labels=["a", "b", "c"], progress=False)
    before = _snapshot(repository)
    assert "tiny/1/model.onnx" in before and "tiny_keras/1/model.keras" in before
    return repository, before


def test_exported_files_are_readable_by_a_server_running_as_another_user(exported_tiny, labels_file):
    repository, _ = exported_tiny
    assert assert_readable_by_others(repository) >= 6  # configs, labels, model.onnx/.keras, reports
    pipeline.export_model(tiny_classifier(uint8=True, seed=1), name="tiny", repository=repository,
                          labels=["x", "y", "z"], progress=False)  # a re-export replaces folders: same modes
    assert_readable_by_others(repository)


def test_failed_parity_leaves_previous_model(exported_tiny):
    repository, before = exported_tiny
    with pytest.raises(ParityError, match="parity FAIL"):
        pipeline.export_model(tiny_classifier(uint8=True, seed=1), name="tiny", repository=repository,
                              labels=["x", "y", "z"], progress=False, parity_threshold=-1.0)
    assert _snapshot(repository) == before
    assert sorted(p.name for p in repository.iterdir()) == ["tiny", "tiny_keras"]


def test_interrupted_conversion_leaves_previous_model(exported_tiny, monkeypatch):
    from export import keras_to_onnx

    repository, before = exported_tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras_to_onnx, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(tiny_classifier(uint8=True, seed=1), name="tiny", repository=repository,
                              labels=["x", "y", "z"], progress=False)
    assert _snapshot(repository) == before
    assert sorted(p.name for p in repository.iterdir()) == ["tiny", "tiny_keras"]


def test_failure_while_moving_restores_previous_model(exported_tiny, monkeypatch):
    """The second rename fails after the first succeeded: the first is rolled back."""
    repository, before = exported_tiny
    real = pipeline._replace_folder
    calls = []

    def flaky(new, dest, backup_dir):
        calls.append(dest.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(new, dest, backup_dir)

    monkeypatch.setattr(pipeline, "_replace_folder", flaky)
    with pytest.raises(OSError, match="disk full"):
        pipeline.export_model(tiny_classifier(uint8=True, seed=1), name="tiny", repository=repository,
                              labels=["x", "y", "z"], progress=False)
    assert calls == ["tiny_keras", "tiny"]
    assert _snapshot(repository) == before
    assert sorted(p.name for p in repository.iterdir()) == ["tiny", "tiny_keras"]


def test_successful_reexport_replaces_model(exported_tiny):
    repository, before = exported_tiny
    pipeline.export_model(tiny_classifier(uint8=True, seed=1), name="tiny", repository=repository,
                          labels=["x", "y", "z"], progress=False)
    after = _snapshot(repository)
    assert after["tiny/labels.txt"] == b"x\ny\nz\n"
    assert after["tiny/1/model.onnx"] != before["tiny/1/model.onnx"]
    assert sorted(p.name for p in repository.iterdir()) == ["tiny", "tiny_keras"]


def test_model_with_augmentation_and_dropout_layers(repository):
    """Training-only layers (RandomFlip, Dropout: they carry seed-generator state) export as identities."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.RandomFlip("horizontal")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    report = pipeline.export_model(keras.Model(inputs, outputs), name="augmented", repository=repository,
                                   labels=["a", "b", "c"], progress=False)
    assert report.parity.passed and report.parity.relative_l2 <= 1e-5


def test_one_channel_model_gets_luma_conversion(repository):
    """A grayscale model (…, 1) is served RGB uint8 images: a frozen luma layer is prepended."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = tiny_classifier(channels=1, seed=2)
    report = pipeline.export_model(model, name="gray", repository=repository, labels=["a", "b", "c"],
                                   progress=False)
    assert report.parity.passed
    entry = ModelRepository(repository).entry("gray")
    assert entry.input_spec.shape == (32, 32, 3)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    gray = (pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    expected = np.asarray(model(gray))
    ours = onnxruntime.InferenceSession(str(entry.artifact())).run(None, {"images": pixels})[0]
    np.testing.assert_allclose(ours, expected, atol=1e-5)
