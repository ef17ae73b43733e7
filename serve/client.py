"""A small client for a Kestrel server, and its command line.

    python -m serve.client photo.jpg other.png --models vgg16,resnet50,xception --top-k 3
    python -m serve.client photo.jpg --ensemble imagenet --address 127.0.0.1:8001

prints, per image, each model's top-k (default: the server's, 5) and the ensemble's answer.

    with KestrelClient("127.0.0.1:8001", token=None) as client:     # token: for a server with --auth-tokens
        client.wait_ready()
        answer = client.classify(Path("cat.jpg").read_bytes(), ["mobilenet_v2"])   # top_k 0: the server's 5
        probabilities = client.infer("mobilenet_v2", uint8_batch)     # KServe V2 ModelInfer
        client.load_model("mobilenet_v2"); client.repository_index()  # the repository extension

gRPC errors become Kestrel exceptions at one boundary (`_call`), each with the
gRPC status in `.code`; an address that answers HTTP/1.x (the server's HTTP or metrics
port) is a `NotGrpcError` that says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from . import datatypes
from .errors import (ControlModeError, DeadlineExceededError, InvalidInputError, KestrelError, ModelLoadError,
                     ModelNotFoundError, PermissionDeniedError, ResourceExhaustedError, SupersededError,
                     UnauthenticatedError)

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_MB = 64

_ERRORS = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.ABORTED: SupersededError,
    grpc.StatusCode.FAILED_PRECONDITION: ControlModeError,
}


class NotGrpcError(KestrelError):
    """The address answered HTTP/1.x, not gRPC: most likely the server's HTTP (or metrics) port."""


# what gRPC's C core reports when an HTTP/1.x server answers its HTTP/2 preface
_HTTP1_SIGNS = ("Trying to connect an http1.x server", "Failed parsing HTTP/2")


def not_grpc_message(address: str, what: str = "") -> str:
    """`what`: what the address is, when known (e.g. "a kestrel server's HTTP port (web page, REST API)")."""
    grpc_port = DEFAULT_ADDRESS.rpartition(":")[2]
    what = what or "an HTTP port (a server's --http-port or --metrics-port?)"
    return (f"{address} answers HTTP/1.x, not gRPC: it is {what}"
            f"; classify speaks gRPC: give the server's gRPC port instead (kestrel serve --port, default {grpc_port}; "
            "the server logs it as 'listening on grpc://HOST:PORT')")


def _error(exc: grpc.RpcError, address: str) -> KestrelError:
    code = exc.code()
    details = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE and any(sign in details for sign in _HTTP1_SIGNS):
        error: KestrelError = NotGrpcError(not_grpc_message(address))
    elif code is grpc.StatusCode.UNAVAILABLE:
        error = ModelLoadError(details) if "model" in details else KestrelError(
            f"cannot reach the server at {address}: {details}")
    else:
        error = _ERRORS.get(code, KestrelError)(f"{code.name}: {details}" if code not in _ERRORS else details)
    error.code = code
    return error


class KestrelClient:
    """Classify and V2 inference against a Kestrel server (insecure, or TLS with `tls_ca`)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
                 tls_ca: str | Path | None = None, timeout: float | None = 30.0, token: str | None = None):
        from ._proto import grpc_service_pb2_grpc, kestrel_pb2_grpc  # generated code: imported on use
        from grpc_health.v1 import health_pb2_grpc

        size = int(max_message_mb * 1024 * 1024)
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        self.address = address
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.classifier = kestrel_pb2_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.address) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the health service reports SERVING; KestrelError after `timeout` seconds."""
        from grpc_health.v1 import health_pb2

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = exc.details() or exc.code().name
            time.sleep(0.1)
        raise KestrelError(f"server at {self.address} not SERVING after {timeout:.0f} s (last: {last})")

    def classify(self, image: bytes | str | Path, models: Sequence[str] = (), *, top_k: int = 0, fusion: str = "",
                 timeout: float | None = None):
        """Classify one encoded image (bytes or a file path); returns a kestrel.v1.ClassifyResponse.
        `top_k` 0 asks for the server's default (5)."""
        from ._proto import kestrel_pb2

        data = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        request = kestrel_pb2.ClassifyRequest(image=bytes(data), models=list(models), top_k=top_k, fusion=fusion)
        return self._call(self.classifier.Classify, request, timeout)

    def list_models(self):
        from ._proto import kestrel_pb2

        return self._call(self.classifier.ListModels, kestrel_pb2.ListModelsRequest())

    def infer(self, model: str, batch: np.ndarray, *, version: str = "", input_name: str = "images",
              timeout: float | None = None) -> np.ndarray:
        """KServe V2 ModelInfer with raw_input_contents; returns the first output as numpy."""
        from ._proto import grpc_service_pb2 as pb

        batch = np.ascontiguousarray(batch)
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.add(name=input_name, datatype=datatypes.to_v2(batch.dtype), shape=list(batch.shape))
        request.raw_input_contents.append(batch.astype(batch.dtype.newbyteorder("<"), copy=False).tobytes())
        response = self._call(self.v2.ModelInfer, request, timeout)
        out = response.outputs[0]
        dtype = datatypes.from_v2(out.datatype).newbyteorder("<")
        return np.frombuffer(response.raw_output_contents[0], dtype=dtype).reshape(tuple(out.shape))

    # ---- the repository extension ------------------------------------------------------------------------
    def repository_index(self, ready: bool = False) -> list[dict]:
        """One row per model version the server knows: {"name", "version", "state", "reason"}."""
        from ._proto import grpc_service_pb2 as pb

        reply = self._call(self.v2.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready))
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in reply.models]

    def load_model(self, name: str, *, config: str | None = None, force: bool = False,
                   timeout: float | None = None) -> None:
        """Load or reload a model or ensemble; returns once it serves (raises why not). `config`: a JSON
        ModelConfig used instead of config.pbtxt; `force`: reload versions whose files did not change."""
        from ._proto import grpc_service_pb2 as pb

        request = pb.RepositoryModelLoadRequest(model_name=name)
        if config is not None:
            request.parameters["config"].string_param = config
        if force:
            request.parameters["force"].bool_param = True
        self._call(self.v2.RepositoryModelLoad, request, timeout)

    def unload_model(self, name: str, *, unload_dependents: bool = False, timeout: float | None = None) -> None:
        """Unload a model or ensemble; returns once its requests in flight are answered."""
        from ._proto import grpc_service_pb2 as pb

        request = pb.RepositoryModelUnloadRequest(model_name=name)
        if unload_dependents:
            request.parameters["unload_dependents"].bool_param = True
        self._call(self.v2.RepositoryModelUnload, request, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def photo_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the encoded photo as it is shown (EXIF rotation applied), read from its header
    by Pillow without decoding the pixels; None when Pillow cannot read it (the server will say why)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation: 5-8 turn the photo by 90 degrees
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _size_note(response, original: tuple[int, int] | None) -> str:
    decoded = (response.image_width, response.image_height)
    if original is None or tuple(original) == decoded:
        return f"{decoded[0]}x{decoded[1]}, decoded in {response.decode_ms:.1f} ms"
    scale = original[0] / decoded[0] if decoded[0] else 0.0
    how = (f"JPEG draft decoding at 1/{scale:.0f}, still above every model's input size"
           if decoded[0] < original[0] and scale in (2.0, 4.0, 8.0) else "the server decoded it at another size")
    return (f"{original[0]}x{original[1]} photo, decoded at {decoded[0]}x{decoded[1]} in {response.decode_ms:.1f} ms: "
            f"{how}")


def format_table(name: str, response, original_size: tuple[int, int] | None = None) -> str:
    """One image's answer as a text table: each model's predictions (all the server returned, best first),
    then each ensemble's. `original_size` (the photo's own width, height) is named when the server decoded
    it smaller (JPEG draft mode)."""
    lines = [f"{name}  ({_size_note(response, original_size)})"]
    rows = [(r.model, r.predictions, f"{r.compute_ms:7.1f} ms (batch {r.batch_size})") for r in response.results]
    rows += [(f"{e.name} [{e.fusion}]", e.predictions, "") for e in response.ensembles]
    width = max(len(row[0]) for row in rows) if rows else 10
    cells = [[f"{p.label} ({p.probability:.3f})" for p in predictions] for _, predictions, _ in rows]
    columns = max((len(c) for c in cells), default=0)
    widths = [max((len(c[i]) for c in cells if i < len(c)), default=0) for i in range(columns)]
    for (model, _, timing), row in zip(rows, cells):
        padded = [f"{c:<{w}}" for c, w in zip(row, widths)] + [" " * w for w in widths[len(row):]]
        lines.append(f"  {model:<{width}}  " + "  |  ".join(padded) + f"  {timing}".rstrip())
    return "\n".join(lines)


def _what_answers(address: str, timeout: float = 2.0) -> str:
    """What an address that answered HTTP/1.x is, asked over HTTP (best effort): Kestrel's HTTP port answers
    GET /v2 with the server's metadata."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/v2", timeout=timeout) as reply:
            name = json.loads(reply.read()).get("name", "")
        if name:
            return f"the HTTP port of a {name} server (its web page and REST API)"
    except Exception:  # noqa: BLE001 (a hint only: any failure leaves the general message)
        pass
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.client", description=(
        "Classify image files with a Kestrel server over gRPC: each model's top-k and the ensemble's answer."))
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, BMP, WebP...)")
    parser.add_argument("--models", default="", help="comma-separated model names (default: the server's choice)")
    parser.add_argument("--ensemble", action="append", default=[],
                        help="an ensemble configured on the server (repeatable)")
    parser.add_argument("--fusion", default="", choices=["", "mean", "geometric", "max-confidence", "majority"],
                        help="override the ensembles' fusion")
    parser.add_argument("--address", help=f"server host:port (default {DEFAULT_ADDRESS}); or --host/--port, "
                                          "not both")
    parser.add_argument("--host", help="server host (with --port, instead of --address; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="server gRPC port (instead of --address), as `serve --port`; "
                                                 "not its --http-port")
    parser.add_argument("--top-k", type=int, default=0,
                        help="predictions per model and ensemble (default 0 = the server's default, 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_MB)
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to trust (the server uses TLS)")
    parser.add_argument("--token", default=os.environ.get("KESTREL_TOKEN"),
                        help="bearer token for a server started with --auth-tokens (default: $KESTREL_TOKEN)")
    from . import console

    console.add_examples(parser, "photo.jpg other.png --models mobilenet_v2,resnet50 --top-k 3",
                         "photo.jpg --ensemble imagenet --port 8001")
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"argument --top-k: received {args.top_k}; expected 0 (the server's default, 5) or a "
                     "positive number")
    if args.address and (args.host or args.port is not None):
        given = " and ".join(f for f, v in (("--host", args.host), ("--port", args.port)) if v is not None)
        parser.error(f"--address {args.address} and {given} both name the server; give --address HOST:PORT or "
                     "--host/--port, not both")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"argument --port: received {args.port}; expected a port number 1-65535")
    default_host, _, default_port = DEFAULT_ADDRESS.rpartition(":")
    address = args.address or f"{args.host or default_host}:{args.port if args.port is not None else default_port}"
    names = [n.strip() for n in args.models.split(",") if n.strip()] + args.ensemble
    failures = 0
    try:
        with KestrelClient(address, max_message_mb=args.max_message_mb, tls_ca=args.tls_ca,
                           timeout=args.timeout, token=args.token) as client:
            for path in args.images:
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    print(f"error: {path}: {exc.strerror}", file=sys.stderr)
                    failures += 1
                    continue
                try:
                    response = client.classify(data, names, top_k=args.top_k, fusion=args.fusion)
                except (ModelNotFoundError, InvalidInputError) as exc:  # this image or name; go on
                    print(f"error: {path}: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                print(format_table(str(path), response, photo_size(data)))
    except NotGrpcError as exc:
        what = _what_answers(address) if args.tls_ca is None else ""
        print(f"error: {not_grpc_message(address, what) if what else exc}", file=sys.stderr)
        return 1
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
