#!/usr/bin/env python3
"""`make footprint`: what serving costs on an edge box, for a host install and for the image.

    .venv/bin/python deploy/docker/footprint.py --repository .cache/image-repo [--image kestrel:cpu]
        [--runs 3] [--load-seconds 15] [--no-image] [--json .cache/footprint.json]

Measures, and prints as a table for docs/benchmarks.md:
  - installed size of `pip install kestrel[cpu]` (the serving install: no export/train extras) in a fresh
    venv (.cache/footprint/venv, reused while pyproject.toml is unchanged), and the image's size;
  - time from process start to READY (/v2/health/ready 200) with mobilenet_v2 alone (--models
    mobilenet_v2) and with the whole repository (`make image-repo`: the demo's three models and their
    ensemble), median of --runs starts; for the image also from the container's launch;
  - RSS of the server process idle (3 s after READY) and under 8 clients (4 tritonclient gRPC V2 infer +
    4 HTTP /v1/classify, one photo each, --load-seconds): the largest sample (every 0.2 s) and VmHWM.
The CPU, its instruction sets, the versions and the machine's load (before and after) are recorded: on a
shared machine these figures are indicative; rerun on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as eng  # noqa: E402

ROOT = eng.ROOT
CLIENTS = 8
IDLE_WAIT_S = 3.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    status = eng.proc_status(pid)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def process_age(pid: int) -> float:
    """Seconds since `pid` started (its exec; /proc/PID/stat starttime, 10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


# ---- the host install ------------------------------------------------------------------------------
def host_venv(folder: Path, reinstall: bool) -> tuple[Path, dict]:
    """A fresh venv with `pip install .[cpu]` from this checkout (non-editable); its sizes."""
    marker = folder / ".pyproject"
    wanted = (ROOT / "pyproject.toml").read_text()
    if reinstall or not marker.is_file() or marker.read_text() != wanted:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"[footprint] pip install '.[cpu]' into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "--no-cache-dir", f"{ROOT}[cpu]"], check=True,
                       cwd=folder)
        marker.write_text(wanted)
    site = next(folder.glob("lib/python3*/site-packages"))
    tooling = sum(eng._du(p) for p in site.iterdir() if p.name.split("-")[0] in ("pip", "setuptools", "_distutils_hack"))
    sizes = {"venv_mb": eng._du(folder) / 1e6, "site_packages_mb": eng._du(site) / 1e6,
             "without_pip_setuptools_mb": (eng._du(site) - tooling) / 1e6}
    biggest = sorted(((eng._du(p), p.name) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")),
                     reverse=True)[:6]
    sizes["biggest_mb"] = {name: round(size / 1e6, 1) for size, name in biggest}
    return folder / "bin" / "python", sizes


class HostRun:
    def __init__(self, python: Path, repository: Path, models: list[str] | None, work: Path):
        self.port_file = work / "footprint-ports.json"
        self.port_file.unlink(missing_ok=True)
        cmd = [str(python), "-m", "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
               "--http-port", "0", "--metrics-port", "-1", "--port-file", str(self.port_file)]
        if models:
            cmd += ["--models", ",".join(models)]
        env = {k: v for k, v in os.environ.items() if k != "KESTREL_ORT_THREADS"}
        self.log = open(work / "footprint-host.log", "ab")
        self.launched = time.monotonic()
        self.process = subprocess.Popen(cmd, cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 300) -> tuple[float, float]:
        """(seconds from launch, seconds from the process's start) to READY."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.is_file() and self.port_file.read_text().strip():
                ports = json.loads(self.port_file.read_text())
                self.grpc, self.http = f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['http_port']}"
                if http_ok(self.http + "/v2/health/ready"):
                    return time.monotonic() - self.launched, process_age(self.pid)
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"the host's server was not ready; see {self.log.name}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


class ImageRun:
    def __init__(self, runner: str, image: str, repository: Path, models: list[str] | None, work: Path):
        args = ["--drain-delay", "0"] + (["--models", ",".join(models)] if models else [])
        self.container = eng.Container(runner, image, args=args, volumes=[(repository, "/mnt/models", True)],
                                       log_path=work / "footprint-image.log")
        self.launched = time.monotonic()
        self.container.start()
        self.grpc = f"127.0.0.1:{self.container.host_port(8081)}"
        self.http = f"http://127.0.0.1:{self.container.host_port(8080)}"

    def wait_ready(self, timeout: float = 300) -> tuple[float, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if http_ok(self.http + "/v2/health/ready"):
                since_launch = time.monotonic() - self.launched
                self.pid = self.container.server_pid()
                return since_launch, process_age(self.pid)
            time.sleep(0.01)
        raise RuntimeError("the image's server was not ready")

    def stop(self):
        self.container.remove()


# ---- load ----------------------------------------------------------------------------------------
def under_load(server, pid: int, model: str, photo: Path, seconds: float) -> dict:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from PIL import Image

    with Image.open(photo) as im:
        batch = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.uint8)[None]
    data = photo.read_bytes()
    stop = threading.Event()
    counts = {"grpc": 0, "http": 0, "errors": 0}
    lock = threading.Lock()

    def grpc_client():
        client = grpcclient.InferenceServerClient(server.grpc)
        inp = grpcclient.InferInput("images", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        while not stop.is_set():
            try:
                client.infer(model, [inp], client_timeout=30)
                key = "grpc"
            except Exception:  # noqa: BLE001 - counted
                key = "errors"
            with lock:
                counts[key] += 1
        client.close()

    def http_client():
        url = f"{server.http}/v1/classify?models={model}&top_k=5"
        while not stop.is_set():
            request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/jpeg"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    r.read()
                key = "http"
            except Exception:  # noqa: BLE001
                key = "errors"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=grpc_client if i % 2 == 0 else http_client, daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    started, peak = time.monotonic(), 0.0
    while time.monotonic() - started < seconds:
        peak = max(peak, rss_mb(pid)[0])
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(60)
    rss, hwm = rss_mb(pid)
    return {"peak_rss_mb": round(peak, 1), "end_rss_mb": round(rss, 1), "vmhwm_mb": round(hwm, 1),
            "requests_per_s": round((counts["grpc"] + counts["http"]) / elapsed, 1), "errors": counts["errors"]}


def measure(kind: str, make, runs: int, load_model: str | None, photo: Path, load_seconds: float) -> dict:
    """Start `runs` times (ready times), idle RSS and load on the last start."""
    launch, own = [], []
    out: dict = {}
    for i in range(runs):
        server = make()
        try:
            a, b = server.wait_ready()
            launch.append(a)
            own.append(b)
            if i == runs - 1:
                time.sleep(IDLE_WAIT_S)
                idle, hwm = rss_mb(server.pid)
                out["idle_rss_mb"], out["startup_vmhwm_mb"] = round(idle, 1), round(hwm, 1)
                if load_model:
                    out["load"] = under_load(server, server.pid, load_model, photo, load_seconds)
        finally:
            server.stop()
    out["ready_from_launch_s"] = {"median": round(statistics.median(launch), 2), "min": round(min(launch), 2),
                                  "max": round(max(launch), 2)}
    out["ready_from_process_start_s"] = {"median": round(statistics.median(own), 2), "min": round(min(own), 2),
                                         "max": round(max(own), 2)}
    print(f"[footprint] {kind}: {json.dumps(out)}", flush=True)
    return out


def versions(python: Path) -> dict:
    code = ("import json, platform\nfrom importlib import metadata as m\n"
            "print(json.dumps({'python': platform.python_version(), **{p: m.version(p) for p in "
            "('onnxruntime', 'numpy', 'grpcio', 'uvicorn', 'pillow', 'kestrel')}}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def table(results: dict) -> str:
    rows = ["| | host install | image |", "|---|---|---|"]
    host, image = results.get("host", {}), results.get("image", {})

    def cell(d, *keys, fmt="{:.0f}"):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return "-"
            d = d[k]
        return fmt.format(d)

    rows.append(f"| installed size | {cell(results, 'host_install', 'site_packages_mb')} MB site-packages "
                f"({cell(results, 'host_install', 'without_pip_setuptools_mb')} MB without pip/setuptools) | "
                f"{cell(results, 'image_size', 'image_mb')} MB image ({cell(results, 'image_size', 'base_mb')} MB base) |")
    for label, key in (("mobilenet_v2", "mobilenet_v2"), ("demo repository (3 models + ensemble)", "repository")):
        h, i = host.get(key, {}), image.get(key, {})
        rows.append(f"| READY after start, {label} | {cell(h, 'ready_from_process_start_s', 'median', fmt='{:.2f}')} s "
                    f"| {cell(i, 'ready_from_process_start_s', 'median', fmt='{:.2f}')} s "
                    f"({cell(i, 'ready_from_launch_s', 'median', fmt='{:.2f}')} s from `buildah run`) |")
        rows.append(f"| idle RSS, {label} | {cell(h, 'idle_rss_mb')} MB | {cell(i, 'idle_rss_mb')} MB |")
        rows.append(f"| RSS under {CLIENTS} clients (peak), {label} | {cell(h, 'load', 'peak_rss_mb')} MB "
                    f"({cell(h, 'load', 'requests_per_s')} req/s) | {cell(i, 'load', 'peak_rss_mb')} MB "
                    f"({cell(i, 'load', 'requests_per_s')} req/s) |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="with mobilenet_v2 (make image-repo)")
    p.add_argument("--image", default=eng.DEFAULT_TAG)
    p.add_argument("--no-image", action="store_true", help="the host install only")
    p.add_argument("--engine")
    p.add_argument("--runner")
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "photos")
    p.add_argument("--runs", type=int, default=3, help="starts per configuration (median READY time)")
    p.add_argument("--load-seconds", type=float, default=15.0)
    p.add_argument("--reinstall", action="store_true", help="rebuild the host venv")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "footprint")
    p.add_argument("--json", type=Path, default=ROOT / ".cache" / "footprint.json")
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python, sizes = host_venv(work / "venv", args.reinstall)  # first: pip needs the network
    runner = None
    if not args.no_image:
        engine = eng.choose_engine(args.engine)
        runner = eng.choose_runner(engine, args.image, args.runner)
        if runner == "buildah":
            eng.private_network([str(Path(__file__).resolve()), *[a for a in argv if a != "--reinstall"]])
    from serve import cpuinfo

    repository = args.repository.resolve()
    photo = next(p for p in sorted(args.photos.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg"))
    results: dict = {"cpu": cpuinfo.cpu_model(), "instruction_sets": cpuinfo.summary(), "cores": os.cpu_count(),
                     "kernel": platform.release(), "load_before": loadavg(), "runs": args.runs,
                     "load_seconds": args.load_seconds, "clients": CLIENTS}
    results["host_install"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in sizes.items()}
    results["versions"] = versions(python)
    print(f"[footprint] {results['cpu']} ({results['instruction_sets']}), load {results['load_before']}; "
          f"host install {json.dumps(results['host_install'])}", flush=True)

    configs = {"mobilenet_v2": ["mobilenet_v2"], "repository": None}
    results["host"] = {key: measure(f"host, {key}", lambda m=models: HostRun(python, repository, m, work), args.runs,
                                    "mobilenet_v2", photo, args.load_seconds) for key, models in configs.items()}
    if runner:
        results["runner"] = runner
        base = eng.DEFAULT_BASE
        results["image_size"] = {"image_mb": round(eng.image_size(engine, args.image) / 1e6, 1)}
        if eng.image_exists(engine, base):
            results["image_size"]["base_mb"] = round(eng.image_size(engine, base) / 1e6, 1)
        results["image"] = {key: measure(f"image, {key}", lambda m=models: ImageRun(runner, args.image, repository, m,
                                                                                     work), args.runs,
                                         "mobilenet_v2", photo, args.load_seconds) for key, models in configs.items()}
    results["load_after"] = loadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['cpu']}, {results['cores']} cores ({results['instruction_sets']}); load before "
          f"{results['load_before']}, after {results['load_after']}; versions {json.dumps(results['versions'])}\n")
    print(table(results))
    print(f"\nfigures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
