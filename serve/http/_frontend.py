"""HttpFrontend: the HTTP port's endpoints over a ModelHub, and its lifecycle (start, stop_accepting, wait)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

import numpy as np

from ..ensemble import FUSIONS
from ..errors import InvalidInputError, ModelLoadError
from ..hub import ENSEMBLE_PLATFORM, READY, UNAVAILABLE, ModelHub, ServedModel
from ._handler import Handler, Server
from ._multipart import header_params, parse_multipart
from ._responses import HttpError, Response, json_response, status_for
from ._v2 import HEADER_LENGTH, flag, input_array, loads, serialize_bytes, tensor_metadata

log = logging.getLogger("serve.http")

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
SERVER_NAME = "kestrel"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository",
              "kestrel_classify"]
DEFAULT_MAX_BODY_MB = 64  # as the gRPC message limit: 32 float32 224x224x3 images fit
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("kestrel")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class HttpFrontend:
    """The HTTP port of a Kestrel server (see the module docstring)."""

    def __init__(self, hub: ModelHub, *, host: str = "127.0.0.1", port: int = 8000,
                 serving: Callable[[], bool] = lambda: True, max_body_mb: float = DEFAULT_MAX_BODY_MB,
                 web_root: Path = WEB_ROOT, idle_timeout: float = 60.0, max_connections: int = 512):
        self.hub = hub
        self.host = host
        self.requested_port = port
        self.serving = serving
        self.max_body = int(max_body_mb * 1024 * 1024)
        self.web_root = Path(web_root)
        self.idle_timeout = idle_timeout  # an idle keep-alive connection is closed after it
        self.max_connections = max_connections  # open connections (one thread each); more get 503
        self.port: int | None = None
        self._httpd: Server | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._inflight = 0
        self._idle = threading.Condition()
        self._connections: set[socket.socket] = set()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "HttpFrontend":
        """Bind host:port (0 = a free port) and serve in a background thread. OSError if it cannot bind."""
        handler = type("KestrelHandler", (Handler,), {"timeout": self.idle_timeout})
        self._httpd = Server((self.host, self.requested_port), handler, self)
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
    def page(self, req: Handler) -> Response:
        return self._file("index.html")

    def static(self, req: Handler, file: str) -> Response:
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
                                  "inputs": [tensor_metadata(target.entry.input_spec)],
                                  "outputs": [tensor_metadata(target.entry.output_spec)]})
        first = self.hub.members(model)[0]
        body = {"name": model, "versions": ["1"], "platform": ENSEMBLE_PLATFORM, "inputs": [], "outputs": []}
        if first.entry is not None:
            body["inputs"] = [tensor_metadata(self.hub.input_spec(model))]
            body["outputs"] = [tensor_metadata(first.entry.output_spec)]
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
        ready_only = flag(body.get("ready", False), "ready")
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

    def infer(self, req: Handler, model: str, version: str | None) -> Response:
        with _Stats(self.hub, "http_infer", [model]):
            return self._infer(req, model, version or "")

    def _infer(self, req: Handler, model: str, version: str) -> Response:
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
        request = loads(body[:split], "a V2 inference request")
        if not isinstance(request, dict):
            raise InvalidInputError(f"received a JSON {type(request).__name__}; expected a V2 inference request "
                                    "object with \"inputs\"")
        parameters = request.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInputError("received request \"parameters\" that is not an object")
        batch = input_array(request, memoryview(body)[split:], spec, model)
        binary_default = flag(parameters.get("binary_data_output", False), "binary_data_output")
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
            binary = flag(params.get("binary_data", binary_default), "binary_data")
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
                raw, data = serialize_bytes([t.encode() for t in texts]), texts
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

    def classify(self, req: Handler) -> Response:
        content_type = req.headers.get("Content-Type", "")
        kind = header_params(content_type).get_content_type() if content_type else ""
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


class _Stats:
    """Per-model request metrics for one HTTP request (api label http_infer / http_classify, code = HTTP status)."""

    def __init__(self, hub: ModelHub, api: str, names):
        self.hub, self.api, self.names = hub, api, names

    def __enter__(self):
        self.record = self.hub.record_request(self.api, self.names)
        return self

    def __exit__(self, kind, exc, tb):
        self.record.finish(None if exc is None else str(int(status_for(exc))))
        return False
