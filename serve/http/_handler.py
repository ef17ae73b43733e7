"""The HTTP plumbing: routes, one thread per connection (HTTP/1.1 keep-alive), bodies, errors, responses.

Each route names an HttpFrontend method; the handler turns whatever it raises into a
status and a JSON error (serve/http/_responses.py) and keeps the connection when it can.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import unquote

from ..errors import InvalidInputError, KestrelError, ResourceExhaustedError
from ._responses import HttpError, Response, error_response, status_for
from ._v2 import loads

if TYPE_CHECKING:
    from ._frontend import HttpFrontend

log = logging.getLogger("serve.http")

_NAME = r"(?P<model>[^/]+)"
_VERSION = r"(?:/versions/(?P<version>[^/]+))?"
ROUTES: list[tuple[str, re.Pattern, str]] = [
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


class Server(ThreadingHTTPServer):
    """A thread per connection, at most `frontend.max_connections` at once (more are answered 503)."""

    daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    request_queue_size = 128

    def __init__(self, address, handler, frontend: "HttpFrontend"):
        self.frontend = frontend
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            admitted = self._open < self.frontend.max_connections
            self._open += admitted
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._leave()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._leave()

    def _leave(self) -> None:
        with self._open_lock:
            self._open -= 1

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"too many connections (the limit is {self.frontend.max_connections}); "
                                    "retry later or reuse a keep-alive connection"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kestrel"
    disable_nagle_algorithm = True  # small responses must not wait for the client's delayed ACK (40 ms)
    wbufsize = 1 << 16  # headers and a small body leave in one send
    server: Server

    def version_string(self) -> str:
        return self.server_version

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
        return loads(body, "a JSON object")

    # ---- dispatch ------------------------------------------------------------------------------
    def _route(self, method: str):
        path = self.path.split("?", 1)[0]
        allowed = []
        for route_method, pattern, name in ROUTES:
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
