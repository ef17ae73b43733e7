"""The Keras applications Kestrel can export, as one table the code dispatches on.

    name             constructor                          input      preprocessing
    vgg16            keras.applications.VGG16             224x224    caffe
    resnet50         keras.applications.ResNet50          224x224    caffe
    xception         keras.applications.Xception          299x299    tf
    mobilenet_v2     keras.applications.MobileNetV2       224x224    tf
    mobilenet        keras.applications.MobileNet         224x224    tf          (v1; --alpha 0.25/0.5/0.75/1.0)
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
    alphas: tuple[float, ...] = ()  # width multipliers with ImageNet weights (MobileNets); () = no alpha

    def check_alpha(self, alpha: float | None) -> float | None:
        """None (the application's default width) or one of `alphas`; ConfigError otherwise."""
        if alpha is None:
            return None
        if not self.alphas:
            with_alpha = ", ".join(sorted(a.name for a in APPLICATIONS.values() if a.alphas))
            raise ConfigError(f"--alpha applies to {with_alpha} only, not {self.name}")
        alpha = float(alpha)
        if alpha not in self.alphas:
            raise ConfigError(f"{self.name}: received alpha {alpha:g}; expected one of "
                              f"{', '.join(f'{a:g}' for a in self.alphas)}")
        return alpha

    def default_name(self, alpha: float | None = None) -> str:
        """The repository name: the application's, with the alpha when it is not 1.0 ('mobilenet_0.25')."""
        alpha = self.check_alpha(alpha)
        return self.name if alpha in (None, 1.0) else f"{self.name}_{alpha:g}"

    def weights_file_for(self, alpha: float | None = None) -> str:
        """The file Keras looks for in $KERAS_HOME/models for weights="imagenet" at this alpha (224 px)."""
        alpha = self.check_alpha(alpha)
        if alpha is None or alpha == 1.0:
            return self.weights_file
        if self.constructor == "MobileNet":  # alpha 0.25 -> "2_5", 0.5 -> "5_0", 0.75 -> "7_5"
            text = f"{alpha:.2f}"[2:]
            return f"mobilenet_{text[0]}_{text[1]}_224_tf.h5"
        return self.weights_file.replace("_1.0_", f"_{alpha:g}_")

    def build(self, *, weights: str | None = "imagenet", input_size: tuple[int, int] | None = None,
              classifier_activation: str | None = "softmax", alpha: float | None = None):
        """Construct the Keras model (include_top, 1000 ImageNet classes). Imports keras."""
        import keras

        constructor = getattr(keras.applications, self.constructor)
        size = tuple(input_size) if input_size else self.input_size
        extra = {}
        alpha = self.check_alpha(alpha)
        if alpha is not None:
            extra["alpha"] = alpha
        return constructor(
            weights=weights,
            include_top=True,
            input_shape=(int(size[0]), int(size[1]), 3),
            classifier_activation=classifier_activation,
            **extra,
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
                    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", 3.5,
                    alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
        Application("mobilenet", "MobileNet", "mobilenet", (224, 224), "tf",
                    "mobilenet_1_0_224_tf.h5", 4.3, alphas=(0.25, 0.5, 0.75, 1.0)),
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
        from serve.console import did_you_mean

        raise ConfigError(
            f"unknown application {name!r}{did_you_mean(name, sorted(APPLICATIONS))} (expected one of "
            f"{', '.join(sorted(APPLICATIONS))} or a path to a .keras/.h5 model)"
        ) from None


def check_mode(mode: str | None) -> str:
    """Normalise a preprocessing mode name (None -> 'none'); unknown names raise ConfigError."""
    mode = "none" if mode is None else str(mode).lower()
    if mode not in PREPROCESSING_MODES:
        raise ConfigError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_MODES)}")
    return mode
