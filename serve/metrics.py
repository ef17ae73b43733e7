"""Per-model statistics: Prometheus metrics on an HTTP port, and the V2 ModelStatistics counters.

Prometheus names (label `model`; request metrics also `api`: "infer" or "classify"):

    kestrel_requests_total                   requests received
    kestrel_request_failures_total           requests that failed (label `code`: the gRPC status name)
    kestrel_request_latency_seconds          request arrival -> response, histogram
    kestrel_queue_latency_seconds            time a request waited for its batch, histogram
    kestrel_compute_latency_seconds          one executed batch's inference time, histogram
    kestrel_batch_size                       images per executed batch, histogram
    kestrel_expired_requests_total           queued requests dropped unrun because their deadline passed
    kestrel_model_ready                      1 when the model is loaded and serving
    kestrel_queue_depth                      requests waiting for a batch now

Each server owns its own registry (several servers in one test process do not mix).
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The Prometheus metrics of one server, and one ModelStats per model."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kestrel_requests", "Requests received", ["model", "api"], registry=r)
        self.failures = Counter("kestrel_request_failures", "Requests that failed", ["model", "api", "code"],
                                registry=r)
        self.request_latency = Histogram("kestrel_request_latency_seconds", "Request latency",
                                         ["model", "api"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("kestrel_queue_latency_seconds", "Time waiting for a batch",
                                       ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_latency = Histogram("kestrel_compute_latency_seconds", "Inference time of one batch",
                                         ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("kestrel_batch_size", "Images per executed batch", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.expired = Counter("kestrel_expired_requests", "Queued requests dropped (deadline passed)",
                               ["model"], registry=r)
        self.model_ready = Gauge("kestrel_model_ready", "1 when the model is loaded and serving", ["model"],
                                 registry=r)
        self.queue_depth = Gauge("kestrel_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self._models: dict[str, ModelStats] = {}
        self._lock = threading.Lock()
        self._http = None

    def model(self, name: str) -> "ModelStats":
        with self._lock:
            if name not in self._models:
                self._models[name] = ModelStats(name, self)
            return self._models[name]

    def serve_http(self, port: int, host: str = "127.0.0.1", limits=None) -> int:
        """Expose /metrics on host:port (0 = any free port); returns the bound port. Served like the
        HTTP port (uvicorn, one event loop, its connection limits: serve/http/_server.py), not a
        thread per connection."""
        from prometheus_client import make_asgi_app

        from .http._server import HttpServer

        self._http = HttpServer(make_asgi_app(self.registry), host=host, port=port, limits=limits,
                                name="metrics").start()
        return int(self._http.port)

    def close(self) -> None:
        if self._http is not None:
            self._http.stop(grace=1.0)
            self._http = None


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self):
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


class ModelStats:
    """Cumulative counters of one model (the V2 ModelStatistics message), mirrored into Prometheus."""

    def __init__(self, name: str, metrics: Metrics):
        self.name = name
        self._m = metrics
        self._lock = threading.Lock()
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_infer = _Duration()
        self.inference_count = 0  # images
        self.execution_count = 0  # batches
        self.batches: dict[int, _Duration] = {}
        self.last_inference_ms = 0

    def set_ready(self, ready: bool) -> None:
        self._m.model_ready.labels(self.name).set(1 if ready else 0)

    def watch_queue(self, depth) -> None:
        """Report `depth()` (requests waiting) as kestrel_queue_depth at each scrape."""
        self._m.queue_depth.labels(self.name).set_function(depth)

    def received(self, api: str) -> None:
        self._m.requests.labels(self.name, api).inc()

    def finished(self, api: str, seconds: float, code: str | None = None) -> None:
        """A request ended: `code` is None on success, else the gRPC status name."""
        self._m.request_latency.labels(self.name, api).observe(seconds)
        with self._lock:
            (self.success if code is None else self.fail).add(seconds)
        if code is not None:
            self._m.failures.labels(self.name, api, code).inc()

    def batch(self, size: int, compute_s: float, queue_s: list[float]) -> None:
        """A batch of `size` images ran in `compute_s`; its requests had waited `queue_s`."""
        self._m.batch_size.labels(self.name).observe(size)
        self._m.compute_latency.labels(self.name).observe(compute_s)
        queue_hist = self._m.queue_latency.labels(self.name)
        for wait in queue_s:
            queue_hist.observe(wait)
        with self._lock:
            self.inference_count += size
            self.execution_count += 1
            self.compute_infer.add(compute_s * len(queue_s), len(queue_s))  # per request, as Triton counts
            for wait in queue_s:
                self.queue.add(wait)
            self.batches.setdefault(size, _Duration()).add(compute_s)
            self.last_inference_ms = int(time.time() * 1000)

    def expired(self) -> None:
        """A queued request's deadline passed before it ran."""
        self._m.expired.labels(self.name).inc()

    def snapshot(self) -> dict:
        """A consistent copy of the counters."""
        with self._lock:
            return {
                "success": (self.success.count, self.success.ns),
                "fail": (self.fail.count, self.fail.ns),
                "queue": (self.queue.count, self.queue.ns),
                "compute_infer": (self.compute_infer.count, self.compute_infer.ns),
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "batches": {size: (d.count, d.ns) for size, d in sorted(self.batches.items())},
                "last_inference": self.last_inference_ms,
            }

    @property
    def mean_batch_size(self) -> float:
        with self._lock:
            return self.inference_count / self.execution_count if self.execution_count else 0.0


class RequestRecord:
    """One request's metrics for each model it names: received now, finished with a status code later.

    The gRPC servicers and the HTTP front end both record through this, each
    with its own api label and status codes.
    """

    def __init__(self, stats: list[ModelStats], api: str):
        self.stats, self.api = stats, api
        self.t0 = time.perf_counter()
        for model in stats:
            model.received(api)

    def finish(self, code: str | None = None) -> None:
        seconds = time.perf_counter() - self.t0
        for model in self.stats:
            model.finished(self.api, seconds, code)
