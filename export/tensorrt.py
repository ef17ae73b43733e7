"""ONNX -> TensorRT engine: the only TensorRT *build* code in Kestrel.

Written from TensorRT 10's documented Python API:

    builder = trt.Builder(logger)
    network = builder.create_network(0)        # explicit batch is the only mode in TensorRT 10
    parser  = trt.OnnxParser(network, logger); parser.parse_from_file(path)
    config  = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)
    config.set_flag(trt.BuilderFlag.FP16 / INT8)
    profile = builder.create_optimization_profile(); profile.set_shape(input, min, opt, max)
    config.add_optimization_profile(profile)
    cache   = config.create_timing_cache(bytes_or_empty); config.set_timing_cache(cache, ignore_mismatch=False)
    plan    = builder.build_serialized_network(network, config)

Only `build_engine()` touches TensorRT; everything around it is plain Python
tested on CPU: the optimization profile (min/opt/max batch, validated), the
precision -> builder-flag table, timing-cache file handling, and the sidecar
`model.plan.json` (see `serve.backends.tensorrt.EngineMetadata`) that the runner
checks before loading.

Precisions:
- fp32: the FP32 ONNX, no flags (TF32 stays TensorRT's default on Ampere+).
- fp16: the FP32 ONNX with BuilderFlag.FP16: TensorRT picks FP16 kernels where
  faster; inputs stay uint8, outputs FP32 (the network's own I/O types).
- int8: *explicit* quantization (TensorRT 10 deprecated implicit calibrators): a
  Q/DQ ONNX calibrated by `export.quantize` with the TensorRT profile (symmetric
  INT8 activations and weights: TensorRT accepts zero-point 0 only), built with
  INT8 + FP16 so unquantized layers (preprocessing, classifier) run in FP16.

Not run here: this machine has no GPU and TensorRT cannot be installed, so
`build_engine` and the runner were written from the documentation and are
exercised only by the gpu-marked test (tests/export/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from serve._files import write_bytes_atomic
from serve._optional import available, require
from serve.backends.tensorrt import DeviceInfo, EngineMetadata, current_device, write_metadata
from serve.errors import ConfigError, KestrelError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "int8")
# precision -> TensorRT BuilderFlag names
BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}
DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_MB = 2048
MAX_PROFILE_BATCH = 4096
TIMING_CACHE_DIR = ".tensorrt"  # inside the repository root; not a model folder (no config.pbtxt)


class EngineBuildError(KestrelError):
    """TensorRT could not parse the ONNX model or build an engine."""


class TensorRTUnavailableError(KestrelError):
    """--engine was asked for on a machine without TensorRT or without an NVIDIA GPU."""


def engine_name(base: str, precision: str) -> str:
    return f"{base}_trt_{check_precision(precision)}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def builder_flags(precision: str) -> tuple[str, ...]:
    """TensorRT BuilderFlag names to set for `precision`."""
    return BUILDER_FLAGS[check_precision(precision)]


# ---- optimization profile -------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """One optimization profile over the batch dimension; TensorRT tunes kernels for `opt`."""

    min: int = DEFAULT_MIN_BATCH
    opt: int = DEFAULT_OPT_BATCH
    max: int = DEFAULT_MAX_BATCH

    def __post_init__(self):
        for label, value in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"--{label}-batch must be an integer, got {value!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(
                f"optimization profile needs 1 <= min-batch <= opt-batch <= max-batch; got "
                f"min={self.min}, opt={self.opt}, max={self.max}"
            )
        if self.max > MAX_PROFILE_BATCH:
            raise ConfigError(f"--max-batch {self.max} is over the limit of {MAX_PROFILE_BATCH}")

    def shapes(self, image_size: tuple[int, int], channels: int = 3) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) NHWC shapes for `set_shape`."""
        h, w = int(image_size[0]), int(image_size[1])
        return tuple((b, h, w, channels) for b in (self.min, self.opt, self.max))

    def as_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def compute_profile(min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None) -> Profile:
    """A validated profile from CLI options; unset values default sensibly.

    max defaults to 32 (the repository's default max_batch_size) or stays >= min;
    opt defaults to 8 clamped into [min, max]. Explicit values are never changed:
    an inconsistent set raises ConfigError.
    """
    lo = DEFAULT_MIN_BATCH if min_batch is None else min_batch
    hi = max_batch if max_batch is not None else max(DEFAULT_MAX_BATCH, lo if isinstance(lo, int) else 0)
    if opt_batch is None:
        opt = min(max(DEFAULT_OPT_BATCH, lo), hi) if isinstance(lo, int) and isinstance(hi, int) else DEFAULT_OPT_BATCH
    else:
        opt = opt_batch
    return Profile(lo, opt, hi)


# ---- timing cache ---------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def timing_cache_path(option: str | Path | None, repository_root: str | Path, device: DeviceInfo) -> Path:
    """Where the timing cache lives.

    - no option: <repository>/.tensorrt/timing-trt<version>-sm<cc>.cache, so
      builds of every model on this GPU/TensorRT reuse each other's timings
      (TensorRT rejects a cache from another version or device anyway);
    - an existing folder (or a path ending in '/'): that file name inside it;
    - otherwise: the file itself.
    """
    name = f"timing-trt{_slug(device.tensorrt_version)}-sm{_slug(device.compute_capability)}.cache"
    if option is None or str(option) == "":
        return Path(repository_root) / TIMING_CACHE_DIR / name
    path = Path(option).expanduser()
    if path.is_dir() or str(option).endswith(("/", os.sep)):
        return path / name
    return path


def read_timing_cache(path: Path) -> bytes:
    """Previous timings (b"" when there are none yet: TensorRT then starts an empty cache)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise ConfigError(f"cannot read the TensorRT timing cache {path}: {exc.strerror}") from None


# ---- environment ----------------------------------------------------------------------------
def probe_device() -> DeviceInfo:
    """This machine's TensorRT and GPU, or TensorRTUnavailableError saying what is missing."""
    if not available("tensorrt"):
        raise TensorRTUnavailableError(
            "--engine needs TensorRT and an NVIDIA GPU: the 'tensorrt' package is not installed "
            "(pip install 'kestrel[gpu]' on a machine with an NVIDIA GPU and driver); the ONNX variants were still written"
        )
    try:
        return current_device()
    except MissingDependencyError as exc:
        raise TensorRTUnavailableError(f"--engine: {exc}") from None
    except Exception as exc:  # no driver / no device: cuda-python reports it as an error code
        raise TensorRTUnavailableError(
            f"--engine needs an NVIDIA GPU, but CUDA reports none usable ({exc}); the ONNX variants were still written"
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rebuild_command(base: str, repository: str | Path, precision: str, profile: Profile, *,
                    workspace_mb: int, calibration: str | Path | None = None) -> str:
    """The exact command that rebuilds this engine on the machine that will run it."""
    parts = ["python", "-m", "export.optimize", base, "--repository", str(repository), "--precision", precision,
             "--engine-only", "--force", "--min-batch", str(profile.min), "--opt-batch", str(profile.opt),
             "--max-batch", str(profile.max), "--workspace-mb", str(workspace_mb)]
    if precision == "int8" and calibration:
        parts += ["--calibration", str(calibration)]
    return shlex.join(parts)


def make_metadata(device: DeviceInfo, *, precision: str, profile: Profile, input_name: str, output_name: str,
                  image_size: tuple[int, int], source: str = "", source_sha256: str = "", rebuild: str = "",
                  workspace_mb: int | None = None, extra: dict | None = None) -> EngineMetadata:
    return EngineMetadata(
        tensorrt_version=device.tensorrt_version, gpu_name=device.gpu_name,
        compute_capability=device.compute_capability, precision=check_precision(precision),
        input_name=input_name, output_name=output_name, image_size=tuple(image_size), profile=profile.as_dict(),
        source=source, source_sha256=source_sha256, rebuild_command=rebuild, workspace_mb=workspace_mb,
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), extra=dict(extra or {}),
    )


# ---- the TensorRT calls ---------------------------------------------------------------------
@dataclass
class BuildResult:
    plan: Path
    metadata: Path
    timing_cache: Path | None
    bytes: int


def build_engine(onnx_path: str | Path, plan_path: str | Path, metadata: EngineMetadata, *, profile: Profile,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache: Path | None = None,
                 verbose: bool = False) -> BuildResult:
    """Parse `onnx_path`, build a serialized engine for `metadata.precision`, write it and its sidecar."""
    trt = require("tensorrt", "building TensorRT engines")
    if workspace_mb < 1:
        raise ConfigError(f"--workspace-mb must be >= 1, got {workspace_mb}")
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = builder_flags(metadata.precision)
    strongly_typed = not all(hasattr(trt.BuilderFlag, f) for f in flags)
    # TensorRT 10: explicit batch always. Weak typing + precision flags is the TensorRT 10 default;
    # a release that dropped the flags gets a strongly typed network (Q/DQ and ONNX types decide).
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    if network.num_inputs != 1 or network.get_input(0).name != metadata.input_name:
        found = [network.get_input(i).name for i in range(network.num_inputs)]
        raise EngineBuildError(f"{onnx_path}: expected one input {metadata.input_name!r}, found {found}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in () if strongly_typed else flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(metadata.input_name, *profile.shapes(metadata.image_size))
    config.add_optimization_profile(optimization_profile)

    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(read_timing_cache(timing_cache))
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build a {metadata.precision} engine from {onnx_path} (its log above says why); "
            f"profile {profile.as_dict()}, workspace {workspace_mb} MB"
        )
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes(memoryview(serialized))
    plan_path.write_bytes(data)
    sidecar = write_metadata(plan_path, metadata)
    if cache is not None:
        write_bytes_atomic(timing_cache, bytes(memoryview(cache.serialize())))
    return BuildResult(plan=plan_path, metadata=sidecar, timing_cache=timing_cache, bytes=len(data))
