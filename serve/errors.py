"""Kestrel's exception tree, drawn once.

    KestrelError                      base of everything Kestrel raises on purpose
    ├── MissingDependencyError        an optional package is not installed (names the extra)
    ├── ConfigError                   a config.pbtxt / option / repository entry is invalid
    ├── ModelNotFoundError            unknown model name or version
    ├── ModelLoadError                a model's artifact exists but cannot be loaded
    ├── InvalidInputError             a request's tensors do not match the model's contract
    │   └── ImageDecodeError          bytes that are not a decodable image (or too large)
    ├── ResourceExhaustedError        a queue is full or a message too large
    │   └── RequestTooLargeError      a request body over its limit (HTTP 413)
    ├── DeadlineExceededError         the request's deadline passed before it ran
    ├── ServerUnavailableError        the server is shutting down
    ├── BackendError                  a model's runtime failed on a batch (the model stays loaded)
    ├── SupersededError               a load/unload replaced by a newer one on the same model
    ├── ControlModeError              a load/unload the server's --model-control-mode does not allow
    ├── UnauthenticatedError          no valid token for an endpoint that needs one
    ├── PermissionDeniedError         a valid token without the role an endpoint needs
    └── EngineMismatchError           a TensorRT engine built for another GPU / TensorRT version

STATUS (below) is the one table that maps them to a gRPC status code and an HTTP
status; serve/servicers.py and serve/http read it (status_of). Messages say what was
received and what was expected; `shown()` bounds what they echo of a request.
"""

from __future__ import annotations


class KestrelError(Exception):
    """Base class of every error Kestrel raises deliberately."""


class MissingDependencyError(KestrelError, ImportError):
    """An optional package is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        self.package = package
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"the optional package '{package}' is not installed{what}; "
            f"install it with: pip install 'kestrel[{extra}]'"
        )


class ConfigError(KestrelError, ValueError):
    """A configuration file, option or repository entry is invalid."""


class ModelNotFoundError(KestrelError, LookupError):
    """The requested model (or version) is not in the repository / not loaded."""


class ModelLoadError(KestrelError):
    """A model's artifact exists but could not be loaded."""


class InvalidInputError(KestrelError, ValueError):
    """Request tensors do not match the model's input contract."""


class ImageDecodeError(InvalidInputError):
    """Bytes that cannot be decoded as an image, or an image over the pixel limit."""


class ResourceExhaustedError(KestrelError):
    """A bounded queue is full or a message is over its size limit."""


class RequestTooLargeError(ResourceExhaustedError):
    """A request (body, JSON document, upload) is over its size limit."""


class DeadlineExceededError(KestrelError):
    """The request's deadline expired before it could run."""


class ServerUnavailableError(KestrelError):
    """The server is shutting down (or not serving yet): retry elsewhere."""


class BackendError(KestrelError):
    """A loaded model's runtime (or the batch around it) failed: the requests in that batch get
    INTERNAL with this one-line reason; the model stays loaded and serves the next batch."""


class SupersededError(KestrelError):
    """A model load or unload that a newer operation on the same model replaced before it finished."""


class ControlModeError(KestrelError):
    """A repository load/unload while the server does not take them (--model-control-mode none or poll)."""


class UnauthenticatedError(KestrelError):
    """The request carries no token, or one the server does not know (HTTP 401, gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(KestrelError):
    """The request's token is valid but lacks the role the endpoint needs (HTTP 403, gRPC PERMISSION_DENIED)."""


class EngineMismatchError(ModelLoadError):
    """A TensorRT engine was built for a different GPU or TensorRT version."""


# Each domain error -> (gRPC status code name, HTTP status), most specific first. Anything
# else is ("INTERNAL", 500) and is logged with its traceback.
STATUS: list[tuple[type[BaseException], str, int]] = [
    (ModelNotFoundError, "NOT_FOUND", 404),
    (InvalidInputError, "INVALID_ARGUMENT", 400),  # ImageDecodeError too
    (RequestTooLargeError, "RESOURCE_EXHAUSTED", 413),
    (ResourceExhaustedError, "RESOURCE_EXHAUSTED", 503),  # queue full: HTTP adds Retry-After: 1
    (DeadlineExceededError, "DEADLINE_EXCEEDED", 504),
    (ServerUnavailableError, "UNAVAILABLE", 503),
    (ModelLoadError, "UNAVAILABLE", 503),  # EngineMismatchError too: the model is not ready
    (BackendError, "INTERNAL", 500),
    (SupersededError, "ABORTED", 409),
    (ControlModeError, "FAILED_PRECONDITION", 400),
    (UnauthenticatedError, "UNAUTHENTICATED", 401),
    (PermissionDeniedError, "PERMISSION_DENIED", 403),  # logged once per distinct message by the batcher, not per request
    (MissingDependencyError, "FAILED_PRECONDITION", 500),
    (ConfigError, "FAILED_PRECONDITION", 500),
]
INTERNAL = ("INTERNAL", 500)


def status_of(exc: BaseException) -> tuple[str, int]:
    """(gRPC status code name, HTTP status) of an exception; ("INTERNAL", 500) when unexpected."""
    for cls, code, http_status in STATUS:
        if isinstance(exc, cls):
            return code, http_status
    return INTERNAL


# Triton's failure reasons (nv_inference_request_failure{reason}), from the status code: the one mapping
# both transports' metrics use
_TRITON_REASONS = {
    "RESOURCE_EXHAUSTED": "REJECTED", "UNAVAILABLE": "REJECTED",
    "CANCELLED": "CANCELED", "DEADLINE_EXCEEDED": "CANCELED",
    "INTERNAL": "BACKEND", "UNKNOWN": "BACKEND",
}


def triton_reason(code: str) -> str:
    """Triton's `reason` label (REJECTED, CANCELED, BACKEND, OTHER) for a failed request's status code name."""
    return _TRITON_REASONS.get(code, "OTHER")


def expected(exc: BaseException) -> bool:
    """True when the exception is in the table (a client's or a model's problem, not a bug)."""
    return status_of(exc) is not INTERNAL


SHOWN_CHARS = 120


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """repr(value), cut to about `limit` characters: messages echo requests without growing with them."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"
