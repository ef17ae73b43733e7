"""The HTTP port as a Starlette (ASGI) app over a DataPlane: KServe V2 REST, /v1/classify, the page, /metrics.

    app = create_app(DataPlane(hub), HttpOptions(max_body_mb=64))   # any ASGI server can run it

Each endpoint reads its body with a cap (Content-Length first, then while it streams), hands
plain values to the data plane in a worker thread (inflating gzip, decoding JSON and multipart
images, encoding answers: CPU work leaves the event loop, which reads bodies, parses headers and
writes responses), and turns exceptions into statuses through serve.errors.STATUS.

Infer and classify run in a data plane request scope (serve.dataplane.RequestScope): their target is
acquired once, their metrics count what answered, and when the request ends, its work still queued
in a batcher is cancelled. While they work, the request's ASGI receive channel is watched: when it
says http.disconnect (uvicorn: the connection closed), that queued work is cancelled at once (never
run, as gRPC does for a cancelled RPC), a request not yet handed to the data plane is dropped, and
a result that arrives anyway is discarded; all of it logged at debug only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .._cancel import CancelOnEnd
from ..dataplane import DataPlane, request_size_limit
from ..auth import http_role
from ..errors import (InvalidInputError, KestrelError, PermissionDeniedError, RequestTooLargeError,
                      ResourceExhaustedError, UnauthenticatedError, shown, status_of)
from . import _v2

log = logging.getLogger("serve.http")

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
DEFAULT_MAX_BODY_MB = 64  # as the gRPC message limit: 32 float32 224x224x3 images fit
HTTP_EXTENSIONS = ["binary_tensor_data"]
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
]


@dataclass
class HttpOptions:
    """What the HTTP app accepts (python -m serve --help names the flags)."""

    max_body_mb: float = DEFAULT_MAX_BODY_MB  # any request body, as read (and as inflated)
    max_form_fields: int = 16  # /v1/classify multipart: non-file fields
    max_field_bytes: int = 64 * 1024  # one non-file multipart field
    max_inflight: int | None = None  # POST requests at once (None: `threads`); more: 503 + Retry-After, unread
    threads: int = 64  # worker threads for the data plane's blocking calls
    allowed_hosts: Sequence[str] | None = None  # Host headers accepted (None: any); "*.example.com" works
    web_root: Path = WEB_ROOT
    extra_routes: list = field(default_factory=list)  # more starlette Routes (e.g. /metrics)

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def inflight_limit(self) -> int:
        """POST requests handled at once: each holds a worker thread while its model works, so by default as
        many as there are threads (more would wait in the executor's queue, unbounded)."""
        return int(self.max_inflight) if self.max_inflight else int(self.threads)


class HttpError(Exception):
    """An error about HTTP itself (route, method, media type), with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


CLIENT_GONE = 499  # nginx's "client closed request": recorded in the metrics, never sent


def http_status(exc: BaseException) -> int:
    if isinstance(exc, ClientDisconnect):
        return CLIENT_GONE
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    return status_of(exc)[1]


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status, headers, "application/json")


def error_response(exc: BaseException, request: Request | None = None) -> Response:
    status = http_status(exc)
    headers = dict(exc.headers or {}) if isinstance(exc, (HttpError, HTTPException)) else {}
    where = f"{request.method} {shown(request.url.path)[1:-1]}" if request is not None else "request"
    if status >= 500 and not isinstance(exc, (KestrelError, HttpError, HTTPException)):
        log.error("http %s failed unexpectedly", where, exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:  # a client's mistake is not the operator's news (and must not flood the log): debug
        log.log(logging.DEBUG if status < 500 else logging.INFO, "http %s: %d: %s", where, status, exc)
        message = exc.detail if isinstance(exc, HTTPException) else str(exc)
    if isinstance(exc, ResourceExhaustedError) and status == 503:
        headers["Retry-After"] = "1"
    return json_response({"error": message}, status, headers)


class _Kestrel:
    """The app's state: the data plane, the options and the worker threads."""

    def __init__(self, plane: DataPlane, options: HttpOptions):
        self.plane, self.options = plane, options
        self.executor = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="http")
        self.inflight = 0  # POST requests being handled (touched on the event loop only)
        self.on_refused = None  # called for each POST refused as too many (the server's metrics)
        self.authorizer = None  # serve.auth.Authorizer: who may call what (None: everyone)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_watched(self, request: Request, scope, fn, *args):
        """fn(*args) in a worker thread while the client's connection is watched: if the client goes
        away, the scope's queued work is cancelled at once and ClientDisconnect raised."""
        watch = _DisconnectWatch(request, scope.submitted)
        try:
            await asyncio.sleep(0)  # a disconnect already known is seen before any work starts
            if not watch.gone:
                try:
                    result = await self.run(functools.partial(fn, *args))
                except Exception:
                    if not watch.gone:
                        raise
                    # its work was cancelled (or failed): the client is not there to learn why
                else:
                    if not watch.gone:
                        return result
            raise ClientDisconnect()
        finally:
            watch.close()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class _DisconnectWatch:
    """Once a request's body is read: a task reading its ASGI receive channel until
    http.disconnect, which ends `submitted` (its queued work is cancelled). Close it before the
    response is sent."""

    def __init__(self, request: Request, submitted: CancelOnEnd):
        self.submitted = submitted
        self.gone = False
        self._where = f"{request.method} {shown(request.url.path)[1:-1]}"
        self._task = asyncio.get_running_loop().create_task(self._watch(request.receive))

    async def _watch(self, receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass  # the body was read: nothing else is expected before the disconnect
        except Exception as exc:  # noqa: BLE001 - an ASGI server whose receive() fails here: the request just runs
            log.debug("http %s: cannot watch for a disconnect: %s", self._where, exc)
            return
        log.debug("http %s: the client went away; its queued work is cancelled", self._where)
        self.gone = True
        self.submitted.end()

    def close(self) -> None:
        self._task.cancel()


# ---- bodies ---------------------------------------------------------------------------------
def _declared_length(request: Request) -> int | None:
    text = request.headers.get("content-length")
    return int(text) if text is not None and text.strip().isdigit() else None


async def read_body(request: Request, limit: int, what: str = "a body") -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise RequestTooLargeError(f"received {what} of {declared} bytes; the limit is {limit} bytes "
                                   f"({limit / 2**20:g} MiB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"received {what} of more than {limit} bytes; the limit is {limit} bytes "
                                       f"({limit / 2**20:g} MiB)")
        chunks.append(chunk)
    return b"".join(chunks)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """A gzip / deflate body, inflated to at most `limit` bytes."""
    encoding = encoding.lower().strip()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "deflate"):
        raise HttpError(415, f"received Content-Encoding: {shown(encoding)}; expected gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"received a body that is not valid {encoding} ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestTooLargeError(f"received a {encoding} body that inflates past the limit of {limit} bytes")
    return out


async def _capped_stream(request: Request, limit: int):
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise RequestTooLargeError(f"received a body of {declared} bytes; the limit is {limit} bytes "
                                   f"({limit / 2**20:g} MiB)")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"received a body of more than {limit} bytes; the limit is {limit} bytes")
        yield chunk


# python-multipart logs a WARNING for each malformed body before raising: a client's mistake, which
# must not write to the server's log (it becomes the 400's message instead)
if logging.getLogger("python_multipart.multipart").level == logging.NOTSET:
    logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


class _FormParser(MultiPartParser):
    """Starlette's multipart/form-data parser (python-multipart underneath) that also refuses a
    body cut short: python-multipart's finalize() accepts one that ends before its closing
    boundary, so this one follows the parts and says where the body ended. File parts stay in
    memory up to `spool_bytes` (the body cap): no temporary file, no thread hop per chunk."""

    def __init__(self, headers, stream, *, spool_bytes: int, **limits):
        self.received = 0
        super().__init__(headers, self._counted(stream), **limits)
        self.spool_max_size = spool_bytes
        self.where = "before its first boundary"
        self.complete = False

    async def _counted(self, stream):
        async for chunk in stream:
            self.received += len(chunk)
            yield chunk

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self.where = "in the headers of a part"

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        self.where = f"inside part {shown(self._current_part.field_name)}"

    def on_end(self) -> None:
        self.complete = True

    async def read(self):
        """The form; InvalidInputError naming what was wrong with a malformed or truncated body."""
        limits = f"at most 1 file and {self.max_fields} fields"
        try:
            form = await self.parse()
        except MultiPartException as exc:
            cause = f" ({shown(str(exc.__cause__))[1:-1]})" if exc.__cause__ is not None else ""
            raise InvalidInputError(f"received a multipart/form-data upload that cannot be read: {exc.message}"
                                    f"{cause}; expected a well-formed form ({limits})") from None
        if not self.complete:
            await form.close()
            _, params = parse_options_header(self.headers["Content-Type"])
            boundary = params.get(b"boundary", b"").decode("latin-1")
            if not self.received:
                raise InvalidInputError("received an empty multipart/form-data body; expected a form with an "
                                        "'image' file field, ending with its closing boundary")
            raise InvalidInputError(
                f"received a multipart/form-data body of {self.received} bytes that ends {self.where}, before "
                f"its closing boundary {shown('--' + boundary + '--')}: the upload was cut short; expected the "
                "whole form (an 'image' file field) followed by the closing boundary")
        return form


# ---- endpoints ------------------------------------------------------------------------------
def _kestrel(request: Request) -> _Kestrel:
    return request.app.state.kestrel


def _endpoint(fn):
    """Every endpoint: its exceptions become JSON errors; a client that went away is not an error."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request, _kestrel(request))
        except ClientDisconnect:
            log.debug("http %s %s: the client went away", request.method, request.url.path)
            return Response(status_code=CLIENT_GONE)  # never sent: the connection is gone
        except Exception as exc:  # noqa: BLE001 - the boundary: every error gets its status
            return error_response(exc, request)

    endpoint.__name__ = fn.__name__
    return endpoint


def _params(request: Request) -> tuple[str, str]:
    return request.path_params["model"], request.path_params.get("version", "")


@_endpoint
async def page(request, k):
    return _file(k, "index.html")


@_endpoint
async def static(request, k):
    name = request.path_params["file"]
    if name.startswith(".") or name == "index.html":
        raise HttpError(404, f"received a request for /static/{shown(name)[1:-1]}; no such file")
    return _file(k, name)


def _file(k: _Kestrel, name: str) -> Response:
    path = Path(k.options.web_root) / name
    kind = _STATIC_TYPES.get(path.suffix)
    if kind is None or not path.is_file() or path.resolve().parent != Path(k.options.web_root).resolve():
        raise HttpError(404, f"received a request for {shown(name)}; no such file in the web page")
    return Response(path.read_bytes(), 200, {"Cache-Control": "no-cache"}, kind)


@_endpoint
async def live(request, k):
    return Response(status_code=200 if k.plane.live() else 400)


@_endpoint
async def ready(request, k):
    return Response(status_code=200 if k.plane.ready() else 400)


@_endpoint
async def server_metadata(request, k):
    meta = k.plane.server_metadata()
    meta["extensions"] = HTTP_EXTENSIONS + meta["extensions"]
    return json_response(meta)


@_endpoint
async def model_ready(request, k):
    return Response(status_code=200 if k.plane.model_ready(*_params(request)) else 400)


@_endpoint
async def model_metadata(request, k):
    return json_response(k.plane.model_metadata(*_params(request)))


@_endpoint
async def model_config(request, k):
    from google.protobuf.json_format import MessageToDict

    return json_response(MessageToDict(k.plane.model_config(*_params(request)), preserving_proto_field_name=True))


@_endpoint
async def statistics(request, k):
    model = request.path_params.get("model", "")
    return json_response({"model_stats": k.plane.model_statistics(model, request.path_params.get("version", ""))})


@_endpoint
async def repository_index(request, k):
    body = await read_body(request, 64 * 1024)
    options = _v2.loads(body, "a JSON object", optional=True) or {}
    if not isinstance(options, dict):
        raise InvalidInputError("received a repository index request that is not a JSON object")
    return json_response(k.plane.repository_index(str(options.get("repository_name", "")),
                                                  _v2.flag(options.get("ready", False), "ready")))


def _repository_parameters(body: bytes, what: str) -> dict:
    options = _v2.loads(body, f"a repository {what} request", optional=True) or {}
    if not isinstance(options, dict):
        raise InvalidInputError(f"received a repository {what} request that is not a JSON object")
    parameters = options.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"received \"parameters\" {shown(parameters)}; expected a JSON object")
    return parameters


@_endpoint
async def repository_load(request, k):
    body = await read_body(request, 4 * 1024 * 1024, "a repository load request")  # room for a "config"
    parameters = await k.run(_repository_parameters, body, "load")
    await k.run(k.plane.repository_load, request.path_params["model"], "", parameters)
    return json_response({})


@_endpoint
async def repository_unload(request, k):
    body = await read_body(request, 64 * 1024, "a repository unload request")
    parameters = _repository_parameters(body, "unload")
    await k.run(k.plane.repository_unload, request.path_params["model"], "", parameters)
    return json_response({})


@_endpoint
async def list_models(request, k):
    return json_response(k.plane.list_models())


_HTTP_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT"}


def code_of(exc: BaseException) -> str:
    """The status code name a failed HTTP request's metrics record: the gRPC name of the same error
    (serve.errors.STATUS), so that both transports count one failure the same way (and Triton's
    failure reason is the same)."""
    if isinstance(exc, ClientDisconnect):
        return "CANCELLED"
    if isinstance(exc, (HttpError, HTTPException)):
        status = http_status(exc)
        return _HTTP_CODES.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")
    return status_of(exc)[0]


@_endpoint
async def infer(request, k):
    model, version = _params(request)
    started = time.monotonic()
    with k.plane.request("http_infer", label=code_of) as scope:
        target = scope.acquire(model, version)  # the one lookup: held until the response
        binary = _v2.HEADER_LENGTH.lower() in request.headers
        limit = k.options.max_body
        budget = request_size_limit(target, binary)  # what max_batch_size images can need, before parsing
        encoded = request.headers.get("content-encoding", "")
        body = await read_body(request, limit if encoded or budget is None else min(limit, budget), "a V2 infer body")
        if encoded:  # inflating up to the limit is CPU work: not on the event loop
            body = await k.run(inflate, body, encoded, limit if budget is None else min(limit, budget))
        header_length = request.headers.get(_v2.HEADER_LENGTH)
        answer = await k.run_watched(request, scope, _v2.infer, k.plane, scope, model, version, body, header_length,
                                     started)
    return answer


@_endpoint
async def classify(request, k):
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    fields: dict[str, list[str]] = {}
    filename = None
    if kind == "multipart/form-data":
        form = await _FormParser(request.headers, _capped_stream(request, k.options.max_body),
                                 max_files=1, max_fields=k.options.max_form_fields,
                                 max_part_size=k.options.max_field_bytes, spool_bytes=k.options.max_body).read()
        try:
            images = [value for key, value in form.multi_items() if key == "image" and not isinstance(value, str)]
            if len(images) != 1:
                names = sorted({key for key, _ in form.multi_items()})
                raise InvalidInputError(
                    f"received {len(images)} 'image' file fields (fields: {shown(', '.join(names) or 'none')}); "
                    "expected one 'image' file field in the multipart/form-data upload"
                )
            filename = images[0].filename
            image = await images[0].read()
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields.setdefault(key, []).append(value)
        finally:
            await form.close()
    elif kind.startswith("image/") or kind == "application/octet-stream":
        image = await read_body(request, k.options.max_body, "an image body")
        for key, value in request.query_params.multi_items():
            fields.setdefault(key, []).append(value)
    else:
        raise HttpError(415, f"received Content-Type {shown(content_type or 'none')}; expected "
                        "multipart/form-data with an 'image' file field, or the image itself (image/*) as the body")
    names = [n.strip() for v in fields.get("models", []) + fields.get("ensemble", []) for n in v.split(",")]
    names = [n for n in names if n]
    top = _int_field(fields, "top_k", 0)  # 0: the default (serve.ensemble.DEFAULT_TOP_K), as on gRPC
    fusion = (fields.get("fusion") or [""])[-1].strip()
    with k.plane.request("http_classify", label=code_of) as scope:
        return await k.run_watched(request, scope, _v2.classify, k.plane, scope, image, names, top, fusion, filename)


def _int_field(fields: dict[str, list[str]], key: str, default: int) -> int:
    values = fields.get(key)
    if not values or not values[-1].strip():
        return default
    text = values[-1].strip()
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"received {key}={shown(text)}; expected a whole number") from None


# ---- errors from routing, middleware --------------------------------------------------------
async def _http_exception(request: Request, exc: HTTPException) -> Response:
    path = shown(request.url.path)[1:-1]
    if exc.status_code == 404:
        exc = HttpError(404, f"received a request for {path}, which this server does not serve; expected /, "
                        "/v1/classify, /v1/models, /metrics or a KServe V2 path under /v2")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        exc = HttpError(405, f"received {request.method} {path}; expected {allow.replace(', ', ' or ')}",
                        {"Allow": allow})
    return error_response(exc, request)


class _Guard:
    """Security headers on every response; POST requests over `max_inflight` are answered 503 unread."""

    def __init__(self, app, kestrel: _Kestrel):
        self.app, self.kestrel = app, kestrel

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        k = self.kestrel
        if k.authorizer is not None:
            role, changes = http_role(scope["path"])
            if role is not None:
                header = next((v.decode("latin-1") for n, v in scope.get("headers", []) if n == b"authorization"),
                              None)
                try:
                    k.authorizer.check(header, role, changes)
                except (UnauthenticatedError, PermissionDeniedError) as exc:
                    status = http_status(exc)
                    log.info("http %s %s: refused (%d)", scope["method"], shown(scope["path"])[1:-1], status)
                    response = json_response({"error": str(exc)}, status,
                                             {"WWW-Authenticate": "Bearer"} if status == 401 else None)
                    return await response(scope, receive, send_with_headers)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send_with_headers)
        if k.inflight >= k.options.inflight_limit:
            if k.on_refused is not None:
                k.on_refused()
            response = json_response({"error": f"the server is busy: too many requests in progress (the limit is "
                                               f"{k.options.inflight_limit}); retry later"}, 503, {"Retry-After": "1"})
            return await response(scope, receive, send_with_headers)
        k.inflight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            k.inflight -= 1


# ---- the app --------------------------------------------------------------------------------
_MODEL = "/v2/models/{model}"
_VERSIONED = "/v2/models/{model}/versions/{version}"


def routes() -> list[Route]:
    out = [
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
        Route("/static/{file}", static, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", statistics, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/classify", classify, methods=["POST"]),
    ]
    for base in (_MODEL, _VERSIONED):
        out += [
            Route(base, model_metadata, methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/config", model_config, methods=["GET"]),
            Route(base + "/stats", statistics, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        ]
    return out


def metrics_route(registry) -> Route:
    """GET /metrics: the Prometheus text format of `registry`."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), 200, None, CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])


def create_app(plane: DataPlane, options: HttpOptions | None = None, *, on_refused=None,
               authorizer=None) -> Starlette:
    """The HTTP port's ASGI app over `plane` (no server start-up: mount it anywhere ASGI runs).
    `on_refused()` is called for each POST refused because too many are in progress; `authorizer`
    (serve.auth.Authorizer) decides who may call what.

    app.state.kestrel.close() releases its worker threads."""
    options = options or HttpOptions()
    kestrel = _Kestrel(plane, options)
    kestrel.on_refused = on_refused
    kestrel.authorizer = authorizer
    middleware = [Middleware(_Guard, kestrel=kestrel)]
    if options.allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(options.allowed_hosts),
                                     www_redirect=False))
    app = Starlette(routes=routes() + list(options.extra_routes), middleware=middleware,
                    exception_handlers={HTTPException: _http_exception})
    app.router.redirect_slashes = False
    app.state.kestrel = kestrel
    return app
