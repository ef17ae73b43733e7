"""The report: aggregation over repeats, paired ratios, the issue's checks, Markdown and plots."""

from __future__ import annotations

import pytest

from benchmarks import report


def _row(api, target, level, repeat, ips, p95, platform="onnxruntime_onnx"):
    return dict(api=api, target=target, platform=platform, level=level, repeat=repeat, items_per_s=ips,
                requests_per_s=ips, mean_ms=p95 / 2, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 1.2, failures=0,
                requests=100, error="", foreign_cores=0.1, own_cores=1.5, mean_batch=2.0)


def _meta(flask=True):
    return {
        "settings": {"model": "m", "baseline": "m_keras", "apis": ["classify", "infer"], "batch": 1,
                     "repeats": 3, "warmup_s": 1, "duration_s": 2, "levels": [1, 8], "server_args": [],
                     "images": None},
        "variants": ["m_keras", "m", "m_int8"],
        "platforms": {"m_keras": "keras", "m": "onnxruntime_onnx", "m_int8": "onnxruntime_onnx"},
        "machine": {"cpu": "Test CPU", "isa": "AVX2 (no AVX-512, no VNNI)", "cores": 2, "cores_usable": 2, "memory_gib": 24, "gpus": [], "os": "x",
                    "python": "3.11"},
        "versions": {"locust": "2.47.0"}, "git": "abc", "started_utc": "2026-01-01 00:00:00", "duration_s": 10,
        "notes": ["m_trt_fp16: no GPU; skipped"], "skipped": [], "flask": flask, "flask_args": ["--tiny"],
    }


def _rows():
    rows = []
    for level in (1, 8):
        for r in range(3):
            for api in ("classify", "infer"):
                rows.append(_row(api, "m_keras", level, r, 20.0 + r, 400.0, platform="keras"))
                rows.append(_row(api, "m", level, r, 60.0 + r, 150.0))
                rows.append(_row(api, "m_int8", level, r, 70.0 + r, 120.0))
            rows.append(_row("classify", "flask", level, r, 5.0, 1600.0, platform="flask+keras predict"))
    return rows


def test_aggregate_takes_medians_over_repeats():
    agg = report.aggregate(_rows())
    cell = agg[("infer", "m", 8)]
    assert cell["items_per_s"].median == 61.0 and cell["items_per_s"].low == 60.0 and cell["runs"] == 3
    assert cell["p95_ms"].median == 150.0


def test_paired_ratios_pair_runs_of_the_same_repeat():
    ratios = report.paired_ratios(_rows(), "infer", 8, "m", "m_keras")
    assert sorted(ratios) == pytest.approx(sorted([60 / 20, 61 / 21, 62 / 22]))


def test_checks_measure_the_issue_criteria():
    rows = _rows()
    found = report.checks(_meta(), rows, report.aggregate(rows))
    by = {(c["api"], c["criterion"]): c for c in found}
    fp32 = by[("infer", "m throughput >= 2x m_keras")]
    assert fp32["passed"] and fp32["measured"] == "2.90x" and fp32["level"] == 8
    int8 = by[("infer", "m_int8 throughput >= 4x m_keras")]
    assert not int8["passed"] and int8["measured"] == "3.38x"
    flask = by[("classify", "Kestrel m throughput >= 10x Flask + predict, at a lower p95")]
    assert flask["passed"] and flask["measured"].startswith("12.2x")


def test_flask_check_fails_when_p95_is_not_lower():
    rows = [r for r in _rows() if r["target"] != "flask"]
    rows += [_row("classify", "flask", 8, r, 1.0, 100.0, platform="flask+keras predict") for r in range(3)]
    found = report.checks(_meta(), rows, report.aggregate(rows))
    flask = [c for c in found if "Flask" in c["criterion"]][0]
    assert not flask["passed"]  # 61x the throughput, but a higher p95


def test_markdown_and_plots(tmp_path):
    rows = _rows()
    path = report.write(tmp_path, _meta(), rows)
    text = path.read_text()
    assert "a Flask + Keras `model.predict` app did **5.0 images/s at p95 1600 ms**" in text
    assert "| 8 | m [onnxruntime] | 61.0 (60.0-62.0) | 75.0 | 150.0 | 180.0 | 2.0 |" in text
    assert "FAIL" in text and "PASS" in text
    assert "m_trt_fp16: no GPU; skipped" in text
    assert "**Machine:** Test CPU (AVX2 (no AVX-512, no VNNI)), 2 cores" in text
    assert report.machine_title(_meta()) == "2 cores (Test CPU, AVX2 (no AVX-512, no VNNI))"
    for name in ("throughput.png", "latency_classify.png", "latency_infer.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_rebuilds_from_results_json(tmp_path):
    import json

    (tmp_path / "results.json").write_text(json.dumps({"meta": _meta(flask=False), "runs": _rows()}))
    assert report.main([str(tmp_path)]) == 0
    assert "### API: infer" in (tmp_path / "report.md").read_text()
    assert report.main([str(tmp_path / "missing")]) == 1
