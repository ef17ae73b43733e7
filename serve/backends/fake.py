"""A dependency-free fake backend: deterministic probabilities from pixel statistics.

Like httpx's MockTransport, it ships with the library so the server, ensembles,
batching and load tests (and users' own tests) run with no ML package at all.

    models/toy/config.pbtxt     platform: "fake" (written by `write_fake_model`)
    models/toy/labels.txt
    models/toy/1/model.json     {"seed": 0, "delay_ms": 0, "per_image_ms": 0, ...}

The probabilities are a softmax of a fixed random projection (from `seed`) of
each image's per-channel mean and standard deviation: the same image always
gets the same answer, different images usually different ones, and
`fake_probabilities` computes the expected output for tests.

model.json options:
    seed            projection seed (models with the same seed agree)
    delay_ms        simulated compute time per batch (time.sleep, releases the GIL)
    per_image_ms    additional simulated time per image of the batch
    thread_safe     false: the server gives the model a single worker
    fail_load       a reason: load() raises ModelLoadError with it
    fail_infer      a reason: every inference raises RuntimeError with it (an unexpected backend failure)
    fail_batches    batch numbers (1 = the first batch after the warm-up) that raise RuntimeError: one bad
                    batch among many
    load_delay_ms   simulated load time (a slow load: requests landing while a version loads)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .._files import read_error
from ..errors import ConfigError, ModelLoadError
from ..repository import PLATFORM_FAKE, ModelEntry, TensorSpec, make_config, write_config
from .base import Runner

_FEATURES = 6


def _projection(classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 6.0, (_FEATURES, classes)), rng.normal(0, 0.5, classes)


def fake_probabilities(batch: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """What a fake model with `classes` outputs and `seed` returns for a uint8 NHWC batch."""
    pixels = batch.reshape(batch.shape[0], -1, batch.shape[-1]).astype(np.float64) / 255.0
    features = np.concatenate([pixels.mean(axis=1), pixels.std(axis=1)], axis=1)[:, :_FEATURES]
    if features.shape[1] < _FEATURES:  # fewer than 3 channels
        features = np.pad(features, ((0, 0), (0, _FEATURES - features.shape[1])))
    weights, bias = _projection(classes, seed)
    logits = features @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class FakeRunner(Runner):
    """Deterministic probabilities, optional simulated compute time; no dependencies."""

    def __init__(self, name: str, input_spec: TensorSpec, output_spec: TensorSpec, *, labels=None,
                 max_batch_size: int = 0, seed: int = 0, delay_ms: float = 0.0, per_image_ms: float = 0.0,
                 thread_safe: bool = True, fail_load: str | None = None, fail_infer: str | None = None,
                 fail_batches=(), load_delay_ms: float = 0.0):
        super().__init__(name, input_spec, output_spec, labels=labels, max_batch_size=max_batch_size)
        if len(output_spec.shape) != 1 or output_spec.shape[0] < 1:
            raise ConfigError(
                f"fake model '{name}': output shape {output_spec.shape} must be (classes,) with classes >= 1"
            )
        self.seed = int(seed)
        self.delay_ms = float(delay_ms)
        self.per_image_ms = float(per_image_ms)
        self.thread_safe = bool(thread_safe)
        self.fail_load = fail_load
        self.fail_infer = fail_infer
        self.fail_batches = {int(b) for b in fail_batches}
        self.load_delay_ms = float(load_delay_ms)
        self.batch_sizes: list[int] = []  # every executed batch size, for tests
        self._count = 0  # batches run since the warm-up

    @classmethod
    def from_entry(cls, entry: ModelEntry, version: int | None = None, **options) -> "FakeRunner":
        path = entry.artifact(version)
        try:
            settings = json.loads(path.read_text() or "{}")
        except OSError as exc:
            raise ModelLoadError(f"fake model '{entry.name}': {read_error(path, exc)}") from None
        except ValueError as exc:
            raise ModelLoadError(f"fake model '{entry.name}': cannot read {path}: {exc}") from None
        if not isinstance(settings, dict):
            raise ModelLoadError(f"fake model '{entry.name}': {path} must hold a JSON object, got {settings!r}")
        known = {"seed", "delay_ms", "per_image_ms", "thread_safe", "fail_load", "fail_infer", "fail_batches",
                 "load_delay_ms"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ModelLoadError(f"fake model '{entry.name}': unknown keys {unknown} in {path}; expected {sorted(known)}")
        settings.update(options)
        return cls(entry.name, entry.input_spec, entry.output_spec, labels=entry.labels(),
                   max_batch_size=entry.max_batch_size, **settings)

    def _load(self) -> None:
        if self.load_delay_ms > 0:
            time.sleep(self.load_delay_ms / 1000.0)
        if self.fail_load:
            raise ModelLoadError(f"fake model '{self.name}': {self.fail_load}")

    def warm_up(self) -> None:
        """Costs what a batch of one costs; not counted in batch_sizes (the batches requests ran in)."""
        try:
            super().warm_up()
        finally:
            self.batch_sizes.clear()
            self._count = 0

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(int(batch.shape[0]))
        self._count += 1
        if self.fail_infer:
            raise RuntimeError(f"fake model '{self.name}': {self.fail_infer}")
        if self._count in self.fail_batches:
            raise RuntimeError(f"fake model '{self.name}': simulated failure of batch {self._count}")
        pause = self.delay_ms + self.per_image_ms * batch.shape[0]
        if pause > 0:
            time.sleep(pause / 1000.0)
        return fake_probabilities(batch, self.output_spec.shape[0], self.seed)


def write_fake_model(root: str | Path, name: str, *, classes: int = 10, size: tuple[int, int] = (32, 32),
                     labels: list[str] | None = None, version: int = 1, max_batch_size: int = 32,
                     max_queue_delay_us: int = 2000, max_queue_size: int = 256, instance_count: int = 1,
                     **settings) -> Path:
    """Write a fake model folder into repository `root`; returns the folder.

    `settings` go to model.json (seed, delay_ms, per_image_ms, thread_safe, fail_load, fail_infer,
    fail_batches, load_delay_ms).
    """
    folder = Path(root) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    config = make_config(
        name, PLATFORM_FAKE,
        TensorSpec("images", np.uint8, (int(size[0]), int(size[1]), 3)),
        TensorSpec("probabilities", np.float32, (classes,)),
        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size, instance_count=instance_count,
    )
    write_config(config, folder)
    names = labels if labels is not None else [f"class_{i}" for i in range(classes)]
    if len(names) != classes:
        raise ConfigError(f"fake model '{name}': {len(names)} labels given, expected {classes}")
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    (folder / str(version) / "model.json").write_text(json.dumps(settings))
    return folder
