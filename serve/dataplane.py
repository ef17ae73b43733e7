"""The KServe V2 data plane, once, for every transport (the role of KServe's protocol/dataplane.py
and MLServer's handlers/dataplane.py).

    plane = DataPlane(hub)                       # hub: a loaded serve.hub.ModelHub
    plane.model_metadata("a")                    # -> {"name", "versions", "platform", "inputs", "outputs"}
    response = plane.infer(InferRequest("a", inputs=[InferInput("images", "UINT8", [1, 32, 32, 3], raw=data)]))
    response.outputs[0].data                     # -> np.ndarray (FP32), or object array of bytes (BYTES)
    plane.classify(jpeg_bytes, ["trio"], top_k=3)          # -> serve.hub.ClassifyResult
    with plane.request("infer") as scope:        # a transport's request: in flight, metrics, its handles
        plane.infer(request, scope)

One request, one lookup: the scope acquires the request's target once (a registry handle that keeps the
model version alive until the request ends), counts its metrics against what answers (the model versions
and ensembles it ran on), and at its end cancels whatever of its work is still queued. The input tensor,
the fusion and top-k are checked once, here.

Everything here takes and returns plain values (str, int, lists, dicts, numpy arrays, the
repository's ModelConfig message); the gRPC servicers (serve/servicers.py) and the HTTP app
(serve/http) are codecs around it. Errors are serve.errors exceptions; serve.errors.STATUS maps
each to its gRPC code and HTTP status. Nothing here imports grpc or an HTTP library.
"""

from __future__ import annotations

import importlib.metadata
import math
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import datatypes
from ._proto import model_config_pb2
from ._cancel import CancelOnEnd
from .ensemble import FUSIONS, check_top_k, top_k
from .errors import (ConfigError, ControlModeError, InvalidInputError, KestrelError, ModelLoadError,
                     ModelNotFoundError, ServerUnavailableError, shown, status_of)
from .hub import ENSEMBLE_PLATFORM, ClassifyResult, ModelHub, Targets
from .metrics import RequestRecord
from .registry import (ENSEMBLE_VERSION, EnsembleRecord, Handle, ModelRecord, check_ensemble_version, not_loaded,
                       shared_input_spec)
from .repository import config_from_json

log = logging.getLogger(__name__)

SERVER_NAME = "kestrel"
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository",
              "model_repository(unload_dependents)", "kestrel_classify"]
JSON_OVERHEAD_BYTES = 64 * 1024  # room for the rest of a JSON infer request (names, parameters, whitespace)


def server_version() -> str:
    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# ---- requests and responses as plain values -------------------------------------------------
@dataclass
class InferInput:
    """One input tensor as a transport decoded it: `raw` little-endian bytes, or `values` (a
    sequence or array). `source` names where the data came from, for messages; `hint` says what
    was expected when neither is present."""

    name: Any
    datatype: Any
    shape: Any
    raw: bytes | memoryview | None = None
    values: Any = None
    source: str = "the request"
    hint: str = "tensor data"


@dataclass
class RequestedOutput:
    name: Any
    classification: int = 0  # > 0: the classification extension's top-k strings instead of scores
    parameters: dict = field(default_factory=dict)  # transport options (e.g. HTTP binary_data)


@dataclass
class InferRequest:
    model: str
    version: str = ""
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: the model's output
    id: str = ""
    fusion: str | None = None  # ensembles only
    deadline: float | None = None  # time.monotonic() value


@dataclass
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: list[int]
    data: np.ndarray  # float32 (N, C), or an object array of bytes (N, k) for BYTES
    parameters: dict = field(default_factory=dict)  # the RequestedOutput's, for the codec


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


# ---- tensors --------------------------------------------------------------------------------
def tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def input_array(model: str, spec, inputs: Sequence[InferInput], max_batch_size: int = 0) -> np.ndarray:
    """The request's one input tensor as a numpy array, checked against the model's input spec (and its
    max_batch_size): the one check a request's tensor gets."""
    if len(inputs) != 1:
        raise InvalidInputError(
            f"model '{model}': received {len(inputs)} input tensors, expected exactly 1 ('{spec.name}')"
        )
    tensor = inputs[0]
    if tensor.name != spec.name:
        raise InvalidInputError(f"model '{model}': received input {shown(tensor.name)}, expected {spec.name!r}")
    dtype = datatypes.from_v2(tensor.datatype) if isinstance(tensor.datatype, str) else None
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received datatype {shown(tensor.datatype)}, "
            f"expected {spec.datatype!r}"
        )
    expected = ["N", *spec.shape]
    raw_shape = tensor.shape
    if not isinstance(raw_shape, (list, tuple)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in raw_shape):
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received shape {shown(raw_shape)}, expected a list of integers "
            f"{expected} (-1 = any)"
        )
    shape = tuple(int(d) for d in raw_shape)
    if len(shape) != len(expected) or any(d < 0 for d in shape) or any(
            want != -1 and got != want for got, want in zip(shape[1:], spec.shape)):
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received shape {shown(list(shape))}, expected {expected} (-1 = any)"
        )
    if shape[0] == 0:
        raise InvalidInputError(f"model '{model}': received an empty batch, expected at least one image")
    if any(d == 0 for d in shape[1:]):
        raise InvalidInputError(f"model '{model}' input '{spec.name}': received shape {list(shape)}, expected "
                                "images of at least one pixel")
    if max_batch_size and shape[0] > max_batch_size:
        raise InvalidInputError(f"model '{model}': received a batch of {shape[0]}, expected at most "
                                f"max_batch_size={max_batch_size}")
    count = math.prod(shape)
    if tensor.raw is not None:
        want = count * dtype.itemsize
        if len(tensor.raw) != want:
            raise InvalidInputError(
                f"model '{model}' input '{spec.name}': received {len(tensor.raw)} bytes of {tensor.source}, "
                f"expected {want} bytes for shape {list(shape)} {tensor.datatype}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if tensor.values is None:
        raise InvalidInputError(f"model '{model}' input '{spec.name}': received no data; expected {tensor.hint}")
    try:
        values = np.asarray(tensor.values)
    except (ValueError, TypeError, RecursionError):
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received ragged or non-numeric {tensor.source}; expected a flat "
            f"or row-major nested list of {count} numbers"
        ) from None
    if values.size != count:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received {values.size} values in {tensor.source}, "
            f"expected {count} for shape {list(shape)}"
        )
    if dtype.kind in "iu":
        if values.size and values.dtype.kind not in "iu":
            raise InvalidInputError(
                f"model '{model}' input '{spec.name}': received {values.dtype.name} values in {tensor.source}, "
                f"expected integers for {tensor.datatype}"
            )
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise InvalidInputError(
                f"model '{model}' input '{spec.name}': received values in [{values.min()}, {values.max()}], "
                f"expected {tensor.datatype} values in [{info.min}, {info.max}]"
            )
    elif values.size and values.dtype.kind not in "iufb":
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}': received {values.dtype.name} values in {tensor.source}, "
            "expected numbers"
        )
    return values.astype(dtype).reshape(shape)


def classification(probs: np.ndarray, count: int, labels) -> np.ndarray:
    """Triton's classification extension: per row the top `count` classes as b"probability:index[:label]"."""
    rows = []
    for picks in top_k(probs, None, count):
        rows.append([(f"{p:f}:{i}" + (f":{labels[i]}" if labels and i < len(labels) and labels[i] else "")).encode()
                     for i, p in picks])
    return np.array(rows, dtype=object).reshape(probs.shape[0], len(rows[0]) if rows else 0)


def bytes_tensor(values) -> bytes:
    """A V2 BYTES tensor's raw contents: each element as a 4-byte little-endian length, then its bytes."""
    items = np.asarray(values, dtype=object).ravel()
    return b"".join(len(v).to_bytes(4, "little") + v for v in items)


def _value_chars(dtype: np.dtype) -> int:
    """Most characters one value of `dtype` takes in JSON, with its separator and a little whitespace."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return max(len(str(info.min)), len(str(info.max))) + 3
    if dtype.kind == "b":
        return 8  # "false, "
    return 28  # "-1.2345678901234567e-308, "


def flag(value, what: str) -> bool:
    """A true/false request parameter: a JSON boolean ("true" or 1 are refused)."""
    if isinstance(value, bool):
        return value
    raise InvalidInputError(f"received {what}={shown(value)}; expected true or false")


def target_max_batch(target: Handle) -> int:
    return min(max(1, v.max_batch_size) for v in target.versions)


def request_size_limit(target: Handle, binary: bool) -> int | None:
    """The most bytes a V2 infer request for `target` can need: max_batch_size images of its input,
    as JSON numbers or (binary) raw bytes after a JSON header. None when the input has dynamic dims."""
    spec = target.input_spec
    if any(d < 0 for d in spec.shape):
        return None
    values = target_max_batch(target) * int(np.prod(spec.shape))
    per_value = np.dtype(spec.dtype).itemsize if binary else _value_chars(np.dtype(spec.dtype))
    return JSON_OVERHEAD_BYTES + values * per_value


# ---- the data plane -------------------------------------------------------------------------
class RequestScope:
    """One work-carrying request: counted in flight (shutdown waits for it), its target acquired once and held
    until it ends, its metrics counted against what answered, its queued work cancelled when it ends.

    `label` turns the exception a request failed with into the status code name its metrics record;
    `submitted` collects its queued work (a transport ends it early when the client goes away)."""

    def __init__(self, plane: "DataPlane", api: str, label: Callable[[BaseException], str],
                 submitted: CancelOnEnd | None = None):
        self.plane, self.api, self.label = plane, api, label
        self.record = RequestRecord(api)
        self.targets: list[Handle] = []
        self.submitted = submitted if submitted is not None else CancelOnEnd()
        self.ended = False
        plane._begin()

    def __enter__(self) -> "RequestScope":
        if not self.plane.serving:
            error = ServerUnavailableError("the server is shutting down; retry elsewhere")
            self._end(error)
            raise error
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self._end(exc)
        return False

    @property
    def target(self) -> Handle | None:
        """The request's one target, once acquired (V2 infer)."""
        return self.targets[0] if len(self.targets) == 1 else None

    def acquire(self, name: str, version: str = "") -> Handle:
        """The request's target: a registry handle, held until the request ends (one lookup per request)."""
        if self.target is not None and self.target.name == name:
            return self.target
        handle = self.plane.hub.acquire(name, version or "")
        self._hold([handle])
        return handle

    def acquire_targets(self, names: Sequence[str]) -> Targets:
        """Classify's targets (the server's default ones when no names are given), held until the request ends."""
        targets = self.plane.hub.acquire_targets(names)
        self._hold(targets)
        return targets

    def _hold(self, handles) -> None:
        for handle in handles:
            self.targets.append(handle)
            stats = [handle.ensemble.stats] if handle.is_ensemble else []
            self.record.add(stats + [v.stats for v in handle.versions if v.stats is not None])

    def _end(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            self.submitted.end()  # siblings of a failed member, work of a request that failed: never run
            self.record.finish(None if exc is None else self.label(exc))
        finally:
            for handle in self.targets:
                handle.release()
            self.plane._end()


class DataPlane:
    """KServe V2 and Classify over a ModelHub, as plain values (see the module docstring).

    `serving()` turns False when shutdown begins: work-carrying requests are then refused
    with ServerUnavailableError (gRPC UNAVAILABLE, HTTP 503) and wait_idle() waits for the rest.
    """

    unload_timeout_s = 60.0  # an unload call waits at most this long for the requests holding the model

    def __init__(self, hub: ModelHub, serving: Callable[[], bool] = lambda: True):
        self.hub = hub
        self._serving = serving
        self._inflight = 0
        self._idle = threading.Condition()
        self.draining = False  # readiness false while work is still served (SIGTERM with --drain-delay)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return bool(self._serving())

    def request(self, api: str, label: Callable[[BaseException], str] = lambda exc: status_of(exc)[0],
                submitted: CancelOnEnd | None = None) -> RequestScope:
        """Context manager around one request's work (`label`: the failure code its metrics record)."""
        return RequestScope(self, api, label, submitted)

    @property
    def inflight(self) -> int:
        with self._idle:
            return self._inflight

    def _begin(self) -> None:
        with self._idle:
            self._inflight += 1

    def _end(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight (True), or `timeout` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    # ---- health and metadata -----------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.serving and not self.draining and self.hub.ready

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.serving and not self.draining and self.hub.registry.ready(name, version or "")

    def _entries(self, name: str, version: str = "") -> tuple[ModelRecord | EnsembleRecord, list]:
        """The record of `name` (any state) and the configurations that describe it: the model's (the version
        asked for, else the latest loaded, else config.pbtxt), or each member's for an ensemble."""
        record = self.hub.find(name)
        if isinstance(record, EnsembleRecord):
            check_ensemble_version(name, version)
            return record, [e for e in (self._model_entry(m) for m in record.ensemble.members) if e is not None]
        if version not in ("", None):
            text = str(version)
            chosen = record.versions.get(int(text)) if text.isdigit() else None
            if chosen is None:
                raise ModelNotFoundError(not_loaded(name, text, [v.label for v in record.serving()]))
            return record, [chosen.entry]
        entry = self._model_entry(name)
        if entry is None:
            raise ModelLoadError(f"model '{name}' has no valid configuration: {record.reason}")
        return record, [entry]

    def _model_entry(self, name: str):
        record = self.hub.registry.records.get(name)
        if record is not None and record.latest is not None:
            return record.latest.entry
        if record is not None and record.entry is not None:
            return record.entry
        try:
            return self.hub.repository.entry(name)
        except KestrelError:
            return None

    def _versions(self, record) -> list[str]:
        if isinstance(record, EnsembleRecord):
            return [ENSEMBLE_VERSION]
        serving = [v.label for v in record.serving()]
        if serving:
            return serving
        entry = self._model_entry(record.name)
        return [str(v) for v in entry.versions] if entry is not None else []

    def model_metadata(self, name: str, version: str = "") -> dict:
        record, entries = self._entries(name, version)
        platform = ENSEMBLE_PLATFORM if isinstance(record, EnsembleRecord) else entries[0].platform
        inputs = outputs = []
        if entries:
            shared_input_spec(name, (e.input_spec for e in entries))
            inputs, outputs = [tensor_metadata(entries[0].input_spec)], [tensor_metadata(entries[0].output_spec)]
        return {"name": name, "versions": self._versions(record), "platform": platform, "inputs": inputs,
                "outputs": outputs}

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        """The model's configuration (config.pbtxt); for an ensemble, one Kestrel writes."""
        record, entries = self._entries(name, version)
        if isinstance(record, ModelRecord):
            return entries[0].config
        config = model_config_pb2.ModelConfig(name=name, platform=ENSEMBLE_PLATFORM)
        if entries:
            config.max_batch_size = min(max(1, e.max_batch_size) for e in entries)
            config.input.extend([entries[0].config.input[0]])
            config.output.extend([entries[0].config.output[0]])
        config.parameters["members"].string_value = ",".join(record.ensemble.members)
        config.parameters["fusion"].string_value = record.ensemble.fusion
        return config

    def model_statistics(self, name: str = "", version: str = "") -> list[dict]:
        """V2 statistics per model version: durations as {"count", "ns"}, batch_stats per batch size."""
        rows = []
        names = [name] if name else self.hub.names()
        for item in names:
            record = self.hub.find(item)
            if isinstance(record, EnsembleRecord):
                if version not in ("", None, ENSEMBLE_VERSION):
                    self._entries(item, version)  # raises not found
                stats = [record.stats]
            else:
                if version not in ("", None):
                    self._entries(item, version)  # raises when not loaded
                    stats = [self.hub.metrics.model(item, str(version))]
                else:
                    serving = [v.stats for v in record.serving() if v.stats is not None]
                    stats = serving or [s for s in self.hub.metrics.versions(item) if s.version]
            for one in stats:
                snap = one.snapshot()
                rows.append({
                    "name": item,
                    "version": one.version or "1",
                    "last_inference": snap["last_inference"],
                    "inference_count": snap["inference_count"],
                    "execution_count": snap["execution_count"],
                    "inference_stats": {key: {"count": snap[key][0], "ns": snap[key][1]}
                                        for key in ("success", "fail", "queue", "compute_infer")},
                    "batch_stats": [{"batch_size": size, "compute_infer": {"count": count, "ns": ns}}
                                    for size, (count, ns) in snap["batches"].items()],
                })
        return rows

    def _repository(self, repository: str) -> None:
        root = self.hub.repository.root.name
        if repository not in ("", "models", root):
            raise ModelNotFoundError(
                f"received repository name {shown(repository)}; this server has one repository, {root!r} "
                "(or send an empty name)"
            )

    def repository_index(self, repository: str = "", ready_only: bool = False) -> list[dict]:
        self._repository(repository)
        return self.hub.registry.index(ready_only)

    # ---- the repository extension's control: load and unload (--model-control-mode explicit) --------------
    def _control(self, what: str, name) -> str:
        mode = self.hub.control_mode
        if mode != "explicit":
            why = ("the server follows its repository's folders (--model-control-mode poll)" if mode == "poll"
                   else "the server serves what it loaded at start (--model-control-mode none)")
            raise ControlModeError(f"received a {what} of model {shown(name)}, but {why}; start it with "
                                   "--model-control-mode explicit to load and unload models by API")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"received model name {shown(name)}; expected the name of a model or ensemble")
        if not self.serving:
            raise ServerUnavailableError("the server is shutting down; models are not loaded or unloaded any more")
        return name

    def repository_load(self, name: str, repository: str = "", parameters: dict | None = None) -> None:
        """Load or reload `name` (Triton's repository load): returns once it serves, or raises why it does not
        (then what served before still serves). Parameters: "config" (a JSON ModelConfig used instead of
        config.pbtxt), "force" (reload versions whose files did not change)."""
        name = self._control("load", name)
        self._repository(repository)
        parameters = parameters or {}
        unknown = sorted(set(parameters) - {"config", "force"})
        if unknown:
            raise InvalidInputError(f"received load parameter(s) {shown(unknown)}; expected \"config\" and/or "
                                    "\"force\"")
        config = None
        if "config" in parameters:
            text = parameters["config"]
            if not isinstance(text, str):
                raise InvalidInputError(f"received config={shown(text)}; expected a JSON model configuration as "
                                        "a string")
            try:
                config = config_from_json(text, name)
            except ConfigError as exc:
                raise InvalidInputError(str(exc)) from None
        t0 = time.perf_counter()
        self.hub.registry.load(name, config=config, force=flag(parameters.get("force", False), "parameter force"))
        log.info("model %s loaded by a repository load call in %.2f s", name, time.perf_counter() - t0)

    def repository_unload(self, name: str, repository: str = "", parameters: dict | None = None) -> None:
        """Unload `name` (Triton's repository unload): new requests are refused at once; returns once the
        requests that held it are answered and its versions closed (at most serve.registry.DRAIN_TIMEOUT_S,
        then the close goes on in the background). Parameter "unload_dependents": an ensemble's members too."""
        name = self._control("unload", name)
        self._repository(repository)
        parameters = parameters or {}
        unknown = sorted(set(parameters) - {"unload_dependents"})
        if unknown:
            raise InvalidInputError(f"received unload parameter(s) {shown(unknown)}; expected "
                                    "\"unload_dependents\"")
        dependents = flag(parameters.get("unload_dependents", False), "parameter unload_dependents")
        self.hub.registry.unload(name, unload_dependents=dependents, timeout=self.unload_timeout_s)
        log.info("model %s unloaded by a repository unload call", name)

    def list_models(self) -> dict:
        """Models and ensembles with what a client needs to pick one (the web page's list)."""
        models = []
        for name, record in self.hub.models.items():
            info = {"name": name, "state": record.state, "reason": record.reason,
                    "version": str(record.version) if record.version is not None else None}
            entry = self._model_entry(name)
            if entry is not None:
                info.update(platform=entry.platform, num_classes=int(entry.output_spec.shape[0]),
                            input_size=[int(d) for d in entry.input_spec.shape[:2]])
            models.append(info)
        ensembles = []
        for record in self.hub.ensembles.values():
            state, reason = self.hub.registry.ensemble_state(record)
            ensembles.append({"name": record.name, "state": state, "reason": reason,
                              "members": list(record.ensemble.members), "fusion": record.ensemble.fusion})
        return {"models": models, "ensembles": ensembles, "fusions": list(FUSIONS)}

    # ---- inference ---------------------------------------------------------------------------
    def infer(self, request: InferRequest, scope: RequestScope | None = None) -> InferResponse:
        """Validate the request against its target (once), run it (batched), answer scores or top-k strings.
        `scope`: the transport's request scope (one is made when None); its target may already be acquired."""
        if scope is None:
            with self.request("infer") as scope:
                return self.infer(request, scope)
        name = request.model
        target = scope.acquire(name, request.version or "")
        spec = target.input_spec
        output_spec = target.versions[0].output_spec
        batch = input_array(name, spec, request.inputs, target_max_batch(target))
        wanted = list(request.outputs) or [RequestedOutput(output_spec.name)]
        for out in wanted:
            if out.name != output_spec.name:
                raise InvalidInputError(
                    f"model '{name}': received requested output {shown(out.name)}, expected {output_spec.name!r}"
                )
            if not isinstance(out.classification, int) or isinstance(out.classification, bool) or \
                    out.classification < 0:
                raise InvalidInputError(
                    f"model '{name}': received classification={shown(out.classification)}; expected a number of "
                    "classes >= 0"
                )
        result = self.hub.run(target, batch, request.deadline, request.fusion, scope.submitted)
        probs = np.ascontiguousarray(result.probabilities, dtype="<f4")
        outputs = []
        for out in wanted:
            if out.classification:
                top = classification(probs, out.classification, target.versions[0].labels)
                outputs.append(OutputTensor(output_spec.name, "BYTES", [int(probs.shape[0]), int(top.shape[1])],
                                            top, out.parameters))
            else:
                outputs.append(OutputTensor(output_spec.name, "FP32", [int(d) for d in probs.shape], probs,
                                            out.parameters))
        return InferResponse(name, result.version, request.id or "", outputs)

    def classify(self, image: bytes, names: Sequence[str] = (), top_k: int = 0, fusion: str = "",
                 deadline: float | None = None, scope: RequestScope | None = None) -> ClassifyResult:
        """Image bytes in, labels out, from each named model / ensemble (default: the first ready
        ensemble, else every ready model); fused per ensemble, or across several models."""
        if scope is None:
            with self.request("classify") as scope:
                return self.classify(image, names, top_k, fusion, deadline, scope)
        top = check_top_k(top_k)  # before any model is acquired
        targets = scope.acquire_targets([n for n in names if n])
        return self.hub.classify_targets(image, targets, top, fusion, deadline, scope.submitted)


__all__ = ["DataPlane", "EXTENSIONS", "InferInput", "InferRequest", "InferResponse", "OutputTensor",
           "RequestScope", "RequestedOutput", "SERVER_NAME", "bytes_tensor", "classification", "flag", "input_array",
           "request_size_limit", "server_version", "target_max_batch", "tensor_metadata"]
