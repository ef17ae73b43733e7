"""Run an ASGI app on uvicorn (httptools' llhttp parser) in a background thread, hardened for the open internet.

    server = HttpServer(app, host="127.0.0.1", port=0, limits=HttpLimits()).start()   # OSError if it cannot bind
    server.port
    server.stop(grace=10)       # close the listener, finish in-flight requests, close the connections

What uvicorn and llhttp do themselves (tests/serve/test_http_abuse.py checks each):
conflicting framing (Transfer-Encoding with Content-Length, two Content-Lengths, bare LF,
obsolete line folding) is a 400 and the connection closes; chunked request bodies work;
an idle connection is a few KB on one event loop, not a thread; a keep-alive connection
idle for `idle_timeout_s` is closed. What `_Protocol` adds (uvicorn has no such options
for httptools): a total deadline for a request's head (`header_timeout_s`, from its first
byte, or from the connection's start) and for its body (`body_timeout_s`), a cap on the
head's size (`max_header_bytes`, 431), and client mistakes logged at debug level only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("serve.http")

# uvicorn logs its start-up banner at INFO and a few per-client events at WARNING; a client
# must not be able to write to the server's log, so only uvicorn's own errors go through.
_QUIET = ("Invalid HTTP request received.", "Unsupported upgrade request.", "Exceeded concurrency limit.")


class _ClientNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not str(record.msg).startswith(_QUIET)


_uvicorn_log = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _ClientNoise) for f in _uvicorn_log.filters):
    _uvicorn_log.addFilter(_ClientNoise())


@dataclass
class HttpLimits:
    """Connection-level limits of an HTTP port (python -m serve --help names the flags)."""

    header_timeout_s: float = 10.0  # a request's line and headers, from its first byte
    body_timeout_s: float = 60.0  # a request's whole body, from the end of its headers
    idle_timeout_s: float = 30.0  # a keep-alive connection between requests
    max_header_bytes: int = 64 * 1024  # request line + headers
    backlog: int = 2048


def _error_bytes(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _HeadTooLarge(Exception):
    pass


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with total head/body deadlines, a head size cap and quiet errors."""

    limits = HttpLimits()  # replaced per server (HttpServer makes a subclass)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "head"  # head: waiting for / reading a request's head; body: reading its body; app
        self._head_bytes = 0  # bytes received while in the head phase
        self._parsed_head = 0  # bytes of URL and headers parsed for the current request

    # ---- deadlines -----------------------------------------------------------------------------
    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "head":
            log.debug("http %s: request head not complete within %.1f s; closed", self.client,
                      self.limits.header_timeout_s)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_error_bytes(408, "Request Timeout", "the request's head did not arrive "
                                                  f"within {self.limits.header_timeout_s:g} s"))
        else:
            log.debug("http %s: request body not complete within %.1f s; closed", self.client,
                      self.limits.body_timeout_s)
            if self.cycle is not None:  # the app's receive() answers http.disconnect; its send() is dropped
                self.cycle.disconnected = True
                self.cycle.message_event.set()
        self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        log.debug("http %s: %d %s", self.client, status, message)
        self._disarm()
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_error_bytes(status, reason, message))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() answers http.disconnect; its send() is dropped
            self.cycle.message_event.set()
        self.transport.close()

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # headers and body leave in separate writes: neither may wait for an ACK (Nagle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)
        self._arm("head", self.limits.header_timeout_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._phase == "head":
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # e.g. curl --http2's h2c offer: answered as HTTP/1.1, as uvicorn does
            log.debug("http %s: protocol upgrade offered; answering over HTTP/1.1", self.client)
            return
        except httptools.HttpParserError as exc:  # a callback's exception arrives wrapped in one
            if self._parsed_head > self.limits.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"received a request line and headers over {self.limits.max_header_bytes} bytes")
                return
            self._refuse(400, "Bad Request", f"received a malformed HTTP request ({exc}); connection closed")
            return
        if self._phase == "head" and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "Request Header Fields Too Large",
                         f"received a request line and headers over {self.limits.max_header_bytes} bytes")

    # ---- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "head" or self._deadline is None:
            self._arm("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._parsed_head += size
        if self._parsed_head > self.limits.max_header_bytes:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        self._parsed_head = 0
        self._head_bytes = 0
        self._arm("body", self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = "app"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase == "app":
            self._phase = "head"  # the next request's head; uvicorn's keep-alive timer covers the wait
            self._head_bytes = 0
        super().on_response_complete()


class HttpServer:
    """An ASGI app served by uvicorn on a socket this object binds, in a daemon thread."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, limits: HttpLimits | None = None,
                 name: str = "http", tls: tuple[str, str] | None = None):
        self.app, self.host, self.requested_port, self.name = app, host, port, name
        self.tls = tls  # (certificate, key) PEM paths: serve HTTPS
        self.limits = limits or HttpLimits()
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False

    def start(self, timeout: float = 30.0) -> "HttpServer":
        """Bind host:port (0 = a free port) and serve; OSError if the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the proto says TCP;
        # without it a response's body waits for the client's delayed ACK (+40 ms a request)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(self.limits.backlog)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        protocol = type("KestrelHttpProtocol", (_Protocol,), {"limits": self.limits})
        config = uvicorn.Config(self.app, http=protocol, ws="none", lifespan="off", log_config=None,
                                access_log=False, timeout_keep_alive=max(1, int(self.limits.idle_timeout_s)),
                                server_header=False, backlog=self.limits.backlog, timeout_graceful_shutdown=None,
                                **({"ssl_certfile": str(self.tls[0]), "ssl_keyfile": str(self.tls[1])} if self.tls else {}))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"{self.name}-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the {self.name} server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        self._accepting = True
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except Exception:  # noqa: BLE001 - the thread must not die silently
            log.exception("the %s server stopped unexpectedly", self.name)
        finally:
            sock.close()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Close the listener and idle connections; requests in flight go on (their connections then close)."""
        if self._server is not None and self._accepting:
            self._accepting = False
            self._server.should_exit = True

    def wait(self, grace: float | None = 10.0) -> bool:
        """Wait for in-flight requests (True if all finished), then the server's thread ends."""
        if self._thread is None:
            return True
        self._thread.join(grace)
        done = not self._thread.is_alive()
        if not done:
            log.warning("%s: requests still running after the grace period; closing their connections", self.name)
            self._server.force_exit = True
            self._thread.join(5.0)
        return done

    def stop(self, grace: float | None = 10.0) -> bool:
        self.stop_accepting()
        return self.wait(grace)
