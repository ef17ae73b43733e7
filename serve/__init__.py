"""Kestrel serving: the model repository, backends, batching, ensembles, images, and the gRPC server.

The public surface (tests/serve/test_public_api.py guards it):

    from serve import ModelRepository, create_runner, images          # run a model in-process
    from serve import create_server, KestrelClient                    # serve it / call it

`import serve` stays light: no TensorFlow or onnxruntime (backends import them
on load), and no generated protobuf code until create_server / KestrelClient /
ModelHub are first used, so a process that imports tritonclient (whose generated
modules define the same `inference` package) can still import serve's pure parts.
"""

from __future__ import annotations

import importlib

from . import images
from .backends import create_runner, register
from .backends.base import Runner
from .batching import BatchResult, DynamicBatcher
from .ensemble import FUSIONS, Ensemble, fuse, rank, top_k
from .errors import (ConfigError, DeadlineExceededError, EngineMismatchError, ImageDecodeError, InvalidInputError,
                     KestrelError, MissingDependencyError, ModelLoadError, ModelNotFoundError, ResourceExhaustedError)
from .repository import ModelEntry, ModelRepository, TensorSpec, make_config, read_config, write_config

# name -> module: loaded on first access (they need the generated gRPC code)
_LAZY = {
    "create_server": "serve.server",
    "Server": "serve.server",
    "KestrelClient": "serve.client",
    "ModelHub": "serve.hub",
    "Metrics": "serve.metrics",
}

__all__ = [
    "BatchResult",
    "ConfigError",
    "DeadlineExceededError",
    "DynamicBatcher",
    "EngineMismatchError",
    "Ensemble",
    "FUSIONS",
    "ImageDecodeError",
    "InvalidInputError",
    "KestrelClient",
    "KestrelError",
    "Metrics",
    "MissingDependencyError",
    "ModelEntry",
    "ModelHub",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelRepository",
    "ResourceExhaustedError",
    "Runner",
    "Server",
    "TensorSpec",
    "create_runner",
    "create_server",
    "fuse",
    "images",
    "make_config",
    "rank",
    "read_config",
    "register",
    "top_k",
    "write_config",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'serve' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
