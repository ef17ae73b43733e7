"""The models a server serves: loading, batching, inference and classification, without gRPC.

    hub = ModelHub(ModelRepository("models"), models=["a", "b"], ensembles=[Ensemble.parse("e=a,b")])
    hub.load()                       # a model that fails is UNAVAILABLE with its reason (or raises if strict)
    result = hub.infer("a", "", uint8_batch, deadline)     # -> InferResult
    answer = hub.classify(jpeg_bytes, ["e"], top_k=3)      # -> ClassifyResult

The servicers (serve/servicers.py) translate requests and map the exceptions
raised here (serve.errors) to gRPC status codes; nothing here knows gRPC.
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
from .batching import BatchResult, DynamicBatcher
from .ensemble import Ensemble, check_fusion, rank, top_k
from .errors import ConfigError, InvalidInputError, KestrelError, ModelLoadError, ModelNotFoundError, shown
from .metrics import Metrics, ModelStats, RequestRecord
from .repository import ModelEntry, ModelRepository

log = logging.getLogger(__name__)

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
ENSEMBLE_PLATFORM = "ensemble"


@dataclass
class ServedModel:
    """One model of the repository as this server holds it."""

    name: str
    entry: ModelEntry | None
    version: int | None = None
    runner: Runner | None = None
    batcher: DynamicBatcher | None = None
    state: str = UNAVAILABLE
    reason: str = "not loaded yet"
    stats: ModelStats | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    # ---- the interface a served model and a served ensemble share ----------------------------
    @property
    def platform(self) -> str:
        return self._entry().platform

    @property
    def versions(self) -> list[str]:
        """The loaded version, or (not loaded) the versions on disk."""
        if self.version is not None:
            return [str(self.version)]
        return [str(v) for v in self.entry.versions] if self.entry is not None else []

    @property
    def version_label(self) -> str:
        """The version requests are answered with ("" while none is loaded)."""
        return "" if self.version is None else str(self.version)

    @property
    def input_spec(self):
        return self._entry().input_spec

    @property
    def output_spec(self):
        return self._entry().output_spec

    @property
    def max_batch_size(self) -> int:
        return self._entry().max_batch_size

    @property
    def labels(self) -> list[str] | None:
        return self.runner.labels if self.runner is not None else None

    def check_version(self, version: str | int | None) -> None:
        _parse_version(self.name, version, self.version)

    def _entry(self) -> ModelEntry:
        if self.entry is None:
            raise ModelLoadError(f"model '{self.name}' has no valid configuration: {self.reason}")
        return self.entry

    @property
    def resize(self) -> str:
        """How Classify resizes images for this model (config.pbtxt parameter "resize")."""
        return self.entry.resize if self.entry is not None else images.DEFAULT_RESIZE


@dataclass
class ServedEnsemble:
    ensemble: Ensemble
    state: str = UNAVAILABLE
    reason: str = "not loaded yet"
    stats: ModelStats | None = None
    members: list[ServedModel] = field(default_factory=list)  # set by ModelHub.load

    @property
    def name(self) -> str:
        return self.ensemble.name

    @property
    def ready(self) -> bool:
        return self.state == READY

    # ---- the interface a served model and a served ensemble share ----------------------------
    platform = ENSEMBLE_PLATFORM
    version_label = "1"

    @property
    def versions(self) -> list[str]:
        return ["1"]

    @property
    def input_spec(self):
        """The members' input spec (InvalidInputError when they take different inputs)."""
        specs = {m.entry.input_spec for m in self.members if m.entry is not None}
        if len(specs) != 1:
            raise InvalidInputError(
                f"ensemble '{self.name}' members take different inputs ({sorted(str(s.shape) for s in specs)}); "
                "send images through Classify, or infer each member"
            )
        return next(iter(specs))

    @property
    def output_spec(self):
        return self._first().output_spec

    @property
    def max_batch_size(self) -> int:
        return min(m.max_batch_size for m in self.members if m.entry is not None)

    @property
    def labels(self) -> list[str] | None:
        return self._first().labels

    def check_version(self, version: str | int | None) -> None:
        _parse_version(self.name, version, 1)

    def _first(self) -> ServedModel:
        configured = [m for m in self.members if m.entry is not None]
        if not configured:
            raise ModelLoadError(f"ensemble '{self.name}' has no member with a valid configuration: {self.reason}")
        return configured[0]


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


def _parse_version(name: str, version: str | int | None, loaded: int | None) -> None:
    if version in (None, "", 0):
        return
    text = str(version)
    if not text.isdigit():
        raise ModelNotFoundError(f"model '{name}': received version {shown(text)}, expected a number (or empty)")
    if loaded is None or int(text) != loaded:
        raise ModelNotFoundError(
            f"model '{name}' has no version {shown(text)[1:-1]} loaded; loaded version: "
            f"{loaded if loaded is not None else 'none'}"
        )


class ModelHub:
    """Loads models (each with a DynamicBatcher), validates ensembles, runs inference and classification."""

    def __init__(self, repository: ModelRepository | str, models: Sequence[str] | None = None,
                 ensembles: Sequence[Ensemble] = (), *, strict: bool = False,
                 runner_options: dict[str, dict] | None = None, metrics: Metrics | None = None,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS):
        self.repository = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        self.requested = list(models) if models else None
        self.strict = strict
        self.runner_options = runner_options or {}
        self.metrics = metrics or Metrics()
        self.max_pixels = max_pixels
        self.models: dict[str, ServedModel] = {}
        self.ensembles: dict[str, ServedEnsemble] = {}
        for ens in ensembles:
            if ens.name in self.ensembles:
                raise ConfigError(f"ensemble '{ens.name}' is defined twice")
            self.ensembles[ens.name] = ServedEnsemble(ens, stats=self.metrics.model(ens.name))
            self.ensembles[ens.name].stats.version = "1"  # ensembles have one version
        self._add_repository_ensembles()

    def _add_repository_ensembles(self) -> None:
        """Ensembles defined in the repository (platform "ensemble" folders): all of them when no
        --models are named, else those named; an --ensemble of the same name takes precedence."""
        for name in self.repository.ensemble_names():
            if self.requested is not None and name not in self.requested:
                continue
            if name in self.ensembles:
                log.info("ensemble %s: the one given on the command line replaces the repository's", name)
                continue
            try:
                ens = Ensemble.from_entry(self.repository.ensemble(name))
            except KestrelError as exc:
                if self.strict or self.requested is not None:
                    raise
                log.error("ensemble %s in the repository is not served: %s", name, exc)
                continue
            self.ensembles[name] = ServedEnsemble(ens, stats=self.metrics.model(name))
            self.ensembles[name].stats.version = "1"  # ensembles have one version

    # ---- loading ---------------------------------------------------------------------------
    def _names_to_load(self) -> list[str]:
        available = self.repository.names()
        if not available and not self.requested:
            raise ConfigError(f"repository {self.repository.root} holds no models (no <name>/config.pbtxt)")
        for name in self.ensembles:
            if name in available:
                raise ConfigError(f"ensemble '{name}' has the name of a model in the repository; expected distinct names")
        # an ensemble named in --models is served through its members
        names = [n for n in self.requested if n not in self.ensembles] if self.requested else list(available)
        for served in self.ensembles.values():
            for member in served.ensemble.members:
                if member not in names:
                    names.append(member)
        for name in names:
            if name not in available:
                raise ConfigError(
                    f"model '{name}' is not in repository {self.repository.root} "
                    f"(models there: {', '.join(available) or 'none'})"
                )
        return names

    def load(self) -> "ModelHub":
        """Parse every model, check ensembles' label sets, then load models and start their batchers."""
        names = self._names_to_load()
        entries: dict[str, ModelEntry] = {}
        for name in names:
            try:
                entries[name] = self.repository.entry(name)
                self.models[name] = ServedModel(name, entries[name], stats=self.metrics.model(name))
            except KestrelError as exc:
                if self.strict:
                    raise
                self.models[name] = ServedModel(name, None, reason=str(exc), stats=self.metrics.model(name))
                log.error("model %s: %s", name, exc)
        self._check_ensembles(entries)
        for name in names:
            if name in entries:
                self._load_one(self.models[name])
        for served in self.ensembles.values():
            served.members = [self.models[m] for m in served.ensemble.members]
            missing = [m for m in served.ensemble.members if not self.models[m].ready]
            if missing:
                served.state = UNAVAILABLE
                served.reason = "members not ready: " + "; ".join(
                    f"{m}: {self.models[m].reason}" for m in missing)
            else:
                served.state, served.reason = READY, ""
            served.stats.set_ready(served.ready)
        return self

    def _check_ensembles(self, entries: dict[str, ModelEntry]) -> None:
        for served in self.ensembles.values():
            ens = served.ensemble
            known = [m for m in ens.members if m in entries]
            try:
                labels = {m: entries[m].labels() for m in known}
                classes = {m: entries[m].output_spec.shape[0] for m in known}
            except KestrelError as exc:
                raise ConfigError(f"ensemble '{ens.name}': {exc}") from None
            if len(known) > 1:
                Ensemble(ens.name, tuple(known), ens.fusion).check_labels(labels, classes)

    def _load_one(self, served: ServedModel) -> None:
        entry = served.entry
        t0 = time.perf_counter()
        try:
            versions = entry.versions
            if not versions:
                entry.artifact()  # raises with the reason
            served.version = versions[-1]
            served.stats.version = str(served.version)
            options = dict(self.runner_options.get(entry.platform, {}))
            runner = create_runner(entry, served.version, **options)
            runner.load()
            self._warm_up(runner)
            batching = entry.config.dynamic_batching if entry.config.HasField("dynamic_batching") else None
            groups = [g.count for g in entry.config.instance_group if g.count > 0]
            served.batcher = DynamicBatcher(
                runner,
                max_batch_size=entry.max_batch_size or 1,
                max_queue_delay_us=batching.max_queue_delay_microseconds if batching else 0,
                max_queue_size=batching.default_queue_policy.max_queue_size if batching else 0,
                workers=sum(groups) or 1,
                stats=served.stats,
            ).start()
            served.stats.watch_queue(lambda batcher=served.batcher: batcher.queued)
            served.runner = runner
            served.state, served.reason = READY, ""
            log.info("model %s version %s loaded (%s) in %.2f s", served.name, served.version, entry.platform,
                     time.perf_counter() - t0)
        except Exception as exc:  # a model that fails must not take the others down
            reason = str(exc) if isinstance(exc, KestrelError) else f"{type(exc).__name__}: {exc}"
            served.state, served.reason = UNAVAILABLE, reason
            log.error("model %s failed to load: %s", served.name, reason)
            if self.strict:
                raise ModelLoadError(f"model '{served.name}' failed to load (--strict): {reason}") from None
        served.stats.set_ready(served.ready)

    @staticmethod
    def _warm_up(runner: Runner) -> None:
        """One zero image through the model before it is READY (lazy allocations, kernel selection,
        tf.function tracing), so readiness probes pass only once the first request is fast. A failure
        is logged, not fatal: the model's own requests report it."""
        try:
            runner.warm_up()
        except Exception as exc:
            log.warning("model %s: warm-up inference failed: %s: %s", runner.name, type(exc).__name__, exc)

    def close(self, timeout: float | None = 10.0) -> None:
        """Drain and stop every batcher, release every runner."""
        for served in self.models.values():
            if served.batcher is not None:
                served.batcher.close(timeout)
            if served.runner is not None:
                try:
                    served.runner.close()
                except Exception as exc:  # closing must go on for the others
                    log.warning("model %s: close failed: %s", served.name, exc)
            served.state, served.reason = UNAVAILABLE, "server shut down"

    # ---- lookups ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(m.ready for m in self.models.values())

    def names(self) -> list[str]:
        return list(self.models) + list(self.ensembles)

    def find(self, name: str) -> ServedModel | ServedEnsemble:
        if name in self.models:
            return self.models[name]
        if name in self.ensembles:
            return self.ensembles[name]
        raise ModelNotFoundError(
            f"received model name {shown(name)}, which this server does not serve; "
            f"expected one of: {', '.join(self.names()) or 'none'}"
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        target = self.find(name)
        target.check_version(version)
        return target.ready

    def ready_model(self, name: str, version: str = "") -> ServedModel | ServedEnsemble:
        """The ready model or ensemble; ModelNotFoundError / ModelLoadError (unavailable) otherwise."""
        target = self.find(name)
        target.check_version(version)
        if not target.ready:
            raise ModelLoadError(f"model '{name}' is not ready: {target.reason}")
        return target

    def members(self, name: str) -> list[ServedModel]:
        target = self.find(name)
        if isinstance(target, ServedModel):
            return [target]
        return [self.models[m] for m in target.ensemble.members]

    def input_spec(self, name: str):
        """The input spec of a model, or of an ensemble whose members all take the same input."""
        return self.find(name).input_spec

    # ---- inference -------------------------------------------------------------------------
    def record_request(self, api: str, names: Sequence[str]) -> RequestRecord:
        """Start one request's metrics. Only names this server serves get metrics
        (arbitrary names from clients must not create series)."""
        stats = [self.metrics.model(n) for n in dict.fromkeys(names) if n in self.models or n in self.ensembles]
        return RequestRecord(stats, api)

    def infer(self, name: str, version: str, batch: np.ndarray, deadline: float | None = None,
              fusion: str | None = None, submitted: list | None = None) -> InferResult:
        """Run a uint8 batch on a model (through its batcher) or an ensemble (members concurrently, fused).

        `submitted` (optional) collects the queued requests (batching.Pending), so that a caller
        whose client went away can cancel them: a cancelled request is not run.
        """
        target = self.ready_model(name, version)
        if isinstance(target, ServedModel):
            pending = target.batcher.submit(batch, deadline)
            if submitted is not None:
                submitted.append(pending)
            run = pending.result()
            return InferResult(name, str(target.version), run.probabilities, {name: run})
        fusion = check_fusion(fusion or target.ensemble.fusion)
        self.input_spec(name)  # members must take one input (Classify resizes per member instead)
        members = self.members(name)
        pending = {m.name: m.batcher.submit(batch, deadline) for m in members}
        if submitted is not None:
            submitted.extend(pending.values())
        runs = {m: p.result() for m, p in pending.items()}
        scores, _ = rank([r.probabilities for r in runs.values()], fusion, target.ensemble.temperatures)
        return InferResult(name, "1", scores.astype(np.float32), runs)

    def classify(self, image: bytes, names: Sequence[str] = (), top: int = 5, fusion: str = "",
                 deadline: float | None = None, submitted: list | None = None) -> ClassifyResult:
        """Decode once, resize once per input size, run every model concurrently, fuse per ensemble.
        (`submitted`: as for infer.)"""
        t_start = time.perf_counter()
        if fusion:
            check_fusion(fusion)
        if top < 0:
            raise InvalidInputError(f"received top_k={top}; expected a positive number (0 = default 5)")
        top = top or 5
        names = [n for n in names if n] or self._default_targets()
        targets = [self.ready_model(n) for n in dict.fromkeys(names)]
        unique: dict[str, ServedModel] = {}  # each model runs once, however often it is named
        for target in targets:
            for member in self.members(target.name):
                unique.setdefault(member.name, member)
        models = list(unique.values())
        sizes = {(m.runner.image_size, m.resize) for m in models}  # each model's size and resize mode
        needed = [images.decode_size(size, mode) for size, mode in sizes]
        biggest = (max(h for h, _ in needed), max(w for _, w in needed))
        t0 = time.perf_counter()
        picture = images.decode(image, min_size=biggest, max_pixels=self.max_pixels)
        pixels = {(size, mode): images.resize(picture, size, mode)[None] for size, mode in sizes}
        decode_s = time.perf_counter() - t0
        pending = {m.name: m.batcher.submit(pixels[(m.runner.image_size, m.resize)], deadline) for m in models}
        if submitted is not None:
            submitted.extend(pending.values())
        runs = {name: p.result() for name, p in pending.items()}
        answers = []
        for m in models:
            probs = runs[m.name].probabilities[0]
            order = np.argsort(-probs, kind="stable")[: min(top, probs.shape[0])]
            answers.append(ModelAnswer(m.name, str(m.version), [(self._label(m, i), int(i), float(probs[i]))
                                                                 for i in order], runs[m.name], m.runner.image_size))
        fused = []
        for target in targets:
            if isinstance(target, ServedEnsemble):
                fused.append(self._fuse(target.name, list(target.ensemble.members), fusion or target.ensemble.fusion,
                                        runs, top, target.ensemble.temperatures))
        if not fused and len(models) > 1 and self._share_labels(models):
            fused.append(self._fuse("ensemble", [m.name for m in models], fusion or "mean", runs, top))
        return ClassifyResult(answers, fused, (picture.height, picture.width), decode_s,
                              time.perf_counter() - t_start)

    def _default_targets(self) -> list[str]:
        """The first ready ensemble, else every ready model."""
        for served in self.ensembles.values():
            if served.ready:
                return [served.name]
        ready = [m.name for m in self.models.values() if m.ready]
        if not ready:
            raise ModelLoadError("no model is ready on this server")
        return ready

    def _share_labels(self, models: list[ServedModel]) -> bool:
        first = models[0].runner
        return all(m.runner.labels == first.labels and m.runner.output_spec.shape == first.output_spec.shape
                   for m in models[1:])

    @staticmethod
    def _label(model: ServedModel, index: int) -> str:
        labels = model.runner.labels
        return labels[index] if labels and index < len(labels) else str(int(index))

    def _fuse(self, name: str, members: list[str], fusion: str, runs: dict[str, BatchResult],
              top: int, temperatures=None) -> EnsembleAnswer:
        scores, order = rank([runs[m].probabilities for m in members], fusion, temperatures)
        model = self.models[members[0]]
        picks = top_k(scores, order, top)[0]
        return EnsembleAnswer(name, fusion, members, [(self._label(model, i), i, s) for i, s in picks])

