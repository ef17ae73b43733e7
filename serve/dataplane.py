"""The KServe V2 data plane, once, for every transport (the role of KServe's protocol/dataplane.py
and MLServer's handlers/dataplane.py).

    plane = DataPlane(hub)                       # hub: a loaded serve.hub.ModelHub
    plane.model_metadata("a")                    # -> {"name", "versions", "platform", "inputs", "outputs"}
    response = plane.infer(InferRequest("a", inputs=[InferInput("images", "UINT8", [1, 32, 32, 3], raw=data)]))
    response.outputs[0].data                     # -> np.ndarray (FP32), or object array of bytes (BYTES)
    plane.classify(jpeg_bytes, ["trio"], top_k=3)          # -> serve.hub.ClassifyResult
    with plane.request("infer", ["a"], label=lambda exc: status_of(exc)[0]): ...   # metrics + drain

Everything here takes and returns plain values (str, int, lists, dicts, numpy arrays, the
repository's ModelConfig message); the gRPC servicers (serve/servicers.py) and the HTTP app
(serve/http) are codecs around it. Errors are serve.errors exceptions; serve.errors.STATUS maps
each to its gRPC code and HTTP status. Nothing here imports grpc or an HTTP library.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import datatypes
from ._proto import model_config_pb2
from .ensemble import FUSIONS
from .errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError, shown, status_of
from .hub import READY, UNAVAILABLE, ClassifyResult, ModelHub, ServedEnsemble, ServedModel

log = logging.getLogger(__name__)

SERVER_NAME = "kestrel"
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository", "kestrel_classify"]
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


def check_fusion(fusion: str) -> str:
    """A fusion name from a request, its echo bounded."""
    if fusion not in FUSIONS:
        raise InvalidInputError(f"unknown fusion {shown(fusion)}; expected one of {', '.join(FUSIONS)}")
    return fusion


# ---- tensors --------------------------------------------------------------------------------
def tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def input_array(model: str, spec, inputs: Sequence[InferInput]) -> np.ndarray:
    """The request's one input tensor as a numpy array, checked against the model's input spec."""
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
    count = int(np.prod(shape))
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
    count = min(count, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :count]
    rows = []
    for row, indices in enumerate(order):
        items = []
        for i in indices:
            label = labels[i] if labels and i < len(labels) else ""
            items.append((f"{probs[row, i]:f}:{int(i)}" + (f":{label}" if label else "")).encode())
        rows.append(items)
    return np.array(rows, dtype=object).reshape(probs.shape[0], count)


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


def request_size_limit(target: ServedModel | ServedEnsemble, binary: bool) -> int | None:
    """The most bytes a V2 infer request for `target` can need: max_batch_size images of its input,
    as JSON numbers or (binary) raw bytes after a JSON header. None when the input has dynamic dims."""
    spec = target.input_spec
    if any(d < 0 for d in spec.shape):
        return None
    values = max(1, target.max_batch_size) * int(np.prod(spec.shape))
    per_value = np.dtype(spec.dtype).itemsize if binary else _value_chars(np.dtype(spec.dtype))
    return JSON_OVERHEAD_BYTES + values * per_value


# ---- the data plane -------------------------------------------------------------------------
class RequestScope:
    """One work-carrying request: counted in flight (shutdown waits for it) and in the metrics."""

    def __init__(self, plane: "DataPlane", api: str, names: Sequence[str], label: Callable[[BaseException], str]):
        self.plane, self.label = plane, label
        self.record = plane.hub.record_request(api, names)
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

    def _end(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.record.finish(None if exc is None else self.label(exc))
        self.plane._end()


class DataPlane:
    """KServe V2 and Classify over a ModelHub, as plain values (see the module docstring).

    `serving()` turns False when shutdown begins: work-carrying requests are then refused
    with ServerUnavailableError (gRPC UNAVAILABLE, HTTP 503) and wait_idle() waits for the rest.
    """

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

    def request(self, api: str, names: Sequence[str] = (),
                label: Callable[[BaseException], str] = lambda exc: status_of(exc)[0]) -> RequestScope:
        """Context manager around one request's work (`label`: the failure code its metrics record)."""
        return RequestScope(self, api, list(names), label)

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
        return self.serving and not self.draining and self.hub.model_ready(name, version or "")

    def target(self, name: str, version: str = "") -> ServedModel | ServedEnsemble:
        """The model or ensemble `name` (any state), its version checked."""
        target = self.hub.find(name)
        target.check_version(version or "")
        return target

    def model_metadata(self, name: str, version: str = "") -> dict:
        target = self.target(name, version)
        if isinstance(target, ServedEnsemble):
            inputs = outputs = []
            if any(m.entry is not None for m in target.members):
                inputs, outputs = [tensor_metadata(target.input_spec)], [tensor_metadata(target.output_spec)]
            return {"name": name, "versions": target.versions, "platform": target.platform,
                    "inputs": inputs, "outputs": outputs}
        return {"name": name, "versions": target.versions, "platform": target.platform,
                "inputs": [tensor_metadata(target.input_spec)], "outputs": [tensor_metadata(target.output_spec)]}

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        """The model's configuration (config.pbtxt); for an ensemble, one Kestrel writes."""
        target = self.target(name, version)
        if isinstance(target, ServedModel):
            return target._entry().config
        config = model_config_pb2.ModelConfig(name=name, platform=target.platform)
        entries = [m.entry for m in target.members if m.entry is not None]
        if entries:
            config.max_batch_size = target.max_batch_size
            config.input.extend([entries[0].config.input[0]])
            config.output.extend([entries[0].config.output[0]])
        config.parameters["members"].string_value = ",".join(target.ensemble.members)
        config.parameters["fusion"].string_value = target.ensemble.fusion
        return config

    def model_statistics(self, name: str = "", version: str = "") -> list[dict]:
        """V2 statistics per model: durations as {"count", "ns"}, batch_stats per batch size."""
        if name:
            self.target(name, version)
            names = [name]
        else:
            names = self.hub.names()
        out = []
        for item in names:
            target = self.hub.find(item)
            snap = self.hub.metrics.model(item).snapshot()
            out.append({
                "name": item,
                "version": target.version_label or "1",
                "last_inference": snap["last_inference"],
                "inference_count": snap["inference_count"],
                "execution_count": snap["execution_count"],
                "inference_stats": {key: {"count": snap[key][0], "ns": snap[key][1]}
                                    for key in ("success", "fail", "queue", "compute_infer")},
                "batch_stats": [{"batch_size": size, "compute_infer": {"count": count, "ns": ns}}
                                for size, (count, ns) in snap["batches"].items()],
            })
        return out

    def repository_index(self, repository: str = "", ready_only: bool = False) -> list[dict]:
        root = self.hub.repository.root.name
        if repository not in ("", "models", root):
            raise ModelNotFoundError(
                f"received repository name {shown(repository)}; this server has one repository, {root!r} "
                "(or send an empty name)"
            )
        items = []
        for name in self.hub.repository.names():
            served = self.hub.models.get(name)
            if served is None:
                item = {"name": name, "version": "", "state": UNAVAILABLE, "reason": "not loaded (not named in --models)"}
            else:
                item = {"name": name, "version": served.version_label, "state": served.state, "reason": served.reason}
            items.append(item)
        for served in self.hub.ensembles.values():
            items.append({"name": served.name, "version": served.version_label, "state": served.state,
                          "reason": served.reason})
        return [item for item in items if not ready_only or item["state"] == READY]

    def list_models(self) -> dict:
        """Models and ensembles with what a client needs to pick one (the web page's list)."""
        models = []
        for served in self.hub.models.values():
            info = {"name": served.name, "state": served.state, "reason": served.reason,
                    "version": served.version_label or None}
            if served.entry is not None:
                info.update(platform=served.platform, num_classes=int(served.output_spec.shape[0]),
                            input_size=[int(d) for d in served.input_spec.shape[:2]])
            models.append(info)
        ensembles = [{"name": s.name, "state": s.state, "reason": s.reason, "members": list(s.ensemble.members),
                      "fusion": s.ensemble.fusion} for s in self.hub.ensembles.values()]
        return {"models": models, "ensembles": ensembles, "fusions": list(FUSIONS)}

    # ---- inference ---------------------------------------------------------------------------
    def ready_target(self, name: str, version: str = "") -> ServedModel | ServedEnsemble:
        return self.hub.ready_model(name, version or "")

    def infer(self, request: InferRequest, submitted: list | None = None) -> InferResponse:
        """Validate the request against the model, run it (batched), answer scores or top-k strings.
        (`submitted`: collects the queued work, for a transport that cancels it when the client leaves.)"""
        name = request.model
        target = self.ready_target(name, request.version)
        spec, output_spec = target.input_spec, target.output_spec
        batch = input_array(name, spec, request.inputs)
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
        fusion = request.fusion
        if fusion is not None:
            if not isinstance(fusion, str):
                raise InvalidInputError(f"received fusion={shown(fusion)}; expected one of {', '.join(FUSIONS)}")
            check_fusion(fusion)
            if isinstance(target, ServedModel):
                raise InvalidInputError(
                    f"received fusion {fusion!r} for the single model '{name}'; a fusion applies to an ensemble")
        result = self.hub.infer(name, request.version or "", batch, request.deadline, fusion=fusion,
                                submitted=submitted)
        probs = np.ascontiguousarray(result.probabilities, dtype="<f4")
        outputs = []
        for out in wanted:
            if out.classification:
                top = classification(probs, out.classification, target.labels)
                outputs.append(OutputTensor(output_spec.name, "BYTES", [int(probs.shape[0]), int(top.shape[1])],
                                            top, out.parameters))
            else:
                outputs.append(OutputTensor(output_spec.name, "FP32", [int(d) for d in probs.shape], probs,
                                            out.parameters))
        return InferResponse(name, result.version, request.id or "", outputs)

    def classify(self, image: bytes, names: Sequence[str] = (), top_k: int = 5, fusion: str = "",
                 deadline: float | None = None, submitted: list | None = None) -> ClassifyResult:
        """Image bytes in, labels out, from each named model / ensemble (default: the first ready
        ensemble, else every ready model); fused per ensemble, or across several models."""
        names = [n for n in names if n]
        if fusion:
            check_fusion(fusion)
            unique = list(dict.fromkeys(names))
            if len(unique) == 1 and isinstance(self.hub.find(unique[0]), ServedModel):
                raise InvalidInputError(
                    f"received fusion {fusion!r} for the single model {unique[0]!r}; a fusion applies to an "
                    "ensemble or to several models"
                )
        return self.hub.classify(image, names, top_k, fusion, deadline, submitted=submitted)


__all__ = ["DataPlane", "EXTENSIONS", "InferInput", "InferRequest", "InferResponse", "OutputTensor",
           "RequestScope", "RequestedOutput", "SERVER_NAME", "bytes_tensor", "classification", "input_array",
           "request_size_limit", "server_version", "tensor_metadata"]
