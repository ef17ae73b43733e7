"""Lazy imports of heavy optional packages with a message naming the extra.

Nothing at module level in serve imports tensorflow, onnxruntime or tensorrt;
adapters call `require()` when a model that needs one is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (pip package, kestrel extra)
_EXTRAS = {
    "onnxruntime": ("onnxruntime (or onnxruntime-gpu)", "cpu"),
    "tensorflow": ("tensorflow", "keras"),
    "keras": ("keras", "keras"),
    "tf2onnx": ("tf2onnx", "export"),
    "onnx": ("onnx", "export"),
    "tensorrt": ("tensorrt", "gpu"),
    "locust": ("locust", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "flask": ("flask", "bench"),
    "ray": ("ray[serve]", "scale"),
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        package, extra = _EXTRAS.get(top, (top, "export"))
        raise MissingDependencyError(package, extra, purpose) from exc


def available(module: str) -> bool:
    """True when `module` is installed; does not import it (tensorflow takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
