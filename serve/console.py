"""Terminal output for Kestrel's commands: quiet native libraries, progress that suits its stream.

Two things every CLI (export, optimize, demo, train, benchmarks, serve) shares:

- `quiet_native_logs()`: TensorFlow's C++ start-up chatter ("All log messages before
  absl::InitializeLog()", "cudart_stub.cc: Could not find cuda drivers", "cpu_feature_guard",
  "failed call to cuInit") is suppressed unless KESTREL_VERBOSE=1 (`kestrel --verbose`):
  TF_CPP_MIN_LOG_LEVEL=3 before TensorFlow is imported, the Python loggers of tensorflow, absl and
  tf2onnx at WARNING, and, because TensorFlow writes some lines from C++ before it reads that
  variable, file descriptor 2 filtered while `tensorflow` is imported: known noise dropped, every
  other line written through. Python warnings and WARNING log records stay visible.
- `quiet_onnxruntime_logs()`: onnxruntime's own log (coloured "[W:onnxruntime:...] Removing initializer
  ..." lines from its graph optimizer) at ERROR unless verbose; for the offline tools (export, optimize,
  evaluate, train), which make many sessions over models they wrote themselves. The server keeps
  onnxruntime's default: a warning about a user's model is worth a line there.
- `progress(...)`: a tqdm-compatible bar. On a terminal it is tqdm's bar; when the stream is not a
  terminal (CI logs, `make demo 2>&1 | tee`) it prints one line per finished step instead of
  carriage-return updates that run together ("export m: 0/5 [00:00] export m: 0/5 [00:00] ...").
  Many-item loops (images, batches) print at every 10 %; `leave=False` bars print one line at the end.
  KESTREL_PROGRESS=bar|lines|off overrides the choice.

Standard library only (tqdm, a base dependency, for the bar), so any folder may import it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import IO, Iterable, Iterator

VERBOSE_ENV = "KESTREL_VERBOSE"
PROGRESS_ENV = "KESTREL_PROGRESS"

# Lines native libraries write to stderr that say nothing a Kestrel user can act on.
NOISE = [
    re.compile(p)
    for p in (
        r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
        r"cudart_stub\.cc",
        r"cuda_(platform|executor|diagnostics|dnn|blas|fft|driver)\.cc",
        r"cpu_feature_guard\.cc",
        r"^To enable the following instructions: .* rebuild TensorFlow",
        r"oneDNN custom operations are on",
        r"Unable to register cu(DNN|FFT|BLAS) factory",
        r"computation placer already registered",
        r"TF-TRT Warning: Could not find TensorRT",
        r"port\.cc:\d+\] oneDNN",
    )
]
# Top-level packages whose import runs under the stderr filter.
NOISY_PACKAGES = ("tensorflow",)
QUIET_LOGGERS = {"tensorflow": logging.ERROR, "absl": logging.WARNING, "tf2onnx": logging.WARNING,
                 "h5py": logging.WARNING}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(verbose: bool) -> None:
    """Record the choice in the environment, so subprocesses (the demo's export and server) follow it."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


@contextlib.contextmanager
def filtered_stderr(keep=lambda line: not is_noise(line)) -> Iterator[None]:
    """Redirect file descriptor 2 (C/C++ writes too) to a file; on exit write back the lines `keep` accepts.

    Meant for short spans (an import): lines are held until the span ends, so a crash inside it loses them.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): do nothing
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True) if keep(line)]
            if kept:
                with contextlib.suppress(Exception):
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()


ORT_ERROR = 3  # onnxruntime's logging severity: 0 verbose, 1 info, 2 warning (its default), 3 error, 4 fatal
_AFTER_IMPORT: dict = {}  # top-level package -> function(module) run once it is imported


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._name in NOISY_PACKAGES:
            with filtered_stderr():
                self._loader.exec_module(module)
            _quiet_loggers()
        else:
            self._loader.exec_module(module)
        after = _AFTER_IMPORT.get(self._name)
        if after is not None:
            with contextlib.suppress(Exception):
                after(module)

    def __getattr__(self, name):  # resources, is_package, ... of the real loader
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds NOISY_PACKAGES as the path finder would, and imports them under filtered_stderr()."""

    def find_spec(self, name, path=None, target=None):
        if name not in NOISY_PACKAGES and name not in _AFTER_IMPORT:
            return None
        spec = None
        for finder in sys.meta_path:  # the others, in order: a finder that blocks the import still blocks it
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader, name)
        return spec


_installed = False
_lock = threading.Lock()


def _quiet_loggers() -> None:
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)


def quiet_native_logs() -> bool:
    """Suppress TensorFlow/absl/CUDA-stub noise in this process and its children unless verbose.

    Call it first thing in a CLI's main(), before anything imports TensorFlow. Returns False (and changes
    nothing) when KESTREL_VERBOSE is set. A user's own TF_CPP_MIN_LOG_LEVEL is kept.
    """
    global _installed
    if is_verbose():
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with _lock:
        if not _installed:
            if any(name in sys.modules for name in NOISY_PACKAGES):
                _quiet_loggers()  # imported already: its start-up lines are out; quiet the rest
            sys.meta_path.insert(0, _QuietFinder())
            _installed = True
    return True


def _ort_errors_only(ort) -> None:
    ort.set_default_logger_severity(ORT_ERROR)


def quiet_onnxruntime_logs() -> bool:
    """onnxruntime's default logger at ERROR in this process unless verbose (KESTREL_VERBOSE=1): its WARNING lines
    ("Removing initializer ... It is not used by any node") say nothing a user of the offline tools can act on.
    Applied when onnxruntime is imported (or now, if it already is): the command's --help stays light.
    Returns False (and changes nothing) when verbose."""
    global _installed
    if is_verbose():
        return False
    module = sys.modules.get("onnxruntime")
    if module is not None and hasattr(module, "set_default_logger_severity"):
        _ort_errors_only(module)
        return True
    with _lock:
        _AFTER_IMPORT["onnxruntime"] = _ort_errors_only
        if not _installed:
            sys.meta_path.insert(0, _QuietFinder())
            _installed = True
    return True


# ---- progress ---------------------------------------------------------------------------------------------
def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _mode(stream) -> str:
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    return "bar" if _isatty(stream) else "lines"


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}:{sec:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


class LineProgress:
    """tqdm's common interface, printing whole lines: one per finished step (unit step/run/epoch/model/variant,
    or total <= 20; leave=True), one per 10 % for longer loops, one at the end for leave=False bars."""

    STEP_LIMIT = 20
    STEP_UNITS = ("step", "run", "epoch", "model", "variant")  # always a line each, however many

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 leave: bool = True, file: IO | None = None, unit: str = "it", disable: bool = False,
                 initial: float = 0, postfix=None, **_ignored):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.desc, self.total, self.leave = iterable, desc or "", total, leave
        self.unit, self.disable, self.n = unit, disable, initial
        self.file = file
        self.postfix = ""
        self._start = self._last_time = time.monotonic()
        self._printed_decile = -1
        self._emitted_n = None  # the count of the last line printed
        self._closed = False
        if postfix is not None:
            self.set_postfix_str(str(postfix))

    # -- tqdm API ---------------------------------------------------------------------------------------------
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable is not iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: float = 1) -> None:
        if self.disable or not n:
            return
        self.n += n
        if not self.leave:
            return
        if (self.total and self.total <= self.STEP_LIMIT) or self.unit in self.STEP_UNITS:
            self._emit()
        elif self.total:
            decile = int(10 * self.n / self.total)
            if decile > self._printed_decile and decile >= 1:
                self._printed_decile = decile
                self._emit()
        elif time.monotonic() - self._last_time >= 10.0:
            self._emit()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str, file: IO | None = None, end: str = "\n") -> None:
        print(s, end=end, file=file or self._stream(), flush=True)

    def close(self) -> None:
        """The final line, unless the last line printed already said it (an interrupted loop says how far)."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n and self.n != self._emitted_n:
            self._emit()

    # -- output -----------------------------------------------------------------------------------------------
    def _stream(self):
        return self.file or sys.stderr

    def _emit(self) -> None:
        now = time.monotonic()
        self._last_time, self._emitted_n = now, self.n
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        unit = "" if self.unit in ("it", "step") else f" {self.unit}"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        line = f"{head}{count}{unit}{tail} [{_fmt_seconds(now - self._start)}]"
        with contextlib.suppress(Exception):
            print(line, file=self._stream(), flush=True)


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar on a terminal, a LineProgress otherwise (same arguments as tqdm: desc, total, unit,
    leave, file, disable...). Drop-in: `from serve.console import progress as tqdm`."""
    stream = kwargs.get("file") or sys.stderr
    mode = _mode(stream)
    if mode == "off":
        kwargs["disable"] = True
        return LineProgress(iterable, **kwargs)
    if mode == "lines":
        return LineProgress(iterable, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


progress.write = lambda s, file=None, end="\n": print(s, end=end, file=file or sys.stderr, flush=True)  # type: ignore[attr-defined]


# ---- mistyped names --------------------------------------------------------------------------------------
def _folded(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def close_names(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The names a mistyped `word` probably meant: the same once case, '_' and '-' are ignored
    ("mobilenetv2" -> mobilenet_v2, "ResNet-50" -> resnet50), else difflib's close matches, else the names
    sharing its first two letters ("exprot" -> export)."""
    import difflib

    choices = list(choices)
    same = [c for c in choices if _folded(c) == _folded(word)]
    if same:
        return same[:n]
    folded = {_folded(c): c for c in choices}
    close = [folded[m] for m in difflib.get_close_matches(_folded(word), list(folded), n=n, cutoff=0.75)]
    return close or [c for c in choices if len(word) >= 2 and c.startswith(word[:2].lower())][:n]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' (or 'X or Y') for a mistyped name, '' when nothing is close: for error lines."""
    close = close_names(word, choices)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ---- --help: program name and examples -------------------------------------------------------------------
_prog_override: str | None = None


def set_prog(prog: str | None) -> None:
    """The program name the next parser given to add_examples() shows ("kestrel export" when dispatched)."""
    global _prog_override
    _prog_override = prog


def add_examples(parser, *examples: str, note: str | None = None):
    """End `parser`'s --help with examples ("examples:\\n  PROG ARGS"), kept as written (not re-wrapped).

    Under the `kestrel` command the parser's prog becomes "kestrel <subcommand>", so usage lines and the
    examples show what the user typed. Returns the parser.
    """
    global _prog_override
    if _prog_override:
        parser.prog, _prog_override = _prog_override, None
    base = parser.formatter_class

    class _KeepEpilog(base):  # type: ignore[misc, valid-type]
        def _fill_text(self, text, width, indent):
            if text.startswith("examples:"):
                return "".join(indent + line for line in text.splitlines(keepends=True))
            return super()._fill_text(text, width, indent)

    parser.formatter_class = _KeepEpilog
    lines = ["examples:"] + [f"  {parser.prog} {e}".rstrip() for e in examples]
    if note:
        lines.append(note)
    parser.epilog = "\n".join(lines)
    return parser
