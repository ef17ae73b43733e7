"""Kestrel on Ray Serve: the application builder, the model deployment and the ingress.

    serve run deploy.ray.app:build_app repository=models num_replicas=2 \\
        ensemble="imagenet=mobilenet_v2,mobilenet_v2_int8"
    serve deploy deploy/ray/serve_config.yaml          # the same, from a config file (gRPC proxy included)

- One deployment per model of the repository (`ModelReplica`): each replica loads the model with
  Kestrel's backend (serve.ModelHub) behind its DynamicBatcher, so concurrent requests routed to a
  replica are batched as in `python -m serve`. `max_ongoing_requests` defaults to twice the model's
  max_batch_size (a batch can fill while one runs), `max_queued_requests` to its config's
  max_queue_size; `num_replicas`, `autoscaling_config` and `ray_actor_options` come from the options.
- The ingress (`KestrelIngress`) holds the repository's configs and labels but no model: a ModelHub
  whose batchers forward to the model deployments, so serve.dataplane.DataPlane (the one V2 data plane),
  serve.servicers (gRPC) and serve.http.create_app (HTTP) run unchanged on top of it. An ensemble's
  members are separate deployments called concurrently; the ingress fuses their answers, decodes each
  Classify image once and resizes it once per input size.
- A request that was routed to a replica that died is sent again (inference has no side effects), up
  to RETRIES times; Ray restarts the replica (its health check is the model being ready).

Not Ray's default: nothing here imports Ray at module level (`import deploy.ray.app` works without
the `scale` extra; build_app names it when Ray is missing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from serve import ModelHub, ModelRepository
from serve._optional import require
from serve.backends.base import Runner
from serve.batching import BatchResult
from serve.ensemble import Ensemble
from serve.errors import (ConfigError, DeadlineExceededError, InvalidInputError, KestrelError, ModelLoadError,
                          ResourceExhaustedError, ServerUnavailableError)

log = logging.getLogger("deploy.ray")

RETRIES = 3  # sends of one request to a model deployment when its replica died under it
INGRESS_NAME = "KestrelIngress"
# The import paths Ray Serve's gRPC proxy needs (grpc_options.grpc_servicer_functions): deploy/ray/grpc.py
GRPC_SERVICER_FUNCTIONS = [
    "deploy.ray.grpc.add_GRPCInferenceServiceServicer_to_server",
    "deploy.ray.grpc.add_ClassifierServicer_to_server",
]
MODEL_OPTION_KEYS = {"num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                     "ray_actor_options", "health_check_period_s", "health_check_timeout_s",
                     "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"}
INGRESS_OPTION_KEYS = MODEL_OPTION_KEYS
APP_ARG_KEYS = {"repository", "models", "ensemble", "ensembles", "num_replicas", "num_cpus", "ort_threads",
                "model_options", "ingress_options", "max_message_mb"}


def _ray_serve():
    return require("ray.serve", "the Ray Serve application (deploy/ray)")


# ---- options ------------------------------------------------------------------------------------
def _names(value) -> list[str] | None:
    if value in (None, "", []):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in items if str(n).strip()]


def _ensembles(value) -> list[str]:
    if value in (None, "", []):
        return []
    items = value.split(";") if isinstance(value, str) else list(value)
    return [str(e).strip() for e in items if str(e).strip()]


def _number(args: Mapping, key: str, default, kind=float):
    value = args.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"application argument {key}: received {value!r}, expected a number") from None


@dataclass
class AppOptions:
    """The application's arguments (`serve run ... key=value`, or `args:` in a config file)."""

    repository: str = "models"
    models: list[str] | None = None  # default: every model of the repository (and ensembles' members)
    ensembles: list[str] = field(default_factory=list)  # "NAME=a,b[:FUSION]"
    num_replicas: int = 1  # per model, unless model_options say otherwise
    num_cpus: float = 1.0  # CPUs each model replica reserves (Ray's scheduling, not a thread limit)
    ort_threads: int = 0  # onnxruntime intra-op threads per replica (0 = its default)
    max_message_mb: float = 64.0  # largest HTTP body, as python -m serve --max-message-mb
    model_options: dict[str, dict] = field(default_factory=dict)  # model -> Ray deployment options
    ingress_options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> "AppOptions":
        args = dict(args or {})
        unknown = set(args) - APP_ARG_KEYS
        if unknown:
            raise ConfigError(f"received application arguments {sorted(unknown)}; expected some of "
                              f"{sorted(APP_ARG_KEYS)}")
        model_options = args.get("model_options") or {}
        ingress_options = args.get("ingress_options") or {}
        if not isinstance(model_options, dict) or not all(isinstance(v, dict) for v in model_options.values()):
            raise ConfigError("model_options: expected a mapping of model name -> deployment options")
        for name, opts in list(model_options.items()) + [(INGRESS_NAME, ingress_options)]:
            allowed = INGRESS_OPTION_KEYS if name == INGRESS_NAME else MODEL_OPTION_KEYS
            wrong = set(opts) - allowed
            if wrong:
                raise ConfigError(f"options for {name}: received {sorted(wrong)}; expected some of {sorted(allowed)}")
        return cls(
            repository=str(args.get("repository", "models")),
            models=_names(args.get("models")),
            ensembles=_ensembles(args.get("ensembles", args.get("ensemble"))),
            num_replicas=_number(args, "num_replicas", 1, int),
            num_cpus=_number(args, "num_cpus", 1.0),
            ort_threads=_number(args, "ort_threads", 0, int),
            max_message_mb=_number(args, "max_message_mb", 64.0),
            model_options={str(k): dict(v) for k, v in model_options.items()},
            ingress_options=dict(ingress_options),
        )

    @property
    def runner_options(self) -> dict[str, dict] | None:
        return {"onnxruntime_onnx": {"intra_op_threads": self.ort_threads}} if self.ort_threads else None


def served_names(options: AppOptions) -> list[str]:
    """The models the application deploys: as `python -m serve` chooses them (ModelHub's rules)."""
    hub = ModelHub(options.repository, options.models, [Ensemble.parse(e) for e in options.ensembles])
    return hub.startup_plan()[0]


def model_deployment_options(repository: ModelRepository, name: str, options: AppOptions) -> dict:
    """Ray deployment options of one model: defaults from its config.pbtxt, then the model's options."""
    entry = repository.entry(name)
    config = entry.config
    max_batch = max(1, entry.max_batch_size or 1)
    queue = config.dynamic_batching.default_queue_policy.max_queue_size if config.HasField("dynamic_batching") else 0
    out: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": max(4, 2 * max_batch),
        "max_queued_requests": queue if queue > 0 else -1,
        "ray_actor_options": {"num_cpus": options.num_cpus},
        "health_check_period_s": 5,
    }
    own = dict(options.model_options.get(name, {}))
    if "autoscaling_config" in own:
        own.setdefault("num_replicas", "auto")
    else:
        out["num_replicas"] = options.num_replicas
    out.update(own)
    return out


# ---- the model deployment -----------------------------------------------------------------------
def _node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return os.uname().nodename


class ModelReplica:
    """One model in one Ray Serve replica: Kestrel's backend behind its dynamic batcher."""

    def __init__(self, repository: str, name: str, runner_options: dict | None = None, waiters: int = 64):
        self.name = name
        self.hub = ModelHub(repository, [name], runner_options=runner_options, strict=True).load()
        self.served = self.hub.models[name]
        # result() blocks: waiting requests park here, already queued in the batcher (so they batch)
        self._waiters = ThreadPoolExecutor(max_workers=waiters, thread_name_prefix=f"wait-{name}")
        self.node = _node_id()
        log.info("replica of %s ready (pid %d, node %s)", name, os.getpid(), self.node)

    async def infer(self, batch: np.ndarray, timeout_s: float | None = None) -> dict:
        """Probabilities of a uint8 batch and how it ran (queue and compute time, executed batch size)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = self.served.batcher.submit(batch, deadline, checked=True)  # the ingress checked it
        try:
            run = await asyncio.get_running_loop().run_in_executor(self._waiters, pending.result)
        except asyncio.CancelledError:  # the caller went away (Ray cancels the request): do not run it
            pending.cancel()
            raise
        return {"probabilities": run.probabilities, "queue_s": run.queue_s, "compute_s": run.compute_s,
                "batch_size": run.batch_size, "pid": os.getpid(), "node": self.node}

    def statistics(self) -> dict:
        """This replica's counters (the V2 ModelStatistics values) and where it runs."""
        return {"pid": os.getpid(), "node": self.node, **self.served.stats.snapshot()}

    def check_health(self) -> None:
        if not self.served.ready:
            raise RuntimeError(f"model {self.name} is not ready: {self.served.reason}")

    def __del__(self):
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.close(timeout=10)
        waiters = getattr(self, "_waiters", None)
        if waiters is not None:
            waiters.shutdown(wait=False, cancel_futures=True)


# ---- the ingress's view of the models: a ModelHub whose batchers are the model deployments --------
class _RemoteRunner(Runner):
    """The model's contract (input/output spec, labels, batch limit) without the model: it runs remotely."""

    def __init__(self, entry):
        super().__init__(entry.name, entry.input_spec, entry.output_spec, labels=entry.labels(),
                         max_batch_size=entry.max_batch_size)
        self._loaded = True

    def _load(self) -> None:
        pass

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError(f"model '{self.name}' runs in its Ray Serve deployment, not in the ingress")


def _unwrap(exc: BaseException) -> BaseException:
    """A model deployment's exception as Kestrel's error (status table), or as it is."""
    try:
        from ray import exceptions as rx
        from ray.serve import exceptions as sx
    except ImportError:  # handles that are not Ray's (tests)
        return exc

    if isinstance(exc, sx.BackPressureError):
        return ResourceExhaustedError(f"model deployment is at max_queued_requests: {exc}")
    if isinstance(exc, sx.DeploymentUnavailableError):
        return ServerUnavailableError(str(exc))
    if isinstance(exc, (TimeoutError, rx.GetTimeoutError)):
        return DeadlineExceededError(f"the model deployment did not answer within the deadline: {exc}")
    if isinstance(exc, rx.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, KestrelError):
            return cause
    return exc


def _replica_died(exc: BaseException) -> bool:
    try:
        from ray import exceptions as rx
    except ImportError:
        return False

    return isinstance(exc, (rx.RayActorError, rx.ActorUnavailableError)) and not isinstance(exc, rx.RayTaskError)


class _RemotePending:
    """A request sent to a model deployment (batching.Pending's interface)."""

    def __init__(self, batcher: "_RemoteBatcher", batch: np.ndarray, deadline: float | None):
        self.batcher, self.batch, self.deadline = batcher, batch, deadline
        self.size = int(batch.shape[0])
        self.cancelled = False
        self._done = False
        self._response = self._send()

    def _send(self):
        timeout = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        return self.batcher.handle.infer.remote(self.batch, timeout)

    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        self.cancelled = True
        if not self._done:
            self._response.cancel()

    def result(self, timeout: float | None = None) -> BatchResult:
        end = None if timeout is None else time.monotonic() + timeout
        if self.deadline is not None:
            end = self.deadline if end is None else min(end, self.deadline)
        try:
            for attempt in range(1, RETRIES + 1):
                try:  # every attempt gets what is left of the deadline, not a fresh one
                    left = None if end is None else max(0.0, end - time.monotonic())
                    out = self._response.result(timeout_s=left)
                    break
                except Exception as exc:
                    if _replica_died(exc) and attempt < RETRIES and not self.cancelled:
                        log.warning("model %s: replica died under a request (%s); sending it again (%d/%d)",
                                    self.batcher.name, type(exc).__name__, attempt + 1, RETRIES)
                        self.batcher.resent += 1
                        self._response = self._send()
                        continue
                    raise _unwrap(exc) from None
        finally:
            self._done = True
        return BatchResult(np.asarray(out["probabilities"]), out["queue_s"], out["compute_s"], out["batch_size"])


class _RemoteBatcher:
    """DynamicBatcher's interface over a model deployment: checks the batch, sends it, returns a Pending.
    (The batching itself happens in the replica.)"""

    def __init__(self, name: str, handle, runner: _RemoteRunner, max_batch_size: int):
        self.name, self.handle, self.runner = name, handle, runner
        self.max_batch_size = max(1, int(max_batch_size or 1))
        self.queued = 0
        self.resent = 0  # requests sent again because their replica died

    close_runner = False
    accepting = True

    def submit(self, batch: np.ndarray, deadline: float | None = None, *, checked: bool = False) -> _RemotePending:
        if not checked:
            batch = self.runner.check(batch)
        if batch.shape[0] > self.max_batch_size:
            raise InvalidInputError(f"model '{self.name}': received a batch of {batch.shape[0]}, "
                                    f"expected at most max_batch_size={self.max_batch_size}")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceededError(f"model '{self.name}': the request's deadline passed before it was sent")
        return _RemotePending(self, batch, deadline)

    def stop_accepting(self) -> None:
        self.accepting = False

    def close(self, timeout: float | None = None, *, deadline: float | None = None) -> bool:
        self.accepting = False
        return True


class RemoteModelHub(ModelHub):
    """A ModelHub over model deployments: configs and labels from the repository, inference remote."""

    def __init__(self, repository, models, ensembles, handles: Mapping[str, Any], **kwargs):
        super().__init__(repository, models, ensembles, **kwargs)
        self.handles = dict(handles)

    def start_version(self, entry, version: int, stats):
        """A version of a model is its Ray Serve deployment: the runner carries the contract, the batcher sends."""
        if entry.name not in self.handles:
            raise ModelLoadError(f"model '{entry.name}' has no Ray Serve deployment in this application")
        runner = _RemoteRunner(entry)
        return runner, _RemoteBatcher(entry.name, self.handles[entry.name], runner, entry.max_batch_size)


# ---- the ingress ----------------------------------------------------------------------------------
class _Aborted(Exception):
    """A servicer aborted the RPC: the code and details are on the Ray gRPC context."""


class _GrpcContext:
    """grpc.ServicerContext's methods serve.servicers uses, over Ray Serve's gRPC context.

    abort() sets the status on Ray's context and raises; the ingress then returns an empty
    response, which Ray's proxy sends with that status (Ray's documented way to return errors).
    Ray's context carries no deadline, and a client's cancellation is not seen here."""

    def __init__(self, ray_context):
        self._ctx = ray_context
        self._callbacks = []

    def abort(self, code, details):
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
        raise _Aborted(f"{code}: {details}")

    def add_callback(self, callback) -> bool:
        self._callbacks.append(callback)
        return True

    def time_remaining(self):
        return None

    def invocation_metadata(self):
        return self._ctx.invocation_metadata() if self._ctx is not None else []

    def finish(self) -> None:
        for callback in self._callbacks:
            callback()


# The RPCs of proto/grpc_service.proto and proto/kestrel.proto (tests/deploy checks this against the
# generated descriptors): Ray Serve's gRPC proxy calls the ingress method named like the RPC.
V2_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
           "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
# (load and unload answer FAILED_PRECONDITION here: on Ray Serve a new model version is a new deployment,
# rolled out by `serve deploy`, not loaded into running replicas; docs/scaling.md)
CLASSIFY_RPCS = ("Classify", "ListModels")


def _response_type(method: str) -> type:
    from serve._proto import grpc_service_pb2, kestrel_pb2

    module, service = ((grpc_service_pb2, "GRPCInferenceService") if method in V2_RPCS
                       else (kestrel_pb2, "Classifier"))
    return getattr(module, module.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type.name)


def _unavailable_app(message: str):
    """An ASGI app answering every HTTP request 501 with `message`."""
    body = ('{"error": %s}' % __import__("json").dumps(message)).encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 501,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class KestrelIngress:
    """`python -m serve`'s APIs over the model deployments (see the module docstring)."""

    def __init__(self, repository: str, models: Sequence[str], ensembles: Sequence[str], handles: dict,
                 max_message_mb: float = 64.0, threads: int = 64):
        from serve.dataplane import DataPlane
        from serve.servicers import ClassifyServicer, InferenceServicer

        from . import grpc as _grpc_aliases  # noqa: F401  (requests arrive pickled: see deploy/ray/grpc.py)

        self.hub = RemoteModelHub(repository, list(models), [Ensemble.parse(e) for e in ensembles], handles)
        self.hub.load()
        self.plane = DataPlane(self.hub)
        self._v2 = InferenceServicer(self.plane)
        self._classify = ClassifyServicer(self.plane)
        self._max_message_mb = max_message_mb
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ingress")

    def __serve_build_asgi_app__(self):
        """The HTTP side: serve.http's app over the same data plane (V2 REST, /v1/classify, the page)."""
        try:
            from serve.http import HttpOptions, create_app
            from serve.http._app import metrics_route
        except ImportError as exc:  # a serve without the ASGI app: gRPC still works, HTTP says why not
            log.error("HTTP is not served: serve.http has no ASGI app (%s)", exc)
            return _unavailable_app(f"this Kestrel's serve.http has no ASGI app ({exc}); use gRPC")
        return create_app(self.plane, HttpOptions(max_body_mb=self._max_message_mb,
                                                  extra_routes=[metrics_route(self.hub.metrics.registry)]))

    async def _grpc(self, method: str, request, grpc_context):
        servicer = self._v2 if method in V2_RPCS else self._classify
        context = _GrpcContext(grpc_context)

        def call():
            try:
                return getattr(servicer, method)(request, context)
            except _Aborted:
                return _response_type(method)()
            finally:
                context.finish()

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def resent(self) -> dict[str, int]:
        """Per model: requests this ingress sent again because the replica they were routed to died."""
        return {name: record.batcher.resent for name, record in self.hub.models.items()
                if isinstance(record.batcher, _RemoteBatcher)}


def _rpc(name: str):
    async def rpc(self, request, grpc_context=None):
        return await self._grpc(name, request, grpc_context)

    rpc.__name__ = rpc.__qualname__ = name
    rpc.__doc__ = f"The {name} RPC (from Ray Serve's gRPC proxy)."
    return rpc


for _name in V2_RPCS + CLASSIFY_RPCS:
    setattr(KestrelIngress, _name, _rpc(_name))


# ---- the builder -----------------------------------------------------------------------------------
def build_app(args: Mapping[str, Any] | None = None):
    """Ray Serve's application builder (`serve run deploy.ray.app:build_app key=value ...`)."""
    serve = _ray_serve()
    options = AppOptions.parse(args)
    repository = ModelRepository(options.repository)
    names = served_names(options)
    model_apps = {}
    for name in names:
        deployment = serve.deployment(**model_deployment_options(repository, name, options))(ModelReplica)
        model_apps[name] = deployment.bind(str(repository.root), name, options.runner_options)
    ingress_opts = {"name": INGRESS_NAME, "num_replicas": 1, "max_ongoing_requests": 256,
                    "ray_actor_options": {"num_cpus": 0}, **options.ingress_options}
    ingress = serve.deployment(**ingress_opts)(serve.ingress()(KestrelIngress))
    return ingress.bind(str(repository.root), names, options.ensembles, model_apps, options.max_message_mb)
