"""Accuracy against ground truth for every variant and ensemble of a repository, as served.

    python -m export.evaluate ../shared/datasets/imagenet_val --repository models \\
        --models mobilenet_v2,mobilenet_v2_int8,mobilenet_v2_fp16 --ensemble trio=mobilenet_v2,mobilenet,effnet \\
        [--output runs/evaluate] [--limit N] [--resize model|stretch|crop] [--class-index FILE]

Labelled data, one of:
- a folder of class sub-folders (ImageFolder), each named by a label of the
  model (`tulips/`) or by an ImageNet WordNet id (`n01440764/`, mapped through
  imagenet_class_index.json: `--class-index`, else $KERAS_HOME/models/, else
  ~/.keras/models/);
- a CSV file of `file,label` rows (paths relative to the CSV; a header row
  `file,label` is allowed; labels as above, or a class number).

Every image is decoded once and resized per model exactly as the server's
Classify does (serve.images.decode + resize with each model's "resize" mode
from its config.pbtxt), then run through Kestrel's own backends (serve.backends:
onnxruntime with its WeightBiasQuantization transformer disabled, the Keras
backend for `<name>_keras`, TensorRT engines where a GPU is present). A model
that fails to load is reported, not fatal; undecodable images are listed and
left out of every model alike (comparisons stay paired).

Reported per model: top-1 and top-5 accuracy with a 95 % interval, and, against
its reference (the FP32 export named by the variant's `source` parameter, else
`<name>` for `<name>_keras`), the paired top-1 difference with a bootstrap 95 %
interval and McNemar's exact p-value: a 1-point gap on 1300 images is often
noise. Per ensemble: every member, every fusion of serve.ensemble.FUSIONS
(against the best member), and the oracle (some member right: the ceiling of any
fusion); its latency (members run concurrently) against its slowest member.
Batch-1 and batch-8 latency per model (interleaved medians; on a shared machine
the numbers say little: re-run with --latency-runs on a quiet one).

Output in --output: evaluation.json, evaluation.md (the table, also printed), and
evaluation.png (top-1 against batch-1 and batch-8 latency per variant; needs
matplotlib: the bench extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from serve import console
from serve import images as simages
from serve.errors import ConfigError, ImageDecodeError, KestrelError
from serve.repository import ModelRepository

CLASS_INDEX_FILE = "imagenet_class_index.json"
RESIZE_CHOICES = ("model",) + simages.RESIZE_MODES
DEFAULT_BATCH_SIZE = 8
DEFAULT_LATENCY_RUNS = 20
LATENCY_BATCHES = (1, 8)
BOOTSTRAP = 2000
CHUNK = 64  # images decoded at a time (bounds memory on large sets)
KERAS_SUFFIX = "_keras"
DEFAULT_TEMPERATURE_FOLDS = 2  # ensembles: fusions with temperatures cross-fitted over this many folds (0: off)
CROSS_FIT = "cross-fit"


# ---- labelled data --------------------------------------------------------------------------
@dataclass
class Sample:
    path: Path
    label: str  # as written in the data: a folder name, a CSV label


def find_class_index(path: str | Path | None = None) -> Path | None:
    """imagenet_class_index.json: `path`, else $KERAS_HOME/models/, else ~/.keras/models/ (None if absent)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--class-index {path} does not exist; expected Keras' {CLASS_INDEX_FILE}")
        return path
    homes = [os.environ.get("KERAS_HOME"), str(Path.home() / ".keras")]
    for home in filter(None, homes):
        candidate = Path(home) / "models" / CLASS_INDEX_FILE
        if candidate.is_file():
            return candidate
    return None


def read_class_index(path: Path) -> dict[str, tuple[int, str]]:
    """{wnid: (class index, readable name)} from Keras' imagenet_class_index.json."""
    try:
        data = json.loads(Path(path).read_text())
        return {wnid: (int(i), name) for i, (wnid, name) in data.items()}
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the ImageNet class index {path}: {exc}; expected "
                          '{"0": ["n01440764", "tench"], ...}') from None


def read_samples(data: str | Path) -> list[Sample]:
    """The labelled images of a class-folder tree or a `file,label` CSV, in a stable order."""
    data = Path(data)
    if data.is_dir():
        classes = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ConfigError(f"{data} has no class sub-folders; expected DATA/<label>/<image> (or a CSV file,label)")
        samples = [Sample(path, folder.name) for folder in classes for path in simages.find_images(folder)]
    elif data.is_file():
        samples = []
        try:
            with data.open(newline="", encoding="utf-8") as fh:
                for number, row in enumerate(csv.reader(fh), 1):
                    if not row or not "".join(row).strip() or row[0].startswith("#"):
                        continue
                    if len(row) < 2:
                        raise ConfigError(f"{data}:{number}: expected 'file,label', got {','.join(row)!r}")
                    if number == 1 and [c.strip().lower() for c in row[:2]] == ["file", "label"]:
                        continue
                    path = Path(row[0].strip())
                    samples.append(Sample(path if path.is_absolute() else data.parent / path, row[1].strip()))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read labelled CSV {data}: {exc}") from None
    else:
        raise ConfigError(f"labelled data {data} does not exist; expected a folder of class folders or a CSV file,label")
    if not samples:
        raise ConfigError(f"{data} holds no images")
    return samples


def _norm(text: str) -> str:
    return text.strip().lower().replace(" ", "_").replace("-", "_")


class LabelMap:
    """Maps the data's labels to one model's class indices (-1: not one of its classes)."""

    def __init__(self, labels: Sequence[str] | None, classes: int, class_index: dict | None = None):
        self.classes = classes
        self.labels = list(labels) if labels else None
        self.by_name = {_norm(l): i for i, l in enumerate(self.labels or [])}
        self.class_index = class_index or {}
        # the model's label list is the ImageNet order when its names match the class index
        self.imagenet = bool(self.class_index) and classes == len(self.class_index) and (
            self.labels is None or sum(_norm(self.labels[i]) == _norm(n) for i, n in self.class_index.values())
            >= 0.99 * classes)

    def index(self, label: str) -> int:
        key = _norm(label)
        if key in self.by_name:
            return self.by_name[key]
        if label in self.class_index:
            i, name = self.class_index[label]
            if self.imagenet:
                return i
            return self.by_name.get(_norm(name), -1)
        if label.isdigit() and int(label) < self.classes:
            return int(label)
        return -1

    def truth(self, samples: Sequence[Sample]) -> np.ndarray:
        return np.array([self.index(s.label) for s in samples], dtype=np.int64)


def is_wnid(label: str) -> bool:
    return len(label) == 9 and label[0] == "n" and label[1:].isdigit()


# ---- statistics -----------------------------------------------------------------------------
def mcnemar_exact(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """McNemar's exact test on paired right/wrong: two-sided binomial p on the discordant pairs."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    only_a = int(np.sum(a_right & ~b_right))
    only_b = int(np.sum(~a_right & b_right))
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return {"only_a": only_a, "only_b": only_b, "p_value": float(min(1.0, 2.0 * tail))}


def bootstrap_diff(a_right: np.ndarray, b_right: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(difference, low, high): mean(a) - mean(b) with a paired bootstrap 95 % interval."""
    diff = np.asarray(a_right, np.float64) - np.asarray(b_right, np.float64)
    if len(diff) == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        means[r] = diff[rng.integers(0, len(diff), len(diff))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def topk_right(order: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Per image: is the true class among the first k of `order` (N, C ranked classes)?"""
    k = min(k, order.shape[1])
    return (order[:, :k] == truth[:, None]).any(axis=1) & (truth >= 0)


def ranked(probs: np.ndarray) -> np.ndarray:
    return np.argsort(-probs, axis=1, kind="stable")


# ---- results --------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str  # "model", "fusion", "oracle"
    images: int
    top1: float | None = None
    top5: float | None = None
    top1_interval: tuple[float, float] | None = None
    reference: str | None = None
    delta_top1: float | None = None
    delta_interval: tuple[float, float] | None = None
    mcnemar_p: float | None = None
    discordant: tuple[int, int] | None = None  # (only this right, only the reference right)
    latency_ms: dict = field(default_factory=dict)  # {"1": ms, "8": ms}
    platform: str = ""
    resize: str = ""
    precision: str = ""
    ensemble: str | None = None
    unmapped: int = 0  # images whose label is not one of this model's classes (counted wrong)
    error: str | None = None
    predictions: list[int] = field(default_factory=list)  # top-1 class per image (Evaluation.files order)


@dataclass
class Evaluation:
    data: str
    images: int
    classes: int
    rows: list[Row]
    skipped: list[dict]
    resize_override: str | None
    cpu: dict
    seconds: float
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the images used, in order
    truth: dict[str, list[int]] = field(default_factory=dict)  # true class per image, per model (-1: unknown)

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def markdown(self) -> str:
        head = ("| name | kind | images | top-1 | top-5 | vs | Δ top-1 [95 % CI] | McNemar p | "
                "batch-1 ms | batch-8 ms |")
        lines = [head, "|" + "---|" * 10]

        def pct(v):
            return "" if v is None else f"{v:.2%}"

        for r in self.rows:
            if r.error:
                lines.append(f"| {r.name} | {r.kind} | | error: {r.error[:80]} | | | | | | |")
                continue
            delta = "" if r.delta_top1 is None else (
                f"{r.delta_top1 * 100:+.2f} [{r.delta_interval[0] * 100:+.2f}, {r.delta_interval[1] * 100:+.2f}]")
            p = "" if r.mcnemar_p is None else f"{r.mcnemar_p:.3g}"
            ms = [f"{r.latency_ms[k]:.2f}" if k in r.latency_ms else "" for k in ("1", "8")]
            name = r.name if r.kind == "model" or not r.ensemble else f"{r.ensemble}:{r.name}"
            lines.append(f"| {name} | {r.kind} | {r.images} | {pct(r.top1)} | {pct(r.top5)} | {r.reference or ''} "
                         f"| {delta} | {p} | {ms[0]} | {ms[1]} |")
        cpu = cpu_text(self.cpu)
        lines.append("")
        lines.append(f"{self.images} images, {self.classes} classes, from {self.data}"
                     + (f"; {len(self.skipped)} undecodable, left out" if self.skipped else "")
                     + f". CPU: {cpu}.")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def cpu_text(cpu: dict) -> str:
    """'AMD EPYC, AVX2 (no AVX-512, no VNNI)' from serve.cpuinfo.describe()."""
    parts = [cpu.get("cpu"), cpu.get("isa")]
    return ", ".join(p for p in parts if p) or cpu.get("summary") or "unknown CPU"


# ---- running --------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    runner: object
    entry: object
    resize: str
    size: tuple[int, int]
    truth: np.ndarray | None = None
    probs: list = field(default_factory=list)
    error: str | None = None


def reference_of(name: str, entry, names: Sequence[str]) -> str | None:
    """The FP32 export a variant is compared with: its `source` parameter, or <name> for <name>_keras."""
    source = entry.parameters.get("source") if entry is not None else None
    if source and source != name:
        return source if source in names else None
    if name.endswith(KERAS_SUFFIX) and name[: -len(KERAS_SUFFIX)] in names:
        return name[: -len(KERAS_SUFFIX)]
    return None


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from serve.console import progress  # a bar on a terminal, lines in logs (docs/cli.md, Output)
    return progress(total=total, desc=desc, unit="img", leave=False)


def predict_all(members: Sequence[Member], samples: Sequence[Sample], *, batch_size: int = DEFAULT_BATCH_SIZE,
                progress: bool = True) -> tuple[list[int], list[dict], dict]:
    """Decode every image once (at the size the most demanding model needs, as Classify does),
    resize per (size, mode), run every loaded member. Returns (indices of the images used,
    skipped [{image, reason}], {(size, mode): one preprocessed image} for latency runs)."""
    live = [m for m in members if m.error is None]
    keys = sorted({(m.size, m.resize) for m in live})
    needed = [simages.decode_size(size, mode) for size, mode in keys] or [(224, 224)]
    biggest = (max(h for h, _ in needed), max(w for _, w in needed))
    used, skipped, sample_pixels = [], [], {}
    bar = _progress(len(samples), progress, "evaluating")
    try:
        for start in range(0, len(samples), CHUNK):
            chunk = samples[start : start + CHUNK]
            pixels = {key: [] for key in keys}
            for offset, sample in enumerate(chunk):
                try:
                    picture = simages.decode(sample.path, min_size=biggest)
                    resized = {key: simages.resize(picture, key[0], key[1]) for key in keys}
                except ImageDecodeError as exc:
                    skipped.append({"image": str(sample.path), "reason": str(exc)})
                    continue
                except Exception as exc:  # an unexpected decoder failure must not end a long run
                    skipped.append({"image": str(sample.path), "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                used.append(start + offset)
                for key, array in resized.items():
                    pixels[key].append(array)
            for key in keys:
                if pixels[key] and key not in sample_pixels:
                    sample_pixels[key] = pixels[key][0]
            for member in live:
                batch = pixels[(member.size, member.resize)]
                if not batch:
                    continue
                stacked = np.stack(batch)
                limit = member.runner.max_batch_size or batch_size
                step = max(1, min(batch_size, limit))
                try:
                    for s in range(0, len(stacked), step):
                        member.probs.append(member.runner.infer(stacked[s : s + step]))
                except Exception as exc:  # one model failing must not lose the others' results
                    member.error = f"inference failed: {type(exc).__name__}: {exc}"
                    member.probs = []
            live = [m for m in live if m.error is None]
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return used, skipped, sample_pixels


def _median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000.0)


def measure_latency(members: Sequence[Member], sample_pixels: dict, ensembles: Sequence, runs: int) -> dict:
    """{name: {"1": ms, "8": ms}}: interleaved medians per model; per ensemble, its members run
    concurrently (one thread each, as the server does)."""
    out: dict[str, dict] = {}
    live = [m for m in members if m.error is None and (m.size, m.resize) in sample_pixels]
    if runs <= 0 or not live:
        return out
    by_name = {m.name: m for m in live}
    batches = {b: {key: np.repeat(img[None], b, axis=0) for key, img in sample_pixels.items()}
               for b in LATENCY_BATCHES}
    runnable = {b: [m for m in live if not m.runner.max_batch_size or m.runner.max_batch_size >= b]
                for b in LATENCY_BATCHES}
    groups = [(e.name, [by_name[n] for n in e.members]) for e in ensembles if all(n in by_name for n in e.members)]
    with ThreadPoolExecutor(max_workers=max([len(g) for _, g in groups] + [1])) as pool:
        for b in LATENCY_BATCHES:
            def one(member, b=b):
                member.runner.infer(batches[b][(member.size, member.resize)])

            times: dict[str, list[float]] = {}
            for member in runnable[b]:
                one(member)  # warm-up
            for _ in range(runs):
                for member in runnable[b]:
                    t0 = time.perf_counter()
                    one(member)
                    times.setdefault(member.name, []).append(time.perf_counter() - t0)
                for name, group in groups:
                    if not all(m in runnable[b] for m in group):
                        continue
                    t0 = time.perf_counter()
                    list(pool.map(one, group))
                    times.setdefault(name, []).append(time.perf_counter() - t0)
            for name, t in times.items():
                out.setdefault(name, {})[str(b)] = _median_ms(t)
    return out


def _compare(row: Row, right: np.ndarray, ref_name: str, ref_right: np.ndarray, seed: int) -> None:
    test = mcnemar_exact(right, ref_right)
    diff, low, high = bootstrap_diff(right, ref_right, seed=seed)
    row.reference = ref_name
    row.delta_top1, row.delta_interval = diff, (low, high)
    row.mcnemar_p = test["p_value"]
    row.discordant = (test["only_a"], test["only_b"])


def _fusions():
    from serve import ensemble as ens_lib
    return ens_lib, tuple(ens_lib.FUSIONS)


def evaluate(data: str | Path, repository: str | Path = "models", models: Sequence[str] | None = None,
             ensembles: Sequence = (), *, resize: str = "model", class_index: str | Path | None = None,
             limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             latency_runs: int = DEFAULT_LATENCY_RUNS, progress: bool = True, log=print,
             temperature_folds: int = DEFAULT_TEMPERATURE_FOLDS) -> Evaluation:
    """Evaluate `models` (default: every model of the repository) and `ensembles` (serve.ensemble.Ensemble
    or 'NAME=a,b[:fusion]' strings) on the labelled `data`."""
    from serve.backends import create_runner
    ens_lib, fusions = _fusions()

    started = time.perf_counter()
    if resize not in RESIZE_CHOICES:
        raise ConfigError(f"unknown --resize {resize!r}; expected one of {', '.join(RESIZE_CHOICES)}")
    repo = ModelRepository(repository)
    available = repo.names()
    if not available:
        raise ConfigError(f"repository {repo.root} holds no models (no <name>/config.pbtxt)")
    ensembles = [e if isinstance(e, ens_lib.Ensemble) else _ensemble(e, repo, ens_lib) for e in ensembles]
    names = list(dict.fromkeys(models)) if models else ([] if ensembles else list(available))
    for ens in ensembles:
        for member in ens.members:
            if member not in names:
                names.append(member)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"model(s) {', '.join(unknown)} not in repository {repo.root} "
                          f"(models there: {', '.join(available)})")

    samples = read_samples(data)
    if limit is not None:
        samples = _spread(samples, limit)
    index_path = find_class_index(class_index)
    wnids = sum(is_wnid(s.label) for s in samples)
    notes = []
    if wnids and index_path is None:
        raise ConfigError(f"{wnids} images are labelled by ImageNet WordNet id (e.g. {samples[0].label}); "
                          f"their mapping needs {CLASS_INDEX_FILE}: pass --class-index FILE or set KERAS_HOME")
    cindex = read_class_index(index_path) if (wnids and index_path) else None

    members: list[Member] = []
    for name in names:
        try:
            entry = repo.entry(name)
            mode = entry.resize if resize == "model" else resize
            runner = create_runner(entry)
            member = Member(name, runner, entry, mode, (int(entry.input_spec.shape[0]), int(entry.input_spec.shape[1])))
            runner.load()
            member.truth = LabelMap(entry.labels(), int(entry.output_spec.shape[0]), cindex).truth(samples)
            if not (member.truth >= 0).any():
                member.error = (f"none of the data's labels (e.g. {samples[0].label!r}) is a class of this model "
                                "(its labels.txt), nor an ImageNet WordNet id it knows")
        except Exception as exc:  # a model that cannot load is reported, the others go on
            reason = str(exc) if isinstance(exc, KestrelError) else f"{type(exc).__name__}: {exc}"
            member = Member(name, None, None, "", (0, 0), error=reason)
        if member.error:
            log(f"{name}: {member.error}")
        members.append(member)
    if all(m.error for m in members):
        raise ConfigError("no model could be evaluated: " + "; ".join(f"{m.name}: {m.error}" for m in members))

    try:
        log(f"evaluating {', '.join(m.name for m in members if not m.error)} on {len(samples)} images from {data}")
        used, skipped, sample_pixels = predict_all(members, samples, batch_size=batch_size, progress=progress)
        if skipped:
            log(f"{len(skipped)} image(s) could not be decoded and were left out (listed in the report)")
        if not used:
            raise ConfigError(f"none of the {len(samples)} images in {data} could be decoded")
        latency = measure_latency(members, sample_pixels, ensembles, latency_runs)
    finally:
        for m in members:
            if m.runner is not None:
                try:
                    m.runner.close()
                except Exception:
                    pass

    used_idx = np.asarray(used)
    rows: list[Row] = []
    right: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    truth: dict[str, np.ndarray] = {}
    for m in members:
        if m.error:
            rows.append(Row(m.name, "model", 0, error=m.error))
            continue
        p = np.concatenate(m.probs)
        t = m.truth[used_idx]
        order = ranked(p)
        r1, r5 = topk_right(order, t, 1), topk_right(order, t, 5)
        probs[m.name], truth[m.name], right[m.name] = p, t, r1
        params = m.entry.parameters
        rows.append(Row(m.name, "model", len(t), float(r1.mean()), float(r5.mean()), wilson(int(r1.sum()), len(t)),
                        latency_ms=latency.get(m.name, {}), platform=m.entry.platform, resize=m.resize,
                        precision=params.get("precision", "fp32" if m.entry.platform == "onnxruntime_onnx" else ""),
                        unmapped=int((t < 0).sum()), predictions=order[:, 0].tolist()))
    for i, row in enumerate(rows):
        if row.error:
            continue
        ref = reference_of(row.name, repo.entry(row.name), list(right))
        if ref is not None:
            _compare(row, right[row.name], ref, right[ref], seed=i)

    for ens in ensembles:
        missing = [n for n in ens.members if n not in probs]
        if missing:
            rows.append(Row(ens.name, "fusion", 0, ensemble=ens.name, error=f"members not evaluated: {missing}"))
            continue
        t = truth[ens.members[0]]
        member_probs = [probs[n] for n in ens.members]
        best = max(ens.members, key=lambda n: right[n].mean())
        temperatures = getattr(ens, "temperatures", None)
        variants = [(f, None) for f in fusions] + ([(f, temperatures) for f in fusions] if temperatures else [])
        # temperatures fitted here are cross-fitted: each image fused with those fitted on the other folds
        variants += [(f, CROSS_FIT) for f in fusions] if temperature_folds else []
        if temperatures and ens.name in repo.ensemble_names():
            fitted_on = {k: v.string_value for k, v in repo.ensemble(ens.name).config.parameters.items()}.get(
                "temperatures_fitted_on", "")
            if fitted_on.startswith(str(Path(data).resolve())):
                notes.append(f"ensemble {ens.name}: its stored temperatures were fitted on these images "
                             f"({fitted_on}): the +T (stored) rows are optimistic; the +T (cv) rows are not")
        for j, (fusion, temps) in enumerate(variants):
            try:
                if temps == CROSS_FIT:
                    scores, order, fitted = ens_lib.cross_fitted(member_probs, t, fusion, folds=temperature_folds)
                    if fusion == fusions[0]:
                        notes.append(f"ensemble {ens.name}: +T (cv) rows fuse each image with temperatures fitted "
                                     f"on the other {temperature_folds - 1} of {temperature_folds} folds; fitted ("
                                     f"{', '.join(ens.members)}): "
                                     + "; ".join(",".join(f"{x:.3g}" for x in f) for f in fitted))
                elif temps:
                    scores, order = ens_lib.rank(member_probs, fusion, temperatures=temps)
                else:
                    scores, order = ens_lib.rank(member_probs, fusion)
            except (KestrelError, TypeError) as exc:
                rows.append(Row(fusion, "fusion", 0, ensemble=ens.name, error=str(exc)))
                continue
            r1, r5 = topk_right(order, t, 1), topk_right(order, t, 5)
            label = fusion + ("" if not temps else " +T (cv)" if temps == CROSS_FIT else " +T (stored)")
            row = Row(label, "fusion", len(t), float(r1.mean()), float(r5.mean()), wilson(int(r1.sum()), len(t)),
                      ensemble=ens.name, predictions=order[:, 0].tolist(), latency_ms=latency.get(ens.name, {}) if fusion == ens.fusion and not temps
                      else {})
            _compare(row, r1, best, right[best], seed=100 + j)
            rows.append(row)
            if fusion == ens.fusion and not temps:  # the served fusion against every member, not only the best
                versus = []
                for n in ens.members:
                    test = mcnemar_exact(r1, right[n])
                    versus.append(f"{n} {(r1.mean() - right[n].mean()) * 100:+.2f} points (McNemar p "
                                  f"{test['p_value']:.2g})")
                notes.append(f"ensemble {ens.name}: {fusion} (its fusion) vs each member: " + "; ".join(versus))
        oracle = np.any([right[n] for n in ens.members], axis=0)
        top5_oracle = np.any([topk_right(ranked(probs[n]), t, 5) for n in ens.members], axis=0)
        row = Row("oracle", "oracle", len(t), float(oracle.mean()), float(top5_oracle.mean()),
                  wilson(int(oracle.sum()), len(t)), ensemble=ens.name)
        _compare(row, oracle, best, right[best], seed=999)
        rows.append(row)
        slowest = {b: max(latency.get(n, {}).get(b, 0.0) for n in ens.members) for b in ("1", "8")}
        if ens.name in latency:
            ratios = ", ".join(f"batch {b}: {latency[ens.name][b] / slowest[b]:.2f}x"
                               for b in ("1", "8") if b in latency[ens.name] and slowest[b])
            notes.append(f"ensemble {ens.name} ({ens.fusion}, members concurrent) latency vs its slowest member: "
                         f"{ratios}")

    try:
        from serve import cpuinfo
        cpu = cpuinfo.describe()
    except Exception as exc:  # describing the CPU must never fail an evaluation
        cpu = {"summary": f"unknown CPU ({exc})"}
    unmapped = {r.name: r.unmapped for r in rows if r.unmapped}
    if unmapped:
        notes.append(f"images whose label is not a class of the model (counted wrong): {unmapped}")
    if latency_runs > 0:
        notes.append(f"latency: medians of {latency_runs} interleaved runs per batch size; on a loaded machine "
                     "they say little")
    if resize != "model":
        notes.append(f"every model resized with --resize {resize} (not its own mode)")
    classes = len({samples[i].label for i in used})
    return Evaluation(str(data), len(used), classes, rows, skipped, None if resize == "model" else resize, cpu,
                      time.perf_counter() - started, notes, files=[str(samples[i].path) for i in used],
                      truth={name: t.tolist() for name, t in truth.items()})


def _ensemble(spec: str, repo: ModelRepository, ens_lib):
    """'NAME=a,b[:fusion]', or the NAME of an ensemble defined in the repository (with its temperatures)."""
    if "=" not in spec and spec.strip() in repo.ensemble_names():
        return ens_lib.Ensemble.from_entry(repo.ensemble(spec.strip()))
    return ens_lib.Ensemble.parse(spec)


def _spread(samples: list[Sample], limit: int) -> list[Sample]:
    """At most `limit` samples, round-robin over labels so a small limit still covers many classes."""
    if limit <= 0:
        raise ConfigError(f"--limit must be a positive number, got {limit}")
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    out, queues = [], [groups[k] for k in sorted(groups)]
    depth = 0
    while len(out) < limit and any(len(q) > depth for q in queues):
        for q in queues:
            if len(q) > depth and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


# ---- output ---------------------------------------------------------------------------------
def plot(evaluation: Evaluation, path: Path) -> Path | None:
    """Top-1 against batch-1 and batch-8 latency per model (and ensemble default fusion)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the accuracy/latency plot needs matplotlib: install the 'bench' extra "
                          "(pip install 'kestrel[bench]'), or pass --no-plot") from None
    rows = [r for r in evaluation.rows if not r.error and r.latency_ms]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(LATENCY_BATCHES), figsize=(6 * len(LATENCY_BATCHES), 4.5), squeeze=False)
    for ax, b in zip(axes[0], LATENCY_BATCHES):
        for r in rows:
            if str(b) not in r.latency_ms:
                continue
            label = r.name if r.kind == "model" else f"{r.ensemble} ({r.name})"
            ax.scatter(r.latency_ms[str(b)], r.top1 * 100, marker="o" if r.kind == "model" else "s")
            ax.annotate(label, (r.latency_ms[str(b)], r.top1 * 100), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
            low, high = r.top1_interval
            ax.vlines(r.latency_ms[str(b)], low * 100, high * 100, alpha=0.3)
        ax.set_xlabel(f"batch-{b} latency (ms, median)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    cpu = cpu_text(evaluation.cpu)
    fig.suptitle(f"top-1 on {evaluation.images} images vs latency ({cpu})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(evaluation: Evaluation, out: str | Path, *, with_plot: bool = True) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "evaluation.json", "markdown": out / "evaluation.md"}
    for key, text in (("json", json.dumps(evaluation.to_dict(), indent=2) + "\n"), ("markdown", evaluation.markdown())):
        tmp = files[key].with_suffix(files[key].suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, files[key])
    if with_plot:
        png = plot(evaluation, out / "evaluation.png")
        if png is not None:
            files["png"] = png
    return files


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="labelled images: a folder of class folders (labels or ImageNet wnids) or a CSV "
                                "file,label")
    p.add_argument("--repository", default="models", help="model repository folder (default: models)")
    p.add_argument("--models", default="", help="comma-separated model names (default: every model, or only the "
                                                "ensembles' members when --ensemble is given)")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=a,b[:fusion]",
                   help="an ensemble to evaluate (repeatable; or the NAME of one defined in the repository): "
                        "every fusion, with and without temperatures, the oracle, its members")
    p.add_argument("--resize", choices=RESIZE_CHOICES, default="model",
                   help="image resize: each model's own mode (default), or force stretch/crop for all")
    p.add_argument("--class-index", help=f"ImageNet {CLASS_INDEX_FILE} for wnid folders "
                                         "(default: $KERAS_HOME/models/, ~/.keras/models/)")
    p.add_argument("--limit", type=int, help="evaluate at most N images (spread over the classes)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--latency-runs", type=int, default=DEFAULT_LATENCY_RUNS,
                   help="interleaved runs per batch size for the latency columns (0: skip)")
    p.add_argument("--temperature-folds", type=int, default=DEFAULT_TEMPERATURE_FOLDS,
                   help="ensembles: also report every fusion with per-member temperatures cross-fitted over this "
                        f"many folds (never fitted on the image scored; default {DEFAULT_TEMPERATURE_FOLDS}; 0: off)")
    p.add_argument("--output", "--out", dest="out", default="runs/evaluate",
                   help="folder for evaluation.json/.md/.png (default: runs/evaluate)")
    p.add_argument("--no-plot", action="store_true", help="do not draw evaluation.png")
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()  # TensorFlow/absl start-up lines, unless --verbose (KESTREL_VERBOSE=1)
    console.quiet_onnxruntime_logs()  # onnxruntime's own warnings (unused initializers ...), unless --verbose
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        evaluation = evaluate(args.data, args.repository, models, args.ensemble, resize=args.resize,
                              class_index=args.class_index, limit=args.limit, batch_size=args.batch_size,
                              latency_runs=args.latency_runs, progress=not args.quiet,
                              temperature_folds=args.temperature_folds,
                              log=lambda m: print(m, file=sys.stderr))
        files = write_outputs(evaluation, args.out, with_plot=not args.no_plot)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(evaluation.markdown())
    for image in evaluation.skipped:
        print(f"skipped {image['image']}: {image['reason']}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
