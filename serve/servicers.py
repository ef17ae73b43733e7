"""The gRPC servicers: KServe V2 (`inference.GRPCInferenceService`) and Classify (`kestrel.v1.Classifier`).

This is the only module that maps Kestrel's exceptions to gRPC status codes:

    ModelNotFoundError                      NOT_FOUND
    InvalidInputError, ImageDecodeError     INVALID_ARGUMENT
    ResourceExhaustedError                  RESOURCE_EXHAUSTED
    DeadlineExceededError                   DEADLINE_EXCEEDED
    ModelLoadError, EngineMismatchError     UNAVAILABLE         (the model is not ready)
    ConfigError, MissingDependencyError     FAILED_PRECONDITION
    anything else                           INTERNAL            (logged with its traceback)

Every handler catches at one boundary (`_Handler`), so a bad request gets
its status and message and the server keeps serving. (Messages larger than
the configured limit are refused by gRPC itself with RESOURCE_EXHAUSTED.)
"""

from __future__ import annotations

import importlib.metadata
import logging
import time

import grpc
import numpy as np

from . import datatypes
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import kestrel_pb2 as kpb
from ._proto import kestrel_pb2_grpc as kpb_grpc
from .errors import (ConfigError, DeadlineExceededError, InvalidInputError, MissingDependencyError,
                     ModelLoadError, ModelNotFoundError, ResourceExhaustedError)
from .hub import ENSEMBLE_PLATFORM, READY, UNAVAILABLE, ModelHub, ServedModel

log = logging.getLogger(__name__)

SERVER_NAME = "kestrel"
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository", "kestrel_classify"]

_STATUS = [  # most specific first
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (MissingDependencyError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
]

# V2 datatype -> the InferTensorContents field that carries it
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (INTERNAL for anything unexpected)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _version() -> str:
    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class _CancelOnTermination(list):
    """The request's queued work (batching.Pending); when the RPC ends (done, cancelled by the
    client, or its deadline passed) anything still queued is dropped instead of run.

    Work queued *after* the RPC ended (the client cancelled while the server was still decoding)
    is cancelled as it is added, and so is everything when the RPC had ended before the callback
    could be registered."""

    def __init__(self, context):
        super().__init__()
        self.ended = False
        if not context.add_callback(self._end):
            self._end()

    def _end(self) -> None:
        self.ended = True
        for pending in list(self):
            if not pending.done():
                pending.cancel()

    def append(self, pending) -> None:
        super().append(pending)
        if self.ended:
            pending.cancel()

    def extend(self, items) -> None:
        for pending in items:
            self.append(pending)


def _cancel_on_termination(context) -> list:
    return _CancelOnTermination(context)


def _deadline(context) -> float | None:
    remaining = context.time_remaining()  # no deadline: None, or a huge number
    if remaining is None or remaining > 1e6:
        return None
    return time.monotonic() + remaining


class _Handler:
    """Times one request, records it per model, and turns exceptions into gRPC statuses."""

    def __init__(self, hub: ModelHub, context, api: str, names=()):
        self.hub, self.context, self.api, self.names = hub, context, api, names

    def __enter__(self):
        self.record = self.hub.record_request(self.api, self.names)
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            self.record.finish()
            return False
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit & co. go on up
        code = status_for(exc)
        self.record.finish(code.name)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed unexpectedly", self.api, exc_info=(kind, exc, tb))
            message = f"internal error: {type(exc).__name__}: {exc}"
        else:
            log.info("%s: %s: %s", self.api, code.name, exc)
            message = str(exc)
        self.context.abort(code, message)  # raises; the handler returns that status


def _tensor_metadata(cls, spec):
    return cls(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.shape])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe V2 / open inference protocol, as Triton speaks it over gRPC."""

    def __init__(self, hub: ModelHub, serving=lambda: True):
        self.hub = hub
        self.serving = serving  # False once shutdown began

    # ---- health and metadata ---------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.serving() and self.hub.ready))

    def ModelReady(self, request, context):
        with _Handler(self.hub, context, "ready"):
            return pb.ModelReadyResponse(ready=bool(self.serving() and self.hub.model_ready(request.name,
                                                                                            request.version)))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        with _Handler(self.hub, context, "metadata"):
            target = self.hub.find(request.name)
            self.hub.model_ready(request.name, request.version)  # validates the version
            response = pb.ModelMetadataResponse(name=request.name)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            if isinstance(target, ServedModel):
                if target.entry is None:
                    raise ModelLoadError(f"model '{request.name}' has no valid configuration: {target.reason}")
                response.platform = target.entry.platform
                response.versions.extend([str(target.version)] if target.version is not None
                                         else [str(v) for v in target.entry.versions])
                response.inputs.append(_tensor_metadata(tensor, target.entry.input_spec))
                response.outputs.append(_tensor_metadata(tensor, target.entry.output_spec))
            else:
                response.platform = ENSEMBLE_PLATFORM
                response.versions.append("1")
                first = self.hub.members(request.name)[0]
                if first.entry is not None:
                    response.inputs.append(_tensor_metadata(tensor, self.hub.input_spec(request.name)))
                    response.outputs.append(_tensor_metadata(tensor, first.entry.output_spec))
            return response

    def ModelConfig(self, request, context):
        with _Handler(self.hub, context, "config"):
            target = self.hub.find(request.name)
            self.hub.model_ready(request.name, request.version)
            response = pb.ModelConfigResponse()
            if isinstance(target, ServedModel):
                if target.entry is None:
                    raise ModelLoadError(f"model '{request.name}' has no valid configuration: {target.reason}")
                response.config.CopyFrom(target.entry.config)
                return response
            members = self.hub.members(request.name)
            config = response.config
            config.name, config.platform = request.name, ENSEMBLE_PLATFORM
            entries = [m.entry for m in members if m.entry is not None]
            if entries:
                config.max_batch_size = min(e.max_batch_size for e in entries)
                config.input.extend([entries[0].config.input[0]])
                config.output.extend([entries[0].config.output[0]])
            config.parameters["members"].string_value = ",".join(target.ensemble.members)
            config.parameters["fusion"].string_value = target.ensemble.fusion
            return response

    def RepositoryIndex(self, request, context):
        with _Handler(self.hub, context, "index"):
            if request.repository_name not in ("", "models", self.hub.repository.root.name):
                raise ModelNotFoundError(
                    f"received repository name {request.repository_name!r}; this server has one repository, "
                    f"{self.hub.repository.root.name!r} (or send an empty name)"
                )
            response = pb.RepositoryIndexResponse()
            index = pb.RepositoryIndexResponse.ModelIndex
            for name in self.hub.repository.names():
                served = self.hub.models.get(name)
                if served is None:
                    item = index(name=name, state=UNAVAILABLE, reason="not loaded (not named in --models)")
                else:
                    item = index(name=name, version="" if served.version is None else str(served.version),
                                 state=served.state, reason=served.reason)
                if not request.ready or item.state == READY:
                    response.models.append(item)
            for served in self.hub.ensembles.values():
                if not request.ready or served.ready:
                    response.models.append(index(name=served.name, version="1", state=served.state,
                                                 reason=served.reason))
            return response

    def ModelStatistics(self, request, context):
        with _Handler(self.hub, context, "statistics"):
            if request.name:
                self.hub.model_ready(request.name, request.version)
                names = [request.name]
            else:
                names = self.hub.names()
            response = pb.ModelStatisticsResponse()
            for name in names:
                target = self.hub.find(name)
                snap = self.hub.metrics.model(name).snapshot()
                version = str(target.version) if isinstance(target, ServedModel) and target.version else "1"
                stats = response.model_stats.add(name=name, version=version,
                                                 last_inference=snap["last_inference"],
                                                 inference_count=snap["inference_count"],
                                                 execution_count=snap["execution_count"])
                for key in ("success", "fail", "queue", "compute_infer"):
                    count, ns = snap[key]
                    getattr(stats.inference_stats, key).count = count
                    getattr(stats.inference_stats, key).ns = ns
                for size, (count, ns) in snap["batches"].items():
                    batch = stats.batch_stats.add(batch_size=size)
                    batch.compute_infer.count, batch.compute_infer.ns = count, ns
            return response

    # ---- inference -------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        with _Handler(self.hub, context, "infer", [request.model_name]):
            name = request.model_name
            self.hub.ready_model(name, request.model_version)
            spec = self.hub.input_spec(name)
            output_name = self.hub.members(name)[0].entry.output_spec.name
            batch = _input_array(request, spec, name)
            class_count = 0
            for wanted in request.outputs:
                if wanted.name != output_name:
                    raise InvalidInputError(
                        f"model '{name}': received requested output {wanted.name!r}, expected {output_name!r}"
                    )
                if "classification" in wanted.parameters:
                    class_count = _class_count(wanted.parameters["classification"], name)
            fusion = None
            if "fusion" in request.parameters:
                fusion = request.parameters["fusion"].string_param
            result = self.hub.infer(name, request.model_version, batch, _deadline(context), fusion=fusion,
                                    submitted=_cancel_on_termination(context))
            probs = np.ascontiguousarray(result.probabilities, dtype="<f4")
            response = pb.ModelInferResponse(model_name=name, model_version=result.version, id=request.id)
            if class_count:
                labels = self.hub.members(name)[0].runner.labels
                top = _classification(probs, class_count, labels)
                response.outputs.add(name=output_name, datatype="BYTES", shape=[probs.shape[0], top.shape[1]])
                response.raw_output_contents.append(_bytes_tensor(top))
            else:
                response.outputs.add(name=output_name, datatype="FP32", shape=list(probs.shape))
                response.raw_output_contents.append(probs.tobytes())
            return response


def _class_count(parameter, name: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind else None
    if kind not in ("int64_param", "uint64_param") or value < 1:
        raise InvalidInputError(
            f"model '{name}': received classification parameter {value!r} ({kind}); expected a positive integer"
        )
    return int(value)


def _classification(probs: np.ndarray, count: int, labels) -> np.ndarray:
    """Triton's classification extension: per image the top `count` classes as b"probability:index[:label]"."""
    count = min(count, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :count]
    rows = []
    for row, indices in enumerate(order):
        items = []
        for i in indices:
            label = labels[i] if labels and i < len(labels) else ""
            items.append(f"{probs[row, i]:f}:{int(i)}" + (f":{label}" if label else ""))
        rows.append([item.encode() for item in items])
    return np.array(rows, dtype=object)


def _bytes_tensor(values: np.ndarray) -> bytes:
    """A BYTES tensor's raw contents: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in values.ravel())


def _input_array(request, spec, name: str) -> np.ndarray:
    """The request's one input tensor as a numpy array, checked against the model's input."""
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"model '{name}': received {len(request.inputs)} input tensors, expected exactly 1 ('{spec.name}')"
        )
    tensor = request.inputs[0]
    if tensor.name != spec.name:
        raise InvalidInputError(f"model '{name}': received input {tensor.name!r}, expected {spec.name!r}")
    dtype = datatypes.from_v2(tensor.datatype)
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received datatype {tensor.datatype}, expected {spec.datatype}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    expected = ("N", *spec.shape)
    if len(shape) != len(expected) or any(d < 0 for d in shape) or any(
            want != -1 and got != want for got, want in zip(shape[1:], spec.shape)):
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received shape {list(shape)}, expected {list(expected)} (-1 = any)"
        )
    count = int(np.prod(shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInputError(
                f"model '{name}': received {len(request.raw_input_contents)} raw_input_contents for 1 input"
            )
        data = request.raw_input_contents[0]
        want = count * dtype.itemsize
        if len(data) != want:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received {len(data)} bytes of raw_input_contents, "
                f"expected {want} bytes for shape {list(shape)} {tensor.datatype}"
            )
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    field = _CONTENTS.get(tensor.datatype)
    if not tensor.HasField("contents") or field is None:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received no data; expected raw_input_contents or "
            f"contents.{field or 'uint_contents'}"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received {len(values)} values in contents.{field}, "
            f"expected {count} for shape {list(shape)}"
        )
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received values in [{wide.min()}, {wide.max()}], "
                f"expected {tensor.datatype} values in [{info.min}, {info.max}]"
            )
    return wide.astype(dtype).reshape(shape)


def _predictions(items) -> list:
    return [kpb.Prediction(label=label, index=index, probability=p) for label, index, p in items]


class ClassifyServicer(kpb_grpc.ClassifierServicer):
    """Image bytes in, labels out (see proto/kestrel.proto)."""

    def __init__(self, hub: ModelHub):
        self.hub = hub

    def Classify(self, request, context):
        names = list(request.models)
        with _Handler(self.hub, context, "classify", names):
            result = self.hub.classify(request.image, names, request.top_k, request.fusion, _deadline(context),
                                       submitted=_cancel_on_termination(context))
            response = kpb.ClassifyResponse(image_height=result.image_size[0], image_width=result.image_size[1],
                                            decode_ms=result.decode_s * 1e3, total_ms=result.total_s * 1e3)
            for answer in result.models:
                response.results.add(model=answer.model, version=answer.version,
                                     predictions=_predictions(answer.predictions),
                                     queue_ms=answer.run.queue_s * 1e3, compute_ms=answer.run.compute_s * 1e3,
                                     batch_size=answer.run.batch_size, input_height=answer.input_size[0],
                                     input_width=answer.input_size[1])
            for ens in result.ensembles:
                response.ensembles.add(name=ens.name, fusion=ens.fusion, members=ens.members,
                                       predictions=_predictions(ens.predictions))
            return response

    def ListModels(self, request, context):
        response = kpb.ListModelsResponse()
        for served in self.hub.models.values():
            info = response.models.add(name=served.name, state=served.state, reason=served.reason)
            if served.entry is not None:
                info.platform = served.entry.platform
                info.num_classes = served.entry.output_spec.shape[0]
                info.input_height, info.input_width = served.entry.input_spec.shape[:2]
        for served in self.hub.ensembles.values():
            response.ensembles.add(name=served.name, state=served.state, reason=served.reason,
                                   members=served.ensemble.members, fusion=served.ensemble.fusion)
        return response


__all__ = ["InferenceServicer", "ClassifyServicer", "status_for"]
