"""The gRPC servicers: KServe V2 (`inference.GRPCInferenceService`) and Classify (`kestrel.v1.Classifier`).

A thin codec around serve.dataplane.DataPlane: protobuf in, plain values to the data plane,
protobuf out. Exceptions become gRPC status codes through serve.errors.STATUS (the table
the HTTP port reads too); anything not in it is INTERNAL and logged with its traceback.

Every handler catches at one boundary (`_Handler`), so a bad request gets
its status and message and the server keeps serving. (Messages larger than
the configured limit are refused by gRPC itself with RESOURCE_EXHAUSTED.)

Admission: work-carrying RPCs (inference, Classify) beyond `Admission.limit` at once are refused at
once with RESOURCE_EXHAUSTED instead of waiting in grpc's executor queue; create_server sizes the limit
from the handler threads, keeping some threads for health checks, metadata and control calls.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from ._cancel import CancelOnEnd
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import kestrel_pb2 as kpb
from ._proto import kestrel_pb2_grpc as kpb_grpc
from .dataplane import DataPlane, InferInput, InferRequest, RequestedOutput, bytes_tensor
from .errors import InvalidInputError, KestrelError, ResourceExhaustedError, shown, status_of
from .hub import ModelHub

log = logging.getLogger(__name__)

# grpc-message travels in a header: a message echoing a huge request would be refused by the
# client as RESOURCE_EXHAUSTED instead of carrying its own status
MAX_DETAILS_CHARS = 2000
_CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)

# V2 datatype -> the InferTensorContents field that carries it
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (serve.errors.STATUS; INTERNAL for anything unexpected)."""
    return grpc.StatusCode[status_of(exc)[0]]


def _code_name(exc: BaseException) -> str:
    return status_of(exc)[0]


class _CancelOnTermination(CancelOnEnd):
    """The request's queued work (batching.Pending); when the RPC ends (done, cancelled by the
    client, or its deadline passed) anything still queued is dropped instead of run.

    Work queued *after* the RPC ended (the client cancelled while the server was still decoding)
    is cancelled as it is added, and so is everything when the RPC had ended before the callback
    could be registered."""

    def __init__(self, context):
        super().__init__()
        if not context.add_callback(self.end):
            self.end()


class Admission:
    """How many work-carrying RPCs may run at once; more are refused at once (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int | None, why: str = "", on_refused=None):
        self.limit, self.why, self.on_refused = limit, why, on_refused
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        if self.limit is None:
            return
        with self._lock:
            if self.active >= self.limit:
                if self.on_refused is not None:
                    self.on_refused()
                raise ResourceExhaustedError(f"the server is busy: {self.active} requests in progress, its limit "
                                             f"{self.limit}{self.why}; retry later or elsewhere")
            self.active += 1

    def leave(self) -> None:
        if self.limit is None:
            return
        with self._lock:
            self.active -= 1


def _deadline(context) -> float | None:
    remaining = context.time_remaining()  # no deadline: None, or a huge number
    if remaining is None or remaining > 1e6:
        return None
    return time.monotonic() + remaining


class _Handler:
    """One RPC's boundary: work-carrying RPCs (`api` given) pass admission, then run in a data plane request
    scope (in flight, metrics, their target held, their queued work dropped when the RPC ends); every
    exception becomes its gRPC status and message."""

    def __init__(self, plane: DataPlane, context, api: str | None = None, admission: Admission | None = None):
        self.plane, self.context, self.api, self.admission = plane, context, api, admission
        self.scope = None
        self.admitted = False

    def __enter__(self):
        if self.api is not None:
            try:
                if self.admission is not None:
                    self.admission.enter()
                    self.admitted = True
                self.scope = self.plane.request(self.api, label=_code_name,
                                                submitted=_CancelOnTermination(self.context))
                self.scope.__enter__()
            except Exception as exc:  # busy (RESOURCE_EXHAUSTED) or shutting down (UNAVAILABLE)
                self._leave()
                self._abort(exc)
        return self

    def _leave(self) -> None:
        if self.admitted:
            self.admitted = False
            self.admission.leave()

    def __exit__(self, kind, exc, tb):
        failed = exc is not None and isinstance(exc, Exception)
        cancelled = failed and self._cancelled_by_client()
        self._leave()
        if self.scope is not None:
            if cancelled:
                self.scope.label = lambda _exc: "CANCELLED"
            self.scope.__exit__(kind, exc, tb)
        if not failed:
            return False  # success; KeyboardInterrupt, SystemExit & co. go on up
        if cancelled:  # its queued work was dropped; nobody reads the answer, and it is not the operator's news
            log.debug("%s: the client cancelled the RPC (%s)", self.api or "rpc", exc)
            self.context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the request")
        self._abort(exc, (kind, exc, tb))

    def _cancelled_by_client(self) -> bool:
        """The RPC ended before its answer, and not at its deadline: the client cancelled it."""
        is_active = getattr(self.context, "is_active", None)  # (deploy/ray's context has none)
        if is_active is None or is_active():
            return False
        remaining = self.context.time_remaining()
        return remaining is None or remaining > 0

    def _abort(self, exc: Exception, exc_info=None):
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, KestrelError):
            log.error("%s failed unexpectedly", self.api or "rpc", exc_info=exc_info or exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
        elif code is grpc.StatusCode.INTERNAL:  # a model's failure: the batcher logged it (once per message)
            log.debug("%s: %s: %s", self.api or "rpc", code.name, exc)
            message = str(exc)
        else:  # a client's mistake is not the operator's news (and must not flood the log): debug
            level = logging.DEBUG if code in _CLIENT_ERRORS else logging.INFO
            log.log(level, "%s: %s: %s", self.api or "rpc", code.name, exc)
            message = str(exc)
        if len(message) > MAX_DETAILS_CHARS:
            message = message[:MAX_DETAILS_CHARS] + f"... ({len(message)} characters)"
        self.context.abort(code, message)  # raises; the handler returns that status


def _tensor_metadata(meta: dict):
    return pb.ModelMetadataResponse.TensorMetadata(name=meta["name"], datatype=meta["datatype"],
                                                   shape=meta["shape"])


def _parameter(parameter):
    """An InferParameter's value (None when unset)."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe V2 / open inference protocol, as Triton speaks it over gRPC (a codec over DataPlane)."""

    def __init__(self, plane: DataPlane | ModelHub, serving=None, admission: Admission | None = None):
        if isinstance(plane, ModelHub):  # a hub alone: a data plane of its own
            plane = DataPlane(plane, serving) if serving is not None else DataPlane(plane)
        self.plane = plane
        self.hub = plane.hub
        self.admission = admission

    # ---- health and metadata ---------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.plane.ready()))

    def ModelReady(self, request, context):
        with _Handler(self.plane, context):
            return pb.ModelReadyResponse(ready=bool(self.plane.model_ready(request.name, request.version)))

    def ServerMetadata(self, request, context):
        meta = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    def ModelMetadata(self, request, context):
        with _Handler(self.plane, context):
            meta = self.plane.model_metadata(request.name, request.version)
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=[_tensor_metadata(t) for t in meta["inputs"]],
                                            outputs=[_tensor_metadata(t) for t in meta["outputs"]])

    def ModelConfig(self, request, context):
        with _Handler(self.plane, context):
            response = pb.ModelConfigResponse()
            response.config.CopyFrom(self.plane.model_config(request.name, request.version))
            return response

    def RepositoryModelLoad(self, request, context):
        with _Handler(self.plane, context):
            self.plane.repository_load(request.model_name, request.repository_name, _repo_parameters(request))
            return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        with _Handler(self.plane, context):
            self.plane.repository_unload(request.model_name, request.repository_name, _repo_parameters(request))
            return pb.RepositoryModelUnloadResponse()

    def RepositoryIndex(self, request, context):
        with _Handler(self.plane, context):
            index = pb.RepositoryIndexResponse.ModelIndex
            items = self.plane.repository_index(request.repository_name, bool(request.ready))
            return pb.RepositoryIndexResponse(models=[index(**item) for item in items])

    def ModelStatistics(self, request, context):
        with _Handler(self.plane, context):
            response = pb.ModelStatisticsResponse()
            for item in self.plane.model_statistics(request.name, request.version):
                stats = response.model_stats.add(name=item["name"], version=item["version"],
                                                 last_inference=item["last_inference"],
                                                 inference_count=item["inference_count"],
                                                 execution_count=item["execution_count"])
                for key, value in item["inference_stats"].items():
                    getattr(stats.inference_stats, key).count = value["count"]
                    getattr(stats.inference_stats, key).ns = value["ns"]
                for batch in item["batch_stats"]:
                    entry = stats.batch_stats.add(batch_size=batch["batch_size"])
                    entry.compute_infer.count = batch["compute_infer"]["count"]
                    entry.compute_infer.ns = batch["compute_infer"]["ns"]
            return response

    # ---- inference -------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        with _Handler(self.plane, context, "infer", self.admission) as handler:
            fusion = None
            if "fusion" in request.parameters:
                fusion = request.parameters["fusion"].string_param
            answer = self.plane.infer(
                InferRequest(request.model_name, request.model_version, _inputs(request),
                             [_requested(o, request.model_name) for o in request.outputs], request.id, fusion,
                             _deadline(context)),
                handler.scope)
            response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                             id=answer.id)
            for out in answer.outputs:
                response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
                response.raw_output_contents.append(bytes_tensor(out.data) if out.datatype == "BYTES"
                                                    else out.data.tobytes())
            return response


def _inputs(request) -> list[InferInput]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"model '{request.model_name}': received {len(raw)} raw_input_contents for {len(request.inputs)} input(s)"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        field = _CONTENTS.get(tensor.datatype)
        item = InferInput(tensor.name, tensor.datatype, list(tensor.shape), source="raw_input_contents",
                          hint=f"raw_input_contents or contents.{field or 'uint_contents'}")
        if raw:
            item.raw = raw[i]
        elif tensor.HasField("contents") and field is not None:
            item.values, item.source = getattr(tensor.contents, field), f"contents.{field}"
        inputs.append(item)
    return inputs


def _repo_parameters(request) -> dict:
    """A repository load/unload request's parameters as plain values (bool, int, str, bytes)."""
    return {key: _parameter(value) for key, value in request.parameters.items()}


def _requested(wanted, model: str) -> RequestedOutput:
    count = 0
    if "classification" in wanted.parameters:
        parameter = wanted.parameters["classification"]
        kind = parameter.WhichOneof("parameter_choice")
        value = _parameter(parameter)
        if kind not in ("int64_param", "uint64_param") or value < 1:
            raise InvalidInputError(
                f"model '{model}': received classification parameter {shown(value)} ({kind}); "
                "expected a positive integer"
            )
        count = int(value)
    return RequestedOutput(wanted.name, count)


def _predictions(items) -> list:
    return [kpb.Prediction(label=label, index=index, probability=p) for label, index, p in items]


class ClassifyServicer(kpb_grpc.ClassifierServicer):
    """Image bytes in, labels out (see proto/kestrel.proto)."""

    def __init__(self, plane: DataPlane | ModelHub, admission: Admission | None = None):
        self.plane = plane if isinstance(plane, DataPlane) else DataPlane(plane)
        self.hub = self.plane.hub
        self.admission = admission

    def Classify(self, request, context):
        with _Handler(self.plane, context, "classify", self.admission) as handler:
            result = self.plane.classify(request.image, list(request.models), request.top_k, request.fusion,
                                         _deadline(context), handler.scope)
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
        listing = self.plane.list_models()
        response = kpb.ListModelsResponse()
        for item in listing["models"]:
            info = response.models.add(name=item["name"], state=item["state"], reason=item["reason"])
            if "platform" in item:
                info.platform, info.num_classes = item["platform"], item["num_classes"]
                info.input_height, info.input_width = item["input_size"]
        for item in listing["ensembles"]:
            response.ensembles.add(name=item["name"], state=item["state"], reason=item["reason"],
                                   members=item["members"], fusion=item["fusion"])
        return response


__all__ = ["Admission", "InferenceServicer", "ClassifyServicer", "status_for"]
