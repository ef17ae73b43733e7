"""The Keras applications Kestrel can export, as one table the code dispatches on.

    name             constructor                          input      preprocessing
    vgg16            keras.applications.VGG16             224x224    caffe
    resnet50         keras.applications.ResNet50          224x224    caffe
    xception         keras.applications.Xception          299x299    tf
    mobilenet_v2     keras.applications.MobileNetV2       224x224    tf
    efficientnet_b0  keras.applications.EfficientNetB0    224x224    none (rescaling is inside)
    inception_v3     keras.applications.InceptionV3       299x299    tf
    densenet121      keras.applications.DenseNet121       224x224    torch

Preprocessing modes (what `keras.applications.<app>.preprocess_input` does):

    caffe   RGB -> BGR, then subtract the ImageNet mean (103.939, 116.779, 123.68), no scaling
    tf      x / 127.5 - 1
    torch   x / 255, then (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    none    the model takes 0..255 floats itself (EfficientNet's Rescaling/Normalization)

This module imports no TensorFlow: the constructor and the reference
`preprocess_input` are resolved by dotted name only when a model is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from serve.errors import ConfigError

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")


@dataclass(frozen=True)
class Application:
    """One exportable Keras application."""

    name: str
    constructor: str  # attribute of keras.applications, e.g. "MobileNetV2"
    module: str  # keras.applications submodule holding preprocess_input, e.g. "mobilenet_v2"
    input_size: tuple[int, int]  # (height, width) of the ImageNet weights
    preprocessing: str  # one of PREPROCESSING_MODES
    weights_file: str  # the file Keras looks for in $KERAS_HOME/models for weights="imagenet"
    params_millions: float  # approximate, for choosing the export route and for the docs

    def build(self, *, weights: str | None = "imagenet", input_size: tuple[int, int] | None = None,
              classifier_activation: str | None = "softmax"):
        """Construct the Keras model (include_top, 1000 ImageNet classes). Imports keras."""
        import keras

        constructor = getattr(keras.applications, self.constructor)
        size = tuple(input_size) if input_size else self.input_size
        return constructor(
            weights=weights,
            include_top=True,
            input_shape=(int(size[0]), int(size[1]), 3),
            classifier_activation=classifier_activation,
        )

    def reference_preprocess(self):
        """Keras' own `preprocess_input` for this application (used to verify ours)."""
        module = importlib.import_module(f"keras.applications.{self.module}")
        return module.preprocess_input


APPLICATIONS: dict[str, Application] = {
    app.name: app
    for app in [
        Application("vgg16", "VGG16", "vgg16", (224, 224), "caffe",
                    "vgg16_weights_tf_dim_ordering_tf_kernels.h5", 138.4),
        Application("resnet50", "ResNet50", "resnet50", (224, 224), "caffe",
                    "resnet50_weights_tf_dim_ordering_tf_kernels.h5", 25.6),
        Application("xception", "Xception", "xception", (299, 299), "tf",
                    "xception_weights_tf_dim_ordering_tf_kernels.h5", 22.9),
        Application("mobilenet_v2", "MobileNetV2", "mobilenet_v2", (224, 224), "tf",
                    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", 3.5),
        Application("efficientnet_b0", "EfficientNetB0", "efficientnet", (224, 224), "none",
                    "efficientnetb0.h5", 5.3),
        Application("inception_v3", "InceptionV3", "inception_v3", (299, 299), "tf",
                    "inception_v3_weights_tf_dim_ordering_tf_kernels.h5", 23.9),
        Application("densenet121", "DenseNet121", "densenet", (224, 224), "torch",
                    "densenet121_weights_tf_dim_ordering_tf_kernels.h5", 8.1),
    ]
}


def get(name: str) -> Application:
    """The application called `name`; an unknown name raises ConfigError listing the known ones."""
    try:
        return APPLICATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown application {name!r}; expected one of {', '.join(sorted(APPLICATIONS))} "
            "or a path to a .keras/.h5 model"
        ) from None


def check_mode(mode: str | None) -> str:
    """Normalise a preprocessing mode name (None -> 'none'); unknown names raise ConfigError."""
    mode = "none" if mode is None else str(mode).lower()
    if mode not in PREPROCESSING_MODES:
        raise ConfigError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_MODES)}")
    return mode
