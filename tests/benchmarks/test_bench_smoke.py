"""`make bench-smoke` end to end, so the benchmark never rots.

It starts the real server (fake models: no ML package) and, when TensorFlow
is installed, the Flask reference app with a tiny Keras model, runs locust
headless against each (gRPC gevent users, HTTP users) and writes the report.
Bounded: one concurrency level, seconds per run, a hard timeout here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# find_spec, not importorskip: importing locust monkey-patches this whole pytest
# process with gevent (threads become greenlets and later tests deadlock).
for _package in ("locust", "matplotlib"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (pip install 'kestrel[bench]')", allow_module_level=True)


def _smoke_command(output: Path) -> list[str]:
    if shutil.which("make"):
        # -o install: never (re)install from a test; the interpreter running the tests runs the benchmark
        return ["make", "-s", "-o", "install", "bench-smoke", f"PY={sys.executable}", f"BENCH_ARGS=--output {output}"]
    return [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output)]


def test_make_bench_smoke_writes_a_report(tmp_path, python_env):
    out = tmp_path / "smoke"
    result = subprocess.run(_smoke_command(out), cwd=ROOT, env=python_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in result.stdout

    with open(out / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    meta = json.loads((out / "results.json").read_text())["meta"]
    targets = {(r["api"], r["target"]) for r in runs}
    assert {("classify", "smoke_reference"), ("classify", "smoke_fast"), ("infer", "smoke_reference"),
            ("infer", "smoke_fast"), ("http_classify", "smoke_reference"), ("http_classify", "smoke_fast")} <= targets
    if meta["flask"]:
        assert ("classify", "flask") in targets
    for run in runs:
        assert run["error"] == "", run
        assert int(run["requests"]) > 0 and int(run["failures"]) == 0, run
        assert float(run["items_per_s"]) > 0 and 0 < float(run["p50_ms"]) <= float(run["p99_ms"])
        if run["target"] != "flask":  # the server's own count of executed batches
            assert float(run["mean_batch"]) >= 1.0, run
    # the measurement tells the models apart: 1 ms vs 4 ms (simulated) per batch
    infer = {r["target"]: float(r["items_per_s"]) for r in runs if r["api"] == "infer"}
    assert infer["smoke_fast"] > infer["smoke_reference"]

    report = (out / "report.md").read_text()
    assert "### API: classify" in report and "### API: infer" in report and "### API: http_classify" in report
    assert "HTTP Classify throughput >= 0.9x gRPC Classify" in report  # the HTTP vs gRPC check
    assert meta["machine"]["cores"] >= 1 and "locust" in meta["versions"]
    assert meta["machine"]["isa"] and f"({meta['machine']['isa']})" in report  # the CPU's instruction set
    for name in ("throughput.png", "latency_classify.png", "latency_infer.png", "latency_http_classify.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # raw locust CSVs kept, warm-up excluded from them too
    stats = list(out.glob("raw/*_stats.csv"))
    assert len(stats) == len(runs)
