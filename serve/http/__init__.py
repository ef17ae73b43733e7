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

serve/http/_responses.py is the only place that maps Kestrel's exceptions to HTTP status codes:

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

Modules: _frontend (HttpFrontend: endpoints, start/stop) · _handler (routes, bodies,
keep-alive, sending) · _responses (errors -> statuses) · _v2 (tensors) · _multipart.
"""

from ._frontend import DEFAULT_MAX_BODY_MB, EXTENSIONS, WEB_ROOT, HttpFrontend
from ._handler import ROUTES
from ._multipart import parse_multipart
from ._responses import HttpError, status_for

__all__ = ["DEFAULT_MAX_BODY_MB", "EXTENSIONS", "HttpError", "HttpFrontend", "ROUTES", "WEB_ROOT", "parse_multipart",
           "status_for"]
