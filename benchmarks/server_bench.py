"""The server benchmark: one Kestrel server, several model variants, locust at several concurrencies.

    python -m benchmarks                       # mobilenet_v2: Keras vs onnxruntime FP32 vs INT8 (+ TensorRT on a GPU)
    python -m benchmarks --smoke               # a tiny end-to-end run (fake models, tiny Flask model)

What it does, in order:

1. Exports the variants that are missing from the repository (subprocess
   calls to `python -m export` and `python -m export.optimize`).
2. Starts the server ONCE with every variant (and the Flask + model.predict
   reference app beside it), on 127.0.0.1 and free ports; a variant that
   fails to load is dropped and the reason reported.
3. For each concurrency level, runs locust headless against each
   (API, variant) target round-robin, the order rotated each repeat, so
   drift of this shared machine hits all variants alike (benchmarks/_method.py).
   Each run: warm-up (not measured), then `duration` seconds measured; the
   load on the machine meanwhile (ours and other processes') is recorded.
4. Writes raw locust CSVs and samples, results.json / runs.csv, report.md and
   PNG plots to benchmarks/results/<timestamp>/ (benchmarks/report.py).

The whole run is bounded: every process start and every locust run has a
timeout, and no new run starts once `budget_s` is spent (the report says
which runs were skipped).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.errors import KestrelError

from . import _method
from ._procs import (ROOT, BenchmarkError, FlaskReference, KestrelServer, Process, locust_command, python_env,
                     run_locust)

RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
LOCUST_FLASK = ROOT / "benchmarks" / "locust_flask.py"
LOCUST_HTTP = ROOT / "benchmarks" / "locust_http.py"
FLASK = "flask"  # the reference target's name
APIS = ("classify", "infer", "http_classify")  # http_classify: POST /v1/classify on the HTTP port
RUN_OVERHEAD_S = 5.0  # locust start-up and shut-down per run, for the time estimate


@dataclass
class Settings:
    """Everything that shapes a benchmark run (recorded in the report)."""

    model: str = "mobilenet_v2"
    repository: Path = ROOT / "models"
    variants: list[str] | None = None  # default: <model>_keras, <model>, <model>_int8 (+ TensorRT on a GPU)
    baseline: str | None = None  # ratios are against it; default <model>_keras
    apis: list[str] = field(default_factory=lambda: list(APIS))
    levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    repeats: int = 3
    duration_s: float = 15.0
    warmup_s: float = 3.0
    batch: int = 1
    top_k: int = 5
    images: Path | None = None  # default ../shared/photos when present, else synthetic JPEGs
    http_body: str = "multipart"  # http_classify uploads: multipart form (default) or raw (image as the body)
    encode: str = "jpeg"  # jpeg: every upload is JPEG bytes (other formats re-encoded once); asis: the files
    flask: bool = True
    flask_args: list[str] | None = None  # default: --model <repository>/<baseline>/1/model.keras
    export: bool = True
    weights: str = "imagenet"
    calibration: Path | None = None  # INT8 calibration images; default ../shared/datasets/imagenet_val
    # None: export.optimize's own default (300, the INT8 variant `kestrel optimize` makes); its calibration runs
    # 8 images at a time (export/calibrate.py), so the count no longer bounds memory
    calibration_images: int | None = None
    server_args: list[str] = field(default_factory=list)
    server_env: dict[str, str] = field(default_factory=dict)  # e.g. TF_NUM_INTRAOP_THREADS for the Keras backend
    output: Path | None = None
    budget_s: float = 3600.0
    start_timeout_s: float = 600.0
    smoke: bool = False

    def resolved(self) -> "Settings":
        s = Settings(**asdict(self))
        s.repository = Path(s.repository).resolve()
        if s.variants is None:
            s.variants = [f"{s.model}_keras", s.model, f"{s.model}_int8"]
            if _method.gpu_names() and _has_tensorrt():
                s.variants.append(f"{s.model}_trt_fp16")
        if not s.variants:
            raise KestrelError("no variants to benchmark")
        if s.baseline is None:
            s.baseline = s.variants[0]
        if s.images is None and (SHARED / "photos").is_dir():
            s.images = SHARED / "photos"
        if s.calibration is None:  # INT8 calibration wants dozens of real, in-distribution (ImageNet) photos
            imagenet = SHARED / "datasets" / "imagenet_val"
            s.calibration = imagenet if imagenet.is_dir() else s.images
        unknown = [a for a in s.apis if a not in APIS]
        if unknown or not s.apis:
            raise KestrelError(f"unknown API(s) {unknown or s.apis}; expected some of {', '.join(APIS)}")
        if not s.levels or any(int(level) < 1 for level in s.levels):
            raise KestrelError(f"concurrency levels must be >= 1, received {s.levels}")
        if s.http_body not in ("multipart", "raw"):
            raise KestrelError(f"unknown HTTP body {s.http_body!r}; expected multipart or raw")
        if s.encode not in ("jpeg", "asis"):
            raise KestrelError(f"unknown encoding {s.encode!r}; expected jpeg or asis")
        if s.repeats < 1 or s.duration_s <= 0 or s.warmup_s < 0 or s.batch < 1:
            raise KestrelError(f"received repeats={s.repeats}, duration={s.duration_s}, warmup={s.warmup_s}, "
                               f"batch={s.batch}; expected repeats >= 1, duration > 0, warm-up >= 0, batch >= 1")
        if s.flask and "classify" not in s.apis:
            s.flask = False  # the reference takes image files: it only compares with Classify
        if s.flask and s.flask_args is None:
            s.flask_args = ["--model", str(s.repository / s.baseline / "1" / "model.keras")]
        s.output = Path(s.output) if s.output else RESULTS / _method.timestamp()
        return s


DEFAULT_RUNS = dict(levels=[1, 8, 32], repeats=3, duration_s=15.0, warmup_s=3.0)  # about 35 min on 2 cores
QUICK_RUNS = dict(levels=[1, 8], repeats=1, duration_s=5.0, warmup_s=1.0)  # --quick: about 4 min


def planned_runs(s: Settings) -> tuple[int, float]:
    """(runs, seconds) the schedule will take: every (API, variant) pair and the Flask reference at each level and
    repeat, each run warm-up + duration + locust's start and stop. Exports of missing variants come on top."""
    targets = len(s.apis) * len(s.variants or []) + int(bool(s.flask))
    runs = targets * len(s.levels) * s.repeats
    return runs, runs * (s.warmup_s + s.duration_s + RUN_OVERHEAD_S)


def _has_tensorrt() -> bool:
    from serve._optional import available

    return available("tensorrt")


# ---- exports --------------------------------------------------------------------------------
def keras_home_env() -> dict:
    """KERAS_HOME for the export subprocess: a writable copy of ../shared/keras_home when unset."""
    if os.environ.get("KERAS_HOME") or not (SHARED / "keras_home" / "models").is_dir():
        return {}
    target = ROOT / ".cache" / "keras_home"
    (target / "models").mkdir(parents=True, exist_ok=True)
    for src in (SHARED / "keras_home" / "models").iterdir():
        if not (target / "models" / src.name).exists():
            shutil.copyfile(src, target / "models" / src.name)
    return {"KERAS_HOME": str(target)}


def export_command(variant: str, s: Settings) -> list[str] | None:
    """The export CLI call that writes `variant` (None when we do not know how)."""
    base = [sys.executable]
    if variant in (s.model, f"{s.model}_keras"):
        return base + ["-m", "export", s.model, "--weights", s.weights, "--repository", str(s.repository)]
    sample = ["--max-calibration-images", str(s.calibration_images)] if s.calibration_images else []
    if variant == f"{s.model}_int8":
        cmd = base + ["-m", "export.optimize", s.model, "--repository", str(s.repository), "--precision", "int8",
                      *sample]
        return cmd + (["--calibration", str(s.calibration)] if s.calibration else [])
    for precision in ("fp16", "fp32", "int8"):
        if variant == f"{s.model}_trt_{precision}":
            cmd = base + ["-m", "export.optimize", s.model, "--repository", str(s.repository),
                          "--precision", precision, "--engine-only"]
            if precision == "int8":
                cmd += sample
                cmd += ["--calibration", str(s.calibration)] if s.calibration else []
            return cmd
    return None


def _present(repository: Path, name: str) -> bool:
    return (repository / name / "config.pbtxt").is_file()


def export_missing(s: Settings, logs: Path, notes: list[str]) -> list[str]:
    """Export the missing variants; returns the variants present afterwards."""
    env = python_env(keras_home_env())
    done: set[tuple] = set()
    for variant in s.variants:
        if _present(s.repository, variant):
            continue
        command = export_command(variant, s)
        if command is None:
            notes.append(f"{variant}: missing from {s.repository} and no known export command; skipped")
            continue
        if tuple(command) in done:
            continue
        done.add(tuple(command))
        log = logs / f"export_{variant}.log"
        print(f"exporting {variant}: {' '.join(command[1:])} (log: {log})", flush=True)
        process = Process(f"export of {variant}", command, log, env=env)
        try:
            code = process.popen.wait(timeout=1800)
        except Exception:  # noqa: BLE001 - timeout: stop it and go on without the variant
            code = None
        process.stop()
        if code != 0:
            notes.append(f"{variant}: export failed (exit {code}); see {log}:\n    "
                         + process.log_tail(5).replace("\n", "\n    "))
    present = [v for v in s.variants if _present(s.repository, v)]
    for v in s.variants:
        if v not in present and not any(n.startswith(f"{v}:") for n in notes):
            notes.append(f"{v}: not in {s.repository} after export; skipped")
    return present


def accuracy_of(repository: Path, variant: str) -> dict | None:
    """The variant's accuracy report (accuracy.json, written by export.optimize), when there is one."""
    try:
        data = json.loads((repository / variant / "accuracy.json").read_text())
    except (OSError, ValueError):
        return None
    keep = ("reference", "images", "image_source", "top1_agreement", "top5_agreement", "min_agreement", "passed")
    return {k: data.get(k) for k in keep}


def platform_of(repository: Path, variant: str) -> str:
    if variant == FLASK:
        return "flask+keras predict"
    try:
        from serve.repository import ModelRepository

        return ModelRepository(repository).entry(variant).platform
    except Exception:  # noqa: BLE001 - descriptive only
        return "?"


# ---- smoke set-up ---------------------------------------------------------------------------
def prepare_smoke(s: Settings, notes: list[str]) -> Settings:
    """A tiny repository of fake models (no ML package) and the tiny Flask model."""
    from serve.backends.fake import write_fake_model

    repo = s.output / "smoke_repository"
    # a slower "reference" and a faster variant: the ratios must come out > 1
    write_fake_model(repo, "smoke_reference", classes=10, size=(32, 32), delay_ms=4.0, max_queue_delay_us=500)
    write_fake_model(repo, "smoke_fast", classes=10, size=(32, 32), delay_ms=1.0, max_queue_delay_us=500)
    s.repository = repo
    s.variants = ["smoke_reference", "smoke_fast"]
    s.baseline = "smoke_reference"
    s.export = False
    if s.flask:
        from serve._optional import available

        if available("tensorflow") and available("keras") and available("flask"):
            s.flask_args = ["--tiny"]
        else:
            s.flask = False
            notes.append("flask reference skipped: tensorflow, keras and flask are needed (pip install "
                         "'kestrel[keras,bench]')")
    return s


def smoke_settings(**overrides) -> Settings:
    """The `make bench-smoke` defaults: one level, one repeat, seconds per run."""
    base = dict(model="smoke", apis=["classify", "infer", "http_classify"], levels=[2], repeats=1, duration_s=2.0, warmup_s=1.0,
                budget_s=120.0, start_timeout_s=120.0, smoke=True)
    base.update(overrides)
    return Settings(**base)


# ---- the run --------------------------------------------------------------------------------
def _record_row(record: dict, **fields) -> dict:
    stats = _method.summarize(record.get("response_times_ms", []))
    row = dict(fields)
    row.update(
        requests=record.get("requests", 0), failures=record.get("failures", 0), items=record.get("items", 0),
        window_s=record.get("window_s", 0.0), requests_per_s=record.get("requests_per_s", float("nan")),
        items_per_s=record.get("items_per_s", float("nan")), mean_ms=stats["mean"], p50_ms=stats["p50"],
        p90_ms=stats["p90"], p95_ms=stats["p95"], p99_ms=stats["p99"], max_ms=stats["max"],
        failure_messages=record.get("failure_messages", {}),
    )
    return row


def run(settings: Settings) -> Path:
    """Run the benchmark; returns the output folder (report.md inside)."""
    s = settings.resolved()
    out = s.output
    raw, logs = out / "raw", out / "logs"
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if s.smoke:
        s = prepare_smoke(s, notes)
    started = time.time()
    machine_start = _method.machine_info()
    runs, seconds = planned_runs(s)
    print(f"plan: {runs} runs of {s.warmup_s:g}+{s.duration_s:g} s, about {seconds / 60:.1f} min"
          + (" (--quick: about 4 min)" if seconds > 600 else "")
          + (", after exporting the variants that are missing" if s.export else ""), flush=True)

    variants = export_missing(s, logs, notes) if s.export else [v for v in s.variants if _present(s.repository, v)]
    if not s.export:
        notes += [f"{v}: not in {s.repository} (exports disabled); skipped" for v in s.variants if v not in variants]
    if not variants:
        raise BenchmarkError("no variant is available to benchmark:\n  " + "\n  ".join(notes))

    server = KestrelServer(s.repository, variants, logs / "server.log", extra_args=s.server_args,
                           env=python_env(s.server_env))
    flask = None
    if s.flask:
        if s.flask_args and s.flask_args[0] == "--model" and not Path(s.flask_args[1]).is_file():
            notes.append(f"flask reference: {s.flask_args[1]} does not exist; reference skipped")
        else:
            flask = FlaskReference(s.flask_args, logs / "flask.log")
    rows: list[dict] = []
    skipped: list[dict] = []
    try:
        print(f"starting the server with {', '.join(variants)}" + (" and the Flask reference" if flask else ""),
              flush=True)
        server.wait_ready(s.start_timeout_s)
        states = server.model_states(variants)
        for name, (ready, reason) in states.items():
            if not ready:
                notes.append(f"{name}: not ready in the server ({reason}); skipped")
        variants = [v for v in variants if states[v][0]]
        if flask is not None:
            try:
                flask.wait_ready(s.start_timeout_s)
            except BenchmarkError as exc:
                notes.append(f"flask reference failed to start; skipped: {exc}")
                flask.stop()
                flask = None
        if not variants:
            raise BenchmarkError("no variant loaded in the server:\n  " + "\n  ".join(notes))

        targets = [(api, v) for api in s.apis for v in variants]
        if flask is not None:
            targets.append(("classify", FLASK))
        schedule = _method.grid(s.levels, targets, s.repeats)
        per_run = s.warmup_s + s.duration_s + RUN_OVERHEAD_S
        if len(schedule) != runs:  # some variants are missing or not ready: fewer runs than planned
            print(f"{len(schedule)} runs of {s.warmup_s:g}+{s.duration_s:g} s after all: about "
                  f"{len(schedule) * per_run / 60:.1f} min", flush=True)
        print(f"budget {s.budget_s / 60:.0f} min; results in {out}", flush=True)
        pids = [server.process.pid] + ([flask.process.pid] if flask else [])
        progress = _progress(len(schedule))
        for index, (level, repeat, (api, target)) in enumerate(schedule):
            elapsed = time.time() - started
            if elapsed + per_run > s.budget_s:
                skipped.append(dict(api=api, target=target, level=level, repeat=repeat, reason="time budget spent"))
                progress.update(1)
                continue
            if not server.process.alive():
                raise BenchmarkError(f"the server exited during the benchmark; last output:\n"
                                     f"{server.process.log_tail()}")
            stem = f"{api}_{target}_c{level}_r{repeat}"
            record_path = raw / f"{stem}.json"
            options = {"kestrel-warmup": s.warmup_s, "kestrel-record": record_path, "kestrel-label": stem,
                       "kestrel-top-k": s.top_k, "kestrel-encode": s.encode}
            if s.images is not None:
                options["kestrel-images"] = s.images
            if target == FLASK:
                locustfile, host = LOCUST_FLASK, flask.url
            elif api == "http_classify":
                locustfile, host = LOCUST_HTTP, f"http://127.0.0.1:{server.http_port}"
                options.update({"kestrel-model": target, "kestrel-http-body": s.http_body})
            else:
                locustfile, host = LOCUSTFILE, server.address
                options.update({"kestrel-api": api, "kestrel-model": target, "kestrel-batch": s.batch})
            command = locust_command(locustfile, users=level, run_time_s=s.warmup_s + s.duration_s, host=host,
                                     csv_prefix=raw / stem, options=options)
            counts_before = server.counts(target) if target != FLASK else None
            monitor = _method.LoadMonitor(pids=pids)
            load_before = _method.load_average()
            monitor.start()
            error = ""
            try:
                code = run_locust(command, logs / f"{stem}.log", timeout=s.warmup_s + s.duration_s + 120)
            except BenchmarkError as exc:
                code, error = None, str(exc)
            usage = monitor.stop()
            counts_after = server.counts(target) if target != FLASK else None
            mean_batch = float("nan")
            if counts_before and counts_after and counts_after[1] > counts_before[1]:
                mean_batch = (counts_after[0] - counts_before[0]) / (counts_after[1] - counts_before[1])
            usage["mean_batch"] = round(mean_batch, 2)
            base = dict(api=api, target=target, platform=platform_of(s.repository, target), level=level,
                        repeat=repeat, order=index, locust_exit=code, load_average_1m=(load_before or [None])[0],
                        **usage)
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                record = {}
                error = error or f"locust wrote no record (exit {code}); see {logs / (stem + '.log')}"
            row = _record_row(record, **base)
            row["error"] = error
            rows.append(row)
            progress.set_postfix_str(f"{api}:{target} c={level}: {row['items_per_s']:.1f}/s "
                                     f"p95 {row['p95_ms']:.1f} ms")
            progress.update(1)
        progress.close()
    finally:
        server.stop()
        if flask is not None:
            flask.stop()

    meta = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "variants": variants,
        "platforms": {v: platform_of(s.repository, v) for v in variants},
        "accuracy": {v: a for v in variants if (a := accuracy_of(s.repository, v))},
        "machine": machine_start,
        "load_average_end": _method.load_average(),
        "versions": _method.package_versions(),
        "git": _method.git_revision(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "notes": notes,
        "skipped": skipped,
        "flask": bool(flask is not None),
        "flask_args": s.flask_args,
    }
    write_results(out, meta, rows)
    from . import report

    report.write(out, meta, rows)
    return out


def _progress(total: int):
    try:
        from serve.console import progress as tqdm  # bar on a terminal, lines in logs

        return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is a base dependency
        class _Null:
            def update(self, n=1): ...
            def set_postfix_str(self, s): ...
            def close(self): ...
        return _Null()


RUN_FIELDS = ["api", "target", "platform", "level", "repeat", "order", "requests", "failures", "items", "window_s",
              "requests_per_s", "items_per_s", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms",
              "mean_batch", "busy_cores", "own_cores", "foreign_cores", "load_average_1m", "locust_exit", "error"]


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """results.json (everything) and runs.csv (one line per run)."""
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, default=str))
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
