"""The runner interface every backend implements (Polygraphy's loader/runner split).

A runner has a cheap constructor, `load()` that allocates (idempotent),
`infer(batch)` that checks the batch against the model's input contract and
only then calls the backend's `_infer()`, and `close()`. Every backend thus
gets the same checks and the same messages.
"""

from __future__ import annotations

import abc
import threading

import numpy as np

from ..errors import InvalidInputError, ServerUnavailableError
from ..repository import TensorSpec


class Runner(abc.ABC):
    """Runs one model on uint8 NHWC batches and returns FP32 probabilities (N, classes)."""

    #: whether `infer` may be called from several threads at once
    thread_safe: bool = True

    def __init__(self, name: str, input_spec: TensorSpec, output_spec: TensorSpec, *,
                 labels: list[str] | None = None, max_batch_size: int = 0):
        self.name = name
        self.input_spec = input_spec
        self.output_spec = output_spec
        self.labels = labels
        self.max_batch_size = max_batch_size
        self._loaded = False
        self._closed = False  # closed by its server: never loads again
        self._load_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def closed(self) -> bool:
        return self._closed

    def load(self) -> "Runner":
        """Allocate the model (idempotent, thread-safe). Returns self. A closed runner does not load again."""
        with self._load_lock:
            if self._closed:
                raise ServerUnavailableError(f"model '{self.name}' was unloaded; it does not run any more")
            if not self._loaded:
                self._load()
                self._loaded = True
        return self

    def close(self, *, final: bool = True) -> None:
        """Release the model. `final` (the server's close): it never loads again, and infer raises
        ServerUnavailableError, so work drained after a shutdown or unload cannot re-create a session.
        Leaving a `with` block closes it with final=False: load() may allocate it again."""
        with self._load_lock:
            self._closed = self._closed or final
            if self._loaded:
                self._loaded = False
                self._close()

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.close(final=False)

    # ---- inference -------------------------------------------------------------------------
    def check(self, batch: np.ndarray) -> np.ndarray:
        """Validate a batch against the input contract; returns it as a C-contiguous array."""
        spec = self.input_spec
        if not isinstance(batch, np.ndarray):
            raise InvalidInputError(f"model '{self.name}': expected a numpy array, received {type(batch).__name__}")
        if batch.dtype != spec.dtype:
            raise InvalidInputError(
                f"model '{self.name}' input '{spec.name}': received dtype {batch.dtype}, expected {spec.dtype}"
            )
        expected = ("N",) + spec.shape
        if batch.ndim != len(spec.shape) + 1 or any(
            want != -1 and got != want for got, want in zip(batch.shape[1:], spec.shape)
        ):
            raise InvalidInputError(
                f"model '{self.name}' input '{spec.name}': received shape {tuple(batch.shape)}, "
                f"expected {expected} (-1 = any)"
            )
        if batch.shape[0] == 0:
            raise InvalidInputError(f"model '{self.name}': received an empty batch, expected at least one image")
        if self.max_batch_size and batch.shape[0] > self.max_batch_size:
            raise InvalidInputError(
                f"model '{self.name}': received a batch of {batch.shape[0]}, "
                f"expected at most max_batch_size={self.max_batch_size}"
            )
        return np.ascontiguousarray(batch)

    def warm_up(self) -> None:
        """One batch of a zero image through the model (lazy allocations, kernel choice, tracing), before
        the server reports it ready. Dynamic dimensions are given 224."""
        shape = tuple(d if d > 0 else 224 for d in self.input_spec.shape)
        self.infer(np.zeros((1, *shape), dtype=self.input_spec.dtype))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Check `batch`, run it, return FP32 (N, classes) probabilities (loads on first use)."""
        return self.run(self.check(batch))

    #: batches the runner would like to run at once (a batcher gives it that many workers at least)
    preferred_workers: int = 1

    def run(self, batch: np.ndarray, busy: bool = False) -> np.ndarray:
        """Run a batch already checked against the input contract (the batcher's path: a request is
        validated once, where it enters the server). `busy`: other batches run or wait meanwhile (a
        runner may then use fewer threads for this one: see the onnxruntime backend)."""
        if not self._loaded:
            self.load()
        return np.asarray(self._infer_busy(batch) if busy else self._infer(batch), dtype=np.float32)

    def _infer_busy(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch while others run too (default: as any batch)."""
        return self._infer(batch)

    # ---- backend hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Allocate sessions/engines."""

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a checked batch."""

    def _close(self) -> None:
        """Release resources (default: nothing)."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return int(self.input_spec.shape[0]), int(self.input_spec.shape[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, input={self.input_spec}, loaded={self._loaded})"
