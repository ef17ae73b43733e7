"""Kestrel against NVIDIA Triton on the same ONNX model, side by side: `kestrel bench vs-triton`.

    make bench-triton                                   # .venv-triton + exports + this with its defaults
    kestrel bench vs-triton --model mobilenet_v2        # after `make bench-triton` made .venv-triton
    kestrel bench vs-triton --quick                     # a few minutes: 1 and 8 clients, one round of 2 s
    kestrel bench vs-triton --clients 16 --batch 1 --protocol grpc --precision fp32 --repeats 5 --duration 10

What it does, in order:

1. Exports what is missing from the Kestrel repository (`--repository`, default models): MODEL and
   MODEL_int8 (calibrated on ../shared/datasets/imagenet_val), and for the ensemble section the `make
   demo` trio and its ensemble (`--no-export` skips every export).
2. Builds a Triton repository for the same ONNX files (benchmarks/triton_repo.py): Triton's python
   backend running benchmarks/triton_model.py, an onnxruntime session set up like Kestrel's, with
   each model's config copied from Kestrel's (max_batch_size, dynamic batching delay, instances).
   The `tritonserver` is the 2.51 binary of PyPI's nvidia-pytriton 0.7.0 wheel in .venv-triton: Triton's
   native onnxruntime backend is NOT in that wheel, so this compares Kestrel with Triton's python backend.
3. Starts both servers on free loopback ports (`python -m serve` with its defaults), waits until every
   model is ready, and checks they answer the same images alike (top-1 agreement, largest difference).
4. For every precision x protocol x batch x client count, runs the same threaded tritonclient load
   (benchmarks/triton_load.py, a subprocess: tritonclient and serve._proto cannot share a process)
   against Kestrel and Triton alternately, `--repeats` rounds with the order rotated each round.
   Each run: warm-up (not measured), then `--duration` s measured; img/s, p50/p95/p99, errors and the
   mean batch each server executed (V2 ModelStatistics: inference_count / execution_count over the window).
5. The request path alone (benchmarks/request_path.py; `--request-path-clients`, default 4 and 32): both
   servers serving a model that does no work with the compared model's tensors and batching, gRPC and
   HTTP, batch 1, alternated: each server's CPU per request besides the model.
6. Ensembles (Kestrel only; `--ensemble NAME`, default the demo's `imagenet`): the ensemble's
   throughput at `--ensemble-clients` (8) against the limit its members' summed in-process cost per
   image allows at the batch sizes the server formed.
7. With the servers stopped, the in-process ceiling: onnxruntime alone in this process (Kestrel's
   session options and thread count) at batch 1, 4, 8, 16, 32 and at the mean batch sizes the servers
   formed.
8. Writes results.json, runs.csv, report.md and plots into benchmarks/results/<timestamp>/
   (benchmarks/vs_triton_report.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from serve import console
from serve.errors import KestrelError

from . import _method
from ._procs import ROOT, BenchmarkError, KestrelServer, _tail, run_to_end
from .vs_triton_report import _num

RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
SERVERS = ("kestrel", "triton")
PRECISIONS = {"fp32": "", "int8": "_int8"}  # precision -> the variant's suffix in the repository
PROTOCOLS = ("grpc", "http")
CEILING_BATCHES = (1, 4, 8, 16, 32)
RUN_OVERHEAD_S = 3.0  # the load generator's start-up (tritonclient import, image decoding) per run
KIND = "vs-triton"  # results.json meta["kind"]: benchmarks/docs.py tells the reports apart by it


@dataclass
class Settings:
    """Everything that shapes a run (recorded in the report)."""

    model: str = "mobilenet_v2"
    repository: Path = ROOT / "models"
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    clients: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 3
    duration_s: float = 6.0
    warmup_s: float = 2.0
    images: Path | None = None  # default ../shared/photos when present, else synthetic
    triton_venv: Path = ROOT / ".venv-triton"
    ort_threads: int = 0  # 0: Kestrel's default (onnxruntime's own); else --ort-threads for Kestrel, the same for Triton
    triton_instances: int = 0  # 0: the model's instance_group, as Kestrel; else Triton's instance count
    triton_threads: int = 0  # 0: as Kestrel; else onnxruntime intra-op threads per Triton instance
    export: bool = True
    weights: str = "imagenet"
    calibration: Path | None = None  # INT8 calibration; default ../shared/datasets/imagenet_val
    calibration_images: int | None = None  # None: export.optimize's default (300)
    ensemble: str = "imagenet"  # "" skips the ensemble section
    ensemble_clients: int = 8
    ensemble_only: bool = False
    request_path_clients: list[int] = field(default_factory=lambda: [4, 32])  # [] skips the request-path runs
    ceiling_batches: list[int] = field(default_factory=lambda: list(CEILING_BATCHES))
    ceiling_repeats: int = 3
    ceiling_iterations: int = 10
    side_by_side_s: float = 3.0  # onnxruntime alone with the ensemble members' batches side by side, per member
    budget_s: float = 3 * 3600.0
    start_timeout_s: float = 600.0
    output: Path | None = None
    quick: bool = False

    def resolved(self) -> "Settings":
        s = Settings(**asdict(self))
        s.repository = Path(s.repository).resolve()
        s.triton_venv = Path(s.triton_venv).absolute()
        bad = [p for p in s.precisions if p not in PRECISIONS] + [p for p in s.protocols if p not in PROTOCOLS]
        if bad or not s.precisions or not s.protocols:
            raise KestrelError(f"received precisions {s.precisions} and protocols {s.protocols}; expected some of "
                               f"{', '.join(PRECISIONS)} and of {', '.join(PROTOCOLS)}")
        if (not s.clients or not s.batches or min(s.clients + s.batches + s.request_path_clients) < 1
                or s.ensemble_clients < 1):
            raise KestrelError(f"received clients {s.clients}, batches {s.batches}, ensemble clients "
                               f"{s.ensemble_clients}, request-path clients {s.request_path_clients}; expected "
                               "integers >= 1")
        if s.repeats < 1 or s.duration_s <= 0 or s.warmup_s < 0 or s.ceiling_repeats < 1 or s.ceiling_iterations < 1:
            raise KestrelError(f"received repeats={s.repeats}, duration={s.duration_s}, warmup={s.warmup_s}; expected "
                               "repeats >= 1, duration > 0, warm-up >= 0")
        if s.triton_instances < 0 or s.triton_threads < 0:
            raise KestrelError(f"received --triton-instances {s.triton_instances} --triton-threads "
                               f"{s.triton_threads}; expected 0 (as Kestrel) or more")
        if s.ort_threads < 0:
            raise KestrelError(f"received --ort-threads {s.ort_threads}; expected 0 (onnxruntime's default) or more")
        if s.ensemble_only and not s.ensemble:
            raise KestrelError("--ensemble-only needs an ensemble name (--ensemble NAME)")
        if s.images is None and (SHARED / "photos").is_dir():
            s.images = SHARED / "photos"
        if s.calibration is None:
            imagenet = SHARED / "datasets" / "imagenet_val"
            s.calibration = imagenet if imagenet.is_dir() else s.images
        s.output = Path(s.output) if s.output else RESULTS / _method.timestamp()
        return s

    def variant(self, precision: str) -> str:
        return self.model + PRECISIONS[precision]


def quick_overrides() -> dict:
    """--quick: every precision, protocol and batch, 1 and 8 clients (the request path at 8), one round of 1 + 2 s."""
    return dict(clients=[1, 8], repeats=1, duration_s=2.0, warmup_s=1.0, ceiling_repeats=1, ceiling_iterations=5,
                ceiling_batches=[1, 8, 32], side_by_side_s=1.0, request_path_clients=[8])


# ---- step 1: exports ----------------------------------------------------------------------------
def export_variants(s: Settings, logs: Path, notes: list[str]) -> list[str]:
    """Export MODEL / MODEL_int8 when missing (server_bench's export commands); returns those present."""
    from . import server_bench

    wanted = [s.variant(p) for p in s.precisions]
    bench = server_bench.Settings(model=s.model, repository=s.repository, variants=wanted, weights=s.weights,
                                  calibration=s.calibration, calibration_images=s.calibration_images)
    if s.export:
        return server_bench.export_missing(bench, logs, notes)
    present = [v for v in wanted if (s.repository / v / "config.pbtxt").is_file()]
    notes += [f"{v}: not in {s.repository} (exports disabled); skipped" for v in wanted if v not in present]
    return present


def export_ensemble(s: Settings, notes: list[str]) -> bool:
    """The demo trio and its ensemble (export.demo's own steps) when the ensemble is missing; True when the
    repository has the ensemble afterwards."""
    from serve.repository import ModelRepository

    if s.ensemble in ModelRepository(s.repository).ensemble_names():
        return True
    if not s.export or s.ensemble != "imagenet":
        notes.append(f"ensemble {s.ensemble!r} is not in {s.repository}; ensemble section skipped "
                     "(`make demo` defines `imagenet`)")
        return False
    from export import demo

    from . import server_bench

    os.environ.update(server_bench.keras_home_env())
    print("exporting the demo ensemble's members (export.demo)", flush=True)
    ready = demo.export_models(list(demo.DEFAULT_MODELS), s.repository, s.weights)
    if len(ready) < 2:
        notes.append(f"the demo ensemble needs two members or more; exported {ready}; ensemble section skipped")
        return False
    demo.define_ensemble(s.repository, ready, demo.DEFAULT_FUSION)
    return s.ensemble in ModelRepository(s.repository).ensemble_names()


# ---- one load run -------------------------------------------------------------------------------
def load_command(url: str, *, protocol: str, model: str, clients: int, batch: int, duration: float, warmup: float,
                 stats_url: str, output: Path, images: Path | None, stats_models: list[str] = (),
                 cpu_pids: list[int] = ()) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.triton_load", "run", "--url", url, "--protocol", protocol,
               "--model", model, "--clients", str(clients), "--batch", str(batch), "--duration", f"{duration:g}",
               "--warmup", f"{warmup:g}", "--stats-url", stats_url, "--output", str(output)]
    if stats_models:
        command += ["--stats-models", ",".join(stats_models)]
    if cpu_pids:
        command += ["--cpu-pids", ",".join(str(p) for p in cpu_pids)]
    if images is not None:
        command += ["--images", str(images)]
    return command


def run_load(command: list[str], log: Path, output: Path, *, timeout: float) -> tuple[dict, str]:
    """Run one load-generator process; (its record, an error message or "")."""
    output.unlink(missing_ok=True)
    try:
        code = run_to_end("the load generator", command, log, timeout=timeout)
    except BenchmarkError as exc:  # timed out: stopped, the run is an error
        return {}, str(exc)
    try:
        return json.loads(output.read_text()), ""
    except (OSError, ValueError):
        return {}, f"the load generator wrote no record (exit {code}); last output:\n{_tail(log, 5)}"


ROW_KEYS = ("requests", "images", "errors", "images_per_s", "requests_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms",
            "mean_batch", "loadgen_cores", "server_cores", "window_s", "error_messages", "stuck_clients")


def _row(record: dict, error: str, **fields) -> dict:
    row = dict(fields)
    row.update({k: record.get(k) for k in ROW_KEYS})
    row["error"] = error
    return row


# ---- step 6: the in-process ceiling --------------------------------------------------------------
def _batch_of(images: list, size: int):
    import numpy as np

    return np.stack([images[i % len(images)] for i in range(size)])


def ceiling(repository: Path, models: list[str], sizes: dict[str, set[int]], *, ort_threads: int, images: Path | None,
            repeats: int, iterations: int) -> dict[str, dict[int, dict]]:
    """{model: {batch: {"median_ms", "low_ms", "high_ms", "images_per_s"}}}: onnxruntime alone in this
    process, each model in the session the server runs a lone batch in (serve.backends.create_runner with
    the server's --ort-threads; batches side by side: benchmarks.ceiling_share.side_by_side), timed like
    `kestrel bench inprocess` (warm-up excluded, median of repeats)."""
    from serve.backends import create_runner
    from serve.repository import ModelRepository

    from ._images import image_arrays
    from .inprocess import time_runners

    repo = ModelRepository(repository)
    out: dict[str, dict[int, dict]] = {}
    for model in models:
        options = {"intra_op_threads": ort_threads} if ort_threads else {}
        runner = create_runner(repo.entry(model), **options)
        try:
            pictures = image_arrays(str(images or ""), runner.image_size)
            out[model] = {}
            for size in sorted(sizes.get(model, ())):
                print(f"in-process ceiling: {model} batch {size}", flush=True)
                timed = time_runners({model: runner}, _batch_of(pictures, size), repeats, iterations=iterations,
                                     warmup=3)[model]
                out[model][size] = {k: timed[k] for k in ("median_ms", "low_ms", "high_ms", "images_per_s")}
        finally:
            runner.close()
    return out


def side_by_side_models(repository: Path, models: list[str], ort_threads: int) -> dict[str, bool]:
    """{model: whether the server runs its batches side by side under load (onnxruntime's adaptive threads)}, from
    the runner the server makes with these options (serve.hub.serving_runner_options), not loaded: the report
    describes the arrangement each run had, not the one the code has when the report is rebuilt."""
    from serve.backends import create_runner
    from serve.hub import serving_runner_options
    from serve.repository import ModelRepository

    repo = ModelRepository(repository)
    server = {"onnxruntime_onnx": {"intra_op_threads": ort_threads}} if ort_threads else None  # --ort-threads
    out = {}
    for model in models:
        entry = repo.entry(model)
        out[model] = int(create_runner(entry, **serving_runner_options(entry.platform, server)).preferred_workers) > 1
    return out


def ceiling_sizes(mean_batches, fixed, max_batch: int) -> set[int]:
    """The fixed batch sizes plus the whole numbers on each side of every formed mean batch."""
    sizes = {int(b) for b in fixed if 1 <= int(b) <= max_batch}
    for mean in mean_batches:
        if mean is None or (isinstance(mean, float) and math.isnan(mean)) or mean <= 0:
            continue
        sizes.update({max(1, min(max_batch, math.floor(mean))), max(1, min(max_batch, math.ceil(mean)))})
    return sizes


# ---- step 5: the ensemble -----------------------------------------------------------------------
def ensemble_runs(s: Settings, logs: Path, raw: Path) -> dict:
    """The ensemble through Kestrel at s.ensemble_clients (gRPC, batch 1): runs and each member's mean batch."""
    from .ensemble_latency import _members

    name, members, _ = _members(s.repository, s.ensemble)
    extra = ["--ort-threads", str(s.ort_threads)] if s.ort_threads else []
    server = KestrelServer(s.repository, members + [name], logs / "kestrel_ensemble_server.log", extra_args=extra)
    runs = []
    try:
        print(f"starting Kestrel with the ensemble {name} ({', '.join(members)})", flush=True)
        server.wait_ready(s.start_timeout_s)
        for repeat in range(s.repeats):
            stem = f"ensemble_{name}_c{s.ensemble_clients}_r{repeat}"
            record_path = raw / f"{stem}.json"
            command = load_command(server.address, protocol="grpc", model=name, clients=s.ensemble_clients, batch=1,
                                   duration=s.duration_s, warmup=s.warmup_s, stats_url=server.address,
                                   output=record_path, images=s.images, stats_models=members + [name])
            monitor = _method.LoadMonitor(pids=[server.process.pid])
            monitor.start()
            record, error = run_load(command, logs / f"{stem}.log", record_path,
                                     timeout=s.warmup_s + s.duration_s + 120)
            usage = monitor.stop()
            row = _row(record, error, repeat=repeat, **usage)
            row["members"] = {m: (record.get("executed") or {}).get(m, {}).get("mean_batch") for m in members}
            runs.append(row)
            print(f"ensemble {name}, {s.ensemble_clients} clients, round {repeat + 1}: "
                  f"{_num(row['images_per_s'])} img/s, p95 {_num(row['p95_ms'])} ms, errors {row['errors']}",
                  flush=True)
    finally:
        server.stop()
    return {"name": name, "members": members, "clients": s.ensemble_clients, "runs": runs}


def _good_runs(ensemble: dict) -> list[dict]:
    """The ensemble's rounds that completed requests without an error."""
    return [r for r in ensemble["runs"] if _method.completed(r)]


def ensemble_batches(ensemble: dict) -> dict[str, float]:
    """{member: the median over the good rounds of the mean batch the server formed for it}."""
    return {m: _method.median(r["members"].get(m) for r in _good_runs(ensemble)) for m in ensemble["members"]}


def side_by_side_costs(repository: Path, ensemble: dict, *, images: Path | None, seconds: float
                       ) -> dict[str, float]:
    """{member: in-process ms per image with its batches side by side on one core each, at the batch the server
    formed (rounded)}, for the members the server runs that way under load (benchmarks.ceiling_share.side_by_side:
    onnxruntime alone, both cores busy); members it runs in one session are left out."""
    from .ceiling_share import side_by_side

    out = {}
    for m, batch in ensemble_batches(ensemble).items():
        size = 1 if math.isnan(batch) else max(1, round(batch))
        print(f"in-process side by side: {m} batch {size}", flush=True)
        rate = side_by_side(repository, m, size, images=images, seconds=seconds)
        if rate:
            out[m] = 1000.0 / rate
    return out


def ensemble_limit(ensemble: dict, costs: dict[str, dict[int, dict]],
                   side_costs: dict[str, float] | None = None) -> dict:
    """The limit the members' summed in-process cost allows, and the measured throughput against it: with each
    member in the session a lone batch runs in (the issue's definition), and, when `side_costs` has a cost for
    each member, with their batches side by side on one core each (what the server does under load)."""
    from .vs_triton_report import per_image_seconds

    runs = _good_runs(ensemble)
    throughput = _method.median(r["images_per_s"] for r in runs)
    members = {}
    for m, batch in ensemble_batches(ensemble).items():
        seconds = per_image_seconds(costs.get(m, {}), batch if not math.isnan(batch) else 1.0)
        members[m] = {"mean_batch": batch, "ms_per_image": seconds * 1000.0}
        if side_costs and m in side_costs:
            members[m]["side_by_side_ms_per_image"] = side_costs[m]
    total = sum(v["ms_per_image"] for v in members.values()) / 1000.0
    limit = 1.0 / total if total > 0 else float("nan")
    out = {"throughput": throughput, "limit": limit, "fraction": _method.ratio(throughput, limit),
           "members": members, "p95_ms": _method.median(r["p95_ms"] for r in runs),
           "errors": sum(int(r.get("errors") or 0) for r in ensemble["runs"])}
    if members and all("side_by_side_ms_per_image" in v for v in members.values()):
        side = sum(v["side_by_side_ms_per_image"] for v in members.values()) / 1000.0
        out["side_by_side_limit"] = 1.0 / side if side > 0 else float("nan")
        out["side_by_side_fraction"] = _method.ratio(throughput, out["side_by_side_limit"])
    return out


# ---- the whole benchmark ------------------------------------------------------------------------
def _servers_for(s: Settings, models: list[str], logs: Path, *, repository: Path | None = None, name: str = ""):
    """Kestrel on `repository` (default s.repository) and Triton on a repository built from it for `models`,
    in `<output>/triton{_name}_repository`, logs `kestrel{_name}_server.log` / `triton{_name}_server.log`."""
    from . import triton_repo

    repository = s.repository if repository is None else repository
    suffix = f"_{name}" if name else ""
    target = s.output / f"triton{suffix}_repository"
    install = triton_repo.prepare(triton_repo.find_install(s.triton_venv))
    built = triton_repo.build_repository(repository, models, target, ort_threads=s.ort_threads,
                                         instances=s.triton_instances, instance_threads=s.triton_threads)
    extra = ["--ort-threads", str(s.ort_threads)] if s.ort_threads else []
    kestrel = KestrelServer(repository, models, logs / f"kestrel{suffix}_server.log", extra_args=extra)
    try:
        triton = triton_repo.TritonServer(install, target, logs / f"triton{suffix}_server.log")
    except BaseException:
        kestrel.stop()
        raise
    return install, built, kestrel, triton


def compare_answers(kestrel_address: str, triton_address: str, models: list[str], s: Settings, logs: Path) -> dict:
    out = {}
    for model in models:
        target = s.output / "raw" / f"compare_{model}.json"
        command = [sys.executable, "-m", "benchmarks.triton_load", "compare", "--model", model, "--url",
                   kestrel_address, "--url", triton_address, "--output", str(target)]
        if s.images is not None:
            command += ["--images", str(s.images)]
        record, error = run_load(command, logs / f"compare_{model}.log", target, timeout=300)
        out[model] = record if not error else {"error": error}
    return out


def request_path_runs(s: Settings, source: str, logs: Path, raw: Path, skipped: list[dict],
                      started: float) -> dict:
    """Both servers serving a model that does no work (benchmarks/request_path.py, built from `source`),
    gRPC/HTTP x `s.request_path_clients`, batch 1, servers alternated: each server's CPU per request."""
    from . import request_path

    repository = request_path.write_repository(s.repository, source, s.output / "request_path_repository")
    _install, _built, kestrel, triton = _servers_for(s, [request_path.NAME], logs, repository=repository,
                                                     name="request_path")
    try:
        print(f"the request path alone: both servers with {request_path.NAME} (no work, {source}'s tensors)",
              flush=True)
        kestrel.wait_ready(s.start_timeout_s)
        triton.wait_ready([request_path.NAME], s.start_timeout_s)
        cells = [(request_path.NAME, proto, 1, c) for proto in s.protocols for c in s.request_path_clients]
        rows = _runs(s, cells, lambda _precision: request_path.NAME, kestrel, triton, raw, logs, skipped, started)
    finally:
        kestrel.stop()
        triton.stop()
    return {"source": source, "rows": rows}


def request_path_section(s: Settings, source: str, logs: Path, raw: Path, skipped: list[dict], started: float,
                         notes: list[str]) -> dict:
    """request_path_runs, or {} with a note saying why it could not run: the main grid, the ensemble and the
    ceiling still make their report."""
    try:
        return request_path_runs(s, source, logs, raw, skipped, started)
    except (KestrelError, ImportError, ValueError, OSError) as exc:
        notes.append(f"the request path alone was not measured: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        print(f"warning: {notes[-1]}", file=sys.stderr, flush=True)
        return {}


def run(settings: Settings) -> Path:
    """Run the comparison; returns the output folder (report.md inside)."""
    s = settings.resolved()
    out = s.output
    raw, logs = out / "raw", out / "logs"
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    started = time.time()
    machine = _method.machine_info()
    rows: list[dict] = []
    skipped: list[dict] = []
    meta: dict = {"kind": KIND, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                  "machine": machine, "versions": _method.package_versions(("kestrel", "onnxruntime", "numpy",
                                                                              "grpcio", "protobuf", "tritonclient")),
                  "python": machine["python"], "git": _method.git_revision(), "notes": notes, "skipped": skipped,
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))}
    ceiling_data: dict = {}
    ensemble: dict = {}
    parity: dict = {}
    request_path: dict = {}
    try:
        variants = [] if s.ensemble_only else export_variants(s, logs, notes)
        if not s.ensemble_only and not variants:
            raise BenchmarkError("no model to compare:\n  " + "\n  ".join(notes))
        has_ensemble = bool(s.ensemble) and export_ensemble(s, notes)
        if variants:
            install, built, kestrel, triton = _servers_for(s, variants, logs)
            meta["triton"] = {"venv": str(install.venv), "binary": str(install.binary), "versions": install.versions,
                              "python_backend_python": install.python_version, "models": built}
            try:
                print(f"starting Kestrel and Triton with {', '.join(variants)}", flush=True)
                kestrel.wait_ready(s.start_timeout_s)
                triton.wait_ready(variants, s.start_timeout_s)
                meta["triton"]["server"] = triton.metadata()
                meta["kestrel_server"] = {"grpc": kestrel.address, "http_port": kestrel.http_port,
                                          "side_by_side": side_by_side_models(s.repository, variants, s.ort_threads)}
                parity = compare_answers(kestrel.address, triton.address, variants, s, logs)
                rows = _grid(s, variants, kestrel, triton, raw, logs, skipped, started)
            finally:
                kestrel.stop()
                triton.stop()
        if variants and s.request_path_clients:
            request_path = request_path_section(s, variants[0], logs, raw, skipped, started, notes)
        if has_ensemble:
            ensemble = ensemble_runs(s, logs, raw)
        # the ceiling, with every server stopped
        sizes: dict[str, set[int]] = {}
        for v in variants:
            mean_batches = [r["mean_batch"] for r in rows if r["model"] == v and not r.get("error")]
            sizes[v] = ceiling_sizes(mean_batches, s.ceiling_batches, built[v]["max_batch_size"] or 32)
        if ensemble:
            from serve.repository import ModelRepository

            repo = ModelRepository(s.repository)
            for m in ensemble["members"]:
                formed = [r["members"].get(m) for r in ensemble["runs"] if not r.get("error")]
                sizes[m] = sizes.get(m, set()) | ceiling_sizes(formed, (1,), repo.entry(m).max_batch_size or 32)
        monitor = _method.LoadMonitor(pids=[os.getpid()])
        monitor.start()
        costs = ceiling(s.repository, list(sizes), sizes, ort_threads=s.ort_threads, images=s.images,
                        repeats=s.ceiling_repeats, iterations=s.ceiling_iterations)
        ceiling_data = {"costs": {m: {str(b): v for b, v in c.items()} for m, c in costs.items()},
                        "load": monitor.stop()}
        if ensemble:
            # the side-by-side limit only where the server ran every member that way (not with --ort-threads)
            arranged = side_by_side_models(s.repository, ensemble["members"], s.ort_threads)
            side_costs = (side_by_side_costs(s.repository, ensemble, images=s.images, seconds=s.side_by_side_s)
                          if all(arranged.values()) else None)
            ensemble["limit"] = ensemble_limit(ensemble, costs, side_costs)
    finally:
        meta["duration_s"] = round(time.time() - started, 1)
        meta["load_average_end"] = _method.load_average()
        write_results(out, meta, rows, ceiling_data, ensemble, parity, request_path)
    from . import vs_triton_report

    vs_triton_report.write(out, meta, rows, ceiling_data, ensemble, parity, request_path)
    return out


def _grid(s: Settings, variants: list[str], kestrel, triton, raw: Path, logs: Path, skipped: list[dict],
          started: float) -> list[dict]:
    cells = [(p, proto, b, c) for p in s.precisions if s.variant(p) in variants for proto in s.protocols
             for b in s.batches for c in s.clients]
    return _runs(s, cells, s.variant, kestrel, triton, raw, logs, skipped, started)


def _runs(s: Settings, cells: list[tuple], model_for: Callable[[str], str], kestrel, triton, raw: Path, logs: Path,
          skipped: list[dict], started: float) -> list[dict]:
    """Every (precision, protocol, batch, clients) cell against both servers, `s.repeats` rounds alternated;
    `model_for(precision)` names the model a cell loads. One row per run."""
    addresses = {"kestrel": {"grpc": kestrel.address, "http": f"127.0.0.1:{kestrel.http_port}"},
                 "triton": {"grpc": triton.address, "http": triton.url}}
    processes = {"kestrel": kestrel.process, "triton": triton.process}
    plan = [(cell, repeat, server) for cell in cells for repeat, server in _method.interleaved(SERVERS, s.repeats)]
    per_run = s.warmup_s + s.duration_s + RUN_OVERHEAD_S
    print(f"{len(plan)} runs of {s.warmup_s:g}+{s.duration_s:g} s: about {len(plan) * per_run / 60:.1f} min "
          f"(budget {s.budget_s / 60:.0f} min); results in {s.output}", flush=True)
    rows = []
    pids = [kestrel.process.pid, triton.process.pid]
    for index, ((precision, protocol, batch, clients), repeat, server) in enumerate(plan):
        model = model_for(precision)
        where = dict(server=server, precision=precision, protocol=protocol, batch=batch, clients=clients,
                     repeat=repeat, model=model)
        if time.time() - started + per_run > s.budget_s:
            skipped.append(dict(where, reason="time budget spent"))
            continue
        for name, process in processes.items():
            if not process.alive():
                raise BenchmarkError(f"{name} exited during the benchmark; last output ({process.log_path}):\n"
                                     f"{process.log_tail()}")
        stem = f"{server}_{precision}_{protocol}_b{batch}_c{clients}_r{repeat}"
        record_path = raw / f"{stem}.json"
        command = load_command(addresses[server][protocol], protocol=protocol, model=model, clients=clients,
                               batch=batch, duration=s.duration_s, warmup=s.warmup_s,
                               stats_url=addresses[server]["grpc"], output=record_path, images=s.images,
                               cpu_pids=[processes[server].pid])
        monitor = _method.LoadMonitor(pids=pids)
        load_before = _method.load_average()
        monitor.start()
        record, error = run_load(command, logs / f"{stem}.log", record_path, timeout=s.warmup_s + s.duration_s + 120)
        usage = monitor.stop()
        row = _row(record, error, order=index, load_average_1m=(load_before or [None])[0], **where, **usage)
        rows.append(row)
        print(f"[{index + 1}/{len(plan)}] {precision} {protocol} batch {batch} x {clients} clients, round "
              f"{repeat + 1}, {server}: {_num(row['images_per_s'])} img/s, p95 {_num(row['p95_ms'])} ms, batch "
              f"{_num(row['mean_batch'], 2)}, errors {row['errors'] if row['errors'] is not None else 'n/a'}"
              + (f" ({error.splitlines()[0]})" if error else ""), flush=True)
    return rows


RUN_FIELDS = ["server", "precision", "protocol", "batch", "clients", "repeat", "order", "model", "requests", "images",
              "errors", "images_per_s", "requests_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "mean_batch",
              "loadgen_cores", "server_cores", "busy_cores", "own_cores", "foreign_cores", "load_average_1m", "window_s",
              "error"]


def write_results(out: Path, meta: dict, rows: list[dict], ceiling_data: dict, ensemble: dict, parity: dict,
                  request_path: dict | None = None) -> None:
    """results.json (everything) and runs.csv (one line per run of the main grid)."""
    data = {"meta": meta, "runs": rows, "ceiling": ceiling_data, "ensemble": ensemble, "parity": parity,
            "request_path": request_path or {}}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


# ---- the command line ---------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, received {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, received {text!r}")
    return values


def _ints_or_empty(text: str) -> list[int]:
    """_ints, or [] for an empty text (skip that part)."""
    return _ints(text) if text.strip() else []


def _choices(allowed) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in allowed]
        if not values or wrong:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(allowed)}, received {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_triton", description=(
        "Kestrel against Triton (the tritonserver 2.51 of PyPI's nvidia-pytriton 0.7.0, python backend: its native "
        "onnxruntime backend is not in that wheel) on the same ONNX model, servers alternated under the same "
        "threaded tritonclient load; a report with img/s, p50/p95/p99, batch sizes, the in-process ceiling and "
        "the demo ensemble against its members' summed cost."))
    p.add_argument("--model", default="mobilenet_v2", help="the model (MODEL and MODEL_int8; default mobilenet_v2)")
    p.add_argument("--repository", type=Path, default=Path("models"), help="Kestrel repository (default models)")
    p.add_argument("--precision", type=_choices(tuple(PRECISIONS)), help="fp32,int8 (default both)")
    p.add_argument("--protocol", type=_choices(PROTOCOLS), help="grpc,http (default both)")
    p.add_argument("--clients", type=_ints, help="concurrent clients (default 1,4,8,16,32; --quick 1,8)")
    p.add_argument("--batch", type=_ints, help="images per request (default 1,8)")
    p.add_argument("--repeats", type=int, help="rounds, servers alternated in each (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 6; --quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 1 and 8 clients, one round of 1 + 2 s")
    p.add_argument("--images", type=Path, help="image folder (default ../shared/photos, else synthetic)")
    p.add_argument("--triton-venv", type=Path, default=ROOT / ".venv-triton",
                   help="the venv with nvidia-pytriton (default .venv-triton, made by `make bench-triton`)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="onnxruntime intra-op threads for both servers (default 0: Kestrel's default, onnxruntime's own)")
    p.add_argument("--triton-instances", type=int, default=0,
                   help="Triton's model instances (default 0: the model's instance_group, as Kestrel's config)")
    p.add_argument("--triton-threads", type=int, default=0,
                   help="onnxruntime intra-op threads per Triton instance (default 0: as Kestrel); with "
                        "--triton-instances 2 --triton-threads 1 Triton runs two batches side by side, as Kestrel's "
                        "default does under load on 2 cores")
    p.add_argument("--ensemble", default="imagenet",
                   help="the Kestrel ensemble for the ensemble section (default imagenet, `make demo`'s); '' skips it")
    p.add_argument("--ensemble-clients", type=int, default=8, help="clients for the ensemble section (default 8)")
    p.add_argument("--ensemble-only", action="store_true", help="only the ensemble section (no Triton)")
    p.add_argument("--request-path-clients", type=_ints_or_empty,
                   help="clients for the request path alone: both servers with a model that does no work, CPU per "
                        "request (default 4,32; --quick 8; '' skips it)")
    p.add_argument("--ceiling-batch", type=_ints, help="in-process batch sizes besides the formed ones "
                                                       "(default 1,4,8,16,32)")
    p.add_argument("--no-export", action="store_true", help="do not export missing models (skip them)")
    p.add_argument("--weights", default="imagenet", help="weights for exports: imagenet or none (default imagenet)")
    p.add_argument("--calibration", type=Path,
                   help="INT8 calibration images (default ../shared/datasets/imagenet_val, else the image folder)")
    p.add_argument("--budget", type=float, default=180.0, help="minutes; no run starts after (default 180)")
    p.add_argument("--output", type=Path, help="output folder (default benchmarks/results/<timestamp>)")
    return console.add_examples(
        p, "--model mobilenet_v2                      # everything, ~50 min on 2 cores",
        "--quick                                   # a few minutes: is the harness working?",
        "--precision fp32 --protocol grpc --batch 1 --clients 1,4,8,16 --repeats 3 --duration 6",
        "--ensemble-only --repeats 3              # the demo ensemble against its members' summed cost",
        note="needs .venv-triton: `make bench-triton` creates it and runs this with its defaults; `kestrel bench "
             "docs` puts the newest report into docs/benchmarks.md")


def settings_from_args(args) -> Settings:
    values: dict = dict(model=args.model, repository=args.repository, images=args.images, triton_venv=args.triton_venv,
                        ort_threads=args.ort_threads, triton_instances=args.triton_instances,
                        triton_threads=args.triton_threads, ensemble=args.ensemble, ensemble_clients=args.ensemble_clients,
                        ensemble_only=args.ensemble_only, export=not args.no_export, weights=args.weights,
                        calibration=args.calibration, budget_s=args.budget * 60.0, output=args.output,
                        quick=args.quick)
    if args.quick:
        values.update(quick_overrides())
    for key, arg in (("precisions", "precision"), ("protocols", "protocol"), ("clients", "clients"),
                     ("batches", "batch"), ("repeats", "repeats"), ("duration_s", "duration"), ("warmup_s", "warmup"),
                     ("ceiling_batches", "ceiling_batch"), ("request_path_clients", "request_path_clients")):
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()
    try:
        out = run(settings_from_args(args))
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
