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
_server (uvicorn in a thread, with the connection limits of HttpLimits) · _frontend (HttpFrontend).
"""

from __future__ import annotations

import importlib

# name -> module, loaded on first use: serve.http._server (uvicorn, no hub) stays importable on its
# own (the metrics port uses it) without pulling in the data plane
_LAZY = {
    "DEFAULT_MAX_BODY_MB": "._app", "HTTP_EXTENSIONS": "._app", "WEB_ROOT": "._app", "HttpError": "._app",
    "HttpOptions": "._app", "create_app": "._app", "metrics_route": "._app",
    "HttpLimits": "._server", "HttpServer": "._server",
    "HttpFrontend": "._frontend",
}

__all__ = ["DEFAULT_MAX_BODY_MB", "EXTENSIONS", "HTTP_EXTENSIONS", "HttpError", "HttpFrontend", "HttpLimits",
           "HttpOptions", "HttpServer", "WEB_ROOT", "create_app", "metrics_route"]


def __getattr__(name: str):
    if name == "EXTENSIONS":
        from ..dataplane import EXTENSIONS as v2_extensions

        value = __getattr__("HTTP_EXTENSIONS") + v2_extensions
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module 'serve.http' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
