"""The HTTP port: KServe V2 REST, Kestrel's classify endpoint and the web page, over the server's ModelHub.

    frontend = HttpFrontend(hub, host="127.0.0.1", port=0).start()   # same models and batchers as gRPC
    print(frontend.port)
    frontend.stop(grace=10)     # refuse new requests, finish in-flight ones

Endpoints (JSON unless said otherwise):

    GET  /                                        the web page (serve/web/, nothing from a CDN)
    GET  /static/<file>                           its CSS and JavaScript
    GET  /v2/health/live | /v2/health/ready       200 = true, 400 = false, empty body (as Triton)
    GET  /v2                                      server metadata
    GET  /v2/models/<m>[/versions/<v>]            model metadata
    GET  /v2/models/<m>[/versions/<v>]/ready      200 = ready, 400 = not ready
    GET  /v2/models/<m>[/versions/<v>]/config     the model configuration (config.pbtxt as JSON)
    GET  /v2/models[/<m>[/versions/<v>]]/stats    statistics extension
    POST /v2/repository/index                     repository extension
    POST /v2/models/<m>[/versions/<v>]/infer      JSON tensors, or the binary tensor data extension
                                                  (Inference-Header-Content-Length; binary_data_size,
                                                  binary_data / binary_data_output; classification)
    GET  /v1/models                               models and ensembles, for the page
    POST /v1/classify                             multipart/form-data: image (file), models (a,b or
                                                  repeated), ensemble, top_k, fusion; or the image as the
                                                  raw body (Content-Type image/*) with those as ?query

Prometheus metrics stay on the metrics port (--metrics-port), as in Triton.

This is the only module that maps Kestrel's exceptions to HTTP status codes:

    ModelNotFoundError                      404
    InvalidInputError, ImageDecodeError     400
    ModelLoadError (model not ready)        503
    ResourceExhaustedError (queue full)     503 with Retry-After: 1
    DeadlineExceededError                   504
    a body over the size limit              413
    anything else                           500  (logged with its traceback)

Error bodies are {"error": "<what was received, what was expected>"}, the
shape tritonclient reads. Requests run on a thread per connection (HTTP/1.1
keep-alive); a bad request gets its status and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import zlib
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote

import numpy as np

from . import datatypes
from .ensemble import FUSIONS
from .errors import (DeadlineExceededError, InvalidInputError, KestrelError, ModelLoadError, ModelNotFoundError,
                     ResourceExhaustedError)
from .hub import ENSEMBLE_PLATFORM, READY, UNAVAILABLE, ModelHub, ServedModel

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent / "web"
SERVER_NAME = "kestrel"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository",
              "kestrel_classify"]
DEFAULT_MAX_BODY_MB = 64  # as the gRPC message limit: 32 float32 224x224x3 images fit
HEADER_LENGTH = "Inference-Header-Content-Length"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}

_STATUS = [  # most specific first
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (InvalidInputError, HTTPStatus.BAD_REQUEST),
    (ResourceExhaustedError, HTTPStatus.SERVICE_UNAVAILABLE),
    (DeadlineExceededError, HTTPStatus.GATEWAY_TIMEOUT),
    (ModelLoadError, HTTPStatus.SERVICE_UNAVAILABLE),
]


def status_for(exc: BaseException) -> HTTPStatus:
    """The HTTP status for an exception (500 for anything unexpected)."""
    if isinstance(exc, HttpError):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


class HttpError(Exception):
    """An error that is about HTTP itself (route, method, body size, content type)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers or {}


def json_response(obj, status: int = HTTPStatus.OK, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json", headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# ---- V2 tensors ----------------------------------------------------------------------------------
def _tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def _flag(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidInputError(f"received {what}={value!r}; expected true or false")


def _input_array(request: dict, binary: memoryview, spec, name: str) -> np.ndarray:
    """The request's one input tensor as a numpy array, checked against the model's input."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else "no"
        raise InvalidInputError(
            f"model '{name}': received {count} input tensors, expected exactly 1 ('{spec.name}') in \"inputs\""
        )
    tensor = inputs[0]
    if tensor.get("name") != spec.name:
        raise InvalidInputError(f"model '{name}': received input {tensor.get('name')!r}, expected {spec.name!r}")
    datatype = tensor.get("datatype")
    dtype = datatypes.from_v2(datatype) if isinstance(datatype, str) else None
    if dtype != spec.dtype:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received datatype {datatype!r}, expected {spec.datatype!r}"
        )
    raw_shape = tensor.get("shape")
    expected = ["N", *spec.shape]
    if not isinstance(raw_shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw_shape):
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received shape {raw_shape!r}, expected a list of integers "
            f"{expected} (-1 = any)"
        )
    shape = tuple(raw_shape)
    if len(shape) != len(expected) or any(d < 0 for d in shape) or any(
            want != -1 and got != want for got, want in zip(shape[1:], spec.shape)):
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received shape {list(shape)}, expected {expected} (-1 = any)"
        )
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"model '{name}' input '{spec.name}': \"parameters\" must be an object")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        want = count * dtype.itemsize
        if not isinstance(size, int) or size != want:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received binary_data_size {size!r}, "
                f"expected {want} bytes for shape {list(shape)} {datatype}"
            )
        if len(binary) != size:
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received {len(binary)} bytes of binary data after the "
                f"JSON header, expected binary_data_size={size}"
            )
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if len(binary):
        raise InvalidInputError(
            f"model '{name}': received {len(binary)} bytes of binary data but no input declares binary_data_size"
        )
    if "data" not in tensor:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received no data; expected \"data\" (a list of numbers) or "
            "parameters.binary_data_size with the binary tensor data extension"
        )
    try:
        values = np.asarray(tensor["data"])
    except ValueError:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received ragged nested \"data\"; expected a flat or "
            f"row-major nested list of {count} numbers"
        ) from None
    if values.size != count:
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received {values.size} values in \"data\", "
            f"expected {count} for shape {list(shape)}"
        )
    if dtype.kind in "iu":
        if values.size and values.dtype.kind not in "iu":
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received {values.dtype.name} values in \"data\", "
                f"expected integers for {datatype}"
            )
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise InvalidInputError(
                f"model '{name}' input '{spec.name}': received values in [{values.min()}, {values.max()}], "
                f"expected {datatype} values in [{info.min}, {info.max}]"
            )
    elif values.size and values.dtype.kind not in "iufb":
        raise InvalidInputError(
            f"model '{name}' input '{spec.name}': received {values.dtype.name} values, expected numbers"
        )
    return values.astype(dtype).reshape(shape)


def _serialize_bytes(items: list[bytes]) -> bytes:
    """V2 BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


# ---- multipart ---------------------------------------------------------------------------------
def _header_params(value: str) -> Message:
    msg = Message()
    msg["Content-Type"] = value
    return msg


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[tuple[str | None, bytes]]]:
    """multipart/form-data -> {field name: [(filename or None, bytes), ...]}."""
    boundary = _header_params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise InvalidInputError(f"received Content-Type {content_type!r} without a boundary; expected "
                                "multipart/form-data; boundary=...")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidInputError(
            f"received a multipart body of {len(body)} bytes without its closing boundary; expected a complete "
            "multipart/form-data upload"
        )
    fields: dict[str, list[tuple[str | None, bytes]]] = {}
    for chunk in chunks[1:-1]:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InvalidInputError("received a multipart part without headers; expected Content-Disposition")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head + b"\r\n\r\n")
        disposition = headers.get("Content-Disposition", "")
        holder = Message()
        holder["Content-Disposition"] = str(disposition)
        name = holder.get_param("name", header="content-disposition")
        filename = holder.get_param("filename", header="content-disposition")
        if not name:
            raise InvalidInputError(f"received a multipart part with Content-Disposition {str(disposition)!r}; "
                                    "expected form-data with a name")
        fields.setdefault(str(name), []).append((None if filename is None else str(filename), data))
    return fields


# ---- the server ----------------------------------------------------------------------------------
_NAME = r"(?P<model>[^/]+)"
_VERSION = r"(?:/versions/(?P<version>[^/]+))?"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    (method, re.compile(pattern + r"/?$"), handler)
    for method, pattern, handler in [
        ("GET", r"/(?:index\.html)?", "page"),
        ("GET", r"/static/(?P<file>[A-Za-z0-9_.-]+)", "static"),
        ("GET", r"/v2/health/live", "live"),
        ("GET", r"/v2/health/ready", "ready"),
        ("GET", r"/v2", "server_metadata"),
        ("GET", r"/v2/models/stats", "statistics"),
        ("POST", r"/v2/repository/index", "repository_index"),
        ("GET", r"/v2/models/" + _NAME + _VERSION, "model_metadata"),
        ("GET", r"/v2/models/" + _NAME + _VERSION + r"/ready", "model_ready"),
        ("GET", r"/v2/models/" + _NAME + _VERSION + r"/config", "model_config"),
        ("GET", r"/v2/models/" + _NAME + _VERSION + r"/stats", "statistics"),
        ("POST", r"/v2/models/" + _NAME + _VERSION + r"/infer", "infer"),
        ("GET", r"/v1/models", "list_models"),
        ("POST", r"/v1/classify", "classify"),
    ]
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    request_queue_size = 128

    def __init__(self, address, handler, frontend: "HttpFrontend"):
        self.frontend = frontend
        super().__init__(address, handler)


class HttpFrontend:
    """The HTTP port of a Kestrel server (see the module docstring)."""

    def __init__(self, hub: ModelHub, *, host: str = "127.0.0.1", port: int = 8000,
                 serving: Callable[[], bool] = lambda: True, max_body_mb: float = DEFAULT_MAX_BODY_MB,
                 web_root: Path = WEB_ROOT, idle_timeout: float = 60.0):
        self.hub = hub
        self.host = host
        self.requested_port = port
        self.serving = serving
        self.max_body = int(max_body_mb * 1024 * 1024)
        self.web_root = Path(web_root)
        self.idle_timeout = idle_timeout
        self.port: int | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._inflight = 0
        self._idle = threading.Condition()
        self._connections: set[socket.socket] = set()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "HttpFrontend":
        """Bind host:port (0 = a free port) and serve in a background thread. OSError if it cannot bind."""
        handler = type("KestrelHandler", (_Handler,), {"timeout": self.idle_timeout})
        self._httpd = _Server((self.host, self.requested_port), handler, self)
        self.port = int(self._httpd.server_address[1])
        self._accepting = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop accepting, let in-flight requests finish within `grace` seconds, close idle connections."""
        if self._httpd is None:
            return
        self.stop_accepting()
        self.wait(grace)
        self._httpd = None

    def stop_accepting(self) -> None:
        """Close the listening socket; requests arriving on open connections get 503. Idempotent."""
        if self._httpd is None or not self._accepting:
            return
        self._accepting = False
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait(self, grace: float | None = 10.0) -> bool:
        """Wait for in-flight requests (True if none is left), then close the remaining connections."""
        deadline = None if grace is None else time.monotonic() + grace
        with self._idle:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning("http: %d request(s) still running after the grace period", self._inflight)
                    break
                self._idle.wait(left)
            done = self._inflight == 0
            connections = list(self._connections)
        for conn in connections:  # idle keep-alive connections: wake their threads up
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return done

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- bookkeeping used by the handler ---------------------------------------------------
    def _begin(self) -> None:
        with self._idle:
            self._inflight += 1

    def _end(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._idle:
            (self._connections.add if add else self._connections.discard)(conn)

    # ---- endpoints: each returns a Response or raises ------------------------------------------
    def page(self, req: "_Handler") -> Response:
        return self._file("index.html")

    def static(self, req: "_Handler", file: str) -> Response:
        if file.startswith(".") or file == "index.html":
            raise HttpError(HTTPStatus.NOT_FOUND, f"received a request for /static/{file}; no such file")
        return self._file(file)

    def _file(self, name: str) -> Response:
        path = self.web_root / name
        kind = _STATIC_TYPES.get(path.suffix)
        if kind is None or not path.is_file():
            raise HttpError(HTTPStatus.NOT_FOUND, f"received a request for {name!r}; no such file in the web page")
        return Response(HTTPStatus.OK, path.read_bytes(), kind, {"Cache-Control": "no-cache"})

    def live(self, req) -> Response:
        return Response(HTTPStatus.OK)

    def ready(self, req) -> Response:
        ok = self.serving() and self.hub.ready
        return Response(HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST)

    def server_metadata(self, req) -> Response:
        return json_response({"name": SERVER_NAME, "version": _version(), "extensions": EXTENSIONS})

    def model_ready(self, req, model: str, version: str | None) -> Response:
        ok = self.serving() and self.hub.model_ready(model, version or "")
        return Response(HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST)

    def model_metadata(self, req, model: str, version: str | None) -> Response:
        target = self.hub.find(model)
        self.hub.model_ready(model, version or "")  # validates the version
        if isinstance(target, ServedModel):
            if target.entry is None:
                raise ModelLoadError(f"model '{model}' has no valid configuration: {target.reason}")
            versions = [str(target.version)] if target.version is not None else [str(v) for v in target.entry.versions]
            return json_response({"name": model, "versions": versions, "platform": target.entry.platform,
                                  "inputs": [_tensor_metadata(target.entry.input_spec)],
                                  "outputs": [_tensor_metadata(target.entry.output_spec)]})
        first = self.hub.members(model)[0]
        body = {"name": model, "versions": ["1"], "platform": ENSEMBLE_PLATFORM, "inputs": [], "outputs": []}
        if first.entry is not None:
            body["inputs"] = [_tensor_metadata(self.hub.input_spec(model))]
            body["outputs"] = [_tensor_metadata(first.entry.output_spec)]
        return json_response(body)

    def model_config(self, req, model: str, version: str | None) -> Response:
        from google.protobuf.json_format import MessageToDict

        target = self.hub.find(model)
        self.hub.model_ready(model, version or "")
        if isinstance(target, ServedModel):
            if target.entry is None:
                raise ModelLoadError(f"model '{model}' has no valid configuration: {target.reason}")
            return json_response(MessageToDict(target.entry.config, preserving_proto_field_name=True))
        members = self.hub.members(model)
        entries = [m.entry for m in members if m.entry is not None]
        config = {"name": model, "platform": ENSEMBLE_PLATFORM,
                  "parameters": {"members": {"string_value": ",".join(target.ensemble.members)},
                                 "fusion": {"string_value": target.ensemble.fusion}}}
        if entries:
            config["max_batch_size"] = min(e.max_batch_size for e in entries)
            first = MessageToDict(entries[0].config, preserving_proto_field_name=True)
            config["input"], config["output"] = first.get("input", []), first.get("output", [])
        return json_response(config)

    def statistics(self, req, model: str | None = None, version: str | None = None) -> Response:
        if model:
            self.hub.model_ready(model, version or "")
            names = [model]
        else:
            names = self.hub.names()
        out = []
        for name in names:
            target = self.hub.find(name)
            snap = self.hub.metrics.model(name).snapshot()
            stats = {key: {"count": snap[key][0], "ns": snap[key][1]}
                     for key in ("success", "fail", "queue", "compute_infer")}
            out.append({
                "name": name,
                "version": str(target.version) if isinstance(target, ServedModel) and target.version else "1",
                "last_inference": snap["last_inference"], "inference_count": snap["inference_count"],
                "execution_count": snap["execution_count"], "inference_stats": stats,
                "batch_stats": [{"batch_size": size, "compute_infer": {"count": count, "ns": ns}}
                                for size, (count, ns) in snap["batches"].items()],
            })
        return json_response({"model_stats": out})

    def repository_index(self, req) -> Response:
        body = req.read_json(optional=True) or {}
        ready_only = _flag(body.get("ready", False), "ready")
        items = []
        for name in self.hub.repository.names():
            served = self.hub.models.get(name)
            if served is None:
                item = {"name": name, "state": UNAVAILABLE, "reason": "not loaded (not named in --models)"}
            else:
                item = {"name": name, "version": "" if served.version is None else str(served.version),
                        "state": served.state, "reason": served.reason}
            if not ready_only or item["state"] == READY:
                items.append(item)
        for served in self.hub.ensembles.values():
            if not ready_only or served.ready:
                items.append({"name": served.name, "version": "1", "state": served.state, "reason": served.reason})
        return json_response(items)

    def infer(self, req: "_Handler", model: str, version: str | None) -> Response:
        with _Stats(self.hub, "http_infer", [model]):
            return self._infer(req, model, version or "")

    def _infer(self, req: "_Handler", model: str, version: str) -> Response:
        body = req.read_body()  # first: an error answered with the body unread would cost the connection
        self.hub.ready_model(model, version)
        spec = self.hub.input_spec(model)
        output_spec = self.hub.members(model)[0].entry.output_spec
        header_length = req.headers.get(HEADER_LENGTH)
        if header_length is not None:
            if not header_length.strip().isdigit() or int(header_length) > len(body):
                raise InvalidInputError(
                    f"received {HEADER_LENGTH}: {header_length!r} with a body of {len(body)} bytes; expected the "
                    "length of the JSON header, at most the body's length"
                )
            split = int(header_length)
        else:
            split = len(body)
        request = _loads(body[:split], "a V2 inference request")
        if not isinstance(request, dict):
            raise InvalidInputError(f"received a JSON {type(request).__name__}; expected a V2 inference request "
                                    "object with \"inputs\"")
        parameters = request.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInputError("received request \"parameters\" that is not an object")
        batch = _input_array(request, memoryview(body)[split:], spec, model)
        binary_default = _flag(parameters.get("binary_data_output", False), "binary_data_output")
        wanted = request.get("outputs")
        if wanted is None or wanted == []:
            wanted = [{"name": output_spec.name}]
        if not isinstance(wanted, list) or not all(isinstance(w, dict) for w in wanted):
            raise InvalidInputError("received \"outputs\" that is not a list of objects; expected "
                                    f"[{{\"name\": \"{output_spec.name}\"}}]")
        for out in wanted:
            if out.get("name") != output_spec.name:
                raise InvalidInputError(
                    f"model '{model}': received requested output {out.get('name')!r}, expected {output_spec.name!r}"
                )
        fusion = parameters.get("fusion")
        if fusion is not None and not isinstance(fusion, str):
            raise InvalidInputError(f"received fusion={fusion!r}; expected one of {', '.join(FUSIONS)}")
        deadline = None
        if "timeout" in parameters:  # tritonclient's server-side timeout, in microseconds
            timeout = parameters["timeout"]
            if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
                raise InvalidInputError(f"received timeout={timeout!r}; expected a positive number of microseconds")
            deadline = req.started + timeout / 1e6
        result = self.hub.infer(model, version, batch, deadline, fusion=fusion)
        probs = np.ascontiguousarray(result.probabilities, dtype="<f4")
        labels = self.hub.members(model)[0].runner.labels
        outputs, chunks = [], []
        for out in wanted:
            params = out.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidInputError(f"output '{output_spec.name}': \"parameters\" must be an object")
            binary = _flag(params.get("binary_data", binary_default), "binary_data")
            classes = params.get("classification", 0)
            if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
                raise InvalidInputError(f"received classification={classes!r}; expected a number of classes >= 0")
            item = {"name": output_spec.name}
            if classes:  # the classification extension: "score:index[:label]" strings, best first
                k = min(classes, probs.shape[1])
                order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                texts = [f"{probs[n, i]:f}:{i}" + (f":{labels[i]}" if labels and i < len(labels) else "")
                         for n in range(probs.shape[0]) for i in order[n]]
                item.update(datatype="BYTES", shape=[probs.shape[0], k])
                raw, data = _serialize_bytes([t.encode() for t in texts]), texts
            else:
                item.update(datatype="FP32", shape=list(probs.shape))
                raw, data = None, probs
            if binary:
                raw = raw if raw is not None else probs.tobytes()
                item["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                item["data"] = data if isinstance(data, list) else data.ravel().tolist()
            outputs.append(item)
        body_out = {"model_name": model, "model_version": result.version, "outputs": outputs}
        if "id" in request:
            body_out["id"] = request["id"]
        header = json.dumps(body_out, separators=(",", ":")).encode()
        if not chunks:
            return Response(HTTPStatus.OK, header, "application/json")
        return Response(HTTPStatus.OK, header + b"".join(chunks), "application/octet-stream",
                        {HEADER_LENGTH: str(len(header))})

    def list_models(self, req) -> Response:
        models = []
        for served in self.hub.models.values():
            info = {"name": served.name, "state": served.state, "reason": served.reason,
                    "version": None if served.version is None else str(served.version)}
            if served.entry is not None:
                info.update(platform=served.entry.platform, num_classes=served.entry.output_spec.shape[0],
                            input_size=list(served.entry.input_spec.shape[:2]))
            models.append(info)
        ensembles = [{"name": s.name, "state": s.state, "reason": s.reason, "members": list(s.ensemble.members),
                      "fusion": s.ensemble.fusion} for s in self.hub.ensembles.values()]
        return json_response({"models": models, "ensembles": ensembles, "fusions": list(FUSIONS)})

    def classify(self, req: "_Handler") -> Response:
        content_type = req.headers.get("Content-Type", "")
        kind = _header_params(content_type).get_content_type() if content_type else ""
        fields: dict[str, list[str]] = {}
        filename = None
        if kind == "multipart/form-data":
            parts = parse_multipart(req.read_body(), content_type)
            files = parts.get("image", [])
            if len(files) != 1:
                raise InvalidInputError(
                    f"received {len(files)} 'image' fields (fields: {', '.join(sorted(parts)) or 'none'}); "
                    "expected one 'image' file field in the multipart/form-data upload"
                )
            filename, image = files[0]
            for key, values in parts.items():
                if key != "image":
                    fields[key] = [v.decode("utf-8", "replace") for _, v in values]
        elif kind.startswith("image/") or kind == "application/octet-stream":
            image = req.read_body()
            fields = parse_qs(req.query, keep_blank_values=True)
        else:
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"received Content-Type {content_type or 'none'!r}; expected multipart/form-data "
                            "with an 'image' file field, or the image itself (image/*) as the body")
        names = [n.strip() for v in fields.get("models", []) + fields.get("ensemble", []) for n in v.split(",")]
        names = [n for n in names if n]
        top = _int_field(fields, "top_k", 5)
        fusion = (fields.get("fusion") or [""])[-1].strip()
        with _Stats(self.hub, "http_classify", names):
            result = self.hub.classify(image, names, top, fusion)
        return json_response({
            "image": {"filename": filename, "bytes": len(image), "height": result.image_size[0],
                      "width": result.image_size[1]},
            "decode_ms": result.decode_s * 1e3,
            "total_ms": result.total_s * 1e3,
            "models": [{"model": a.model, "version": a.version, "predictions": _predictions(a.predictions),
                        "queue_ms": a.run.queue_s * 1e3, "compute_ms": a.run.compute_s * 1e3,
                        "latency_ms": (a.run.queue_s + a.run.compute_s) * 1e3, "batch_size": a.run.batch_size,
                        "input_size": list(a.input_size)} for a in result.models],
            "ensembles": [{"name": e.name, "fusion": e.fusion, "members": e.members,
                           "predictions": _predictions(e.predictions)} for e in result.ensembles],
        })


def _predictions(items) -> list[dict]:
    return [{"label": label, "index": int(index), "probability": float(p)} for label, index, p in items]


def _int_field(fields: dict[str, list[str]], key: str, default: int) -> int:
    values = fields.get(key)
    if not values or not values[-1].strip():
        return default
    text = values[-1].strip()
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"received {key}={text!r}; expected a whole number") from None


def _loads(data: bytes, what: str):
    if not data.strip():
        raise InvalidInputError(f"received an empty body; expected {what} as JSON")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"received a body that is not valid JSON ({exc}); expected {what}") from None


class _Stats:
    """Per-model request metrics for one HTTP request (api label http_infer / http_classify, code = HTTP status)."""

    def __init__(self, hub: ModelHub, api: str, names):
        self.api = api
        # only names this server serves get metrics (arbitrary names must not create series)
        self.stats = [hub.metrics.model(n) for n in dict.fromkeys(names) if n in hub.models or n in hub.ensembles]

    def __enter__(self):
        self.t0 = time.perf_counter()
        for stats in self.stats:
            stats.received(self.api)
        return self

    def __exit__(self, kind, exc, tb):
        seconds = time.perf_counter() - self.t0
        code = None if exc is None else str(int(status_for(exc)))
        for stats in self.stats:
            stats.finished(self.api, seconds, code)
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kestrel"
    disable_nagle_algorithm = True  # small responses must not wait for the client's delayed ACK (40 ms)
    wbufsize = 1 << 16  # headers and a small body leave in one send
    sys_version = ""
    server: _Server

    def setup(self):
        super().setup()
        self.server.frontend._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.frontend._track(self.connection, False)

    def send_error(self, code, message=None, explain=None):
        """Errors http.server raises itself (malformed request line, header too long...) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        body = json.dumps({"error": f"{text}" + (f": {explain}" if explain else "")}).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("http %s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):  # GET's status and headers, no body (_send checks self.command)
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ---- request body ------------------------------------------------------------------------
    def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        frontend = self.server.frontend
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise HttpError(HTTPStatus.LENGTH_REQUIRED,
                            f"received Transfer-Encoding: {self.headers['Transfer-Encoding']}; expected a body "
                            "with a Content-Length")
        length_text = self.headers.get("Content-Length", "0").strip()
        if not length_text.isdigit():
            raise HttpError(HTTPStatus.BAD_REQUEST,
                            f"received Content-Length: {length_text!r}; expected a number of bytes")
        length = int(length_text)
        if length > frontend.max_body:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"received a body of {length} bytes; the limit is {frontend.max_body} bytes "
                            f"({frontend.max_body / 2**20:g} MiB)")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST,
                            f"received {len(data)} bytes of a body announced as {length} bytes (connection closed)")
        self._body = data
        encoding = self.headers.get("Content-Encoding", "").lower().strip()
        if encoding in ("gzip", "deflate"):
            self._body = self._inflate(data, encoding, frontend.max_body)
        elif encoding not in ("", "identity"):
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"received Content-Encoding: {encoding}; expected gzip, deflate or none")
        return self._body

    @staticmethod
    def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise InvalidInputError(f"received a body that is not valid {encoding} ({exc})") from None
        if len(out) > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"received a {encoding} body that inflates past the limit of {limit} bytes")
        return out

    def read_json(self, optional: bool = False):
        body = self.read_body()
        if optional and not body.strip():
            return None
        return _loads(body, "a JSON object")

    # ---- dispatch ------------------------------------------------------------------------------
    def _route(self, method: str):
        path = self.path.split("?", 1)[0]
        allowed = []
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match:
                if route_method == method:
                    args = {k: (unquote(v) if v is not None else None) for k, v in match.groupdict().items()}
                    return name, args
                allowed.append(route_method)
        if allowed:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"received {method} {path}; expected {' or '.join(allowed)}",
                            {"Allow": ", ".join(allowed)})
        raise HttpError(HTTPStatus.NOT_FOUND, f"received a request for {path}, which this server does not serve; "
                        "expected /, /v1/classify, /v1/models or a KServe V2 path under /v2")

    def _dispatch(self, method: str) -> None:
        frontend = self.server.frontend
        self._body = None
        self.started = time.monotonic()
        self.query = self.path.split("?", 1)[1] if "?" in self.path else ""
        frontend._begin()
        try:
            try:
                if not frontend.accepting:
                    self.close_connection = True
                    raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down; retry elsewhere")
                name, args = self._route(method)
                response = getattr(frontend, name)(self, **args)
            except Exception as exc:
                response = self._error(exc)
            self._send(response)
        finally:
            frontend._end()

    def _error(self, exc: Exception) -> Response:
        status = status_for(exc)
        headers = dict(exc.headers) if isinstance(exc, HttpError) else {}
        if isinstance(exc, ResourceExhaustedError):
            headers["Retry-After"] = "1"
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            log.exception("http %s %s failed unexpectedly", self.command, self.path)
            message = f"internal error: {type(exc).__name__}: {exc}"
        else:
            log.info("http %s %s: %d: %s", self.command, self.path, status, exc)
            message = str(exc) if isinstance(exc, (KestrelError, HttpError)) else f"{type(exc).__name__}: {exc}"
        if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            self.close_connection = True
        return error_response(status, message, headers)

    def _send(self, response: Response) -> None:
        unread = self._body is None and self.headers.get("Content-Length", "0").strip() not in ("", "0")
        if unread:  # the body was never read: this connection cannot carry another request
            self.close_connection = True
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for key, value in response.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()
        if unread:
            self._linger()

    def _linger(self, seconds: float = 2.0, limit: int = 256 * 2**20) -> None:
        """Half-close and drain what the client still sends, so it reads our answer instead of a reset."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            end, drained = time.monotonic() + seconds, 0
            while time.monotonic() < end and drained < limit:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass


__all__ = ["HttpFrontend", "HttpError", "status_for", "parse_multipart", "DEFAULT_MAX_BODY_MB", "WEB_ROOT"]
