"""Settings, export commands and the CLI's errors (no processes started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import server_bench
from serve.errors import KestrelError

ROOT = Path(__file__).resolve().parents[2]


def test_default_variants_compare_keras_fp32_int8_with_keras_as_baseline(tmp_path):
    s = server_bench.Settings(repository=tmp_path, output=tmp_path / "out").resolved()
    assert s.variants[:3] == ["mobilenet_v2_keras", "mobilenet_v2", "mobilenet_v2_int8"]
    assert s.baseline == "mobilenet_v2_keras"
    assert s.levels == [1, 8, 32] and s.apis == ["classify", "infer", "http_classify"]
    assert s.flask_args == ["--model", str(tmp_path / "mobilenet_v2_keras" / "1" / "model.keras")]


def test_flask_reference_needs_the_classify_api(tmp_path):
    s = server_bench.Settings(repository=tmp_path, apis=["infer"], output=tmp_path).resolved()
    assert s.flask is False


@pytest.mark.parametrize("bad", [dict(apis=["grpc"]), dict(levels=[0]), dict(encode="png"), dict(repeats=0), dict(duration_s=0),
                                 dict(batch=0), dict(variants=[])])
def test_invalid_settings_are_refused(tmp_path, bad):
    with pytest.raises(KestrelError):
        server_bench.Settings(repository=tmp_path, output=tmp_path, **bad).resolved()


def test_export_commands_use_the_export_clis(tmp_path):
    s = server_bench.Settings(repository=tmp_path, output=tmp_path, calibration=tmp_path / "cal").resolved()
    fp32 = server_bench.export_command("mobilenet_v2", s)
    assert fp32[1:] == ["-m", "export", "mobilenet_v2", "--weights", "imagenet", "--repository", str(tmp_path)]
    assert server_bench.export_command("mobilenet_v2_keras", s) == fp32  # one export writes both
    int8 = server_bench.export_command("mobilenet_v2_int8", s)
    assert int8[1:4] == ["-m", "export.optimize", "mobilenet_v2"]
    # export.optimize's own calibration sample (300): the INT8 variant `kestrel optimize` makes
    assert int8[-4:] == ["--precision", "int8", "--calibration", str(tmp_path / "cal")]
    s.calibration_images = 64
    assert server_bench.export_command("mobilenet_v2_int8", s)[-6:-2] == ["--precision", "int8",
                                                                        "--max-calibration-images", "64"]
    trt = server_bench.export_command("mobilenet_v2_trt_fp16", s)
    assert trt[-3:] == ["--precision", "fp16", "--engine-only"]
    assert server_bench.export_command("resnet50", s) is None


def test_missing_variants_without_export_end_with_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--repository", str(tmp_path), "--no-export",
                             "--no-flask", "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no variant is available to benchmark")
    assert "mobilenet_v2_int8: not in" in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_bad_levels():
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--levels", "8,x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected comma-separated integers" in result.stderr


def test_http_vs_grpc_schedule_rotates_and_the_table_gives_the_ratios():
    from benchmarks import http_vs_grpc

    plan = http_vs_grpc.schedule(3)
    assert len(plan) == 12 and {p[1:] for p in plan} == {(s, t) for s in ("before", "after") for t in ("grpc", "http")}
    assert [p[1:] for p in plan[:4]] != [p[1:] for p in plan[4:8]]  # rotated between repeats
    rows = [dict(side=s, transport=t, requests=10, images_per_s=v, p50_ms=5.0, p95_ms=9.0)
            for s, t, v in [("before", "grpc", 100.0), ("before", "http", 95.0), ("after", "grpc", 100.0),
                            ("after", "http", 80.0), ("after", "http", 90.0)]]
    text = http_vs_grpc.table(http_vs_grpc.summary(rows), 8)
    assert "before: HTTP / gRPC Classify throughput = 0.95" in text
    assert "after: HTTP / gRPC Classify throughput = 0.85" in text  # the median of 80 and 90
    assert "http: after / before throughput = 0.89" in text


def _settings(*argv):
    from benchmarks.__main__ import build_parser, settings_from_args

    return settings_from_args(build_parser().parse_args(list(argv)))


def test_quick_shortens_the_schedule_and_explicit_flags_still_win(tmp_path):
    full = _settings("--repository", str(tmp_path)).resolved()
    assert (full.levels, full.repeats, full.duration_s, full.warmup_s) == ([1, 8, 32], 3, 15.0, 3.0)
    runs, seconds = server_bench.planned_runs(full)
    assert runs == 90 and 30 * 60 < seconds < 40 * 60  # the README's "about 35 minutes"
    quick = _settings("--repository", str(tmp_path), "--quick").resolved()
    assert (quick.levels, quick.repeats, quick.duration_s, quick.warmup_s) == ([1, 8], 1, 5.0, 1.0)
    runs, seconds = server_bench.planned_runs(quick)
    assert runs == 20 and seconds < 5 * 60  # "about 4 minutes"
    mixed = _settings("--repository", str(tmp_path), "--quick", "--levels", "4", "--duration", "8")
    assert (mixed.levels, mixed.repeats, mixed.duration_s, mixed.warmup_s) == ([4], 1, 8.0, 1.0)
    assert _settings("--repository", str(tmp_path), "--repeats", "2").levels == [1, 8, 32]
    assert _settings("--repository", str(tmp_path)).calibration_images is None
    assert _settings("--repository", str(tmp_path), "--calibration-images", "150").calibration_images == 150
    with pytest.raises(KestrelError, match="KEY=VALUE"):
        _settings("--server-env", "NOPE")


def test_help_says_how_long_the_default_run_takes_and_how_to_shorten_it():
    result = subprocess.run([sys.executable, "-m", "kestrel", "bench", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "about 35 minutes" in text and "--quick" in text and "about 4 minutes" in text
    assert "activations in memory" not in text  # stale since export/calibrate.py
