"""Pieces both locustfiles share: options, the image set and the raw-sample recorder.

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

import io
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

from serve import images as kimages  # noqa: E402
from serve.errors import ImageDecodeError  # noqa: E402

DEFAULT_PHOTOS = ROOT.parent / "shared" / "photos"
MAX_IMAGES = 64  # bounded: the image set is held in memory by every user


# Users of one locust process are numbered from KESTREL_SEED, so each starts at another image and the
# run is repeatable (every locustfile here uses the same numbering).
_USER_IDS = itertools.count(int(os.environ.get("KESTREL_SEED", "0")))


def next_user() -> int:
    """This user's number: its offset into the image list."""
    return next(_USER_IDS)


def rotated(items: list, offset: int) -> list:
    """`items` starting at `offset` (wrapping round): each user cycles through the same images in its own order."""
    return [items[(offset + i) % len(items)] for i in range(len(items))]


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


# ---- images ---------------------------------------------------------------------------------
def _synthetic_jpegs(count: int = 8, size: tuple[int, int] = (480, 640)) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for i, array in enumerate(kimages.synthetic_images(count, size, seed=1234)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        out.append((f"synthetic_{i}.jpg", buf.getvalue()))
    return out


_FILES: dict[tuple[str, str], list[tuple[str, bytes]]] = {}


def _as_jpeg(name: str, data: bytes) -> tuple[str, bytes]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return name, data
    rgb = kimages.decode(data)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=92)
    return str(Path(name).with_suffix(".jpg")), buf.getvalue()


def image_files(folder: str = "", encode: str = "jpeg") -> list[tuple[str, bytes]]:
    """[(file name, encoded bytes)] of the decodable images in `folder`, at most MAX_IMAGES.

    encode="jpeg": non-JPEG files are re-encoded to JPEG once (what phones
    upload); "asis": the bytes on disk. With no folder, ../shared/photos is
    used when present, else synthetic JPEGs.
    """
    key = (folder or "", encode)
    if key in _FILES:
        return _FILES[key]
    path = Path(folder) if folder else DEFAULT_PHOTOS
    files: list[tuple[str, bytes]] = []
    if folder or path.is_dir():
        for p in kimages.find_images(path):  # raises ImageDecodeError for a missing folder
            data = p.read_bytes()
            try:
                kimages.decode(data, min_size=(32, 32))
            except ImageDecodeError:
                continue  # not an image we can send as a valid request
            files.append(_as_jpeg(p.name, data) if encode == "jpeg" else (p.name, data))
            if len(files) >= MAX_IMAGES:
                break
        if not files:
            raise ImageDecodeError(f"image folder {path} holds no decodable image")
    else:
        files = _synthetic_jpegs()
    _FILES[key] = files
    return files


_ARRAYS: dict[tuple, list] = {}


def image_arrays(folder: str, size: tuple[int, int]) -> list:
    """The image set decoded and resized to (height, width): uint8 HxWx3 arrays (cached)."""
    key = (folder or "", tuple(size))
    if key not in _ARRAYS:
        _ARRAYS[key] = [kimages.load(data, size) for _, data in image_files(folder, "asis")]
    return _ARRAYS[key]


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
