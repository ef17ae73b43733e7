"""Build and run the gRPC server (grpc's examples' shape: create_server returns the server and its port).

    server, port = create_server("models", models=["mobilenet_v2"], port=0)   # loaded, started, SERVING
    ...
    server.stop(grace=10)    # NOT_SERVING, refuse new RPCs, finish in-flight ones, drain batchers

Services: inference.GRPCInferenceService (KServe V2), kestrel.v1.Classifier,
grpc.health.v1.Health ("" and each service: SERVING once models are loaded and
at least one is ready) and server reflection. With `http_port`, the same models
and batchers also answer over HTTP (serve/http: KServe V2 REST, /v1/classify,
the web page, /metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import images
from ._proto import grpc_service_pb2, grpc_service_pb2_grpc, kestrel_pb2, kestrel_pb2_grpc
from .ensemble import Ensemble
from .dataplane import DataPlane
from .errors import ConfigError
from .http import HttpFrontend, HttpLimits, HttpOptions
from .hub import ModelHub
from .metrics import Metrics
from .repository import ModelRepository
from .auth import Authorizer, TokenFile, grpc_interceptor, is_loopback
from .poller import RepositoryPoller
from .servicers import Admission, ClassifyServicer, InferenceServicer

log = logging.getLogger(__name__)

# 32 float32 224x224x3 images are 19.3 MB; leave room for bigger inputs.
DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_THREADS = 64
DEFAULT_POLL_SECS = 15.0


def reserved_threads(threads: int) -> int:
    """Handler threads kept free of inference for health checks, metadata and control calls."""
    return max(2, threads // 8)


def admission_limit(threads: int) -> int:
    """Inference and Classify RPCs that may run at once on `threads` gRPC handler threads (more are refused
    with RESOURCE_EXHAUSTED at once): 56 of the default 64."""
    return max(1, threads - reserved_threads(threads))
V2_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CLASSIFY_SERVICE = kestrel_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name


def message_options(max_message_mb: float) -> list[tuple[str, int]]:
    """gRPC channel/server options raising both message limits to `max_message_mb` MiB."""
    size = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


class Server:
    """A started Kestrel server: the grpc.Server, its models, health and metrics."""

    def __init__(self, grpc_server: grpc.Server, hub: ModelHub, health_servicer: health.HealthServicer,
                 metrics: Metrics, address: str, port: int, metrics_port: int | None,
                 http: HttpFrontend | None = None, plane: DataPlane | None = None):
        self.grpc_server = grpc_server
        self.hub = hub
        self.plane = plane or DataPlane(hub, serving=lambda: self.serving)  # shared by gRPC and HTTP
        self.health = health_servicer
        self.metrics = metrics
        self.address = address
        self.port = port
        self.metrics_port = metrics_port
        self.http = http  # the HTTP port (serve/http), or None
        self.poller = None  # serve.poller.RepositoryPoller with --model-control-mode poll
        self._serving = True
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def set_not_ready(self) -> None:
        """Readiness false (HTTP /v2/health/ready, V2 ServerReady, gRPC health NOT_SERVING) while requests
        are still served: load balancers take the server out before stop() closes the ports."""
        self.plane.draining = True
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = 10.0) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new RPCs, let in-flight ones finish
        within `grace` seconds, then drain the batchers and release the models. Idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._serving = False
            self.health.enter_graceful_shutdown()
            if self.poller is not None:
                self.poller.stop()
            log.info("shutting down: finishing in-flight requests (grace %.1f s)", grace or 0)
            t0 = time.monotonic()
            deadline = None if grace is None else t0 + grace  # one deadline for the ports and every model

            def left() -> float | None:
                return None if deadline is None else max(0.0, deadline - time.monotonic())

            if self.http is not None:  # both ports stop accepting, then both finish in-flight requests
                self.http.stop_accepting()
            # requests arriving now are answered UNAVAILABLE by the data plane (gRPC's own stop
            # would CANCEL them); in-flight ones finish, then gRPC stops with what is left of grace
            if not self.plane.wait_idle(left()):
                log.warning("%d request(s) still running after the grace period; the models fail them "
                            "UNAVAILABLE", self.plane.inflight)
            # models stop taking requests; what they still hold runs until the deadline, then fails UNAVAILABLE
            # (a runner is closed only once no worker is inside it)
            closer = threading.Thread(target=self.hub.close, kwargs={"deadline": deadline}, name="close-models",
                                      daemon=True)
            closer.start()
            closer.join(None if deadline is None else left() + 1.0)
            self.plane.wait_idle(0.5)  # the requests the models failed at the deadline write their answers
            self.grpc_server.stop(left()).wait()
            if self.http is not None:
                self.http.stop(left())
            self.metrics.close()
            self._stopped.set()
            log.info("server stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stop() finished (True) or `timeout` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(grace=1.0)


def create_server(
    repository: str | Path | ModelRepository,
    *,
    models: Sequence[str] | None = None,
    ensembles: Sequence[Ensemble | str] = (),
    host: str = "127.0.0.1",
    port: int = 8001,
    metrics_port: int | None = None,
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
    strict: bool = False,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    threads: int = DEFAULT_THREADS,
    max_inflight: int | None = None,
    runner_options: dict[str, dict] | None = None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    http_port: int | None = None,
    http_options: HttpOptions | None = None,
    http_limits: HttpLimits | None = None,
    unhealthy_after_s: float | None = None,
    control_mode: str = "none",
    load_models: Sequence[str] | None = None,
    poll_secs: float | None = None,
    auth_tokens: str | Path | None = None,
    allow_unauthenticated_control: bool = False,
    control_open: bool | None = None,
) -> tuple[Server, int]:
    """Load the models, start serving on host:port (0 = a free port); returns (server, bound port).

    `metrics_port`: None = no Prometheus endpoint, 0 = a free port (server.metrics_port).
    `http_port`: None = no HTTP port, 0 = a free port (server.http_port); HTTP bodies are
    capped at `max_message_mb` like gRPC messages. `http_options` (what the HTTP app accepts)
    and `http_limits` (connection deadlines and sizes, also for the metrics port): serve/http.
    A model that fails to load is UNAVAILABLE with its reason; with `strict` it raises instead.
    `max_inflight`: inference and Classify RPCs at once on the gRPC port (default admission_limit(threads));
    more are refused with RESOURCE_EXHAUSTED at once. `unhealthy_after_s`: a model whose every batch has
    failed this long reports not ready (serve.batching.UNHEALTHY_AFTER_S).

    Models that change while it runs (docs/serving.md): `control_mode` "none" (what start-up loads is what
    it serves), "explicit" (the repository load/unload API; start-up loads `load_models`, "*" = all, and
    `models`) or "poll" (the repository is followed every `poll_secs`). `auth_tokens`: a token file
    (serve/auth.py); without one, load and unload are refused unless `control_open` (default: the server
    listens on loopback only, or `allow_unauthenticated_control`). TLS (`tls_cert`, `tls_key`) covers the
    gRPC and HTTP ports.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key); received one")
    if max_message_mb <= 0:
        raise ConfigError(f"received max message size {max_message_mb} MB; expected a positive number")
    ensembles = [e if isinstance(e, Ensemble) else Ensemble.parse(e) for e in ensembles]
    if control_mode == "poll" and poll_secs is not None and poll_secs <= 0:
        raise ConfigError(f"received --repository-poll-secs {poll_secs}; expected a positive number of seconds")
    tokens = TokenFile(auth_tokens) if auth_tokens is not None else None
    if control_open is None:
        control_open = is_loopback(host) or allow_unauthenticated_control
    authorizer = Authorizer(tokens, control_open=control_open)
    metrics = Metrics()
    hub = ModelHub(repository, models, ensembles, strict=strict, runner_options=runner_options, metrics=metrics,
                   max_pixels=max_pixels, control_mode=control_mode, load_models=load_models,
                   **({} if unhealthy_after_s is None else {"unhealthy_after_s": unhealthy_after_s}))
    grpc_server = None
    frontend = None
    try:
        hub.load()
        # so_reuseport off: a second server on a busy port must fail, not silently share it. At most `threads`
        # RPCs at once (grpc refuses more with RESOURCE_EXHAUSTED instead of queueing them without bound), and
        # inference at most `limit` of them, so health checks and metadata always find a thread.
        limit = admission_limit(threads) if max_inflight is None else max(1, int(max_inflight))
        admission = Admission(limit, f" (gRPC handler threads {threads}, {threads - limit} kept for health, "
                                     "metadata and control)", metrics.refused.labels("grpc").inc)
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                                  options=message_options(max_message_mb) + [("grpc.so_reuseport", 0)],
                                  maximum_concurrent_rpcs=max(threads, limit),
                                  interceptors=[grpc_interceptor(authorizer)] if tokens is not None or not control_open
                                  else None)
        holder: dict[str, Server] = {}
        plane = DataPlane(hub, serving=lambda: holder["server"].serving if "server" in holder else True)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, admission=admission),
                                                                        grpc_server)
        kestrel_pb2_grpc.add_ClassifierServicer_to_server(ClassifyServicer(plane, admission=admission), grpc_server)
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        reflection.enable_server_reflection(
            (V2_SERVICE, CLASSIFY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server)
        address = f"{host}:{port}"
        try:
            if tls_cert is not None:
                credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
                bound = grpc_server.add_secure_port(address, credentials)
            else:
                bound = grpc_server.add_insecure_port(address)
        except OSError as exc:
            raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from None
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if not bound:
            raise ConfigError(f"cannot listen on {address} (in use, or not an address of this machine)")
        server = Server(grpc_server, hub, health_servicer, metrics, host, bound, None, plane=plane)
        holder["server"] = server
        if metrics_port is not None:
            try:
                server.metrics_port = metrics.serve_http(metrics_port, host, limits=http_limits)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {host}:{metrics_port}: {exc.strerror}") from None
        if http_port is not None:
            try:
                options = http_options or HttpOptions(max_body_mb=max_message_mb, threads=threads)
                frontend = HttpFrontend(plane, host=host, port=http_port, options=options, limits=http_limits,
                                        metrics_registry=metrics.registry,
                                        on_refused=metrics.refused.labels("http").inc, authorizer=authorizer,
                                        tls=(str(tls_cert), str(tls_key)) if tls_cert is not None else None).start()
            except OSError as exc:
                raise ConfigError(f"cannot serve HTTP on {host}:{http_port}: {exc.strerror}") from None
            server.http = frontend
        grpc_server.start()
        if control_mode == "poll":
            server.poller = RepositoryPoller(hub, poll_secs or DEFAULT_POLL_SECS, hub.requested).start()
    except BaseException:
        if frontend is not None:
            frontend.stop(grace=0)
        if grpc_server is not None:
            grpc_server.stop(None)
        hub.close(timeout=1.0)
        metrics.close()
        raise
    status = health_pb2.HealthCheckResponse.SERVING if hub.ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", V2_SERVICE, CLASSIFY_SERVICE):
        health_servicer.set(service, status)
    return server, bound
