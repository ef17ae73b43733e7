"""The models a server holds: each model's versions, their states, and the handles requests hold.

    registry = ModelRegistry(repository, start=hub.start_version, metrics=metrics)
    registry.load("a")                    # the versions its version_policy names; returns once READY or failed
    with registry.acquire("a") as handle: # the highest READY version, kept alive while the request runs
        handle.versions[0].batcher.submit(...)
    registry.unload("a")                  # no new requests at once; returns once those it had are answered
    registry.index()                      # one row per model and version: state and reason

States (Triton's names): LOADING -> READY -> UNLOADING -> UNAVAILABLE; a failed load is UNAVAILABLE with its reason.

- A load prepares every version it adds (runner loaded, warmed up, batcher started) while the versions already
  serving go on serving, then swaps them in under one lock: unversioned requests go to the highest READY version
  from the next request on. If any version of the call fails, nothing from that call serves, the versions that
  served before stay READY, and the index shows the failure's reason.
- A version whose content did not change (configuration, labels, every file of its folder) is kept, not
  reloaded, unless the load is forced.
- A version that leaves (unloaded, replaced, or no longer named by the version policy) takes no new request at
  once; the requests holding it finish; then its batcher stops and its runner is closed, in the background.
- Operations on one model run one at a time, and a newer one wins: an older one still waiting or loading stops
  with SupersededError. Operations on different models run concurrently and never block inference.
- Ensembles are served through their members' READY versions, acquired together for each request: reloading a
  member never makes an ensemble unavailable; unloading one does, with a reason naming it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from google.protobuf import text_format

from .ensemble import Ensemble
from .errors import (ConfigError, InvalidInputError, KestrelError, ModelLoadError, ModelNotFoundError,
                     ServerUnavailableError, SupersededError, shown)
from .repository import ModelEntry, ModelRepository, TensorSpec

log = logging.getLogger(__name__)

LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"
DRAIN_TIMEOUT_S = 30.0  # a leaving version's requests get this long before what remains fails UNAVAILABLE
ENSEMBLE_VERSION = "1"


class ModelVersion:
    """One version of one model: its runner and batcher while loaded, and the requests holding it."""

    def __init__(self, name: str, version: int, entry: ModelEntry, stats, fingerprint: str = ""):
        self.name, self.version, self.entry, self.stats = name, version, entry, stats
        self.fingerprint = fingerprint
        self.runner = None
        self.batcher = None
        self.state, self.reason = LOADING, "loading"
        self._refs = 0
        self._routable = False  # requests may acquire it (READY and not leaving)
        self._idle = threading.Condition()
        self.closed = threading.Event()

    @property
    def label(self) -> str:
        return str(self.version)

    # ---- the contract -----------------------------------------------------------------------------
    @property
    def platform(self) -> str:
        return self.entry.platform

    @property
    def input_spec(self):
        return self.entry.input_spec

    @property
    def output_spec(self):
        return self.entry.output_spec

    @property
    def max_batch_size(self) -> int:
        return self.entry.max_batch_size

    @property
    def resize(self) -> str:
        return self.entry.resize

    @property
    def labels(self) -> list[str] | None:
        return self.runner.labels if self.runner is not None else self.entry.labels()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.runner.image_size

    # ---- health and references ---------------------------------------------------------------------
    def health(self) -> str | None:
        """None while it serves; else why not (every batch failing, a worker gone)."""
        batcher = self.batcher
        return batcher.health() if batcher is not None and hasattr(batcher, "health") else None

    @property
    def ready(self) -> bool:
        return self._routable and self.state == READY and self.health() is None

    def _acquire(self) -> bool:
        with self._idle:
            if not self._routable:
                return False
            self._refs += 1
            return True

    def _release(self) -> None:
        with self._idle:
            self._refs -= 1
            if self._refs <= 0:
                self._idle.notify_all()

    def _retire(self, reason: str) -> None:
        with self._idle:
            self._routable = False
            self.state, self.reason = UNLOADING, reason

    def wait_idle(self, deadline: float | None) -> bool:
        """Wait until no request holds this version (True), or `deadline` passed (False)."""
        with self._idle:
            while self._refs > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    @property
    def holders(self) -> int:
        with self._idle:
            return self._refs


class ModelRecord:
    """Everything the server holds of one model name: its serving versions and the story of its loads."""

    def __init__(self, name: str):
        self.name = name
        self.entry: ModelEntry | None = None  # the configuration the serving versions were loaded with
        self.versions: dict[int, ModelVersion] = {}  # READY, routable
        self.loading: dict[int, ModelVersion] = {}  # being prepared by the current load
        self.draining: list[ModelVersion] = []  # leaving: finishing their requests, then closed
        self.failures: dict[str, str] = {}  # version ("" = the model) -> reason of the last failed load
        self.gone: dict[int, str] = {}  # versions that left -> why (for the index)
        self.unloaded: str | None = "not loaded"  # why nothing serves on purpose (None once loaded)
        self.op_lock = threading.Lock()
        self._generation = 0
        self._tickets = threading.Lock()

    # ---- operations: the newer wins ------------------------------------------------------------------
    def ticket(self) -> int:
        with self._tickets:
            self._generation += 1
            return self._generation

    def check(self, ticket: int, what: str) -> None:
        """SupersededError when another operation on this model was asked for after this one."""
        if ticket != self._generation:
            raise SupersededError(f"model '{self.name}': this {what} was superseded by a newer load or unload of "
                                  "the same model, which decides its state")

    # ---- views -------------------------------------------------------------------------------------
    def serving(self) -> list[ModelVersion]:
        """Routable versions, highest first."""
        return [self.versions[v] for v in sorted(self.versions, reverse=True) if self.versions[v]._routable]

    @property
    def latest(self) -> ModelVersion | None:
        serving = self.serving()
        return serving[0] if serving else None

    @property
    def ready(self) -> bool:
        return any(v.ready for v in self.serving())

    # the latest serving version's parts (in-process users and tests; requests hold a Handle instead)
    @property
    def version(self) -> int | None:
        latest = self.latest
        return latest.version if latest is not None else None

    @property
    def runner(self):
        latest = self.latest
        return latest.runner if latest is not None else None

    @property
    def batcher(self):
        latest = self.latest
        return latest.batcher if latest is not None else None

    @property
    def stats(self):
        latest = self.latest
        return latest.stats if latest is not None else None

    @property
    def resize(self) -> str:
        return (self.latest.entry if self.latest is not None else self.entry).resize

    @property
    def reason(self) -> str:
        """Why the model does not serve (empty when a version is READY)."""
        serving = self.serving()
        if any(v.ready for v in serving):
            return ""
        for version in serving:
            health = version.health()
            if health:
                return health
        if self.loading:
            return "loading version(s) " + ", ".join(str(v) for v in sorted(self.loading))
        if self.failures:
            return "; ".join(self.failures.values())
        return self.unloaded or "not loaded"

    @property
    def state(self) -> str:
        if self.ready:
            return READY
        if self.loading and not self.serving():
            return LOADING
        if self.draining and not self.serving():
            return UNLOADING
        return UNAVAILABLE


@dataclass
class EnsembleRecord:
    """An ensemble the server serves through its members (loaded = asked for; ready = members ready)."""

    ensemble: Ensemble
    stats: object = None
    loaded: bool = True
    reason: str = ""  # why it is not loaded
    registry: "ModelRegistry | None" = None

    @property
    def name(self) -> str:
        return self.ensemble.name

    @property
    def state(self) -> str:
        return self.registry.ensemble_state(self)[0]

    @property
    def ready(self) -> bool:
        return self.state == READY


def shared_input_spec(name: str, specs) -> TensorSpec:
    """The one input spec of a model, or of an ensemble whose members must share it to take one tensor."""
    unique = set(specs)
    if len(unique) != 1:
        raise InvalidInputError(
            f"ensemble '{name}' members take different inputs ({sorted(str(s.shape) for s in unique)}); "
            "send images through Classify, or infer each member"
        )
    return next(iter(unique))


class Handle:
    """What one request holds: the model version it runs on, or an ensemble's member versions (in member
    order). Released once, when the request ends; a version leaves only after its last handle is released."""

    __slots__ = ("name", "versions", "ensemble", "_released")

    def __init__(self, name: str, versions: list[ModelVersion], ensemble: EnsembleRecord | None = None):
        self.name, self.versions, self.ensemble = name, versions, ensemble
        self._released = False

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble is not None

    @property
    def input_spec(self) -> TensorSpec:
        """The input a V2 request to this target must match (InvalidInputError: members that differ)."""
        return shared_input_spec(self.name, (v.input_spec for v in self.versions))

    @property
    def version(self) -> str:
        """The version that answers: the model's, or the ensemble's ("1")."""
        return ENSEMBLE_VERSION if self.ensemble is not None else self.versions[0].label

    def release(self) -> None:
        if not self._released:
            self._released = True
            for version in self.versions:
                version._release()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---- what decides whether a version changed: its content, not its timestamps ------------------------------
_DIGESTS: dict[str, tuple[tuple, str]] = {}  # path -> (stat key, sha256): a file is re-read only when its stat changed
_DIGESTS_LOCK = threading.Lock()


def _file_digest(path) -> str:
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _DIGESTS_LOCK:
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        _DIGESTS[str(path)] = (key, value)
    return value


def fingerprint(entry: ModelEntry, version: int) -> str:
    """A digest of what a version serves: its configuration, labels and every file of its version folder."""
    digest = hashlib.sha256(text_format.MessageToString(entry.config).encode())
    label_file = entry.config.output[0].label_filename if entry.config.output else ""
    if label_file and (entry.path / label_file).is_file():
        digest.update(b"labels:" + _file_digest(entry.path / label_file).encode())
    folder = entry.path / str(version)
    for path in entry.version_files(version):
        digest.update(str(path.relative_to(folder)).encode() + b":" + _file_digest(path).encode())
    return digest.hexdigest()


def not_loaded(name: str, version: str, loaded: list[str]) -> str:
    """The message for a version that is not loaded (names the ones that are)."""
    which = shown(str(version))[1:-1]
    if len(loaded) == 1:
        return f"model '{name}' has no version {which} loaded; loaded version: {loaded[0]}"
    return f"model '{name}' has no version {which} loaded; loaded versions: {', '.join(loaded) or 'none'}"


def version_text(name: str, version) -> str:
    """A requested model version as text: "" (none: the highest READY) or digits; else ModelNotFoundError."""
    text = "" if version in (None, "", 0) else str(version)
    if text and not text.isdigit():
        raise ModelNotFoundError(f"model '{name}': received version {shown(text)}, expected a number (or empty)")
    return text


def check_ensemble_version(name: str, version) -> None:
    """An ensemble has one version, ENSEMBLE_VERSION; any other but none is ModelNotFoundError."""
    text = "" if version in (None, "", 0) else str(version)
    if text and text != ENSEMBLE_VERSION:
        raise ModelNotFoundError(not_loaded(name, text, [ENSEMBLE_VERSION]))


def trim_heap() -> None:
    """Give the heap memory a closed version freed back to the system (glibc's malloc_trim). A closed
    onnxruntime session frees its buffers, but glibc keeps them in its arenas: without this, RSS grew
    with every load/unload cycle (mobilenet_v2: 150 -> 217 MB over 190 cycles; with it, flat)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        import gc

        gc.collect()
        _LIBC.malloc_trim(0)


_LIBC = None


StartVersion = Callable[[ModelEntry, int, object], tuple]  # (entry, version, stats) -> (runner, batcher)


class ModelRegistry:
    """Models, versions, states and handles (see the module docstring)."""

    def __init__(self, repository: ModelRepository, *, start: StartVersion, metrics,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S):
        self.repository = repository
        self._start = start
        self.metrics = metrics
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.RLock()
        self._records: dict[str, ModelRecord] = {}
        self._ensembles: dict[str, EnsembleRecord] = {}
        self._drains: set[threading.Thread] = set()
        self.closing = False

    # ---- names ---------------------------------------------------------------------------------------
    @property
    def records(self) -> dict[str, ModelRecord]:
        with self._lock:
            return dict(self._records)

    @property
    def ensembles(self) -> dict[str, EnsembleRecord]:
        with self._lock:
            return dict(self._ensembles)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._records) + list(self._ensembles)

    def add_ensemble(self, ensemble: Ensemble, loaded: bool = True) -> EnsembleRecord:
        with self._lock:
            if ensemble.name in self._records:
                raise ConfigError(f"ensemble '{ensemble.name}' has the name of a model; expected distinct names")
            record = self._ensembles.get(ensemble.name)
            if record is None:
                record = EnsembleRecord(ensemble, self.metrics.model(ensemble.name, ENSEMBLE_VERSION), loaded,
                                        registry=self)
                self._ensembles[ensemble.name] = record
                self.metrics.watch_model(ensemble.name, lambda r=record: self.ensemble_state(r)[0] == READY,
                                         lambda: 0)
            else:
                record.ensemble, record.loaded, record.reason = ensemble, loaded, ""
            return record

    def record(self, name: str) -> ModelRecord:
        """The record of model `name`, made on first use (the name must be a model of the repository)."""
        with self._lock:
            record = self._records.get(name)
            if record is not None:
                return record
            if name in self._ensembles:
                raise ConfigError(f"'{name}' is an ensemble, not a model")
            self.repository.folder(name)  # a name that stays inside the repository
            if name not in self.repository.names():
                raise self._unknown(name)
            record = self._records[name] = ModelRecord(name)
            self.metrics.watch_model(name, lambda r=record: r.ready,
                                     lambda r=record: sum(v.batcher.queued for v in r.serving()
                                                          if v.batcher is not None))
            return record

    def _unknown(self, name: str) -> ModelNotFoundError:
        known = sorted(set(self.repository.names()) | set(self._records) | set(self._ensembles))
        return ModelNotFoundError(f"received model name {shown(name)}, which this server does not serve; "
                                  f"expected one of: {', '.join(known) or 'none'}")

    def find(self, name: str) -> ModelRecord | EnsembleRecord:
        """The record of a model or ensemble this server knows (any state); ModelNotFoundError otherwise."""
        with self._lock:
            if name in self._records:
                return self._records[name]
            if name in self._ensembles:
                return self._ensembles[name]
        raise self._unknown(name)

    # ---- requests --------------------------------------------------------------------------------------
    def acquire(self, name: str, version: str = "") -> Handle:
        """A handle on the model's version (`version`, or the highest READY one) or on an ensemble's members.
        ModelNotFoundError for an unknown name or version; ModelLoadError when it does not serve now."""
        with self._lock:
            if self.closing:
                raise ServerUnavailableError("the server is shutting down; retry elsewhere")
            if name in self._ensembles:
                return self._acquire_ensemble(self._ensembles[name], version)
            record = self._records.get(name)
            if record is not None:
                return Handle(name, [self._acquire_version(record, version)])
        # not served: the repository's folders are read outside the lock every request takes
        if isinstance(name, str) and name in self.repository.names():
            raise ModelLoadError(f"model '{name}' is not ready: not loaded")
        raise self._unknown(name)

    def _acquire_version(self, record: ModelRecord, version: str | int = "") -> ModelVersion:
        text = version_text(record.name, version)
        serving = record.serving()
        if text:
            chosen = record.versions.get(int(text))
            if chosen is None or not chosen._routable:
                raise ModelNotFoundError(not_loaded(record.name, text, [v.label for v in serving]))
            serving = [chosen]
        for candidate in serving:
            if candidate._acquire():
                return candidate
        raise ModelLoadError(f"model '{record.name}' is not ready: {record.reason}")

    def _acquire_ensemble(self, record: EnsembleRecord, version: str) -> Handle:
        check_ensemble_version(record.name, version)
        if not record.loaded:
            raise ModelLoadError(f"ensemble '{record.name}' is not ready: {record.reason or 'unloaded'}")
        held: list[ModelVersion] = []
        try:
            for member in record.ensemble.members:
                member_record = self._records.get(member)
                if member_record is None:
                    raise ModelLoadError(f"ensemble '{record.name}' is not ready: member '{member}' is not loaded")
                try:
                    held.append(self._acquire_version(member_record))
                except ModelLoadError:
                    raise ModelLoadError(f"ensemble '{record.name}' is not ready: member '{member}': "
                                         f"{member_record.reason}") from None
        except BaseException:
            for version_held in held:
                version_held._release()
            raise
        return Handle(record.name, held, record)

    # ---- states ----------------------------------------------------------------------------------------
    def ensemble_state(self, record: EnsembleRecord) -> tuple[str, str]:
        if self.closing:
            return UNAVAILABLE, "server shut down"
        if not record.loaded:
            return UNAVAILABLE, record.reason or "unloaded"
        missing = []
        for member in record.ensemble.members:
            member_record = self._records.get(member)
            if member_record is None:
                missing.append(f"{member}: not loaded")
            elif not member_record.ready:
                missing.append(f"{member}: {member_record.reason}")
        if missing:
            return UNAVAILABLE, "members not ready: " + "; ".join(missing)
        return READY, ""

    def state(self, name: str) -> tuple[str, str]:
        """(state, reason) of a model or ensemble."""
        target = self.find(name)
        if isinstance(target, EnsembleRecord):
            return self.ensemble_state(target)
        if self.closing:
            return UNAVAILABLE, "server shut down"
        return target.state, target.reason

    def ready(self, name: str, version: str = "") -> bool:
        target = self.find(name)
        if isinstance(target, EnsembleRecord):
            check_ensemble_version(name, version)
            return self.ensemble_state(target)[0] == READY
        if self.closing:
            return False
        text = version_text(name, version)
        if text:
            chosen = target.versions.get(int(text))
            if chosen is None:
                raise ModelNotFoundError(not_loaded(name, text, [v.label for v in target.serving()]))
            return chosen.ready
        return target.ready

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: a row per model version the server knows (every model of the repository,
        loaded or not), and one per ensemble, with its state and reason."""
        rows = []
        with self._lock:
            names = sorted(set(self.repository.names()) | set(self._records))
            for name in names:
                record = self._records.get(name)
                if record is None:
                    rows.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": "not loaded"})
                    continue
                mine: dict[str, dict] = {}
                for version in record.serving():
                    health = version.health()
                    failed = record.failures.get(version.label) or record.failures.get("")
                    reason = health or (f"the last load failed ({failed}); the version loaded before serves"
                                        if failed else "")
                    mine[version.label] = {"name": name, "version": version.label,
                                           "state": READY if health is None else UNAVAILABLE, "reason": reason}
                for version in record.loading.values():
                    mine.setdefault(version.label, {"name": name, "version": version.label, "state": LOADING,
                                                    "reason": version.reason})
                for version in record.draining:
                    mine.setdefault(version.label, {"name": name, "version": version.label, "state": UNLOADING,
                                                    "reason": version.reason})
                for label, reason in record.failures.items():
                    if label:
                        mine.setdefault(label, {"name": name, "version": label, "state": UNAVAILABLE,
                                                "reason": reason})
                for number, reason in record.gone.items():
                    mine.setdefault(str(number), {"name": name, "version": str(number), "state": UNAVAILABLE,
                                                  "reason": reason})
                if not mine or (record.failures.get("") and not record.serving()):
                    rows.append({"name": name, "version": "", "state": record.state, "reason": record.reason})
                rows.extend(mine[label] for label in sorted(mine, key=lambda s: int(s) if s.isdigit() else -1))
            for record in self._ensembles.values():
                state, reason = self.ensemble_state(record)
                rows.append({"name": record.name, "version": ENSEMBLE_VERSION, "state": state, "reason": reason})
        return [row for row in rows if not ready_only or row["state"] == READY]

    # ---- operations --------------------------------------------------------------------------------------
    def is_ensemble(self, name: str) -> bool:
        with self._lock:
            if name in self._ensembles:
                return True
        return name in self.repository.ensemble_names()

    def load(self, name: str, *, config=None, force: bool = False) -> list[int]:
        """Load (or reload) model `name` as its version policy says; returns the versions now serving.
        `config`: a ModelConfig used instead of config.pbtxt. Raises what made the load fail; then nothing of
        this call serves and the versions serving before go on. An ensemble: its members are loaded (each as
        above), then it serves again."""
        if self.closing:
            raise ServerUnavailableError("the server is shutting down; models are not loaded any more")
        if self.is_ensemble(name):
            if config is not None:
                raise ConfigError(f"'{name}' is an ensemble: a \"config\" parameter applies to a model")
            self.load_ensemble(name, force=force)
            return [int(ENSEMBLE_VERSION)]
        record = self.record(name)
        ticket = record.ticket()
        with record.op_lock:
            record.check(ticket, "load")
            t0 = time.perf_counter()
            try:
                entry = self.repository.entry(name, config)
                wanted = entry.policy_versions()
                if not wanted:
                    entry.artifact()  # raises with the reason (no version folder with the artifact)
                prints = {v: fingerprint(entry, v) for v in wanted}
            except KestrelError as exc:
                with self._lock:
                    record.failures = {"": str(exc)}
                raise
            except OSError as exc:
                with self._lock:
                    record.failures = {"": f"cannot read model '{name}': {exc}"}
                raise ModelLoadError(record.failures[""]) from None
            with self._lock:
                start = [v for v in wanted if force or v not in record.versions
                         or record.versions[v].fingerprint != prints[v] or not record.versions[v]._routable]
                for v in start:
                    record.loading[v] = ModelVersion(name, v, entry, self.metrics.model(name, str(v)), prints[v])
            failed_version = None
            try:
                for v in start:
                    failed_version = v
                    version = record.loading[v]
                    version.runner, version.batcher = self._start(entry, v, version.stats)
                    record.check(ticket, "load")
                failed_version = None
                if self.closing:
                    raise ServerUnavailableError("the server is shutting down; models are not loaded any more")
            except BaseException as exc:
                with self._lock:
                    started = list(record.loading.values())
                    record.loading.clear()
                    reason = str(exc) if isinstance(exc, KestrelError) else f"{type(exc).__name__}: {exc}"
                    if not isinstance(exc, SupersededError):
                        record.failures = {str(failed_version) if failed_version is not None else "": reason}
                for version in started:
                    self._close_now(version, "load failed" if not isinstance(exc, SupersededError) else "superseded")
                if isinstance(exc, KestrelError):
                    raise
                raise ModelLoadError(f"model '{name}' failed to load: {reason}") from exc
            with self._lock:  # the swap: new versions serve from the next request on
                leaving = []
                for v in start:
                    version = record.loading.pop(v)
                    version.state, version.reason = READY, ""
                    old = record.versions.get(v)
                    if old is not None:
                        leaving.append((old, f"replaced by a new load of version {v}"))
                    record.versions[v] = version
                    version._routable = True
                    record.gone.pop(v, None)
                for v in list(record.versions):
                    if v not in wanted:
                        leaving.append((record.versions.pop(v), "unloaded: no longer named by the version policy"))
                for old, why in leaving:
                    old._retire(why)
                    record.draining.append(old)
                record.entry = entry
                record.failures = {}
                record.unloaded = None
            for old, why in leaving:
                self._drain_later(record, old, why)
            if start:
                log.info("model %s: version(s) %s loaded (%s) in %.2f s%s", name, ", ".join(map(str, start)),
                         entry.platform, time.perf_counter() - t0,
                         f"; kept {', '.join(str(v) for v in wanted if v not in start)}" if len(start) < len(wanted)
                         else "")
            return sorted(wanted)

    def load_ensemble(self, name: str, *, force: bool = False) -> EnsembleRecord:
        """Load an ensemble: its definition read again (a repository folder; or the one given at start), each
        member loaded (unchanged ones are kept), the members' labels checked, then it serves."""
        with self._lock:
            current = self._ensembles.get(name)
        if name in self.repository.ensemble_names():
            ensemble = Ensemble.from_entry(self.repository.ensemble(name))
        elif current is not None:
            ensemble = current.ensemble
        else:
            raise self._unknown(name)
        for member in ensemble.members:
            self.load(member, force=force)
        labels, classes = {}, {}
        for member in ensemble.members:
            latest = self._records[member].latest
            if latest is not None:
                labels[member], classes[member] = latest.labels, int(latest.output_spec.shape[0])
        if len(labels) > 1:
            Ensemble(ensemble.name, tuple(labels), ensemble.fusion).check_labels(labels, classes)
        return self.add_ensemble(ensemble, loaded=True)

    def unload(self, name: str, *, unload_dependents: bool = False, timeout: float | None = None) -> None:
        """Stop serving `name`: new requests are refused at once; returns once the requests that held it are
        answered and its versions are closed (or after `timeout` seconds, the close then goes on in the
        background). An ensemble: unloaded; with `unload_dependents` its members too (those no other loaded
        ensemble uses). Unloading what is not loaded succeeds."""
        with self._lock:
            ensemble = self._ensembles.get(name)
        if ensemble is not None:
            with self._lock:
                ensemble.loaded, ensemble.reason = False, "unloaded"
                others = {m for e in self._ensembles.values() if e.loaded and e is not ensemble
                          for m in e.ensemble.members}
            if unload_dependents:
                for member in ensemble.ensemble.members:
                    if member not in others and member in self._records:
                        self.unload(member, timeout=timeout)
            return
        record = self.record(name)
        ticket = record.ticket()
        with record.op_lock:
            record.check(ticket, "unload")
            with self._lock:
                leaving = list(record.versions.values())
                record.versions.clear()
                for version in leaving:
                    version._retire("unloaded")
                    record.draining.append(version)
                record.failures = {}
                record.unloaded = "unloaded"
            threads = [self._drain_later(record, version, "unloaded") for version in leaving]
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if leaving:
            log.info("model %s: unloaded (version(s) %s)", name, ", ".join(v.label for v in leaving))

    # ---- leaving versions ----------------------------------------------------------------------------------
    def _drain_later(self, record: ModelRecord, version: ModelVersion, why: str) -> threading.Thread:
        thread = threading.Thread(target=self._drain, args=(record, version, why), daemon=True,
                                  name=f"drain-{version.name}-{version.label}")
        with self._lock:
            self._drains.add(thread)
        thread.start()
        return thread

    def _drain(self, record: ModelRecord, version: ModelVersion, why: str) -> None:
        try:
            deadline = time.monotonic() + self.drain_timeout_s
            if not version.wait_idle(deadline):
                log.warning("model %s version %s: %d request(s) still held it after %.0f s; they fail UNAVAILABLE",
                            version.name, version.label, version.holders, self.drain_timeout_s)
            self._close_now(version, why, deadline=max(deadline, time.monotonic() + 1.0))
            with self._lock:
                if version in record.draining:
                    record.draining.remove(version)
                if version.version not in record.versions:
                    record.gone[version.version] = why
        finally:
            with self._lock:
                self._drains.discard(threading.current_thread())

    def _close_now(self, version: ModelVersion, why: str, deadline: float | None = None, *,
                   trim: bool = True) -> None:
        """Stop the version's batcher (which closes its runner once its workers stopped) and forget both."""
        version._retire(why)
        batcher, runner = version.batcher, version.runner
        try:
            if batcher is not None:
                batcher.close(deadline=deadline if deadline is not None else time.monotonic() + 1.0)
                batcher.wait_stopped(1.0)
                if not batcher.close_runner and runner is not None:
                    runner.close()
            elif runner is not None:
                runner.close()
        except Exception as exc:  # noqa: BLE001 - a close that fails must not stop the others
            log.warning("model %s version %s: close failed: %s: %s", version.name, version.label,
                        type(exc).__name__, exc)
        if version.stats is not None and batcher is not None:
            version.stats.unwatch_queue(batcher)
        version.state, version.reason = UNAVAILABLE, why
        version.batcher = version.runner = None
        batcher = runner = None
        if trim:
            trim_heap()
        version.closed.set()

    def close(self, deadline: float | None = None) -> None:
        """Server shutdown: nothing is acquired any more; every batcher stops taking requests, runs what it
        holds until `deadline` (one deadline for all models), then its runner is closed."""
        with self._lock:
            self.closing = True
            versions = []
            for record in self._records.values():
                versions += list(record.versions.values()) + list(record.loading.values()) + record.draining
                for version in record.versions.values():
                    version._routable = False
        for version in versions:
            if version.batcher is not None:
                version.batcher.stop_accepting()
        for version in versions:
            self._close_now(version, "server shut down", deadline, trim=False)
        if versions:
            trim_heap()  # once for all: a garbage collection and malloc_trim per version added up at shutdown
        with self._lock:
            drains = list(self._drains)
        for thread in drains:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
