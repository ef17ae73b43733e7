"""Build Keras models that follow Kestrel's model contract.

    images (uint8, [N, H, W, 3])  ->  preprocessing layers  ->  the network  ->  probabilities (float32, [N, C])

The preprocessing is made of built-in Keras layers only (no Lambda), so the
saved `.keras` file loads with `safe_mode=True` and the ONNX graph holds the
exact arithmetic of `keras.applications.<app>.preprocess_input`:

    tf      Rescaling(1/127.5, offset=-1)
    torch   Rescaling(scale=1/(255*std), offset=-mean/std) per channel
    caffe   Rescaling(1) (cast) then a frozen Dense(3) on the channel axis whose kernel is the
            RGB->BGR permutation and whose bias is minus the ImageNet BGR mean
    none    Rescaling(1) (cast to float; the network rescales itself, e.g. EfficientNet)

A user model (fine-tuned `.keras`/`.h5`) either already takes uint8 images (it
carries its own preprocessing, like the ones train/ builds) or takes float
images, in which case a preprocessing mode is prepended (default none: just
the cast). A one-channel model gets a frozen RGB->luma Dense(1) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve._optional import require
from serve.errors import ConfigError, ModelLoadError

from .applications import check_mode

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass(frozen=True)
class ModelInfo:
    """What the checks learned about a user model."""

    input_size: tuple[int, int]
    channels: int
    input_dtype: str
    classes: int


def _keras():
    require("tensorflow", "building Keras models")
    return require("keras", "building Keras models")


def preprocessing_layers(mode: str, *, channels: int = 3) -> list:
    """The built-in layers that turn a uint8 batch into the network's expected float input."""
    keras = _keras()
    mode = check_mode(mode)
    if channels == 1 and mode in ("caffe", "torch"):
        raise ConfigError(f"preprocessing mode {mode!r} is per RGB channel; a one-channel model can use 'tf' or 'none'")
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        scale = [1.0 / (255.0 * s) for s in TORCH_STD]
        offset = [-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)]
        return [keras.layers.Rescaling(scale, offset=offset, name="preprocess_torch")]
    if mode == "caffe":
        bgr = keras.layers.Dense(3, name="preprocess_caffe_bgr_mean", trainable=False)
        return [keras.layers.Rescaling(1.0, name="preprocess_cast"), bgr]
    return [keras.layers.Rescaling(1.0, name="preprocess_cast")]


def _set_fixed_weights(layer) -> None:
    """Weights of the fixed (non-trainable) Dense layers, set once they are built."""
    if layer.name == "preprocess_caffe_bgr_mean":
        kernel = np.zeros((3, 3), np.float32)
        for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
            kernel[rgb, bgr] = 1.0  # output channel bgr takes input channel rgb
        layer.set_weights([kernel, -np.asarray(IMAGENET_BGR_MEAN, np.float32)])
    elif layer.name == "preprocess_luma":
        layer.set_weights([np.asarray(LUMA, np.float32).reshape(3, 1)])


def wrap(network, *, input_size: tuple[int, int], mode: str = "none", channels: int = 3,
         softmax: bool = False, cast: bool = True, name: str | None = None):
    """A functional model: uint8 "images" -> preprocessing -> `network` -> "probabilities".

    `softmax=True` when `network` returns logits (the applications are built
    without their final softmax so the output layer itself is the softmax);
    `cast=False` when `network` already takes uint8 images.
    """
    keras = _keras()
    height, width = int(input_size[0]), int(input_size[1])
    images = keras.Input(shape=(height, width, 3), dtype="uint8", name=INPUT_NAME)
    x = images
    if cast:
        layers = []
        if channels == 1:
            layers.append(keras.layers.Rescaling(1.0, name="preprocess_cast_gray"))
            layers.append(keras.layers.Dense(1, use_bias=False, name="preprocess_luma", trainable=False))
            if check_mode(mode) != "none":
                layers.extend(preprocessing_layers(mode, channels=1))
        else:
            layers = preprocessing_layers(mode)
        for layer in layers:
            x = layer(x)
            _set_fixed_weights(layer)
    x = network(x)
    if softmax:
        out = keras.layers.Activation("softmax", name=OUTPUT_NAME, dtype="float32")(x)
    else:
        out = keras.layers.Identity(name=OUTPUT_NAME, dtype="float32")(x)
    return keras.Model(images, out, name=name or f"kestrel_{network.name}")


def build_application(app, *, weights="imagenet", input_size=None, alpha=None):
    """An application wrapped in the contract; `weights` is 'imagenet', None or a path to an .h5 file."""
    network = app.build(weights=weights, input_size=input_size, classifier_activation=None, alpha=alpha)
    size = tuple(input_size) if input_size else app.input_size
    return wrap(network, input_size=size, mode=app.preprocessing, softmax=True, name=app.name)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def precheck_file(path: Path) -> None:
    """Reject files that cannot be a Keras model before TensorFlow starts (ModelLoadError)."""
    import zipfile

    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(2048)
    except OSError as exc:
        raise ModelLoadError(f"cannot read Keras model {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(f"cannot load Keras model {path}: not a .keras archive (zip), the file is corrupt "
                                 "or truncated")
    elif not any(head[offset:offset + 8] == HDF5_SIGNATURE for offset in (0, 512, 1024)):
        raise ModelLoadError(f"cannot load Keras model {path}: not an HDF5 file, the file is corrupt or truncated")


def load_user_model(path: str | Path):
    """Load a `.keras` / `.h5` model with safe_mode; a bad file raises ModelLoadError in one line."""
    keras = _keras()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ConfigError(f"cannot read {path}: expected a Keras model file ending in {', '.join(MODEL_SUFFIXES)}")
    precheck_file(path)
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras/h5py/zipfile raise many types for corrupt files
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelLoadError(f"cannot load Keras model {path}: {detail}") from None


def inspect(model) -> ModelInfo:
    """Check a model is an image classifier; ConfigError says what is wrong."""
    inputs = list(getattr(model, "inputs", None) or [])
    outputs = list(getattr(model, "outputs", None) or [])
    if len(inputs) != 1:
        raise ConfigError(f"expected a model with one image input, got {len(inputs)} inputs")
    if len(outputs) != 1:
        raise ConfigError(f"expected a model with one output (class probabilities), got {len(outputs)} outputs")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise ConfigError(
            f"the model's input is not an image: got shape {shape}, expected (None, height, width, 1 or 3) (NHWC)"
        )
    if shape[1] is None or shape[2] is None:
        raise ConfigError(f"the model's input {shape} has no fixed height/width; pass an input size")
    out_shape = tuple(outputs[0].shape)
    if len(out_shape) != 2 or out_shape[1] is None or out_shape[1] < 2:
        raise ConfigError(
            f"the model's output is not a class distribution: got shape {out_shape}, expected (None, classes >= 2)"
        )
    return ModelInfo(input_size=(int(shape[1]), int(shape[2])), channels=int(shape[3]),
                     input_dtype=str(inputs[0].dtype), classes=int(out_shape[1]))


def wrap_user_model(model, *, preprocessing: str | None = None, input_size=None):
    """Wrap a user model in the contract after checking it; returns (wrapped, info)."""
    if input_size is not None:
        keras = _keras()
        shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else ()
        if len(shape) == 4 and (shape[1] is None or shape[2] is None):
            x = keras.Input(shape=(int(input_size[0]), int(input_size[1]), shape[3]), dtype=model.inputs[0].dtype)
            model = keras.Model(x, model(x), name=model.name)
    info = inspect(model)
    if input_size is not None and tuple(input_size) != info.input_size:
        raise ConfigError(f"input size {tuple(input_size)} does not match the model's input {info.input_size}")
    takes_uint8 = info.input_dtype == "uint8"
    mode = check_mode(preprocessing)
    if takes_uint8:
        if mode != "none":
            raise ConfigError(
                f"the model already takes uint8 images (with its own preprocessing); preprocessing {mode!r} "
                "would apply twice: leave it at 'none'"
            )
        if info.channels != 3:
            raise ConfigError(f"a model taking uint8 images must take 3 channels, got {info.channels}")
    wrapped = wrap(model, input_size=info.input_size, mode=mode, channels=info.channels,
                   softmax=False, cast=not takes_uint8, name=f"kestrel_{model.name}")
    return wrapped, info


def check_probabilities(probs: np.ndarray, *, tolerance: float = 1e-3) -> None:
    """Rows must be non-negative and sum to 1: the output must be a class distribution, not logits."""
    probs = np.asarray(probs, dtype=np.float64)
    sums = probs.sum(axis=1)
    if probs.min() < -tolerance or np.abs(sums - 1.0).max() > tolerance:
        raise ConfigError(
            "the model's output is not a class distribution: rows sum to "
            f"{sums.min():.4g}..{sums.max():.4g} with minimum {probs.min():.4g}; "
            "expected softmax probabilities (add a softmax layer to the model)"
        )
