"""Triton for the side-by-side benchmark: its binary from the nvidia-pytriton wheel, and a Triton
repository serving Kestrel's own ONNX files through Triton's python backend.

    install = find_install(ROOT / ".venv-triton")     # the wheel's paths, versions (make bench-triton made it)
    prepare(install)                                  # the 3.11 stub copied into backends/python/
    build_repository(kestrel_repo, ["mobilenet_v2"], target)  # config.pbtxt + 1/model.py per model
    server = TritonServer(install, target, log); server.wait_ready(["mobilenet_v2"], timeout=300)

The `nvidia-pytriton` 0.7.0 wheel ships `tritonserver` 2.51 with ONE backend, python: Triton's native
onnxruntime backend is not in it, so this is Triton running the model through its python backend
(benchmarks/triton_model.py: one onnxruntime session per model instance, set up like Kestrel's). The
stub process that runs model.py embeds the venv's Python: its `bin` goes first on PATH (how pytriton
itself starts the server), its libpython's folder and the wheel's library folders on LD_LIBRARY_PATH.

Each Triton model copies its Kestrel config.pbtxt (names, datatypes, dims, max_batch_size, instance
group, dynamic batching with the same max_queue_delay and queue size) and changes only the platform
(`backend: "python"`) and the parameters model.py reads: `onnx_path` (Kestrel's file, not a copy) and
the onnxruntime thread counts Kestrel's backend would use for that model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ._procs import ROOT, BenchmarkError, Process, wait_for

MODEL_FILE = Path(__file__).with_name("triton_model.py")
DEFAULT_VENV = ROOT / ".venv-triton"
BACKEND = "python"

# What the venv's Python reports about itself and the wheel (run with the venv's interpreter: the
# orchestrator never imports pytriton, whose pins clash with Kestrel's).
_PROBE = r"""
import importlib.metadata as md, json, pathlib, sys, sysconfig
import pytriton
root = pathlib.Path(pytriton.__file__).resolve().parent
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({
    "pytriton": str(root),
    "python_version": "%d.%d" % sys.version_info[:2],
    "python_libdir": sysconfig.get_config_var("LIBDIR") or "",
    "ldlibrary": sysconfig.get_config_var("LDLIBRARY") or "",
    "versions": {n: version(n) for n in ("nvidia-pytriton", "onnxruntime", "numpy")},
}))
"""


@dataclass
class TritonInstall:
    """Where the wheel put Triton, and what the python backend's stub will run with."""

    venv: Path
    pytriton: Path  # site-packages/pytriton
    python_version: str  # "3.11"
    python_libdir: Path | None  # the folder of the venv Python's libpython (the stub links libpython3.X)
    versions: dict = field(default_factory=dict)  # nvidia-pytriton, onnxruntime, numpy in the venv

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.tritonserver / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.tritonserver / "backends"

    @property
    def stub_source(self) -> Path:
        return self.tritonserver / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @property
    def stub(self) -> Path:
        return self.backends / BACKEND / "triton_python_backend_stub"

    def library_dirs(self) -> list[Path]:
        """LD_LIBRARY_PATH for tritonserver and its stub: the venv Python's libpython folder first (so the
        stub embeds the interpreter the venv was made from), then the wheel's own libraries: `lib` and
        `external_libs` in an editable/source layout, `nvidia_pytriton.libs` (auditwheel) in the wheel."""
        candidates = [self.python_libdir, self.tritonserver / "lib", self.tritonserver / "external_libs",
                      self.pytriton.parent / "nvidia_pytriton.libs"]
        return [p for p in candidates if p is not None and p.is_dir()]

    def environment(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")]).rstrip(os.pathsep)
        libs = [str(p) for p in self.library_dirs()]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the stub must see the venv, nothing else
            env.pop(key, None)
        return env


def find_install(venv: Path = DEFAULT_VENV) -> TritonInstall:
    """The nvidia-pytriton wheel in `venv` (made by `make bench-triton`); BenchmarkError when absent."""
    venv = Path(venv).absolute()
    python = venv / "bin" / "python"
    hint = "run `make bench-triton` (it creates .venv-triton with nvidia-pytriton) or pass --triton-venv"
    if not python.exists():
        raise BenchmarkError(f"{venv} has no Python; {hint}")
    try:
        result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchmarkError(f"cannot run {python}: {exc}; {hint}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchmarkError(f"{python} cannot import pytriton ({last}); {hint}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    libdir = Path(info["python_libdir"]) if info["python_libdir"] else None
    if libdir is not None and not (libdir / info["ldlibrary"]).exists():
        libdir = None  # a static Python: the stub then finds the system's libpython
    install = TritonInstall(venv=venv, pytriton=Path(info["pytriton"]), python_version=info["python_version"],
                            python_libdir=libdir, versions=info["versions"])
    if not install.binary.is_file():
        raise BenchmarkError(f"the nvidia-pytriton wheel in {venv} has no tritonserver binary at {install.binary}")
    if not install.stub_source.is_file():
        have = sorted(p.name for p in (install.tritonserver / "python_backend_stubs").glob("*"))
        raise BenchmarkError(f"the wheel has no python backend stub for Python {install.python_version} "
                             f"(it has {', '.join(have) or 'none'}); make .venv-triton with one of those")
    return install


def prepare(install: TritonInstall) -> TritonInstall:
    """Put the stub for the venv's Python into backends/python/ (what pytriton does before it starts the
    server); idempotent."""
    source, target = install.stub_source, install.stub
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)
    target.chmod(0o755)
    return install


# ---- the repository ------------------------------------------------------------------------------
def thread_counts(entry, ort_threads: int = 0, env: dict | None = None) -> dict[str, int]:
    """The onnxruntime thread counts Kestrel's backend uses for `entry` when the server runs with
    `--ort-threads ort_threads` (serve/backends/onnxruntime.py: the model's config parameters win over
    the server option; KESTREL_ORT_THREADS when neither sets intra-op threads; 0 = onnxruntime's default)."""
    from serve.backends.onnxruntime import config_thread_options, intra_op_threads_for

    options = {"intra_op_threads": ort_threads or None, "inter_op_threads": None}
    options.update(config_thread_options(entry))
    return {"intra_op_thread_count": intra_op_threads_for(options["intra_op_threads"], env),
            "inter_op_thread_count": int(options["inter_op_threads"] or 0)}


def triton_config(entry, *, onnx_path: Path, threads: dict[str, int]):
    """Kestrel's ModelConfig for `entry`, served by Triton's python backend instead."""
    config = type(entry.config)()
    config.CopyFrom(entry.config)
    config.ClearField("platform")
    config.ClearField("default_model_filename")
    config.backend = BACKEND
    config.parameters["onnx_path"].string_value = str(Path(onnx_path).resolve())
    for key, value in threads.items():
        config.parameters[key].string_value = str(int(value))
    return config


def build_repository(kestrel_repository: Path, models: list[str], target: Path, *, ort_threads: int = 0,
                     instances: int = 0, instance_threads: int = 0) -> dict:
    """Write a Triton repository at `target` serving `models` of the Kestrel repository; returns
    {model: {"onnx": path, "threads": {...}, "max_batch_size": n, "max_queue_delay_us": n, "instances": n}}.
    `instances` / `instance_threads` (0: as Kestrel's config and thread count) give Triton another arrangement,
    e.g. 2 instances of 1 thread: two batches side by side, as Kestrel's adaptive threads run under load."""
    from serve.repository import PLATFORM_ONNX, ModelRepository, write_config

    repo = ModelRepository(kestrel_repository)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in models:
        entry = repo.entry(name)
        if entry.platform != PLATFORM_ONNX:
            raise BenchmarkError(f"model '{name}' is {entry.platform}; the Triton comparison needs an ONNX model "
                                 f"({PLATFORM_ONNX})")
        onnx = entry.artifact()
        threads = thread_counts(entry, ort_threads)
        if instance_threads:
            threads["intra_op_thread_count"] = int(instance_threads)
        config = triton_config(entry, onnx_path=onnx, threads=threads)
        if instances:  # one group of that many (its kind kept)
            del config.instance_group[1:]
            (config.instance_group[0] if config.instance_group else config.instance_group.add()).count = int(instances)
        folder = target / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        write_config(config, folder)
        for output in config.output:
            if output.label_filename:
                shutil.copyfile(entry.path / output.label_filename, folder / output.label_filename)
        shutil.copyfile(MODEL_FILE, folder / "1" / "model.py")
        out[name] = {"onnx": str(onnx), "threads": threads, "max_batch_size": int(config.max_batch_size),
                     "max_queue_delay_us": int(config.dynamic_batching.max_queue_delay_microseconds),
                     "instances": sum(int(g.count or 1) for g in config.instance_group) or 1}
    return out


# ---- the server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """tritonserver on 127.0.0.1 with free HTTP, gRPC and metrics ports; ready when /v2/health/ready
    and every model's /ready answer 200."""

    def __init__(self, install: TritonInstall, repository: Path, log_path: Path):
        self.install = install
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.command = [str(install.binary), "--model-repository", str(Path(repository).resolve()),
                        "--backend-directory", str(install.backends),
                        "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                        "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                        "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                        "--exit-on-error", "true", "--log-verbose", "0"]
        self.process = Process("tritonserver", self.command, log_path, env=install.environment())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, models: list[str], timeout: float) -> None:
        wait_for(lambda: self._ok("/v2/health/ready") and all(self._ok(f"/v2/models/{m}/ready") for m in models),
                 timeout=timeout, process=self.process, what=f"Triton to serve {', '.join(models)}")

    def metadata(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def stop(self) -> int | None:
        return self.process.stop(timeout=30)


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.triton_repo [VENV]: prepare the wheel's tritonserver (the stub into
    backends/python/) and print how it is started."""
    import argparse
    import sys

    from serve import console

    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_repo", description=main.__doc__.splitlines()[0])
    p.add_argument("venv", nargs="?", type=Path, default=DEFAULT_VENV,
                   help="the venv with nvidia-pytriton (default .venv-triton)")
    console.add_examples(p, ".venv-triton")
    args = p.parse_args(argv)
    try:
        install = prepare(find_install(args.venv))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = install.environment({})
    versions = ", ".join(f"{k} {v}" for k, v in install.versions.items() if v)
    print(f"tritonserver: {install.binary}\n"
          f"backends:     {install.backends} (python backend stub for Python {install.python_version} in place)\n"
          f"PATH prefix:  {install.venv / 'bin'} (the stub embeds this venv's Python)\n"
          f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}\n"
          f"versions:     {versions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
