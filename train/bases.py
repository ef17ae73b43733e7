"""The frozen base network: any application from export's table, without its top.

    base = build_base("mobilenet_v2", weights="imagenet", input_size=(224, 224))
    extractor = feature_extractor(base)                # uint8 "images" -> pooled features
    bottom, top, cut = split_top(base.network, k=10)   # for fine-tuning the top K layers

The application table (names, constructors, input sizes, preprocessing modes)
and the uint8 preprocessing layers come from `export.applications` and
`export.contract`; this module only adds what a *headless* base needs:
`include_top=False`, an arbitrary input size, MobileNet's `alpha`, and a
weights hash for the feature cache. TensorFlow is imported inside functions.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from export import applications, contract
from serve._optional import require
from serve.errors import ConfigError, KestrelError, ModelLoadError


@dataclass
class Base:
    """A headless application: `network` maps preprocessed float images to a feature map."""

    app: applications.Application
    network: object  # keras.Model, include_top=False, no pooling
    input_size: tuple[int, int]
    weights: str | None  # "imagenet", None or a path
    weights_sha256: str
    alpha: float | None = None
    # multi-scale pooling: the layers whose global-average-pooled outputs, concatenated in this order,
    # are the features (`stage_layers`); empty = the network's output only
    pooled_layers: tuple[str, ...] = ()

    @property
    def preprocessing(self) -> str:
        return self.app.preprocessing

    @property
    def description(self) -> str:
        alpha = f", alpha {self.alpha}" if self.alpha else ""
        return f"{self.app.name}{alpha} {self.input_size[0]}x{self.input_size[1]} (weights {self.weights or 'none'})"

    def key(self) -> dict:
        """What identifies the features this base produces (for the cache)."""
        key = {"base": self.app.name, "alpha": self.alpha, "input_size": list(self.input_size),
               "preprocessing": self.preprocessing, "weights_sha256": self.weights_sha256}
        if len(self.pooled_layers) > 1:  # one pooled layer (the output) keeps the key features always had
            key["pooled_layers"] = list(self.pooled_layers)
        return key


def _keras():
    require("tensorflow", "training")
    return require("keras", "training")


def weights_arg(weights: str | None) -> str | None:
    """'imagenet' | None | an existing file path; anything else raises ConfigError."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; expected 'imagenet', 'none' or a path to an .h5 file")
    return str(path)


def weights_hash(network) -> str:
    """sha256 of every weight value: the identity of the weights, whatever file they came from."""
    digest = hashlib.sha256()
    for variable in network.weights:
        value = variable.numpy()
        digest.update(f"{variable.path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def build_base(name: str, *, weights: str | None = "imagenet", input_size: tuple[int, int] | None = None,
               alpha: float | None = None, seed: int = 0) -> Base:
    """Build the headless application `name` (a key of export.applications.APPLICATIONS).

    With `weights=None` the random initialisation is seeded, so the same seed
    gives the same weights (and the feature cache still hits).
    """
    if is_model_file(name):
        return build_file_base(Path(name), input_size=input_size, alpha=alpha, weights=weights)
    app = applications.get(name)
    weights = weights_arg(weights)
    keras = _keras()
    size = (int(input_size[0]), int(input_size[1])) if input_size else tuple(app.input_size)
    if min(size) < 32:
        raise ConfigError(f"image size {size} is too small; expected at least 32x32")
    kwargs = {}
    if alpha is not None:
        if "MobileNet" not in app.constructor:
            raise ConfigError(f"--alpha applies to MobileNet bases only, not {app.name}")
        kwargs["alpha"] = float(alpha)
    constructor = getattr(keras.applications, app.constructor)
    # Keras picks the ImageNet weights file by input size for some applications
    # (MobileNetV2 has one per size); a size-free input loads the default
    # (224) file, and the convolution weights fit any size.
    shape = (None, None, 3) if weights == "imagenet" else (size[0], size[1], 3)
    file_weights = weights if weights not in (None, "imagenet") else None
    keras.utils.set_random_seed(int(seed))
    try:
        with warnings.catch_warnings():  # "weights for input shape (224, 224) will be loaded": intended
            warnings.filterwarnings("ignore", message=".*input_shape.*", category=UserWarning)
            network = constructor(include_top=False, weights=None if file_weights else weights,
                                  input_shape=shape, pooling=None, **kwargs)
        if file_weights:
            network.load_weights(file_weights)
    except KestrelError:
        raise
    except Exception as exc:  # keras raises ValueError/OSError/Exception for downloads, shapes, files
        text = " ".join(str(exc).split())
        if weights == "imagenet" and ("URL fetch failure" in text or "urlopen" in text or "HTTP" in text):
            home = os.environ.get("KERAS_HOME", "~/.keras")
            raise ConfigError(
                f"cannot obtain the ImageNet weights for {app.name} without top (offline?): put them in "
                f"{home}/models (set KERAS_HOME), or pass --weights PATH / --weights none"
            ) from None
        if file_weights:
            raise ModelLoadError(f"cannot load weights {file_weights} into {app.name} (no top): {text[:300]}") from None
        raise ConfigError(f"cannot build {app.name} at {size[0]}x{size[1]}: {text[:300]}") from None
    network.trainable = False
    return Base(app=app, network=network, input_size=size, weights=weights, weights_sha256=weights_hash(network),
                alpha=kwargs.get("alpha"))


MODEL_SUFFIXES = (".keras",)


def is_model_file(name: str) -> bool:
    return str(name).lower().endswith(MODEL_SUFFIXES)


def build_file_base(path: Path, *, input_size=None, alpha=None, weights="imagenet") -> Base:
    """A user's own classifier (.keras) as the base: cut before its last GlobalAveragePooling2D.

    The file must take float RGB pixels 0..255 with any scaling inside it (as export's
    `--preprocessing none`; e.g. ../shared/models/efficientnet_lite0); its own weights are used.
    """
    if not path.is_file():
        raise ConfigError(f"--base {path}: no such file; expected an application name or a .keras model file")
    if alpha is not None:
        raise ConfigError(f"--alpha applies to MobileNet applications, not to the model file {path.name}")
    if weights not in ("imagenet", None) and str(weights) != "imagenet":
        raise ConfigError(f"--weights {weights}: a model file base uses its own weights; leave --weights out")
    keras = _keras()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path} as a Keras model: {' '.join(str(exc).split())[:300]}") from None
    info = contract.inspect(model)
    if info.channels != 3 or info.input_dtype != "float32":
        raise ConfigError(f"--base {path.name}: expected a float32 RGB image input (pixels 0..255, scaling inside "
                          f"the model), got {info.channels} channel(s) of {info.input_dtype}")
    if input_size is not None and tuple(int(v) for v in input_size) != info.input_size:
        raise ConfigError(f"--image-size: {path.name} takes {info.input_size[0]}x{info.input_size[1]} images only")
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ConfigError(f"--base {path.name}: no GlobalAveragePooling2D layer to cut at; expected a CNN "
                          "classifier ending in global average pooling and a Dense layer")
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem) or "model"
    network = keras.Model(model.inputs[0], pools[-1].input, name=name)
    network.trainable = False
    app = applications.Application(name=name, constructor="", module="", input_size=info.input_size,
                                   preprocessing="none", weights_file=path.name,
                                   params_millions=round(network.count_params() / 1e6, 2))
    return Base(app=app, network=network, input_size=info.input_size, weights=str(path),
                weights_sha256=weights_hash(network))


def stage_layers(base: Base, stages: int) -> tuple[str, ...]:
    """The last layer of each of the network's `stages` coarsest resolutions, deepest first.

    Stage 1 is the network's output (what `--pool-stages 1` pools); stage 2 the
    last layer before the downsampling into it, and so on (MobileNetV2 at 224:
    out_relu 7x7, block_13_expand_relu 14x14, block_6_expand_relu 28x28). Sizes
    come from one pass of a zero image (an ImageNet base is built size-free);
    padding layers and the input's own size (preprocessing) are not a resolution
    of their own. A network with fewer resolutions gives fewer layers.
    """
    keras = _keras()
    import numpy as np

    if stages < 1:
        raise ConfigError(f"--pool-stages {stages}: expected 1 (the base's output) or more")
    network = base.network
    if stages == 1:
        return (output_layer_name(base),)
    candidates = [layer for layer in network.layers
                  if not isinstance(layer, (keras.layers.InputLayer, keras.layers.ZeroPadding2D))
                  and len(getattr(layer, "output", ()).shape) == 4]
    probe = keras.Model(network.input, [layer.output for layer in candidates])
    height, width = base.input_size
    outputs = probe(np.zeros((1, height, width, 3), np.float32), training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]  # one candidate: one tensor back
    output_name = output_layer_name(base)
    last_at: dict[tuple[int, int], str] = {}  # spatial size -> the last layer (graph order) with it
    output_area = None
    for layer, out in zip(candidates, outputs):
        size = (int(out.shape[1]), int(out.shape[2]))
        if layer.name == output_name:
            output_area = size[0] * size[1]
        if size[0] * size[1] < height * width:  # the image's own size (its preprocessing) is not a stage
            last_at[size] = layer.name
    sizes = sorted(last_at, key=lambda hw: hw[0] * hw[1])  # coarsest first
    if output_area is None:  # an output that is not a feature map: take its resolution to be the coarsest
        output_area = sizes[0][0] * sizes[0][1] if sizes else 0
    finer = [last_at[hw] for hw in sizes if hw[0] * hw[1] > output_area]  # the stages below the output's
    return (output_name, *[name for name in finer if name != output_name][:stages - 1])


def output_layer_name(base: Base) -> str:
    """The layer that produces the network's output (what a one-stage base pools)."""
    network = base.network
    for layer in reversed(network.layers):
        if layer.output is network.output:
            return layer.name
    return network.layers[-1].name


def pooled_layer_names(base: Base) -> list[str]:
    """The layers whose pooled outputs are the features, deepest first."""
    return list(base.pooled_layers) or [output_layer_name(base)]


def with_stages(base: Base, stages: int) -> Base:
    """`base` pooling its `stages` coarsest resolutions (`stage_layers`)."""
    import dataclasses

    layers = stage_layers(base, stages)
    return dataclasses.replace(base, pooled_layers=layers if len(layers) > 1 else ())


def pooled_model(base: Base):
    """Preprocessed float images -> the pooled features: the global average of the network's output, or,
    with `base.pooled_layers`, those layers' global averages concatenated (one pass of the network)."""
    keras = _keras()
    network = base.network
    if len(base.pooled_layers) <= 1:
        pooled = keras.layers.GlobalAveragePooling2D(name="features")(network.output)
    else:
        pooled = keras.layers.Concatenate(name="features")([
            keras.layers.GlobalAveragePooling2D(name=f"pool_{name}")(network.get_layer(name).output)
            for name in base.pooled_layers])
    return keras.Model(network.input, pooled, name=f"{network.name}_pooled")


def feature_extractor(base: Base, cut: str | None = None):
    """uint8 "images" -> features: the global-average-pooled output, or the raw output of layer `cut`.

    The preprocessing is export's (contract.wrap), so features are computed on
    exactly what the joined model sees; the output tensor keeps the contract's
    name ("probabilities") although it holds features.
    """
    keras = _keras()
    network = base.network
    if cut is None:
        inner = pooled_model(base)
    else:
        inner = bottom_model(base, cut)
    return contract.wrap(inner, input_size=base.input_size, mode=base.preprocessing, softmax=False,
                         name=f"{base.app.name}_features")


def classifier(base: Base, head, *, flip_tta: bool = False):
    """The joined model: uint8 "images" -> preprocessing -> base -> pooling -> `head` -> "probabilities".

    `flip_tta`: the base also runs on the horizontally mirrored image and the head sees the mean of the
    two pooled feature vectors (test-time flip averaging inside the model: twice the base's work).
    """
    keras = _keras()
    network = base.network
    if not flip_tta:
        pooled = pooled_model(base)
        inner = keras.Model(network.input, head(pooled.output), name=f"{base.app.name}_classifier")
    else:
        height, width = base.input_size
        images = keras.Input(shape=(height, width, 3), name="preprocessed")
        pooled = pooled_model(base)
        x = keras.layers.Average(name="features")([pooled(images), pooled(horizontal_flip(images))])
        inner = keras.Model(images, head(x), name=f"{base.app.name}_classifier_flip_tta")
    return contract.wrap(inner, input_size=base.input_size, mode=base.preprocessing, softmax=False,
                         name=f"{base.app.name}_transfer")


def horizontal_flip(x):
    """Mirror (N, H, W, C) images left-right with standard layers only (the .keras file loads in safe mode
    and converts to ONNX as is): width moved last, a fixed anti-diagonal Dense(W, no bias), moved back.
    Exact in float32 (one product by 1 and zeros per output); about 0.03 GFLOP per 224x224 image."""
    keras = _keras()
    import numpy as np

    width = int(x.shape[2])
    x = keras.layers.Permute((1, 3, 2), name="flip_width_last")(x)
    mirror = keras.layers.Dense(width, use_bias=False, trainable=False, name="flip_mirror")
    x = mirror(x)
    mirror.set_weights([np.eye(width, dtype=np.float32)[::-1]])
    return keras.layers.Permute((1, 3, 2), name="flip_width_back")(x)


def bottom_model(base: Base, cut: str):
    keras = _keras()
    network = base.network
    return keras.Model(network.input, network.get_layer(cut).output, name=f"{network.name}_to_{cut}")


def split_top(base: Base, k: int):
    """(cut layer name, top model, top layer names) for fine-tuning at least the top `k` layers.

    The cut is the output of a layer from which the rest of the network depends
    on that one tensor only (a block boundary): the nearest such point at or
    below `k` layers from the top. ConfigError when there is none.
    """
    keras = _keras()
    network = base.network
    layers = [layer for layer in network.layers if not isinstance(layer, keras.layers.InputLayer)]
    if k < 1 or k >= len(layers):
        raise ConfigError(f"--fine-tune-layers {k}: expected 1..{len(layers) - 1} for {base.app.name}")
    valid = []
    for index in range(len(layers) - 1 - k, 0, -1):
        cut = layers[index]
        try:
            top = keras.Model(cut.output, network.output, name=f"{network.name}_top")
        except Exception:  # ValueError: graph disconnected (a skip connection crosses the cut)
            continue
        valid.append((index, cut, top))
        if len(valid) == 1:
            first = index
        if index <= first - NARROW_SEARCH:
            break
    if not valid:
        raise ConfigError(f"no single-tensor cut point found in {base.app.name} below its top {k} layers")
    # The cached feature maps are the cut's output: among the cut points within a few layers of the
    # nearest one, take the narrowest (MobileNetV2: a 160-channel block output, not its 960-channel expansion).
    index, cut, top = min(valid, key=lambda v: (_elements(v[1].output.shape), -v[0]))
    names = [layer.name for layer in top.layers if not isinstance(layer, keras.layers.InputLayer)]
    return cut.name, top, names


NARROW_SEARCH = 3  # layers below the nearest cut point searched for a narrower one


def _elements(shape) -> int:
    count = 1
    for dim in tuple(shape)[1:]:
        count *= int(dim) if dim is not None else 1
    return count
