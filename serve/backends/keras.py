"""Keras backend: serves the original model.keras, for comparison with the exported paths.

TensorFlow and Keras are imported in `_load()` only. The model is loaded with
`safe_mode=True` (Kestrel's preprocessing is built from standard layers, no
Lambda) and, by default, run through a `tf.function` with a fixed uint8 input
signature, so every batch size reuses one traced graph. `mode="predict"` runs
`model.predict` instead (Keras' own, slower path; the benchmarks compare both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._files import check_readable
from .._optional import require
from ..errors import ConfigError, ModelLoadError
from ..repository import ModelEntry, TensorSpec
from .base import Runner

MODES = ("function", "predict")


class KerasRunner(Runner):
    """Runs model.keras with TensorFlow (thread-safe: a tf.function may be called concurrently)."""

    thread_safe = True

    def __init__(self, name: str, path: str | Path, input_spec: TensorSpec, output_spec: TensorSpec, *,
                 labels=None, max_batch_size: int = 0, mode: str = "function"):
        super().__init__(name, input_spec, output_spec, labels=labels, max_batch_size=max_batch_size)
        if mode not in MODES:
            raise ConfigError(f"unknown Keras runner mode {mode!r}; expected one of {MODES}")
        self.path = Path(path)
        self.mode = mode
        self.model = None
        self._function = None

    @classmethod
    def from_entry(cls, entry: ModelEntry, version: int | None = None, **options) -> "KerasRunner":
        return cls(entry.name, entry.artifact(version), entry.input_spec, entry.output_spec,
                   labels=entry.labels(), max_batch_size=entry.max_batch_size, **options)

    def _load(self) -> None:
        tf = require("tensorflow", "the Keras backend")
        keras = require("keras", "the Keras backend")
        if not self.path.is_file():
            raise ModelLoadError(f"model '{self.name}': {self.path} does not exist")
        unreadable = check_readable(self.path)
        if unreadable:
            raise ModelLoadError(f"model '{self.name}': {unreadable}")
        try:
            model = keras.saving.load_model(str(self.path), compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for unreadable files
            detail = " ".join(str(exc).split())[:300]
            raise ModelLoadError(f"model '{self.name}': Keras cannot load {self.path}: {detail}") from None
        shape = [None, *self.input_spec.shape]
        signature = [tf.TensorSpec(shape, tf.as_dtype(self.input_spec.dtype), name=self.input_spec.name)]

        def forward(images):
            return tf.cast(model(images, training=False), tf.float32)

        self.model = model
        self._function = tf.function(forward, input_signature=signature, autograph=False)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.mode == "predict":
            return self.model.predict(batch, batch_size=max(len(batch), 1), verbose=0)
        return self._function(batch).numpy()

    def _close(self) -> None:
        self.model = None
        self._function = None
