"""The shared measurement method: statistics, interleaved schedules, machine info, load monitor."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import _method


def test_percentiles_are_exact_on_raw_samples():
    samples = list(range(1, 101))  # 1..100
    p = _method.percentiles(samples, (50, 95, 99))
    assert p["p50"] == pytest.approx(50.5)
    assert p["p95"] == pytest.approx(np.percentile(samples, 95))
    assert p["p99"] == pytest.approx(99.01)
    assert math.isnan(_method.percentiles([], (50,))["p50"])


def test_summarize_counts_and_extremes():
    s = _method.summarize([3.0, 1.0, 2.0])
    assert s["count"] == 3 and s["min"] == 1.0 and s["max"] == 3.0 and s["mean"] == pytest.approx(2.0)
    assert s["p50"] == 2.0


def test_over_repeats_median_and_range_ignore_missing():
    spread = _method.over_repeats([10.0, float("nan"), 30.0, 20.0, None])
    assert (spread.median, spread.low, spread.high, spread.n) == (20.0, 10.0, 30.0, 3)
    assert spread.format(1) == "20.0 (10.0-30.0)"
    assert _method.over_repeats([]).format() == "n/a"
    assert _method.over_repeats([5.0]).format(2) == "5.00"


def test_ratio_handles_missing_and_zero():
    assert _method.ratio(10.0, 4.0) == 2.5
    assert math.isnan(_method.ratio(1.0, 0.0))
    assert math.isnan(_method.ratio(float("nan"), 1.0))


def test_interleaved_rotates_so_each_variant_runs_in_each_position():
    schedule = _method.interleaved(["a", "b", "c"], 3)
    assert [v for _, v in schedule] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r for r, _ in schedule] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    firsts = [schedule[i][1] for i in (0, 3, 6)]
    assert sorted(firsts) == ["a", "b", "c"]
    assert [v for _, v in _method.interleaved(["a", "b"], 2, rotate=False)] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError):
        _method.interleaved(["a"], 0)


def test_grid_keeps_each_level_together():
    schedule = _method.grid([1, 8], ["x", "y"], 2)
    assert [lv for lv, _, _ in schedule] == [1, 1, 1, 1, 8, 8, 8, 8]
    assert [v for _, _, v in schedule[:4]] == ["x", "y", "y", "x"]


def test_time_calls_excludes_warmup():
    calls = []
    times = _method.time_calls(lambda: calls.append(1), warmup=3, iterations=5)
    assert len(calls) == 8 and len(times) == 5 and all(t >= 0 for t in times)


def test_machine_info_and_versions():
    info = _method.machine_info()
    assert info["cores"] >= 1 and info["cpu"] and info["memory_gib"] > 0
    from serve import cpuinfo

    assert info["isa"] == cpuinfo.summary() and info["isa_flags"] == cpuinfo.instruction_sets()
    assert info["int8"] == cpuinfo.int8_meaning()
    versions = _method.package_versions(["numpy", "surely-not-installed-package"])
    assert versions == {"numpy": np.__version__}
    assert len(_method.timestamp()) == len("20261123T011500Z")


def test_load_monitor_sees_own_busy_process():
    import os

    monitor = _method.LoadMonitor(pids=[os.getpid()])
    monitor.start()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # burn CPU in the watched process
        sum(i * i for i in range(1000))
    usage = monitor.stop()
    assert usage["wall_s"] >= 0.5
    assert usage["own_cores"] > 0.1  # spinning (on a shared machine: a share of a core); idle ~0
    assert usage["busy_cores"] >= usage["own_cores"] * 0.8
    assert usage["foreign_cores"] >= 0.0


def test_process_tree_cpu_counts_the_processes_under_the_server(tmp_path):
    # a parent (idle) whose child burns 0.3 s of CPU and then waits: the parent's tree holds that CPU
    done = tmp_path / "burned"
    child = ("import time, pathlib\nwhile time.process_time() < 0.3: pass\n"
             f"pathlib.Path({str(done)!r}).write_text('x')\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               f"{child!r}])"], start_new_session=True)
    try:
        for _ in range(300):
            if done.exists():
                break
            time.sleep(0.05)
        assert done.exists()
        cpu, pids = _method.process_tree_cpu([parent.pid])
        assert cpu >= 0.3 and parent.pid in pids and len(pids) == 2  # the parent and its child
        assert _method.process_tree_cpu([2 ** 22 + 7]) is None  # above Linux's largest pid: no such process
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the parent and its child
        parent.wait(10)
