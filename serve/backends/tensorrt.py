"""TensorRT backend: runs a `model.plan` engine. The only TensorRT *runtime* code in Kestrel.

A TensorRT engine runs only on the GPU family (compute capability) and the
TensorRT version it was built for. `export.tensorrt` writes a sidecar
`model.plan.json` beside every engine (TensorRT version, GPU name, compute
capability, precision, optimization profile, the command that rebuilds it);
`TensorRTRunner.load()` compares it with this machine *before* deserializing
and raises EngineMismatchError naming both sides and the rebuild command.

Rules (TensorRT's own: engines are not portable across TensorRT versions or
compute capabilities unless built version/hardware-compatible, which we don't):
- a different TensorRT version or compute capability -> EngineMismatchError;
- the same compute capability but another GPU name (an A10 engine on an A10G)
  -> a warning: it runs, possibly with tactics tuned for the other part.

GPU memory: TensorRT's Python API ships no allocator, and cupy / torch /
pycuda are not dependencies. The runner uses NVIDIA's `cuda-python` bindings
(the CUDA runtime API: cudaMalloc, cudaMemcpyAsync, streams), imported lazily
and named in the `gpu` extra. Device buffers are allocated once per input
shape's batch at the profile's max batch and reused; one CUDA stream per
runner. An IExecutionContext is not thread-safe, so `thread_safe = False` and
`_infer` holds a lock as well.

Nothing here imports tensorrt or cuda at module level: `import serve.backends.tensorrt`
works on any machine; the metadata helpers are plain Python and tested on CPU.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._files import check_readable, read_error, write_text_atomic
from .._optional import require
from ..errors import (BackendError, EngineMismatchError, MissingDependencyError, ModelLoadError,
                      ServerUnavailableError)
from ..repository import ModelEntry, TensorSpec
from .base import Runner

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"  # model.plan -> model.plan.json
METADATA_FORMAT = 1


# ---- build metadata (pure Python) -----------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """What an engine depends on: TensorRT version, GPU name, compute capability ("8.6")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


@dataclass(frozen=True)
class EngineMetadata:
    """The sidecar `model.plan.json`."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_name: str
    output_name: str
    image_size: tuple[int, int]
    profile: dict  # {"min": int, "opt": int, "max": int} (batch sizes)
    source: str = ""  # the ONNX the engine was built from (repository-relative)
    source_sha256: str = ""
    rebuild_command: str = ""
    workspace_mb: int | None = None
    built_at: str = ""
    extra: dict = field(default_factory=dict)
    format: int = METADATA_FORMAT

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_json(self) -> str:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "engine metadata") -> "EngineMetadata":
        required = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "input_name",
                    "output_name", "image_size", "profile")
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelLoadError(f"{where}: missing fields {missing}; expected all of {list(required)}")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["image_size"] = tuple(int(v) for v in values["image_size"])
        values["profile"] = {k: int(values["profile"][k]) for k in ("min", "opt", "max")}
        return cls(**values)


def sidecar_path(plan: str | Path) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + SIDECAR_SUFFIX)


def write_metadata(plan: str | Path, metadata: EngineMetadata) -> Path:
    return write_text_atomic(sidecar_path(plan), metadata.to_json())


def read_metadata(plan: str | Path) -> EngineMetadata:
    """The sidecar of `plan`; a missing or unreadable one is a ModelLoadError saying so."""
    path = sidecar_path(plan)
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: every TensorRT engine needs the build metadata written beside it by "
            "`python -m export.optimize ... --engine` (it records the GPU and TensorRT version it runs on)"
        )
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelLoadError(f"engine metadata: {read_error(path, exc)}") from None
    except ValueError as exc:
        raise ModelLoadError(f"{path}: cannot read engine metadata: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return EngineMetadata.from_dict(data, where=str(path))


def same_version(a: str, b: str) -> bool:
    """TensorRT versions match on every numeric component present in both ("10.3.0" == "10.3.0.26")."""
    pa, pb = re.findall(r"\d+", a), re.findall(r"\d+", b)
    n = min(len(pa), len(pb))
    return n > 0 and pa[:n] == pb[:n]


def check_compatible(metadata: EngineMetadata, here: DeviceInfo, *, model: str = "", plan: str | Path = "") -> list[str]:
    """Raise EngineMismatchError when the engine cannot run here; return warnings otherwise."""
    problems = []
    if not same_version(metadata.tensorrt_version, here.tensorrt_version):
        problems.append(f"TensorRT {metadata.tensorrt_version} (this machine has {here.tensorrt_version})")
    if metadata.compute_capability != here.compute_capability:
        problems.append(
            f"compute capability {metadata.compute_capability} (this machine's GPU has {here.compute_capability})"
        )
    who = f"model '{model}': " if model else ""
    where = f" {plan}" if plan else ""
    if problems:
        rebuild = metadata.rebuild_command or "python -m export.optimize NAME --engine-only --force ..."
        raise EngineMismatchError(
            f"{who}the TensorRT engine{where} was built for {metadata.device.describe()}; this machine has "
            f"{here.describe()}; mismatch in: {'; '.join(problems)}. Engines are specific to the GPU and "
            f"TensorRT version: rebuild it on this machine with: {rebuild}"
        )
    warnings = []
    if metadata.gpu_name != here.gpu_name:
        warnings.append(
            f"{who}engine{where} was built on {metadata.gpu_name}, running on {here.gpu_name} (same compute "
            f"capability {here.compute_capability}): it runs, but rebuild for best performance: "
            f"{metadata.rebuild_command}"
        )
    return warnings


# ---- CUDA / TensorRT access (lazy) ----------------------------------------------------------
def cudart():
    """The CUDA runtime bindings of `cuda-python` (module path differs between 12.x and 13.x)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 / 13
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # older cuda-python 12.x
        return runtime
    except ImportError as exc:
        raise MissingDependencyError("cuda-python", "gpu", "GPU memory for TensorRT engines") from exc


def _check(result, what: str, error: type[Exception] = ModelLoadError):
    """cuda-python calls return (err, *values); raise `error` on a non-success error code
    (ModelLoadError while loading, BackendError while running a batch)."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        rt = cudart()
        try:
            name = rt.cudaGetErrorName(err)[1].decode()
        except Exception:  # pragma: no cover - only on a broken CUDA install
            name = str(err)
        raise error(f"CUDA call {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def current_device() -> DeviceInfo:
    """TensorRT version and the current GPU's name and compute capability."""
    trt = require("tensorrt", "TensorRT engines")
    rt = cudart()
    device = _check(rt.cudaGetDevice(), "cudaGetDevice")
    props = _check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return DeviceInfo(str(trt.__version__), str(name).strip(), f"{props.major}.{props.minor}")


_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                 "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_}


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine with one execution context and one CUDA stream."""

    thread_safe = False  # an IExecutionContext may not be used from several threads

    def __init__(self, name: str, path: str | Path, input_spec: TensorSpec, output_spec: TensorSpec, *,
                 labels=None, max_batch_size: int = 0, check_device: bool = True):
        super().__init__(name, input_spec, output_spec, labels=labels, max_batch_size=max_batch_size)
        self.path = Path(path)
        self.check_device = check_device
        self.metadata: EngineMetadata | None = None
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._engine = self._context = self._stream = None
        self._buffers: dict[str, int] = {}

    @classmethod
    def from_entry(cls, entry: ModelEntry, version: int | None = None, **options) -> "TensorRTRunner":
        return cls(entry.name, entry.artifact(version), entry.input_spec, entry.output_spec,
                   labels=entry.labels(), max_batch_size=entry.max_batch_size, **options)

    def _load(self) -> None:
        if not self.path.is_file():
            raise ModelLoadError(f"model '{self.name}': {self.path} does not exist")
        unreadable = check_readable(self.path)
        if unreadable:
            raise ModelLoadError(f"model '{self.name}': {unreadable}")
        self.metadata = read_metadata(self.path)
        trt = require("tensorrt", "TensorRT engines")
        rt = cudart()
        if self.check_device:
            self.warnings = check_compatible(self.metadata, current_device(), model=self.name, plan=self.path)
            for warning in self.warnings:
                log.warning(warning)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ModelLoadError(
                f"model '{self.name}': TensorRT could not deserialize {self.path} (see TensorRT's log above); "
                f"rebuild it with: {self.metadata.rebuild_command}"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self.input_spec.name] or outputs != [self.output_spec.name]:
            raise ModelLoadError(
                f"model '{self.name}': engine has inputs {inputs} and outputs {outputs}; "
                f"expected [{self.input_spec.name!r}] and [{self.output_spec.name!r}]"
            )
        self._dtypes = {n: np.dtype(_TRT_TO_NUMPY[engine.get_tensor_dtype(n).name]) for n in names}
        self._input, self._output = inputs[0], outputs[0]
        profile_max = int(engine.get_tensor_profile_shape(self._input, 0)[2][0])
        self._capacity = min(profile_max, self.max_batch_size) if self.max_batch_size else profile_max
        if not self.max_batch_size or self.max_batch_size > profile_max:
            if self.max_batch_size:
                log.warning("model '%s': config max_batch_size %d exceeds the engine's profile max %d; "
                            "batches above %d are refused", self.name, self.max_batch_size, profile_max, profile_max)
            self.max_batch_size = profile_max  # check() then refuses bigger batches with a clear message
        self._engine = engine
        try:
            self._context = engine.create_execution_context()
            self._stream = _check(rt.cudaStreamCreate(), "cudaStreamCreate")
            classes = int(self.output_spec.shape[-1])
            sizes = {
                self._input: self._capacity * int(np.prod(self.input_spec.shape)) * self._dtypes[self._input].itemsize,
                self._output: self._capacity * classes * self._dtypes[self._output].itemsize,
            }
            for tensor, nbytes in sizes.items():
                self._buffers[tensor] = int(_check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))
                self._context.set_tensor_address(tensor, self._buffers[tensor])
        except BaseException:
            self._close()  # free what was allocated before the failure
            raise

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        rt = cudart()
        n = batch.shape[0]
        host_in = np.ascontiguousarray(batch, dtype=self._dtypes[self._input])
        host_out = np.empty((n, int(self.output_spec.shape[-1])), dtype=self._dtypes[self._output])
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            if self._context is None:  # closed while this batch waited for the lock
                raise ServerUnavailableError(f"model '{self.name}' was unloaded; it does not run any more")
            if not self._context.set_input_shape(self._input, tuple(host_in.shape)):
                raise BackendError(f"model '{self.name}': TensorRT refused input shape {host_in.shape}")
            _check(rt.cudaMemcpyAsync(self._buffers[self._input], host_in.ctypes.data, host_in.nbytes, h2d,
                                      self._stream), "cudaMemcpyAsync (host to device)", BackendError)
            if not self._context.execute_async_v3(int(self._stream)):
                raise BackendError(f"model '{self.name}': TensorRT execute_async_v3 failed")
            _check(rt.cudaMemcpyAsync(host_out.ctypes.data, self._buffers[self._output], host_out.nbytes, d2h,
                                      self._stream), "cudaMemcpyAsync (device to host)", BackendError)
            _check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize", BackendError)
        return host_out.astype(np.float32, copy=False)

    def _close(self) -> None:
        rt = cudart()
        with self._lock:  # never while a batch is inside execute_async_v3 / the copies
            for ptr in self._buffers.values():
                rt.cudaFree(ptr)
            self._buffers.clear()
            if self._stream is not None:
                rt.cudaStreamDestroy(self._stream)
            self._context = self._engine = self._stream = None
