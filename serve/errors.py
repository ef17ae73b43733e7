"""Kestrel's exception tree, drawn once.

    KestrelError                      base of everything Kestrel raises on purpose
    ├── MissingDependencyError        an optional package is not installed (names the extra)
    ├── ConfigError                   a config.pbtxt / option / repository entry is invalid
    ├── ModelNotFoundError            unknown model name or version
    ├── ModelLoadError                a model's artifact exists but cannot be loaded
    ├── InvalidInputError             a request's tensors do not match the model's contract
    │   └── ImageDecodeError          bytes that are not a decodable image (or too large)
    ├── ResourceExhaustedError        a queue is full or a message too large
    ├── DeadlineExceededError         the request's deadline passed before it ran
    └── EngineMismatchError           a TensorRT engine built for another GPU / TensorRT version

The gRPC servicers are the only place these are mapped to status codes.
Messages say what was received and what was expected.
"""

from __future__ import annotations


class KestrelError(Exception):
    """Base class of every error Kestrel raises deliberately."""


class MissingDependencyError(KestrelError, ImportError):
    """An optional package is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        self.package = package
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"the optional package '{package}' is not installed{what}; "
            f"install it with: pip install 'kestrel[{extra}]'"
        )


class ConfigError(KestrelError, ValueError):
    """A configuration file, option or repository entry is invalid."""


class ModelNotFoundError(KestrelError, LookupError):
    """The requested model (or version) is not in the repository / not loaded."""


class ModelLoadError(KestrelError):
    """A model's artifact exists but could not be loaded."""


class InvalidInputError(KestrelError, ValueError):
    """Request tensors do not match the model's input contract."""


class ImageDecodeError(InvalidInputError):
    """Bytes that cannot be decoded as an image, or an image over the pixel limit."""


class ResourceExhaustedError(KestrelError):
    """A bounded queue is full or a message is over its size limit."""


class DeadlineExceededError(KestrelError):
    """The request's deadline expired before it could run."""


class EngineMismatchError(ModelLoadError):
    """A TensorRT engine was built for a different GPU or TensorRT version."""
