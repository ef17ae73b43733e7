"""The HTTP port: KServe V2 REST, Kestrel's classify endpoint, the web page and /metrics, as a
Starlette (ASGI) app over the server's DataPlane, served by uvicorn.

    app = create_app(DataPlane(hub), HttpOptions())          # an ASGI app: mount it in any ASGI server
    frontend = HttpFrontend(plane, host="127.0.0.1", port=0).start()   # or run it here, in a thread
    frontend.port
    frontend.stop(grace=10)     # close the listener, finish in-flight requests

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
    GET  /metrics                                 Prometheus text format (also on --metrics-port)

Errors are {"error": "<what was received, what was expected>"} (the shape tritonclient reads),
with the HTTP status of serve.errors.STATUS; 413 for a body over its limit, 415 for a media
type, 404/405 for routes. Modules: _app (the Starlette app, endpoints) · _v2 (V2 JSON codec) ·
_server (uvicorn in a thread, with the connection limits of HttpLimits).
"""

from __future__ import annotations

from typing import Callable

from ..dataplane import EXTENSIONS as _V2_EXTENSIONS
from ..dataplane import DataPlane
from ..hub import ModelHub
from ._app import DEFAULT_MAX_BODY_MB, HTTP_EXTENSIONS, WEB_ROOT, HttpError, HttpOptions, create_app, metrics_route
from ._server import HttpLimits, HttpServer

EXTENSIONS = HTTP_EXTENSIONS + _V2_EXTENSIONS


class HttpFrontend:
    """The HTTP port of a Kestrel server: create_app(plane) on an HttpServer."""

    def __init__(self, plane: DataPlane | ModelHub, *, host: str = "127.0.0.1", port: int = 8000,
                 serving: Callable[[], bool] | None = None, options: HttpOptions | None = None,
                 limits: HttpLimits | None = None, metrics_registry=None):
        if isinstance(plane, ModelHub):
            plane = DataPlane(plane, serving) if serving is not None else DataPlane(plane)
        self.plane = plane
        self.options = options or HttpOptions()
        if metrics_registry is not None:
            self.options.extra_routes = [*self.options.extra_routes, metrics_route(metrics_registry)]
        self.app = create_app(plane, self.options)
        self.server = HttpServer(self.app, host=host, port=port, limits=limits, name="http")

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def accepting(self) -> bool:
        return self.server.accepting

    def start(self) -> "HttpFrontend":
        """Bind and serve in a background thread; OSError if the address cannot be bound."""
        try:
            self.server.start()
        except BaseException:
            self.app.state.kestrel.close()
            raise
        return self

    def stop_accepting(self) -> None:
        self.server.stop_accepting()

    def wait(self, grace: float | None = 10.0) -> bool:
        done = self.server.wait(grace)
        self.app.state.kestrel.close()
        return done

    def stop(self, grace: float | None = 10.0) -> bool:
        self.stop_accepting()
        return self.wait(grace)


__all__ = ["DEFAULT_MAX_BODY_MB", "EXTENSIONS", "HttpError", "HttpFrontend", "HttpLimits", "HttpOptions", "HttpServer",
           "WEB_ROOT", "create_app", "metrics_route"]
