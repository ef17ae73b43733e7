"""The measurement method every Kestrel benchmark shares.

The in-process benchmark (benchmarks/inprocess.py, benchmarks/classify_latency.py)
and the server benchmark (python -m benchmarks) follow the same rules, so
their numbers can be read side by side:

- Warm-up excluded: the first calls (graph compilation, allocator growth,
  caches, thread pools spinning up) are run but never measured.
- Repeats, medians: every cell is measured `repeats` times; the headline is
  the median over repeats and the spread (min..max) is shown beside it.
  Percentiles of one run are computed on the raw samples (no bucketing).
- Interleaving: within one cell of the grid (e.g. a concurrency level) the
  variants are measured round-robin, the order rotated each repeat, so slow
  drift of the machine (other jobs, thermal state) hits every variant alike
  instead of whichever happened to run last.
- The machine and the versions are recorded beside every result, with the
  load on the machine while it ran.

Pure Python + numpy; no heavy imports.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import numpy as np

from serve import cpuinfo

T = TypeVar("T")

PERCENTILES = (50, 90, 95, 99)
# Distributions whose versions a benchmark report records (absent ones are skipped).
PACKAGES = (
    "kestrel", "numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorflow", "keras",
    "tf2onnx", "onnx", "grpcio", "protobuf", "locust", "gevent", "flask", "werkzeug", "matplotlib",
)


# ---- statistics -----------------------------------------------------------------------------
def percentiles(samples: Sequence[float], qs: Iterable[float] = PERCENTILES) -> dict[str, float]:
    """{'p50': .., 'p95': ..} of raw samples (linear interpolation); NaN when there are none."""
    values = np.asarray(list(samples), dtype=np.float64)
    out = {}
    for q in qs:
        key = f"p{q:g}".replace(".", "_")
        out[key] = float(np.percentile(values, q)) if values.size else float("nan")
    return out


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """count, mean, min, max and the standard percentiles of one run's raw samples."""
    values = np.asarray(list(samples), dtype=np.float64)
    out = {"count": int(values.size)}
    if values.size:
        out.update(mean=float(values.mean()), min=float(values.min()), max=float(values.max()))
    else:
        out.update(mean=float("nan"), min=float("nan"), max=float("nan"))
    out.update(percentiles(values))
    return out


def median(values: Iterable[float]) -> float:
    """Median ignoring NaN (NaN when nothing is left)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else float("nan")


@dataclass
class Spread:
    """Median over repeats with its range."""

    median: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 1) -> str:
        if self.n == 0 or np.isnan(self.median):
            return "n/a"
        if self.n == 1 or self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def over_repeats(values: Iterable[float]) -> Spread:
    """Median, min and max of one quantity measured in several repeats (NaN ignored)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if not arr.size:
        return Spread(float("nan"), float("nan"), float("nan"), 0)
    return Spread(float(np.median(arr)), float(arr.min()), float(arr.max()), int(arr.size))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or np.isnan(numerator) or np.isnan(denominator) or denominator == 0:
        return float("nan")
    return float(numerator) / float(denominator)


# ---- schedules ------------------------------------------------------------------------------
def interleaved(variants: Sequence[T], repeats: int, *, rotate: bool = True) -> list[tuple[int, T]]:
    """Round-robin order over `variants`, `repeats` times: [(repeat, variant), ...].

    With `rotate`, repeat r starts at variant r (mod n): every variant runs first,
    second... equally often, so "runs right after the slow one" is not a bias.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, received {repeats}")
    order = list(variants)
    out = []
    for r in range(repeats):
        shift = (r % len(order)) if (rotate and order) else 0
        for item in order[shift:] + order[:shift]:
            out.append((r, item))
    return out


def grid(levels: Sequence, variants: Sequence[T], repeats: int, *, rotate: bool = True) -> list[tuple]:
    """The full schedule: for each level, the interleaved variants: [(level, repeat, variant), ...]."""
    return [(level, r, v) for level in levels for r, v in interleaved(variants, repeats, rotate=rotate)]


def time_calls(fn: Callable[[], object], *, warmup: int, iterations: int) -> list[float]:
    """Call `fn` `warmup` times unmeasured, then `iterations` times; returns per-call ms."""
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


# ---- machine & versions ---------------------------------------------------------------------
def cpu_model() -> str:
    return cpuinfo.cpu_model()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def gpu_names() -> list[str]:
    """NVIDIA GPUs per nvidia-smi (empty when there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict:
    """CPU model and instruction set, cores, RAM, GPUs, OS, Python and load at the time of the call."""
    isa = cpuinfo.instruction_sets()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    return {
        "cpu": cpu_model(),
        # the instruction set decides the INT8 speed-up (serve/cpuinfo.py): recorded beside every result
        "isa": cpuinfo.summary(isa),
        "isa_flags": isa,
        "int8": cpuinfo.int8_meaning(isa),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gib": round(memory_gib(), 1),
        "gpus": gpu_names(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": load_average(),
        "hostname": platform.node(),
    }


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (absent ones omitted)."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_revision(root: str | Path | None = None) -> str | None:
    """`<commit>[-dirty]` of the checkout, or None outside git."""
    root = Path(root or Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def timestamp() -> str:
    """UTC time stamp usable as a folder name: 20261123T011500Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def completed(row: dict) -> bool:
    """A load run that ran to its end and answered requests (no run error): one whose numbers count."""
    return not row.get("error") and bool(row.get("requests"))


# ---- load on the machine while measuring ----------------------------------------------------
def process_tree_cpu(pids: Iterable[int]) -> tuple[float, frozenset[int]] | None:
    """(CPU seconds, user + system, every thread, used so far by `pids` and every process under them that is
    still running; the process ids counted), read from /proc. None where /proc cannot tell (not Linux) or
    none of `pids` is running."""
    processes: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, clock ticks)
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for name in entries:
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            processes[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    tree = {p for p in pids if p in processes}
    if not tree:
        return None
    while True:
        under = {pid for pid, (parent, _) in processes.items() if parent in tree} - tree
        if not under:
            break
        tree |= under
    return sum(processes[pid][1] for pid in tree) / os.sysconf("SC_CLK_TCK"), frozenset(tree)


@dataclass
class CpuSample:
    wall: float
    busy: float  # machine CPU-seconds spent busy (all cores)
    own: float  # CPU-seconds of the watched processes (and their children)


@dataclass
class LoadMonitor:
    """How busy the machine was during a measurement, and how much of that was ours.

    "Ours" is the watched processes that are still running (e.g. the server)
    plus this process's children that ended and were waited for meanwhile
    (e.g. a locust run).

        monitor = LoadMonitor(pids=[server.pid])
        monitor.start(); ...; usage = monitor.stop()
        usage["foreign_cores"]  # cores' worth of CPU used by *other* processes meanwhile

    Reads /proc (Linux); elsewhere own and foreign CPU are NaN.
    """

    pids: list[int] = field(default_factory=list)
    _start: CpuSample | None = None

    def _own_cpu(self) -> float:
        # children that ended and were waited for (a locust run) are in RUSAGE_CHILDREN
        try:
            import resource

            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            total = usage.ru_utime + usage.ru_stime
        except (ImportError, OSError):
            total = 0.0
        if not self.pids:
            return total
        tree = process_tree_cpu(self.pids)
        if tree is None:
            return float("nan") if not Path("/proc/self/stat").exists() else total
        return total + tree[0]

    @staticmethod
    def _busy() -> float:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) for v in fields]
        except (OSError, ValueError, IndexError):
            return float("nan")
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        # guest time is already included in user/nice
        total = sum(values[:8])
        return (total - idle) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> CpuSample:
        return CpuSample(time.monotonic(), self._busy(), self._own_cpu())

    def start(self) -> None:
        self._start = self.sample()

    def stop(self) -> dict[str, float]:
        """{'wall_s', 'busy_cores', 'own_cores', 'foreign_cores'} since start()."""
        if self._start is None:
            raise RuntimeError("LoadMonitor.stop() called before start()")
        end = self.sample()
        wall = max(end.wall - self._start.wall, 1e-9)
        busy = (end.busy - self._start.busy) / wall
        own = (end.own - self._start.own) / wall
        return {
            "wall_s": round(wall, 3),
            "busy_cores": round(busy, 3),
            "own_cores": round(own, 3),
            "foreign_cores": round(max(busy - own, 0.0), 3) if not np.isnan(own) else float("nan"),
        }
