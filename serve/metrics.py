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
    kestrel_requests_refused_total           requests refused before reaching a model: the server was busy
                                             (label `transport`: grpc or http; no `model`)

Triton-compatible names, beside Kestrel's own, so Triton's Grafana dashboards and HPA rules work
unchanged (labels `model` and `version`; the same counters as the V2 ModelStatistics message; durations
are cumulative microseconds). The sample names are Triton's exactly, without the `_total` suffix
prometheus_client gives its counters, so they are exposed as untyped (`unknown` in OpenMetrics):
PromQL's rate() and increase() treat them as the counters they are.

    nv_inference_request_success             successful requests (a batch counts as 1)
    nv_inference_request_failure             failed requests (label `reason`: REJECTED, CANCELED, BACKEND, OTHER)
    nv_inference_count                       inferences (a batch of n counts n)
    nv_inference_exec_count                  executed batches
    nv_inference_request_duration_us         arrival -> response of successful requests
    nv_inference_queue_duration_us           time requests waited for their batch
    nv_inference_compute_infer_duration_us   inference time, per request (each request counts its batch's time)
    nv_inference_pending_request_count       requests queued for a batch now (gauge)

Each server owns its own registry (several servers in one test process do not mix).
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric

from .errors import triton_reason

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# prometheus_client renames a counter's samples to <name>_total; Triton's names have no suffix.
_COUNTER = "unknown"


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
        self.refused = Counter("kestrel_requests_refused", "Requests refused before reaching a model (server busy)",
                               ["transport"], registry=r)
        self._models: dict[str, ModelStats] = {}
        self._lock = threading.Lock()
        self._http = None
        r.register(_TritonCollector(self))

    def model(self, name: str, version: str = "") -> "ModelStats":
        """The statistics of one model version (Triton's `model` and `version` labels); made on first use."""
        key = (name, str(version))
        with self._lock:
            if key not in self._models:
                self._models[key] = ModelStats(name, self, str(version))
            return self._models[key]

    def versions(self, name: str) -> list["ModelStats"]:
        """Every version's statistics of `name`, by version."""
        with self._lock:
            found = [stats for (model, _), stats in self._models.items() if model == name]
        return sorted(found, key=lambda s: int(s.version) if s.version.isdigit() else -1)

    def watch_model(self, name: str, ready, depth) -> None:
        """kestrel_model_ready and kestrel_queue_depth of model `name`, read from `ready()` and `depth()`
        at each scrape (over all its versions)."""
        self.model_ready.labels(name).set_function(lambda: 1.0 if ready() else 0.0)
        self.queue_depth.labels(name).set_function(lambda: float(depth()))

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


class _TritonCollector:
    """Triton's metric names, read from each model's ModelStats at scrape time."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self):
        return []  # no fixed series: registering must not call collect()

    def collect(self):
        with self._metrics._lock:
            models = list(self._metrics._models.values())
        families = {
            "success": Metric("nv_inference_request_success", "Number of successful inference requests, "
                              "all batch sizes", _COUNTER),
            "failure": Metric("nv_inference_request_failure", "Number of failed inference requests, "
                              "all batch sizes", _COUNTER),
            "count": Metric("nv_inference_count", "Number of inferences performed (does not include cached "
                            "requests)", _COUNTER),
            "exec": Metric("nv_inference_exec_count", "Number of model executions performed (does not include "
                           "cached requests)", _COUNTER),
            "request_us": Metric("nv_inference_request_duration_us", "Cumulative inference request duration "
                                 "in microseconds (includes cached requests)", _COUNTER),
            "queue_us": Metric("nv_inference_queue_duration_us", "Cumulative inference queuing duration in "
                               "microseconds (includes cached requests)", _COUNTER),
            "infer_us": Metric("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration "
                               "in microseconds (does not include cached requests)", _COUNTER),
            "pending": Metric("nv_inference_pending_request_count", "Instantaneous number of pending requests "
                              "awaiting execution per-model.", "gauge"),
        }
        for stats in models:
            if not stats.version:  # never loaded: Triton shows no series for it either
                continue
            snap = stats.snapshot()
            labels = {"model": stats.name, "version": stats.version}
            for key, name, value in (
                ("success", "nv_inference_request_success", snap["success"][0]),
                ("count", "nv_inference_count", snap["inference_count"]),
                ("exec", "nv_inference_exec_count", snap["execution_count"]),
                ("request_us", "nv_inference_request_duration_us", snap["success"][1] // 1000),
                ("queue_us", "nv_inference_queue_duration_us", snap["queue"][1] // 1000),
                ("infer_us", "nv_inference_compute_infer_duration_us", snap["compute_infer"][1] // 1000),
                ("pending", "nv_inference_pending_request_count", stats.pending()),
            ):
                families[key].add_sample(name, labels, float(value))
            for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
                families["failure"].add_sample("nv_inference_request_failure", dict(labels, reason=reason),
                                               float(snap["fail_reasons"].get(reason, 0)))
        return list(families.values())


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

    def __init__(self, name: str, metrics: Metrics, version: str = ""):
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
        self.fail_reasons: dict[str, int] = {}  # Triton's failure reasons -> requests
        self.version = version  # Triton's `version` label
        self._depth = self._depth_owner = None
        # the Prometheus children this model writes on every request, looked up once (labels() takes a lock
        # and builds a key each call)
        self._per_api: dict[str, tuple] = {}
        self._batch_size = metrics.batch_size.labels(name)
        self._compute = metrics.compute_latency.labels(name)
        self._queue_hist = metrics.queue_latency.labels(name)

    def _api(self, api: str) -> tuple:
        children = self._per_api.get(api)
        if children is None:
            children = self._per_api[api] = (self._m.requests.labels(self.name, api),
                                             self._m.request_latency.labels(self.name, api))
        return children

    def watch_queue(self, depth, owner=None) -> None:
        """Report `depth()` (this version's requests waiting) as Triton's pending count at each scrape;
        `owner` (its batcher) lets unwatch_queue drop it without touching a newer owner's."""
        self._depth, self._depth_owner = depth, owner

    def unwatch_queue(self, owner) -> None:
        """Stop reading the queue of `owner` (a closed batcher: nothing keeps it alive from here)."""
        if self._depth_owner is owner:
            self._depth = self._depth_owner = None

    def pending(self) -> int:
        """Requests queued for a batch now (0 for an ensemble: its members queue)."""
        return int(self._depth()) if self._depth is not None else 0

    def received(self, api: str) -> None:
        self._api(api)[0].inc()

    def finished(self, api: str, seconds: float, code: str | None = None) -> None:
        """A request ended: `code` is None on success, else the gRPC status name."""
        self._api(api)[1].observe(seconds)
        with self._lock:
            (self.success if code is None else self.fail).add(seconds)
            if code is not None:
                reason = triton_reason(code)
                self.fail_reasons[reason] = self.fail_reasons.get(reason, 0) + 1
        if code is not None:
            self._m.failures.labels(self.name, api, code).inc()

    def batch(self, size: int, compute_s: float, queue_s: list[float]) -> None:
        """A batch of `size` images ran in `compute_s`; its requests had waited `queue_s`."""
        self._batch_size.observe(size)
        self._compute.observe(compute_s)
        queue_hist = self._queue_hist
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
                "fail_reasons": dict(self.fail_reasons),
            }

    @property
    def mean_batch_size(self) -> float:
        with self._lock:
            return self.inference_count / self.execution_count if self.execution_count else 0.0


class RequestRecord:
    """One request's metrics, for each model version and ensemble that answers it: counted once the request
    knows what answers it (its names resolved), finished with a status code name later.

    The gRPC servicers and the HTTP front end both record through this (serve.dataplane.RequestScope), with
    their own api label and the same status code names (serve.errors.status_of)."""

    def __init__(self, api: str, stats: list[ModelStats] = ()):
        self.api = api
        self.t0 = time.perf_counter()
        self.stats: list[ModelStats] = []
        self.add(stats)

    def add(self, stats) -> None:
        for model in stats:
            if not any(model is known for known in self.stats):
                self.stats.append(model)
                model.received(self.api)

    def finish(self, code: str | None = None) -> None:
        seconds = time.perf_counter() - self.t0
        for model in self.stats:
            model.finished(self.api, seconds, code)
