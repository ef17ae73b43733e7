"""benchmarks/docs.py: docs/benchmarks.md's "Latest reports" comes from the benchmarks' own reports (newest
in-process report, newest non-smoke server report), between markers, leaving the rest of the page alone."""

from __future__ import annotations

import json

from benchmarks import docs

INPROCESS = ("In-process inference, Test CPU (AVX-512 VNNI, 2 cores), 20260101T000000Z; load while measuring: 0.1 cores busy "
             "(other processes: 0.0)\nonnxruntime 1.32.0\nINT8 on this CPU: VNNI ...\n\n"
             "| model | batch | variant | median ms (range over repeats) | images/s | vs Keras predict |\n|---|---:|---|---:|---:|---:|\n"
             "| m | 1 | onnxruntime fp32 | 5.00 | 200.0 | - |\n")
REPORT = """# Kestrel server benchmark: m

2026-01-02 00:00:00 UTC, 60 s, git abc.

**Machine:** Test CPU (AVX-512 VNNI), 2 cores (2 usable), 24 GiB RAM, no GPU; Linux; Python 3.11.

## Headline

Kestrel does {speed} images/s.

## Results

### API: classify

| concurrency | target | images/s |
|---|---|---|
| 8 | m | {speed} |

![throughput](throughput.png)

## Load on the machine

Other processes: 0.00 cores.

## Set-up

- Versions: onnxruntime 1.32.0.
"""


def _server(results, name, speed, smoke):
    folder = results / name
    folder.mkdir(parents=True)
    (folder / "report.md").write_text(REPORT.format(speed=speed))
    (folder / "results.json").write_text(json.dumps({"meta": {"settings": {"smoke": smoke}}, "runs": []}))


def test_latest_reports_replace_only_the_generated_block(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "inprocess-20250101T000000Z.md").write_text(INPROCESS.replace("5.00", "9.99"))
    (results / "inprocess-20260101T000000Z.md").write_text(INPROCESS)
    _server(results, "20260102T000000Z", 123.4, smoke=False)
    _server(results, "20260103T000000Z", 1.0, smoke=True)  # newer, but a smoke run: skipped
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Benchmarks\n\nhand-written text\n\n{docs.START}\nold\n{docs.END}\n\nafter\n")

    assert docs.main(["--results", str(results), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n\n") and text.endswith(f"{docs.END}\n\nafter\n")
    block = text.split(docs.START)[1].split(docs.END)[0]
    assert "old" not in block
    assert "Test CPU (AVX-512 VNNI, 2 cores)" in block and "| m | 1 | onnxruntime fp32 | 5.00 | 200.0 | - |" in block
    assert "9.99" not in block  # the newest in-process report only
    assert "**Machine:** Test CPU (AVX-512 VNNI), 2 cores" in block and "123.4" in block and "| 8 | m | 1.0 |" not in block
    assert "### Headline" in block and "#### API: classify" in block and "Other processes: 0.00 cores." in block
    assert "Set-up" not in block
    assert "![throughput](../benchmarks/results/20260102T000000Z/throughput.png)" in block
    assert docs.main(["--results", str(results), "--docs", str(page)]) == 0
    assert page.read_text() == text  # idempotent


def test_no_reports_and_no_markers(tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nmine\n")
    (tmp_path / "results").mkdir()
    assert docs.main(["--results", str(tmp_path / "results"), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nmine\n") and docs.START in text and "No benchmark report found" in text
    assert docs.main(["--results", str(tmp_path / "missing"), "--docs", str(page)]) == 2
    assert "is not a folder" in capsys.readouterr().err
