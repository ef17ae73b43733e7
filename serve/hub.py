"""The models a server serves, run: start-up loading, inference and classification, without a transport.

    hub = ModelHub(ModelRepository("models"), models=["a", "b"], ensembles=[Ensemble.parse("e=a,b")]).load()
    with hub.acquire("a") as target:                  # one lookup per request: the registry's handle
        result = hub.run(target, uint8_batch, deadline)           # -> InferResult
    with hub.acquire_targets(["e"]) as targets:
        answer = hub.classify_targets(jpeg_bytes, targets, top=3)  # -> ClassifyResult
    hub.infer("a", "", uint8_batch); hub.classify(jpeg_bytes, ["e"], top=3)   # the same, in process

Models, versions, their states and the handles requests hold are serve/registry.py's; this module starts a
version (runner, warm-up, batcher) when the registry loads one, and runs requests on the handles it gets.
The data plane (serve/dataplane.py) validates a request once and calls the run methods; nothing here
knows a transport.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import images
from .backends import create_runner
from .backends.base import Runner
from .batching import UNHEALTHY_AFTER_S, BatchResult, DynamicBatcher, Pending
from .ensemble import Ensemble, check_top_k, rank, resolve_fusion, top_k
from .errors import ConfigError, KestrelError, ModelLoadError
from .metrics import Metrics
from .registry import READY, UNAVAILABLE, EnsembleRecord, Handle, ModelRecord, ModelRegistry, ModelVersion
from .repository import ModelEntry, ModelRepository

log = logging.getLogger(__name__)

ENSEMBLE_PLATFORM = "ensemble"
CONTROL_MODES = ("none", "explicit", "poll")  # Triton's --model-control-mode
# What a served model's runner gets unless the server's options (serve's --no-ort-adaptive-threads) or the
# model's config.pbtxt say otherwise: onnxruntime's adaptive threads (two batches side by side under load).
SERVING_RUNNER_OPTIONS: dict[str, dict] = {"onnxruntime_onnx": {"adaptive_threads": True}}


def serving_runner_options(platform: str, server_options: dict[str, dict] | None = None) -> dict:
    """The options a served model's runner of `platform` is created with: SERVING_RUNNER_OPTIONS, overridden
    by the server's own ({platform: options}, e.g. serve's --ort-threads); the model's config.pbtxt has the last
    word inside the runner."""
    return {**SERVING_RUNNER_OPTIONS.get(platform, {}), **(server_options or {}).get(platform, {})}


__all__ = ["ModelHub", "InferResult", "ClassifyResult", "ModelAnswer", "EnsembleAnswer", "READY", "UNAVAILABLE",
           "Targets"]


@dataclass
class InferResult:
    name: str
    version: str
    probabilities: np.ndarray
    runs: dict[str, BatchResult] = field(default_factory=dict)  # per model that ran


@dataclass
class ModelAnswer:
    model: str
    version: str
    predictions: list[tuple[str, int, float]]  # (label, index, probability)
    run: BatchResult
    input_size: tuple[int, int]


@dataclass
class EnsembleAnswer:
    name: str
    fusion: str
    members: list[str]
    predictions: list[tuple[str, int, float]]


@dataclass
class ClassifyResult:
    models: list[ModelAnswer]
    ensembles: list[EnsembleAnswer]
    image_size: tuple[int, int]  # (height, width) as decoded (after a JPEG draft)
    decode_s: float
    total_s: float


class Targets(list):
    """The handles one Classify holds (a list of registry.Handle), released together."""

    def release(self) -> None:
        for handle in self:
            handle.release()

    def __enter__(self) -> "Targets":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _label(labels, index: int) -> str:
    return labels[index] if labels and index < len(labels) else str(int(index))


def submit_all(work: Sequence[tuple[ModelVersion, np.ndarray]], deadline: float | None,
               submitted: list | None, *, checked: bool = True) -> list[Pending]:
    """Queue each (version, batch); every request joins `submitted` as soon as it is queued. If one is refused,
    the ones queued before it are cancelled (never run) and the refusal is raised. `checked`: the batches were
    validated against each version's input already (the data plane's tensors); False: the batcher checks them."""
    pending: list[Pending] = []
    try:
        for version, batch in work:
            item = version.batcher.submit(batch, deadline, checked=checked)
            pending.append(item)
            if submitted is not None:
                submitted.append(item)
    except BaseException:
        for item in pending:
            item.cancel()
        raise
    return pending


def collect_all(pending: Sequence[Pending]) -> list[BatchResult]:
    """Each request's result, in order; the first failure cancels the siblings still queued and is raised."""
    try:
        return [item.result() for item in pending]
    except BaseException:
        for item in pending:
            if not item.done():
                item.cancel()
        raise


class ModelHub:
    """Start-up loading, then inference and Classify over the registry (see the module docstring)."""

    def __init__(self, repository: ModelRepository | str, models: Sequence[str] | None = None,
                 ensembles: Sequence[Ensemble] = (), *, strict: bool = False,
                 runner_options: dict[str, dict] | None = None, metrics: Metrics | None = None,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, unhealthy_after_s: float = UNHEALTHY_AFTER_S,
                 control_mode: str = "none", load_models: Sequence[str] | None = None):
        self.repository = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        if control_mode not in CONTROL_MODES:
            raise ConfigError(f"received model control mode {control_mode!r}; expected one of {', '.join(CONTROL_MODES)}")
        self.control_mode = control_mode
        named = list(models or []) + [n for n in (load_models or []) if n not in (models or [])]
        if "*" in named and named != ["*"]:
            raise ConfigError("--load-model '*' loads every model: give it alone, not with other names")
        self.load_all = named == ["*"]
        self.requested = None if self.load_all or not named else named
        self.strict = strict
        self.runner_options = runner_options or {}
        self.metrics = metrics or Metrics()
        self.max_pixels = max_pixels
        self.unhealthy_after_s = unhealthy_after_s
        self.registry = ModelRegistry(self.repository, start=self.start_version, metrics=self.metrics)
        self._given = {}
        for ens in ensembles:
            if ens.name in self._given:
                raise ConfigError(f"ensemble '{ens.name}' is defined twice")
            self._given[ens.name] = ens
        self._startup_ensembles = list(self._given.values()) + self._repository_ensembles()

    # ---- start-up ------------------------------------------------------------------------------------
    def _repository_ensembles(self) -> list[Ensemble]:
        """Ensembles defined in the repository (platform "ensemble" folders): all of them when no --models
        are named (in explicit mode: none unless named), else those named; an --ensemble of the same name
        takes precedence."""
        found = []
        for name in self.repository.ensemble_names():
            if self.requested is not None and name not in self.requested:
                continue
            if self.requested is None and self.control_mode == "explicit" and not self.load_all:
                continue
            if name in self._given:
                log.info("ensemble %s: the one given on the command line replaces the repository's", name)
                continue
            try:
                found.append(Ensemble.from_entry(self.repository.ensemble(name)))
            except KestrelError as exc:
                if self.strict or self.requested is not None:
                    raise
                log.error("ensemble %s in the repository is not served: %s", name, exc)
        return found

    def startup_plan(self) -> tuple[list[str], list[Ensemble]]:
        """(models, ensembles) the start-up loads: --models (an ensemble named there brings its members),
        else every model; each ensemble's members."""
        ensembles = self._startup_ensembles
        available = self.repository.names()
        if not available and not self.requested and self.control_mode == "none":
            raise ConfigError(f"repository {self.repository.root} holds no models (no <name>/config.pbtxt)")
        for ens in ensembles:
            if ens.name in available:
                raise ConfigError(f"ensemble '{ens.name}' has the name of a model in the repository; "
                                  "expected distinct names")
        if self.requested:
            names = [n for n in self.requested if n not in {e.name for e in ensembles}]
        elif self.control_mode == "explicit" and not self.load_all:
            names = []  # explicit: only what --load-model / --models name (Triton's rule)
        else:
            names = list(available)
        for ens in ensembles:
            for member in ens.members:
                if member not in names:
                    names.append(member)
        for name in names:
            if name not in available:
                raise ConfigError(f"model '{name}' is not in repository {self.repository.root} "
                                  f"(models there: {', '.join(available) or 'none'})")
        return names, ensembles

    def load(self) -> "ModelHub":
        """Load the start-up models (a model that fails is UNAVAILABLE with its reason, or raises with
        `strict`), after checking each ensemble's members share one label set."""
        names, ensembles = self.startup_plan()
        self._check_labels(ensembles)
        for ens in ensembles:
            self.registry.add_ensemble(ens)
        for name in names:
            self.load_model(name)
        return self

    def load_model(self, name: str) -> None:
        try:
            self.registry.load(name)
        except KestrelError as exc:
            log.error("model %s failed to load: %s", name, exc)
            if self.strict:
                raise ModelLoadError(f"model '{name}' failed to load (--strict): {exc}") from None

    def _check_labels(self, ensembles: Sequence[Ensemble]) -> None:
        for ens in ensembles:
            entries = {}
            for member in ens.members:
                try:
                    entries[member] = self.repository.entry(member)
                except KestrelError:
                    continue  # reported when it fails to load
            try:
                labels = {m: e.labels() for m, e in entries.items()}
                classes = {m: e.output_spec.shape[0] for m, e in entries.items()}
            except KestrelError as exc:
                raise ConfigError(f"ensemble '{ens.name}': {exc}") from None
            if len(entries) > 1:
                Ensemble(ens.name, tuple(entries), ens.fusion).check_labels(labels, classes)

    def start_version(self, entry: ModelEntry, version: int, stats) -> tuple[Runner, DynamicBatcher]:
        """What the registry calls to load one version: runner loaded and warmed up, batcher started.
        (deploy/ray overrides it: there the batcher is a model deployment.)"""
        runner = create_runner(entry, version, **serving_runner_options(entry.platform, self.runner_options))
        try:
            runner.load()
            self._warm_up(runner)
            batching = entry.config.dynamic_batching if entry.config.HasField("dynamic_batching") else None
            groups = [g.count for g in entry.config.instance_group if g.count > 0]
            batcher = DynamicBatcher(
                runner,
                max_batch_size=entry.max_batch_size or 1,
                max_queue_delay_us=batching.max_queue_delay_microseconds if batching else 0,
                max_queue_size=batching.default_queue_policy.max_queue_size if batching else 0,
                workers=sum(groups) or 1,
                stats=stats,
                close_runner=True,
                unhealthy_after_s=self.unhealthy_after_s,
            ).start()
        except BaseException:
            runner.close()
            raise
        stats.watch_queue(lambda b=batcher: b.queued, owner=batcher)
        return runner, batcher

    @staticmethod
    def _warm_up(runner: Runner) -> None:
        """One zero image through the model before it is READY (lazy allocations, kernel selection,
        tf.function tracing), so readiness probes pass only once the first request is fast. A failure
        is logged, not fatal: the model's own requests report it."""
        try:
            runner.warm_up()
        except Exception as exc:
            log.warning("model %s: warm-up inference failed: %s: %s", runner.name, type(exc).__name__, exc)

    def close(self, timeout: float | None = 10.0, *, deadline: float | None = None) -> None:
        """Shutdown: every model stops taking requests at once, runs what it holds until one deadline
        (`deadline`, or `timeout` seconds from now) shared by all models, then releases its runner."""
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        self.registry.close(deadline)

    # ---- lookups ---------------------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, ModelRecord]:
        return self.registry.records

    @property
    def ensembles(self) -> dict[str, EnsembleRecord]:
        return self.registry.ensembles

    @property
    def ready(self) -> bool:
        return any(record.ready for record in self.registry.records.values())

    def names(self) -> list[str]:
        return self.registry.names()

    def find(self, name: str) -> ModelRecord | EnsembleRecord:
        return self.registry.find(name)

    def acquire(self, name: str, version: str = "") -> Handle:
        """The handle one request runs on (registry.acquire): a model version, or an ensemble's members."""
        return self.registry.acquire(name, version or "")

    def acquire_targets(self, names: Sequence[str] = ()) -> Targets:
        """Handles for Classify's names (default: the first ready ensemble, else every ready model), each
        name once; all released if one cannot be had."""
        names = list(dict.fromkeys(n for n in names if n)) or self.default_targets()
        targets = Targets()
        try:
            for name in names:
                targets.append(self.registry.acquire(name))
        except BaseException:
            targets.release()
            raise
        return targets

    def default_targets(self) -> list[str]:
        """The first ready ensemble, else every ready model."""
        for record in self.registry.ensembles.values():
            if self.registry.ensemble_state(record)[0] == READY:
                return [record.name]
        ready = [name for name, record in self.registry.records.items() if record.ready]
        if not ready:
            raise ModelLoadError("no model is ready on this server")
        return ready

    # ---- inference -----------------------------------------------------------------------------------
    def run(self, target: Handle, batch: np.ndarray, deadline: float | None = None, fusion: str | None = None,
            submitted: list | None = None) -> InferResult:
        """Run a checked uint8 batch on a model version, or on an ensemble's members concurrently, fused
        (`fusion`: None or "" = the ensemble's own). `submitted` collects the queued requests
        (batching.Pending) so that a transport can cancel them when its client goes away."""
        fusion = resolve_fusion(fusion, ensembles=int(target.is_ensemble), models=len(target.versions),
                                several_models=False, name=target.name)
        pending = submit_all([(version, batch) for version in target.versions], deadline, submitted)
        runs = collect_all(pending)
        if not target.is_ensemble:
            return InferResult(target.name, target.version, runs[0].probabilities, {target.name: runs[0]})
        ensemble = target.ensemble.ensemble
        scores, _ = rank([r.probabilities for r in runs], fusion or ensemble.fusion, ensemble.temperatures)
        return InferResult(target.name, target.version, scores.astype(np.float32),
                           {v.name: r for v, r in zip(target.versions, runs)})

    def classify_targets(self, image: bytes, targets: Sequence[Handle], top: int = 0, fusion: str | None = None,
                         deadline: float | None = None, submitted: list | None = None) -> ClassifyResult:
        """Decode once, resize once per input size, run every model concurrently, fuse per ensemble (or across
        several models). `top`: predictions per model (0 = the default); `fusion`: None or "" = each
        ensemble's own."""
        t_start = time.perf_counter()
        top = check_top_k(top)
        fusion = resolve_fusion(fusion, ensembles=sum(t.is_ensemble for t in targets),
                                models=len({v.name for t in targets for v in t.versions}), several_models=True,
                                name=targets[0].name if len(targets) == 1 else "")
        unique: dict[str, ModelVersion] = {}  # each model runs once, however often it is named
        for target in targets:
            for version in target.versions:
                unique.setdefault(version.name, version)
        models = list(unique.values())
        sizes = {(m.image_size, m.resize) for m in models}  # each model's size and resize mode
        needed = [images.decode_size(size, mode) for size, mode in sizes]
        biggest = (max(h for h, _ in needed), max(w for _, w in needed))
        t0 = time.perf_counter()
        picture = images.decode(image, min_size=biggest, max_pixels=self.max_pixels)
        pixels = {(size, mode): images.resize(picture, size, mode)[None] for size, mode in sizes}
        decode_s = time.perf_counter() - t0
        # decoded pixels are uint8 RGB: a model whose input is not (a config may say FP32, or one channel) is
        # refused by the batcher's check as INVALID_ARGUMENT, never handed to the backend
        pending = submit_all([(m, pixels[(m.image_size, m.resize)]) for m in models], deadline, submitted,
                             checked=False)
        runs = dict(zip(unique, collect_all(pending)))
        answers = []
        for m in models:
            probs = runs[m.name].probabilities
            picks = top_k(probs, None, top)[0]
            answers.append(ModelAnswer(m.name, m.label, [(_label(m.labels, i), i, p) for i, p in picks],
                                       runs[m.name], m.image_size))
        fused = []
        for target in targets:
            if target.is_ensemble:
                ens = target.ensemble.ensemble
                fused.append(self._fuse(target.name, [unique[m] for m in ens.members], fusion or ens.fusion,
                                        runs, top, ens.temperatures))
        if not fused and len(models) > 1 and self._share_labels(models):
            fused.append(self._fuse("ensemble", models, fusion or "mean", runs, top))
        return ClassifyResult(answers, fused, (picture.height, picture.width), decode_s,
                              time.perf_counter() - t_start)

    @staticmethod
    def _share_labels(models: list[ModelVersion]) -> bool:
        first = models[0]
        return all(m.labels == first.labels and m.output_spec.shape == first.output_spec.shape for m in models[1:])

    @staticmethod
    def _fuse(name: str, members: list[ModelVersion], fusion: str, runs: dict[str, BatchResult],
              top: int, temperatures=None) -> EnsembleAnswer:
        scores, order = rank([runs[m.name].probabilities for m in members], fusion, temperatures)
        picks = top_k(scores, order, top)[0]
        return EnsembleAnswer(name, fusion, [m.name for m in members],
                              [(_label(members[0].labels, i), i, s) for i, s in picks])

    # ---- in process: the same as the data plane, without a transport ---------------------------------------
    def infer(self, name: str, version: str, batch: np.ndarray, deadline: float | None = None,
              fusion: str | None = None, submitted: list | None = None) -> InferResult:
        """Acquire, check the batch against the model's input, run, release."""
        with self.acquire(name, version) as target:
            target.input_spec  # an ensemble's members must share one input, else InvalidInputError
            return self.run(target, target.versions[0].runner.check(batch), deadline, fusion, submitted)

    def classify(self, image: bytes, names: Sequence[str] = (), top: int = 0, fusion: str = "",
                 deadline: float | None = None, submitted: list | None = None) -> ClassifyResult:
        """Acquire the targets, classify, release."""
        top = check_top_k(top)  # before any model is acquired
        with self.acquire_targets(names) as targets:
            return self.classify_targets(image, targets, top, fusion, deadline, submitted)
