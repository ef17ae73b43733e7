"""Pieces both locustfiles share: options, the image set (benchmarks/_images.py) and the raw-sample recorder.

Imported by benchmarks/locustfile.py (gRPC) and benchmarks/locust_flask.py
(HTTP) inside a locust process; imports locust and gevent, so nothing outside
a locust process imports it.

The recorder implements the benchmark method (benchmarks/_method.py) inside
locust: requests during the first `--kestrel-warmup` seconds run but are not
measured (locust's own statistics are reset when the warm-up ends, so its
CSVs exclude it too), and every measured response time is kept raw, so
percentiles are exact rather than locust's rounded buckets. With
`--kestrel-record FILE` the samples and counts are written there as JSON when
the test stops.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import gevent
from locust import events

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `locust -f benchmarks/locustfile.py` from a checkout
    sys.path.insert(0, str(ROOT))

# the image set, shared with the threaded tritonclient load generator (no gevent there)
from benchmarks._images import DEFAULT_PHOTOS, image_arrays, image_files, rotated  # noqa: E402,F401


# Users of one locust process are numbered from KESTREL_SEED, so each starts at another image and the
# run is repeatable (every locustfile here uses the same numbering).
_USER_IDS = itertools.count(int(os.environ.get("KESTREL_SEED", "0")))


def next_user() -> int:
    """This user's number: its offset into the image list."""
    return next(_USER_IDS)


def model_names(spec: str) -> list[str]:
    """'a+b' asks for both models in one request."""
    return [n for n in spec.split("+") if n]


def add_common_arguments(parser) -> None:
    """Options every Kestrel locustfile takes (also settable as KESTREL_* environment variables)."""
    group = parser.add_argument_group("kestrel")
    group.add_argument("--kestrel-images", env_var="KESTREL_IMAGES", default="",
                       help=f"folder of images to send (default {DEFAULT_PHOTOS} when present, "
                            "else synthetic JPEGs)")
    group.add_argument("--kestrel-encode", env_var="KESTREL_ENCODE", default="jpeg", choices=("jpeg", "asis"),
                       help="jpeg (default): send every image as JPEG bytes, re-encoding other formats once "
                            "(quality 92), as phone photos arrive; asis: the files' bytes unchanged")
    group.add_argument("--kestrel-warmup", env_var="KESTREL_WARMUP", type=float, default=0.0,
                       help="seconds at the start whose requests are not measured (default 0)")
    group.add_argument("--kestrel-record", env_var="KESTREL_RECORD", default="",
                       help="write the measured raw samples and counts to this JSON file at the end")
    group.add_argument("--kestrel-label", env_var="KESTREL_LABEL", default="",
                       help="free-form label stored in the record (e.g. the variant)")


# ---- recorder -------------------------------------------------------------------------------
class Recorder:
    """Collects measured samples after the warm-up; writes them as JSON at test stop."""

    def __init__(self):
        self.reset()
        self.environment = None

    def reset(self) -> None:
        self.measuring = False
        self.times_ms: list[float] = []
        self.items = 0
        self.failures = 0
        self.failure_messages: Counter = Counter()
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.written = False

    # locust events
    def on_test_start(self, environment, **_kw) -> None:
        self.environment = environment
        self.reset()
        warmup = float(getattr(environment.parsed_options, "kestrel_warmup", 0.0) or 0.0)
        if warmup > 0:
            gevent.spawn_later(warmup, self.begin_window)
        else:
            self.begin_window()

    def begin_window(self) -> None:
        if self.environment is not None and self.environment.stats is not None:
            self.environment.stats.reset_all()  # locust's CSVs exclude the warm-up too
        self.window_start = time.perf_counter()
        self.measuring = True

    def on_request(self, request_type, name, response_time, response_length, exception=None,
                   context=None, **_kw) -> None:
        if not self.measuring:
            return
        if exception is not None:
            self.failures += 1
            if len(self.failure_messages) < 20 or str(exception)[:200] in self.failure_messages:
                self.failure_messages[str(exception)[:200]] += 1
            return
        self.times_ms.append(float(response_time))
        self.items += int((context or {}).get("images", 1))

    def on_test_stop(self, environment, **_kw) -> None:
        if self.measuring:
            self.window_end = time.perf_counter()
            self.measuring = False
        self.write(environment)

    def on_quitting(self, environment, **_kw) -> None:
        if not self.written:
            self.on_test_stop(environment)

    def result(self, environment) -> dict:
        options = environment.parsed_options
        window = (self.window_end - self.window_start) if (self.window_start and self.window_end) else 0.0
        count = len(self.times_ms)
        return {
            "label": getattr(options, "kestrel_label", ""),
            "users": getattr(options, "num_users", None),
            "warmup_s": getattr(options, "kestrel_warmup", 0.0),
            "window_s": round(window, 4),
            "requests": count,
            "failures": self.failures,
            "items": self.items,
            "requests_per_s": count / window if window > 0 else float("nan"),
            "items_per_s": self.items / window if window > 0 else float("nan"),
            "failure_messages": dict(self.failure_messages.most_common(10)),
            "response_times_ms": [round(t, 4) for t in self.times_ms],
        }

    def write(self, environment) -> None:
        target = getattr(environment.parsed_options, "kestrel_record", "") if environment.parsed_options else ""
        if not target or self.written:
            return
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result(environment)))
        os.replace(tmp, path)
        self.written = True


RECORDER = Recorder()


def install_recorder() -> Recorder:
    """Hook the recorder into locust's events (once per process)."""
    if not getattr(install_recorder, "_done", False):
        events.test_start.add_listener(RECORDER.on_test_start)
        events.request.add_listener(RECORDER.on_request)
        events.test_stop.add_listener(RECORDER.on_test_stop)
        events.quitting.add_listener(RECORDER.on_quitting)
        install_recorder._done = True
    return RECORDER
