"""kestrel doctor: what this machine can do for Kestrel and what is missing, one line each.

    kestrel doctor            # CPU instruction sets, runtimes, GPUs, offline weights, ports
    kestrel doctor --gpu      # also: build a TensorRT engine, run it, compare with onnxruntime

Every line is `LABEL  STATUS  DETAIL`; STATUS is ok, missing, warn or info (and PASS / FAIL for --gpu).
Without --gpu the exit status is 0 whatever is missing (it is a report). With --gpu it is 1 unless
the whole TensorRT check passed, so a GPU machine's set-up script can run it.

The --gpu check (`gpu_check`): a small generated ONNX classifier (uint8 NHWC images, dynamic batch)
-> `export.tensorrt.build_engine` (FP32 and FP16, profile 1/4/8) -> the engine's sidecar read back
and checked against this GPU -> `serve.backends.tensorrt.TensorRTRunner` on batches of 1, 3 and 8 ->
compared with onnxruntime on the same ONNX (largest probability difference, top-1 agreement) -> a
batch above the profile's max must be refused. It was written from TensorRT's documentation and
tested on CPU with stand-ins (tests/kestrel/test_doctor.py); it has never run on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from serve import console, cpuinfo

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORTS = {8001: "gRPC, kestrel serve --port", 8000: "HTTP + web page, --http-port",
                 8002: "Prometheus metrics, --metrics-port"}
# module imported -> (distribution for its version, what it is for, install hint)
IMPORTS = {
    "tensorflow": ("tensorflow", "export, train and the Keras backend", "pip install 'kestrel[export]'"),
    "tf2onnx": ("tf2onnx", "Keras -> ONNX", "pip install 'kestrel[export]'"),
    "onnx": ("onnx", "INT8/FP16 variants and doctor --gpu's test model", "pip install 'kestrel[export]'"),
    "tensorrt": ("tensorrt", "TensorRT engines on an NVIDIA GPU",
                 "pip install 'kestrel[gpu]' on a machine with an NVIDIA GPU (README: On an NVIDIA GPU)"),
    "cuda": ("cuda-python", "GPU memory for TensorRT engines", "pip install 'kestrel[gpu]'"),
}
GPU_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}  # largest |TensorRT - onnxruntime| probability difference
GPU_BATCHES = (1, 3, 8)


@dataclass
class Line:
    label: str
    status: str  # ok | missing | warn | info | PASS | FAIL
    detail: str

    def render(self) -> str:
        return f"{self.label:<18}{self.status:<9}{self.detail}"


# ---- the report -------------------------------------------------------------------------------------------
def check_cpu() -> list[Line]:
    flags, source = cpuinfo.cpu_flags()
    isa = cpuinfo.instruction_sets(flags)
    names = [n for n in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if isa[n]]
    detail = f"{cpuinfo.cpu_model()}, {os.cpu_count()} cores: {cpuinfo.summary(isa)}"
    if names:
        detail += f" [{' '.join(names)}]"
    return [Line("cpu", "ok" if source else "warn", detail),
            Line("int8 speed-up", "info", cpuinfo.int8_meaning(isa))]


def check_python() -> list[Line]:
    from . import __version__

    return [Line("python", "ok", f"{platform.python_version()} ({sys.executable})"),
            Line("kestrel", "ok", f"{__version__} ({ROOT})")]


def _distribution(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_onnxruntime() -> list[Line]:
    cpu, gpu = _distribution("onnxruntime"), _distribution("onnxruntime-gpu")
    if importlib.util.find_spec("onnxruntime") is None:
        return [Line("onnxruntime", "missing", "not installed: serving ONNX models needs it "
                                               "(pip install 'kestrel[cpu]', or 'kestrel[gpu]' on a GPU)")]
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception as exc:  # a broken install: say so, keep reporting
        return [Line("onnxruntime", "warn", f"installed but does not import: {type(exc).__name__}: {exc}")]
    lines = [Line("onnxruntime", "ok", f"{ort.__version__}; execution providers: {', '.join(providers)}")]
    if cpu and gpu:
        lines.append(Line("onnxruntime", "warn", f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed: "
                                                 "they provide the same module; uninstall one"))
    return lines


_IMPORT_PROBE = r"""
import importlib, json, sys, time
from serve import console
console.quiet_native_logs()
out = {}
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        if name == "cuda":
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                from cuda import cudart as rt
            info = {}
            for key, call in (("runtime", "cudaRuntimeGetVersion"), ("driver", "cudaDriverGetVersion")):
                try:
                    err, value = getattr(rt, call)()
                    info[key] = f"{value // 1000}.{(value % 1000) // 10}" if int(err) == 0 else f"error {err}"
                except Exception as exc:
                    info[key] = f"error {exc}"
            out[name] = {"ok": True, "version": None, "extra": info}
        else:
            module = importlib.import_module(name)
            extra = {}
            if name == "tensorflow":
                extra["built_with_cuda"] = bool(module.test.is_built_with_cuda())
            out[name] = {"ok": True, "version": getattr(module, "__version__", None), "extra": extra}
    except BaseException as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    out[name]["seconds"] = round(time.perf_counter() - start, 2)
print("DOCTOR-JSON " + json.dumps(out))
"""


def probe_imports(names: Sequence[str], timeout: float = 300.0) -> dict:
    """Import each module in a fresh interpreter (TensorFlow's import is slow and noisy; a crash there must
    not take the report with it). {name: {"ok", "version", "extra" | "error", "seconds"}}."""
    if not names:
        return {}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *names], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {n: {"ok": False, "error": f"importing took over {timeout:.0f} s"} for n in names}
    for line in done.stdout.splitlines():
        if line.startswith("DOCTOR-JSON "):
            return json.loads(line[len("DOCTOR-JSON "):])
    tail = " ".join(done.stderr.split())[-300:]
    return {n: {"ok": False, "error": f"the import probe exited with {done.returncode}: {tail}"} for n in names}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_imports(probe: Callable[[Sequence[str]], dict] | None = None) -> list[Line]:
    present = [m for m in IMPORTS if _installed(m)]
    results = (probe or probe_imports)(present)
    lines = []
    for module, (dist, purpose, hint) in IMPORTS.items():
        label = "cuda-python" if module == "cuda" else module
        if module not in present:
            lines.append(Line(label, "missing", f"not installed, needed for {purpose}: {hint}"))
            continue
        r = results.get(module, {"ok": False, "error": "not probed"})
        version = r.get("version") or _distribution(dist) or "?"
        if not r.get("ok"):
            lines.append(Line(label, "warn", f"installed ({dist} {_distribution(dist) or '?'}) but does not import: "
                                             f"{r.get('error')}"))
            continue
        extra = r.get("extra") or {}
        detail = f"{version} importable ({purpose})"
        if module == "tensorflow":
            detail += f"; built with CUDA: {'yes' if extra.get('built_with_cuda') else 'no'}"
        if module == "cuda":
            detail = (f"{_distribution(dist) or '?'} importable; CUDA runtime {extra.get('runtime', '?')}, "
                      f"driver supports CUDA {extra.get('driver', '?')}")
        lines.append(Line(label, "ok", detail))
    return lines


def query_gpus(run: Callable[[list[str]], str | None] | None = None) -> list[dict] | None:
    """NVIDIA GPUs per nvidia-smi: [{"index", "name", "compute_capability", "driver", "memory"}], or None when
    nvidia-smi is not on PATH."""
    def _run(argv):
        if shutil.which(argv[0]) is None:
            return None
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout if done.returncode == 0 else ""

    run = run or _run
    out = run(["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version,memory.total",
               "--format=csv,noheader"])
    if out is None:
        return None
    old = False
    if not out.strip():  # drivers older than 510 have no compute_cap field
        out = run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"]) or ""
        old = True
    gpus = []
    for row in out.strip().splitlines():
        cells = [c.strip() for c in row.split(",")]
        if old and len(cells) == 4:
            cells.insert(2, "?")
        if len(cells) == 5:
            gpus.append(dict(zip(("index", "name", "compute_capability", "driver", "memory"), cells)))
    return gpus


def check_gpus(gpus: list[dict] | None) -> list[Line]:
    if gpus is None:
        return [Line("gpu", "missing", "no NVIDIA GPU: nvidia-smi is not on PATH (CPU serving works; "
                                       "TensorRT engines need a GPU)")]
    if not gpus:
        return [Line("gpu", "missing", "nvidia-smi is present but lists no usable GPU (driver loaded?)")]
    return [Line(f"gpu {g['index']}", "ok", f"{g['name']}, compute capability {g['compute_capability']}, "
                                             f"driver {g['driver']}, {g['memory']}") for g in gpus]


def keras_home() -> tuple[Path, bool]:
    """(folder, set explicitly): $KERAS_HOME, else Keras' default ~/.keras."""
    value = os.environ.get("KERAS_HOME")
    return (Path(value).expanduser(), True) if value else (Path.home() / ".keras", False)


def check_weights() -> list[Line]:
    from export.applications import APPLICATIONS

    home, explicit = keras_home()
    where = f"KERAS_HOME={home}" if explicit else f"{home} (KERAS_HOME not set)"
    folder = home / "models"
    have = sorted(n for n, app in APPLICATIONS.items() if (folder / app.weights_file).is_file())
    missing = sorted(n for n in APPLICATIONS if n not in have)
    index = (folder / "imagenet_class_index.json").is_file()
    if not have:
        return [Line("imagenet weights", "missing",
                     f"none in {where}/models: --weights imagenet downloads them (needs internet); offline, copy "
                     "the .h5 files there (--weights none exports untrained models)")]
    detail = f"offline in {where}: {', '.join(have)} ({len(have)} of {len(APPLICATIONS)})"
    if missing:
        detail += f"; not there (would download): {', '.join(missing)}"
    lines = [Line("imagenet weights", "ok", detail)]
    if not index:
        lines.append(Line("imagenet labels", "warn", f"{folder}/imagenet_class_index.json is missing: exports "
                                                     "would download it"))
    return lines


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(ports: dict[int, str]) -> list[Line]:
    lines = []
    for port, purpose in ports.items():
        if port_free(port):
            lines.append(Line(f"port {port}", "ok", f"free ({purpose})"))
        else:
            lines.append(Line(f"port {port}", "warn", f"taken by another process ({purpose}): stop it or pick "
                                                      "another port"))
    return lines


def report(ports: dict[int, str], probe: Callable[[Sequence[str]], dict] | None = None,
           gpus: list[dict] | None | str = "query") -> list[Line]:
    lines = check_cpu() + check_python() + check_onnxruntime() + check_imports(probe)
    lines += check_gpus(query_gpus() if gpus == "query" else gpus)
    lines += check_weights() + check_ports(ports)
    return lines


# ---- --gpu: the TensorRT round trip -----------------------------------------------------------------------
GPU_SIZE = (32, 32)
GPU_CLASSES = 10


def small_onnx(path: Path, seed: int = 0) -> Path:
    """A small classifier on Kestrel's contract: uint8 "images" [N,32,32,3] -> float32 "probabilities" [N,10],
    dynamic batch: Cast, scale, NHWC->NCHW, Conv 3x3 + Relu (x2), global average pool, MatMul + Add, Softmax."""
    from serve._optional import require

    onnx = require("onnx", "doctor --gpu's test model")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
             w("c1_w", 16, 3, 3, 3), w("c1_b", 16, scale=0.1), w("c2_w", 32, 16, 3, 3, scale=0.1),
             w("c2_b", 32, scale=0.1), w("fc_w", 32, GPU_CLASSES, scale=1.0), w("fc_b", GPU_CLASSES, scale=0.1)]
    n = helper.make_node
    nodes = [
        n("Cast", ["images"], ["x_f"], to=TensorProto.FLOAT),
        n("Mul", ["x_f", "scale"], ["x_s"]),
        n("Transpose", ["x_s"], ["x_t"], perm=[0, 3, 1, 2]),
        n("Conv", ["x_t", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["c1"], ["r1"]),
        n("Conv", ["r1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["c2"], ["r2"]),
        n("GlobalAveragePool", ["r2"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("MatMul", ["f", "fc_w"], ["l0"]),
        n("Add", ["l0", "fc_b"], ["logits"]),
        n("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "kestrel_doctor",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", GPU_SIZE[0], GPU_SIZE[1], 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", GPU_CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@dataclass
class GpuParts:
    """What gpu_check calls; tests replace them with CPU stand-ins."""

    probe_device: Callable
    build_engine: Callable
    tensorrt_runner: Callable  # (name, plan, input_spec, output_spec, max_batch_size=) -> Runner
    reference_runner: Callable  # (name, onnx_path, input_spec, output_spec) -> Runner
    make_onnx: Callable[[Path], Path] = small_onnx


def default_parts() -> GpuParts:
    from export import tensorrt as trt_build
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    from serve.backends.tensorrt import TensorRTRunner

    return GpuParts(trt_build.probe_device, trt_build.build_engine, TensorRTRunner,
                    lambda name, path, i, o: OnnxRuntimeRunner(name, path, i, o, providers=["CPUExecutionProvider"]))


def gpu_check(workdir: Path, parts: GpuParts | None = None, precisions: Sequence[str] = ("fp32", "fp16"),
              gpus: list[dict] | None | str = "query") -> list[Line]:
    """The TensorRT round trip; every step is one line, PASS or FAIL with its numbers; the last line is the
    verdict. Never raises for a failed step: the failure is the line."""
    import numpy as np

    from export import tensorrt as trt_build
    from serve.backends.tensorrt import check_compatible, read_metadata
    from serve.repository import TensorSpec

    lines: list[Line] = []

    def verdict() -> list[Line]:
        failed = [ln for ln in lines if ln.status == "FAIL"]
        if failed:
            lines.append(Line("gpu check", "FAIL", f"{len(failed)} step(s) failed: "
                                                   f"{', '.join(ln.label for ln in failed)}"))
        else:
            lines.append(Line("gpu check", "PASS", "TensorRT builds, runs and matches onnxruntime on this GPU"))
        return lines

    gpus = query_gpus() if gpus == "query" else gpus
    if not gpus:
        why = "nvidia-smi is not on PATH" if gpus is None else "nvidia-smi lists no GPU"
        lines.append(Line("gpu check", "FAIL", f"no NVIDIA GPU on this machine ({why}): the TensorRT check needs "
                                               "one; everything else in Kestrel runs on the CPU"))
        return lines
    try:
        parts = parts or default_parts()
        device = parts.probe_device()
    except Exception as exc:
        lines.append(Line("gpu device", "FAIL", " ".join(str(exc).split())))
        return verdict()
    lines.append(Line("gpu device", "PASS", device.describe()))

    workdir = Path(workdir)
    try:
        onnx_path = parts.make_onnx(workdir / "doctor.onnx")
    except Exception as exc:
        lines.append(Line("gpu test model", "FAIL", f"cannot write the test ONNX model: {exc}"))
        return verdict()
    in_spec = TensorSpec("images", np.uint8, (*GPU_SIZE, 3))
    out_spec = TensorSpec("probabilities", np.float32, (GPU_CLASSES,))
    profile = trt_build.Profile(1, 4, max(GPU_BATCHES))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (b, *GPU_SIZE, 3), dtype=np.uint8) for b in GPU_BATCHES]
    try:
        with parts.reference_runner("doctor_onnx", onnx_path, in_spec, out_spec) as reference:
            expected = [reference.infer(b) for b in batches]
    except Exception as exc:
        lines.append(Line("gpu reference", "FAIL", f"onnxruntime could not run the test model: {exc}"))
        return verdict()

    for precision in precisions:
        label = f"tensorrt {precision}"
        plan = workdir / precision / "model.plan"
        metadata = trt_build.make_metadata(
            device, precision=precision, profile=profile, input_name="images", output_name="probabilities",
            image_size=GPU_SIZE, source=onnx_path.name, source_sha256=trt_build.sha256(onnx_path),
            rebuild="kestrel doctor --gpu", workspace_mb=256)
        start = time.perf_counter()
        try:
            built = parts.build_engine(onnx_path, plan, metadata, profile=profile, workspace_mb=256)
        except Exception as exc:
            lines.append(Line(f"{label} build", "FAIL", " ".join(str(exc).split())[:400]))
            continue
        lines.append(Line(f"{label} build", "PASS", f"{built.bytes / 1024:.0f} KiB engine in "
                                                    f"{time.perf_counter() - start:.1f} s, profile batch "
                                                    f"{profile.min}/{profile.opt}/{profile.max}"))
        try:
            sidecar = read_metadata(plan)
            problems = [f"{k}: {getattr(sidecar, k)!r} != {getattr(metadata, k)!r}"
                        for k in ("precision", "input_name", "output_name", "image_size", "profile", "source_sha256",
                                  "tensorrt_version", "compute_capability")
                        if getattr(sidecar, k) != getattr(metadata, k)]
            warnings = check_compatible(sidecar, device, model="doctor", plan=plan)
            if problems:
                raise ValueError("; ".join(problems))
            lines.append(Line(f"{label} sidecar", "PASS", f"{plan.name}.json matches this GPU "
                                                          f"({sidecar.device.describe()})"
                                                          + (f"; {warnings[0]}" if warnings else "")))
        except Exception as exc:
            lines.append(Line(f"{label} sidecar", "FAIL", " ".join(str(exc).split())[:400]))
            continue
        try:
            runner = parts.tensorrt_runner("doctor_trt", plan, in_spec, out_spec, max_batch_size=profile.max)
            with runner:
                got, times = [], []
                for batch in batches:
                    start = time.perf_counter()
                    got.append(runner.infer(batch))
                    times.append((time.perf_counter() - start) * 1000)
                refused = False
                try:
                    runner.infer(rng.integers(0, 256, (profile.max + 1, *GPU_SIZE, 3), dtype=np.uint8))
                except Exception:
                    refused = True
        except Exception as exc:
            lines.append(Line(f"{label} run", "FAIL", " ".join(str(exc).split())[:400]))
            continue
        shapes_ok = all(g.shape == e.shape for g, e in zip(got, expected))
        diff = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected)) if shapes_ok else float("inf")
        agree = (sum(int(np.sum(np.argmax(g, 1) == np.argmax(e, 1))) for g, e in zip(got, expected))
                 if shapes_ok else 0)
        total = sum(len(b) for b in batches)
        tolerance = GPU_TOLERANCE.get(precision, 2e-2)
        ok = shapes_ok and diff <= tolerance and agree == total
        numbers = (f"batches {'/'.join(map(str, GPU_BATCHES))}: max |TensorRT - onnxruntime| {diff:.2e} "
                   f"(limit {tolerance:.0e}), top-1 agreement {agree}/{total}, "
                   f"{' / '.join(f'{t:.2f}' for t in times)} ms")
        if not shapes_ok:
            numbers = f"output shapes {[g.shape for g in got]} != {[e.shape for e in expected]}"
        lines.append(Line(f"{label} run", "PASS" if ok else "FAIL", numbers))
        lines.append(Line(f"{label} limits", "PASS" if refused else "FAIL",
                          f"batch {profile.max + 1} (over the profile max {profile.max}) "
                          + ("refused" if refused else "was accepted: it should have been refused")))
    return verdict()


# ---- CLI --------------------------------------------------------------------------------------------------
def _ports(text: str) -> dict[int, str]:
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            port = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated port numbers, got {item!r}") from None
        if not 0 < port < 65536:
            raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
        out[port] = DEFAULT_PORTS.get(port, "asked for")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kestrel doctor", description=(
        "What this machine can do for Kestrel and what is missing, one line each: CPU instruction sets and "
        "what they mean for INT8, onnxruntime and its execution providers, TensorFlow / tf2onnx / onnx / "
        "TensorRT / CUDA with versions, NVIDIA GPUs, offline ImageNet weights (KERAS_HOME), default ports."))
    p.add_argument("--gpu", action="store_true",
                   help="also build a TensorRT engine from a small generated ONNX model, run it, compare it with "
                        "onnxruntime and check its sidecar; exit 1 unless it all passes (or there is no GPU)")
    p.add_argument("--ports", type=_ports, default=dict(DEFAULT_PORTS),
                   help="ports to check, comma-separated (default 8001,8000,8002: gRPC, HTTP, metrics)")
    p.add_argument("--json", action="store_true", help="print the lines as JSON instead")
    p.add_argument("--keep", type=Path, metavar="DIR", help="with --gpu: write the test model and engines here")
    return console.add_examples(p, "                      # the report", "--gpu                # on a GPU machine")


def main(argv: Sequence[str] | None = None, *, parts: GpuParts | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()
    gpus = query_gpus()
    lines = report(args.ports, gpus=gpus)
    gpu_lines: list[Line] = []
    if args.gpu:
        if args.keep:
            gpu_lines = gpu_check(args.keep, parts, gpus=gpus)
        else:
            with tempfile.TemporaryDirectory(prefix="kestrel-doctor-") as tmp:
                gpu_lines = gpu_check(Path(tmp), parts, gpus=gpus)
    if args.json:
        print(json.dumps([asdict(ln) for ln in lines + gpu_lines], indent=1))
    else:
        for ln in lines + gpu_lines:
            print(ln.render(), flush=True)
        if not args.gpu:
            print("(kestrel doctor --gpu also checks TensorRT end to end on an NVIDIA GPU)")
    if args.gpu and (not gpu_lines or gpu_lines[-1].status != "PASS"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
