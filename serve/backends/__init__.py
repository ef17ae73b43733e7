"""Backends: one module per runtime, imported only when a model needs it.

    runner = create_runner(repository.entry("mobilenet_v2"))   # no heavy import yet
    runner.load()                                               # imports onnxruntime here
    probabilities = runner.infer(uint8_batch)

The registry maps a model's platform/backend (from config.pbtxt) to the module
that implements it; a missing package raises MissingDependencyError naming the
extra to install.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from ..repository import ModelEntry
from .base import Runner

# platform/backend name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime_onnx": ("serve.backends.onnxruntime", "OnnxRuntimeRunner"),
    "tensorrt_plan": ("serve.backends.tensorrt", "TensorRTRunner"),
    "keras": ("serve.backends.keras", "KerasRunner"),
    "fake": ("serve.backends.fake", "FakeRunner"),
}


def register(platform: str, module: str, cls: str) -> None:
    """Add (or replace) a backend; used by tests and plug-ins."""
    _REGISTRY[platform] = (module, cls)


def backend_class(platform: str) -> type[Runner]:
    try:
        module, cls = _REGISTRY[platform]
    except KeyError:
        raise ConfigError(f"no backend for platform {platform!r}; expected one of {sorted(_REGISTRY)}") from None
    return getattr(importlib.import_module(module), cls)


def create_runner(entry: ModelEntry, version: int | None = None, **options) -> Runner:
    """A runner for a repository entry (not loaded yet). Options go to the backend."""
    cls = backend_class(entry.platform)
    return cls.from_entry(entry, version=version, **options)


__all__ = ["Runner", "backend_class", "create_runner", "register"]
