"""benchmarks.inprocess.time_runners: warm-up excluded, variants interleaved, medians over repeats."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.inprocess import markdown, time_runners
from serve.backends.base import Runner
from serve.repository import TensorSpec


class _Sleepy(Runner):
    def __init__(self, name, delay, log):
        super().__init__(name, TensorSpec("images", np.uint8, (4, 4, 3)), TensorSpec("probabilities", np.float32, (2,)))
        self.delay, self.log = delay, log

    def _load(self):
        self.log.append((self.name, "load"))

    def _infer(self, batch):
        self.log.append((self.name, "infer"))
        time.sleep(self.delay)
        return np.full((len(batch), 2), 0.5, np.float32)

    @classmethod
    def from_entry(cls, entry, version=None, **options):  # pragma: no cover - not used
        raise NotImplementedError


def test_time_runners_interleaves_and_excludes_warmup():
    log = []
    runners = {"slow": _Sleepy("slow", 0.004, log), "fast": _Sleepy("fast", 0.001, log)}
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    stats = time_runners(runners, batch, repeats=3, iterations=2, warmup=2)
    calls = [name for name, what in log if what == "infer"]
    assert calls[:4] == ["slow", "slow", "fast", "fast"]  # warm-up first, then measured
    measured = calls[4:]
    # round-robin, rotated each repeat: slow,fast | fast,slow | slow,fast (2 calls each)
    assert measured == ["slow"] * 2 + ["fast"] * 2 + ["fast"] * 2 + ["slow"] * 2 + ["slow"] * 2 + ["fast"] * 2
    for label in runners:
        assert len(stats[label]["samples_ms"]) == 6 and len(stats[label]["repeat_medians_ms"]) == 3
        assert stats[label]["low_ms"] <= stats[label]["median_ms"] <= stats[label]["high_ms"]
    assert stats["slow"]["median_ms"] > stats["fast"]["median_ms"] >= 1.0
    assert abs(stats["fast"]["images_per_s"] - 2 / (stats["fast"]["median_ms"] / 1000)) < 1e-6
    rows = [{"model": "m", "variant": "keras predict", **stats["slow"]},
            {"model": "m", "variant": "onnxruntime fp32", **stats["fast"]}]
    table = markdown(rows)
    assert "| m | 2 | onnxruntime fp32 |" in table and "1.0x" in table


def test_main_records_the_instruction_set(tmp_path, capsys):
    """The .md and .json of a run name the CPU's instruction set beside the numbers (serve/cpuinfo.py)."""
    import json

    from benchmarks.inprocess import main
    from serve import cpuinfo
    from serve.backends.fake import write_fake_model

    repo = tmp_path / "repo"
    write_fake_model(repo, "toy", classes=3, size=(8, 8))
    out = tmp_path / "out"
    assert main(["--models", "toy", "--repository", str(repo), "--batch", "1", "--repeats", "1",
                 "--iterations", "2", "--warmup", "0", "--out", str(out)]) == 0
    isa = cpuinfo.summary()
    data = json.loads(next(out.glob("inprocess-*.json")).read_text())
    assert data["info"]["machine"]["isa"] == isa
    assert data["info"]["machine"]["isa_flags"] == cpuinfo.instruction_sets()
    assert [r["variant"] for r in data["results"]] == ["onnxruntime fp32"]
    text = next(out.glob("inprocess-*.md")).read_text()
    assert f"({isa}, " in text.splitlines()[0]
    assert cpuinfo.int8_meaning() in text
    assert isa in capsys.readouterr().out
