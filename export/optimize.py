"""Variants of an exported model: `<name>_int8`, `<name>_fp16` and TensorRT engines `<name>_trt_<precision>`.

    python -m export.optimize mobilenet_v2 --repository models --precision int8,fp16 \\
        --calibration ../shared/datasets/imagenet_val [--accuracy-images DIR] [--engine]

Input: the FP32 export `models/<name>/` (config.pbtxt + 1/model.onnx; uint8
NHWC "images" in, FP32 "probabilities" out, preprocessing in the graph) and,
when present, `models/<name>_keras/1/model.keras` (the accuracy reference).

Each variant becomes its own repository entry (config.pbtxt from
serve.repository.make_config, labels.txt, 1/model.onnx or 1/model.plan, and
accuracy.json), written into a temporary folder inside the repository and
renamed into place only after it loaded and passed its accuracy check: a failed
or interrupted run never leaves a half-written model behind.

Accuracy report (accuracy.json, also printed) and gate: the variant against the
Keras model (or the FP32 ONNX when there is no Keras entry or no TensorFlow) on
real images not used for calibration (`--accuracy-images`, default: a held-out,
class-stratified 20 % of the calibration folder plus its images beyond the ones
calibrated on; quantize.hold_out, whose count and reason are printed), resized
with the model's resize mode; synthetic images only when no real image was given:

- labelled images (class folders named by the model's labels or ImageNet wnids):
  top-1 accuracy of both, the ratio, a paired 95 % interval and McNemar's p; the
  variant must keep `--min-accuracy-ratio` (default 99 %) of the reference's top-1;
- otherwise: top-1 agreement where the reference is confident (top-1 p >= 0.5),
  at least `--min-agreement` (default 98 % INT8, 99 % FP16 / FP32 engines).

Also: top-1/top-5 agreement, relative L2 of the probability vectors, the worst
images, batch-1 latency against FP32 (one interleaved run of FP32 and every
variant, medians: all reports share one FP32 figure). A variant failing
its gate is not written and the command fails with the report, unless `--force`.

With `--engine`: TensorRT engines for every requested precision (fp32 and fp16
from the FP32 ONNX with the FP16 flag, int8 from a Q/DQ model quantized for
TensorRT); see export/tensorrt.py. Without TensorRT or a GPU, `--engine` fails
with a clear message *after* the ONNX variants were written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from serve import console
from serve import images as simages
from serve._files import publish_folder, staging_folder
from serve._optional import available
from serve.errors import ConfigError, KestrelError
from serve.repository import (LABELS_FILE, PLATFORM_ONNX, PLATFORM_TENSORRT, RESIZE_PARAMETER, ModelEntry,
                              ModelRepository, make_config, validate_name, write_config)

from . import quantize as quant
from . import tensorrt as trt_build

VARIANT_PRECISIONS = ("fp16", "int8")  # ONNX variants; fp32 is the export itself
DEFAULT_MIN_AGREEMENT = {"int8": 0.98, "fp16": 0.99, "fp32": 0.99}  # unlabelled gate: confident top-1 agreement
DEFAULT_MIN_ACCURACY_RATIO = 0.99  # labelled gate: variant top-1 >= 99 % of the reference's (MLPerf's rule)
CONFIDENT = 0.5  # the unlabelled gate counts images whose reference top-1 probability is at least this
MIN_CONFIDENT_IMAGES = 20  # fewer confident images: the gate falls back to top-1 agreement on all images
MIN_LABELLED_FRACTION = 0.9  # this share of the accuracy images must map to a class for the labelled gate
DEFAULT_MAX_EVAL_IMAGES = 1000
DEFAULT_LATENCY_RUNS = 30
REPORT_FILE = "accuracy.json"
WORST = 5


class AccuracyError(KestrelError):
    """A variant agreed with the reference less than the threshold; carries the report."""

    def __init__(self, message: str, report: "AccuracyReport"):
        super().__init__(message)
        self.report = report


# ---- accuracy report ------------------------------------------------------------------------
@dataclass
class AccuracyReport:
    variant: str
    precision: str
    reference: str
    images: int
    image_source: str
    top1_agreement: float
    top5_agreement: float
    rel_l2_median: float
    rel_l2_mean: float
    rel_l2_max: float
    min_agreement: float
    passed: bool
    worst: list[dict] = field(default_factory=list)
    gate: str = "agreement"  # "accuracy" (labelled images) or "agreement" (confident top-1 agreement)
    confident_agreement: float | None = None  # top-1 agreement where the reference's top-1 p >= CONFIDENT
    confident_images: int = 0
    labelled_images: int = 0
    reference_top1: float | None = None  # accuracy against the labels (labelled images only)
    variant_top1: float | None = None
    accuracy_ratio: float | None = None
    min_accuracy_ratio: float | None = None
    delta_top1_interval: list[float] | None = None  # paired bootstrap 95 % interval of variant - reference
    mcnemar_p: float | None = None
    calibration: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def text(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"{self.variant} ({self.precision}) vs {self.reference} on {self.images} images ({self.image_source}):"]
        if self.gate == "accuracy":
            low, high = self.delta_top1_interval or (0.0, 0.0)
            lines.append(
                f"  top-1 accuracy {self.variant_top1:.2%} vs {self.reference_top1:.2%} on {self.labelled_images} "
                f"labelled images = {self.accuracy_ratio:.2%} of the reference (threshold "
                f"{self.min_accuracy_ratio:.0%}: {verdict}); difference 95 % CI [{low * 100:+.2f}, {high * 100:+.2f}] "
                f"points, McNemar p {self.mcnemar_p:.3g}")
            agreement = f"  top-1 agreement {self.top1_agreement:.2%}"
        else:
            agreement = (f"  confident top-1 agreement {self.confident_agreement:.2%} on {self.confident_images} images "
                         f"(reference p >= {CONFIDENT}; threshold {self.min_agreement:.2%}: {verdict}), "
                         f"top-1 agreement {self.top1_agreement:.2%}")
        lines += [
            agreement + f", top-5 agreement {self.top5_agreement:.2%}",
            f"  relative L2: median {self.rel_l2_median:.4f}, mean {self.rel_l2_mean:.4f}, max {self.rel_l2_max:.4f}",
        ]
        if self.calibration:
            lines.append(f"  calibration: {self.calibration.get('images_used')} images, method "
                         f"{self.calibration.get('method')}, kept in float: "
                         f"{ {k: len(v) for k, v in self.calibration.get('kept_float_by_rule', {}).items()} }")
        if self.latency:
            together = [v for v in self.latency.get("measured_with", []) if v != self.variant]
            also = f" and {', '.join(together)}" if together else ""
            lines.append(f"  batch-1 latency: {self.latency['variant_ms']:.2f} ms vs FP32 {self.latency['fp32_ms']:.2f} ms "
                         f"= {self.latency['ratio']:.2f}x ({self.latency['runs']} runs, interleaved with FP32{also}; "
                         "medians)")
        if self.worst:
            lines.append("  worst images:")
            for w in self.worst:
                lines.append(f"    {w['image']}: rel L2 {w['rel_l2']:.3f}, reference {w['reference_top1']} "
                             f"({w['reference_p']:.3f}) vs {w['variant_top1']} ({w['variant_p']:.3f})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Agreement metrics of two (N, classes) probability arrays."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise ConfigError(f"cannot compare outputs of shapes {reference.shape} and {candidate.shape}")
    ref_top1 = reference.argmax(1)
    cand_top1 = candidate.argmax(1)
    k = min(5, reference.shape[1])
    cand_top5 = np.argpartition(-candidate, k - 1, axis=1)[:, :k]
    rel = np.linalg.norm(reference - candidate, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    return {
        "top1": float(np.mean(ref_top1 == cand_top1)),
        "top5": float(np.mean([ref_top1[i] in cand_top5[i] for i in range(len(reference))])),
        "rel_l2": rel,
        "ref_top1": ref_top1,
        "cand_top1": cand_top1,
    }


def accuracy_ratio(reference_top1: float, variant_top1: float) -> float:
    """The variant's top-1 as a fraction of the reference's (the labelled gate's measure); a reference
    that gets nothing right makes any variant at least as good."""
    if reference_top1 > 0:
        return float(variant_top1) / float(reference_top1)
    return 1.0 if variant_top1 <= 0 else float("inf")


def make_report(variant: str, precision: str, reference_name: str, reference: np.ndarray, candidate: np.ndarray,
                image_names: Sequence[str], *, image_source: str, min_agreement: float,
                labels: Sequence[str] | None = None, worst: int = WORST, truth: np.ndarray | None = None,
                min_accuracy_ratio: float = DEFAULT_MIN_ACCURACY_RATIO) -> AccuracyReport:
    """The report and its gate.

    With `truth` (class index per image, -1 unknown; at least MIN_LABELLED_FRACTION known) the gate
    is accuracy: variant top-1 >= `min_accuracy_ratio` x the reference's on the labelled images.
    Otherwise top-1 agreement with the reference on the images where it is confident (top-1
    probability >= CONFIDENT), >= `min_agreement`: a flip between two near-equal classes of an
    ambiguous image is not an error (all images when fewer than MIN_CONFIDENT_IMAGES are confident).
    """
    m = compare(reference, candidate)
    rel = m["rel_l2"]
    ref_p = np.asarray(reference, np.float64).max(axis=1)
    confident = ref_p >= CONFIDENT
    same = m["ref_top1"] == m["cand_top1"]
    if confident.sum() >= MIN_CONFIDENT_IMAGES:
        conf_agreement, conf_images = float(same[confident].mean()), int(confident.sum())
    else:
        conf_agreement, conf_images = float(same.mean()), int(len(same))
    gate = {"gate": "agreement", "confident_agreement": conf_agreement, "confident_images": conf_images}
    passed = conf_agreement >= min_agreement
    if truth is not None:
        truth = np.asarray(truth)
        known = truth >= 0
        if known.mean() >= MIN_LABELLED_FRACTION:
            from .evaluate import bootstrap_diff, mcnemar_exact
            ref_right = (m["ref_top1"] == truth)[known]
            var_right = (m["cand_top1"] == truth)[known]
            ref_acc, var_acc = float(ref_right.mean()), float(var_right.mean())
            ratio = accuracy_ratio(ref_acc, var_acc)
            _, low, high = bootstrap_diff(var_right, ref_right)
            gate.update(gate="accuracy", labelled_images=int(known.sum()), reference_top1=ref_acc,
                        variant_top1=var_acc, accuracy_ratio=float(ratio), min_accuracy_ratio=float(min_accuracy_ratio),
                        delta_top1_interval=[low, high], mcnemar_p=mcnemar_exact(var_right, ref_right)["p_value"])
            passed = var_acc >= min_accuracy_ratio * ref_acc

    def label(i: int) -> str:
        return labels[i] if labels and 0 <= i < len(labels) else str(i)

    # worst first: disagreements, then by relative L2
    order = sorted(range(len(rel)), key=lambda i: (m["ref_top1"][i] == m["cand_top1"][i], -rel[i]))[:worst]
    worst_rows = [{
        "image": str(image_names[i]), "rel_l2": float(rel[i]),
        "reference_top1": label(int(m["ref_top1"][i])), "reference_p": float(reference[i, m["ref_top1"][i]]),
        "variant_top1": label(int(m["cand_top1"][i])), "variant_p": float(candidate[i, m["cand_top1"][i]]),
    } for i in order]
    return AccuracyReport(
        variant=variant, precision=precision, reference=reference_name, images=int(len(rel)),
        image_source=image_source, top1_agreement=m["top1"], top5_agreement=m["top5"],
        rel_l2_median=float(np.median(rel)), rel_l2_mean=float(np.mean(rel)), rel_l2_max=float(np.max(rel)),
        min_agreement=float(min_agreement), passed=bool(passed), worst=worst_rows, **gate,
    )


def predict(runner, images: np.ndarray, batch_size: int = 16, *, progress: bool = False, desc: str = "") -> np.ndarray:
    """Run `runner` over `images` in batches; returns FP32 (N, classes)."""
    limit = runner.max_batch_size or batch_size
    batch_size = max(1, min(batch_size, limit))
    starts = range(0, len(images), batch_size)
    if progress:
        from serve.console import progress as tqdm  # bar on a terminal, lines in logs
        starts = tqdm(starts, desc=desc or runner.name, unit="batch", leave=False)
    return np.concatenate([runner.infer(images[s : s + batch_size]) for s in starts])


def interleaved_latency(runners: Sequence, image: np.ndarray, runs: int = DEFAULT_LATENCY_RUNS, warmup: int = 3) -> list[float]:
    """Median batch-1 latency (ms) of each runner, calls interleaved so load affects all alike."""
    batch = image[None] if image.ndim == 3 else image[:1]
    for runner in runners:
        for _ in range(warmup):
            runner.infer(batch)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for i, runner in enumerate(runners):
            start = time.perf_counter()
            runner.infer(batch)
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t) * 1000.0) for t in times]


# ---- repository entries, written atomically ------------------------------------------------
def _staging_dir(repo: ModelRepository, name: str) -> Path:
    repo.root.mkdir(parents=True, exist_ok=True)
    # mkdtemp's folder is private (0700): renamed into place it must be as readable as its siblings
    return staging_folder(repo.root, f".tmp-{name}-")


def stage_entry(repo: ModelRepository, base: ModelEntry, name: str, platform: str, *,
                max_batch_size: int | None = None, parameters: dict | None = None) -> Path:
    """A staging folder holding config.pbtxt (with the base's resize mode), labels.txt and an
    empty version folder 1/."""
    folder = _staging_dir(repo, name)
    config = make_config(name, platform, base.input_spec, base.output_spec,
                         max_batch_size=max_batch_size or base.max_batch_size,
                         labels=base.labels() is not None, parameters=parameters,
                         resize=base.parameters.get(RESIZE_PARAMETER))
    write_config(config, folder)
    labels_file = base.path / LABELS_FILE
    if base.labels() is not None and labels_file.is_file():
        shutil.copyfile(labels_file, folder / LABELS_FILE)
    (folder / "1").mkdir()
    return folder


def commit_entry(repo: ModelRepository, staging: Path, name: str, *, force: bool) -> Path:
    """Rename `staging` to the entry's folder; an existing entry is replaced only with force."""
    target = repo.folder(name)
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to replace it")
    previous = publish_folder(staging, target)  # in one step: a polling server never sees half a model
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def _onnx_runner(name: str, path: Path, base: ModelEntry, **options):
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    return OnnxRuntimeRunner(name, path, base.input_spec, base.output_spec, labels=base.labels(),
                             max_batch_size=base.max_batch_size, **options)


# ---- the reference --------------------------------------------------------------------------
def reference_runner(repo: ModelRepository, name: str, base: ModelEntry, reference: str = "auto"):
    """(runner, description): the Keras model when present and loadable, else the FP32 ONNX."""
    keras_name = f"{name}_keras"
    if reference in ("auto", "keras") and keras_name in repo.names():
        if available("tensorflow") and available("serve.backends.keras"):
            from serve.backends import create_runner
            return create_runner(repo.entry(keras_name)), f"keras:{keras_name}"
        if reference == "keras":
            raise ConfigError(f"--reference keras needs TensorFlow and serve.backends.keras to load {keras_name}")
    elif reference == "keras":
        raise ConfigError(f"--reference keras: there is no {keras_name} entry in {repo.root}")
    return _onnx_runner(name, base.artifact(), base), f"onnx:{name}"


# ---- orchestration --------------------------------------------------------------------------
def parse_precisions(value: str | Sequence[str], *, engine: bool = False) -> list[str]:
    """Validated, de-duplicated precisions; none at all with `engine` means the FP32 engine."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        trt_build.check_precision(item)
        if item not in out:
            out.append(item)
    if not out and engine:
        return ["fp32"]
    if not out:
        raise ConfigError(f"--precision needs at least one of {', '.join(trt_build.PRECISIONS)}; got {value!r}")
    return out


def _thresholds(min_agreement: float | dict | None) -> dict[str, float]:
    out = dict(DEFAULT_MIN_AGREEMENT)
    if isinstance(min_agreement, dict):
        out.update(min_agreement)
    elif min_agreement is not None:
        out = {k: float(min_agreement) for k in out}
    for key, value in out.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--min-agreement must be between 0 and 1 (a fraction), got {value}")
    return out


def image_truth(paths: Sequence[Path], base: ModelEntry, class_index=None) -> np.ndarray | None:
    """Class index per image from its folder name (a label of the model, or an ImageNet wnid through
    the class index), or None when fewer than MIN_LABELLED_FRACTION of the images map to a class.
    `class_index` False: never labelled."""
    if class_index is False or not paths:
        return None
    from . import evaluate as ev
    samples = [ev.Sample(Path(p), Path(p).parent.name) for p in paths]
    index = None
    if any(ev.is_wnid(s.label) for s in samples):
        path = ev.find_class_index(class_index)
        index = ev.read_class_index(path) if path is not None else None
    truth = ev.LabelMap(base.labels(), int(base.output_spec.shape[0]), index).truth(samples)
    return truth if (truth >= 0).mean() >= MIN_LABELLED_FRACTION else None


@dataclass
class Images:
    calibration: quant.ImageSet | None
    evaluation: quant.ImageSet
    source: str
    calibration_note: str = ""  # how the calibration images relate to the folder ("a sample of 300 of the 926 ...")
    holdout_note: str = ""  # why the hold-out has the size it has (quantize.HoldOut.why)


def image_folders(accuracy_images) -> list:
    return [] if accuracy_images is None else (
        [accuracy_images] if isinstance(accuracy_images, (str, Path)) else list(accuracy_images))


def check_image_inputs(*, calibration, accuracy_images, need_calibration: bool) -> None:
    """The image folders exist and INT8 has calibration images: checked before anything else (an existing
    variant, the reference model), so the first message names what is missing."""
    if need_calibration and calibration is None:
        raise ConfigError("INT8 needs calibration images: pass --calibration DIR (a folder searched recursively)")
    for flag, folder in [("--calibration", calibration)] + [("--accuracy-images", f)
                                                           for f in image_folders(accuracy_images)]:
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder}: the folder does not exist")


def gather_images(image_size, *, calibration, accuracy_images, holdout, qoptions, need_calibration,
                  max_eval, progress, mode: str = simages.DEFAULT_RESIZE) -> Images:
    """Calibration and evaluation images, never overlapping.

    Evaluation = every `accuracy_images` folder, plus the held-out `holdout`
    fraction of the calibration folder (default: 20 % when no accuracy folder
    is given, none otherwise; quantize.hold_out: stratified by class folder,
    single-image folders held out whole when nothing else can be). With the
    default holdout, the calibration part's images beyond the `max_images`
    calibrated on are evaluated too (never calibrated on; more images, a
    tighter gate), up to `max_eval` in all.

    Synthetic images stand in only when no real image was given at all; real
    images that leave nothing to evaluate on are an error naming --holdout and
    --accuracy-images.
    """
    default_holdout = holdout is None and not image_folders(accuracy_images)
    folders = image_folders(accuracy_images)
    if holdout is None:
        holdout = 0.0 if folders else quant.DEFAULT_HOLDOUT
    check_image_inputs(calibration=calibration, accuracy_images=folders, need_calibration=need_calibration)
    all_cal: list[Path] = simages.find_images(calibration) if calibration is not None else []
    cal_paths = list(all_cal)
    eval_paths: list[Path] = []
    sources = []
    held_count, holdout_note = 0, ""
    if cal_paths and holdout > 0:
        split = quant.hold_out(cal_paths, holdout)
        cal_paths, held_count = split.calibration, len(split.held)
        eval_paths += split.held
        if split.held:
            sources.append(split.count(calibration))
            holdout_note = split.why()
    extra: list[Path] = []
    for folder in folders:
        found = simages.find_images(folder)
        extra += found
        sources.append(f"{folder} ({len(found)} files)")
    cal_set = None
    note = ""
    if need_calibration:
        overlap = set(map(str, cal_paths)) & set(map(str, extra))
        if overlap:
            raise ConfigError(f"{len(overlap)} accuracy images are also calibration images (e.g. {sorted(overlap)[0]}); "
                              "use a separate --accuracy-images folder or --holdout")
        cal_set = quant.load_calibration(cal_paths, image_size, qoptions, source=calibration, progress=progress,
                                         mode=mode, held_out=held_count)
        rest = f"the {len(cal_paths)} not held out" if held_count else f"its {len(cal_paths)} images"
        if len(cal_set) + len(cal_set.skipped) < len(cal_paths):
            note = (f"a sample of {len(cal_set)} of {rest}, every class in turn (--max-calibration-images "
                    f"{qoptions.max_images})")
        else:
            note = f"all {rest}" + (f" but {len(cal_set.skipped)} undecodable" if cal_set.skipped else "")
        if default_holdout:
            used = set(map(str, cal_set.paths)) | {str(p) for p, _ in cal_set.skipped}
            unused = [p for p in cal_paths if str(p) not in used]
            if unused:
                eval_paths += unused
                sources.append(f"{len(unused)} more of its images not calibrated on")
    held_set = quant.load_images(eval_paths, image_size, limit=max_eval, progress=progress, desc="held-out images",
                                 mode=mode)
    extra_set = quant.load_images(extra, image_size, progress=progress, desc="accuracy images", mode=mode)
    eval_set = quant.ImageSet(np.concatenate([held_set.images, extra_set.images]), held_set.paths + extra_set.paths,
                              held_set.skipped + extra_set.skipped)
    source = " + ".join(sources)
    if len(eval_set) == 0:
        if all_cal or extra:  # real images were given: never judge on synthetic ones instead
            why = []
            if folders:
                why.append(f"--accuracy-images {', '.join(map(str, folders))}: no decodable image")
            if all_cal:
                why.append(f"--calibration {calibration}: " + (
                    f"--holdout {holdout:g} holds none of its {len(all_cal)} images out" if not held_count else
                    f"none of the {held_count} images held out could be decoded"))
            raise ConfigError("no real images are left for the accuracy report (" + "; ".join(why) + "): pass "
                              "--holdout 0.2 to hold out a fifth of the calibration folder, or --accuracy-images DIR")
        eval_set = quant.ImageSet(simages.synthetic_images(32, image_size, seed=1),
                                  [Path(f"synthetic-{i}") for i in range(32)])
        source = "32 synthetic images (no real images were given: pass --accuracy-images or --calibration)"
    return Images(cal_set, eval_set, source, note, holdout_note)


def optimize(repository: str | Path, name: str, *, precisions: Sequence[str] | str, calibration: str | Path | None = None,
             engine: bool = False, engine_only: bool = False,
             accuracy_images: str | Path | Sequence[str | Path] | None = None,
             min_agreement: float | dict | None = None, force: bool = False, holdout: float | None = None,
             quantize_options: quant.QuantizeOptions | None = None, min_batch: int | None = None,
             opt_batch: int | None = None, max_batch: int | None = None,
             workspace_mb: int = trt_build.DEFAULT_WORKSPACE_MB, timing_cache: str | Path | None = None,
             reference: str = "auto", max_eval_images: int = DEFAULT_MAX_EVAL_IMAGES,
             latency_runs: int = DEFAULT_LATENCY_RUNS, progress: bool = True, log=print,
             min_accuracy_ratio: float | None = None, class_index: str | Path | None = None,
             labelled: bool | None = None, suffix: str = "") -> dict[str, AccuracyReport]:
    """Build the requested variants of repository entry `name`; returns {variant name: report}.

    `precisions`: any of fp32, fp16, int8. ONNX variants are built for fp16 and
    int8 (fp32 is the export itself); with `engine`, a TensorRT engine for each.
    """
    repo = ModelRepository(repository)
    base = repo.entry(name)
    if base.platform != PLATFORM_ONNX:
        raise ConfigError(f"model '{name}' is {base.platform!r}; optimize needs the FP32 ONNX export ({PLATFORM_ONNX})")
    wanted = parse_precisions(precisions, engine=engine or engine_only)
    if suffix:
        validate_name(f"{name}_int8{suffix}")
    thresholds = _thresholds(min_agreement)
    accuracy_ratio = DEFAULT_MIN_ACCURACY_RATIO if min_accuracy_ratio is None else float(min_accuracy_ratio)
    if not 0.0 < accuracy_ratio <= 1.5:
        raise ConfigError(f"--min-accuracy-ratio must be a fraction such as 0.99, got {accuracy_ratio}")
    if labelled is False:
        class_index = False
    qoptions = quantize_options or quant.QuantizeOptions()
    build_engines = engine or engine_only
    profile = trt_build.compute_profile(min_batch, opt_batch, max_batch) if build_engines else None
    onnx_variants = [] if engine_only else [p for p in VARIANT_PRECISIONS if p in wanted]
    if not build_engines and not onnx_variants:
        raise ConfigError(f"nothing to build: --precision {','.join(wanted)} without --engine "
                          f"(ONNX variants exist for {', '.join(VARIANT_PRECISIONS)}; fp32 is the export itself)")
    need_cal = "int8" in wanted
    check_image_inputs(calibration=calibration, accuracy_images=accuracy_images, need_calibration=need_cal)
    for variant in [f"{name}_{p}{suffix}" for p in onnx_variants] + (
            [trt_build.engine_name(name, p) for p in wanted] if build_engines else []):
        if repo.folder(variant).exists() and not force:
            raise ConfigError(f"{repo.folder(variant)} already exists; pass --force to replace it")
    device = trt_build.probe_device() if build_engines and engine_only else None

    image_size = (int(base.input_spec.shape[0]), int(base.input_spec.shape[1]))
    imgs = gather_images(image_size, calibration=calibration, accuracy_images=accuracy_images, holdout=holdout,
                         qoptions=qoptions, need_calibration=need_cal, max_eval=max_eval_images, progress=progress,
                         mode=base.resize)
    if imgs.calibration is not None:
        log(f"calibration: {len(imgs.calibration)} images from {calibration} ({imgs.calibration_note})")
    log(f"accuracy images: {len(imgs.evaluation)} ({imgs.source})")
    if imgs.holdout_note:
        log(f"hold-out: {imgs.holdout_note}; never calibrated on")

    ref_runner, ref_name = reference_runner(repo, name, base, reference)
    with ref_runner:
        ref_probs = predict(ref_runner, imgs.evaluation.images, progress=progress, desc=f"reference {ref_name}")
    names = [str(p) for p in imgs.evaluation.paths]
    truth = image_truth(imgs.evaluation.paths, base, class_index)
    if truth is not None:
        log(f"accuracy gate: {int((truth >= 0).sum())} of {len(truth)} accuracy images are labelled (class folders); "
            f"variants must keep {accuracy_ratio:.0%} of the reference's top-1 accuracy")
    else:
        log("accuracy images are not labelled by class folder: the gate is top-1 agreement with the reference "
            f"where it is confident (top-1 probability >= {CONFIDENT})")
    fp32 = _onnx_runner(name, base.artifact(), base)
    reports: dict[str, AccuracyReport] = {}
    failures: list[AccuracyReport] = []

    def judge(variant: str, precision: str, staging: Path, runner, extra: dict) -> AccuracyReport:
        """The variant's accuracy report (latency comes later, for all variants of a group at once: the runner
        stays loaded until then, and finish() closes it)."""
        probs = predict(runner.load(), imgs.evaluation.images, progress=progress, desc=variant)
        report = make_report(variant, precision, ref_name, ref_probs, probs, names, image_source=imgs.source,
                             min_agreement=thresholds[precision], labels=base.labels(), truth=truth,
                             min_accuracy_ratio=accuracy_ratio)
        report.calibration = extra.get("calibration", {})
        report.notes = extra.get("notes", [])
        return report

    def finish(group: list) -> None:
        """Batch-1 latency of FP32 and every variant of `group` [(variant, staging, runner, report)] in one
        interleaved run, so each variant is compared with the same FP32 figure (measured per variant, FP32 gave
        5.84 ms in one section and 9.10 ms in the next of one run); then write, print, commit or refuse each."""
        runners = [g[2] for g in group if g[2] is not None]
        try:
            if latency_runs > 0 and group:
                with contextlib.ExitStack() as stack:
                    for runner in [fp32] + [g[2] for g in group]:
                        stack.enter_context(runner)
                    f_ms, *v_ms = interleaved_latency([fp32] + [g[2] for g in group],
                                                      imgs.evaluation.images[0], latency_runs)
                others = [g[0] for g in group]
                log(f"batch-1 latency ({latency_runs} interleaved runs, medians): FP32 {f_ms:.2f} ms; "
                    + "; ".join(f"{v} {ms:.2f} ms = {ms / f_ms:.2f}x" for v, ms in zip(others, v_ms)))
                for (variant, _, _, report), ms in zip(group, v_ms):
                    report.latency = {"variant_ms": ms, "fp32_ms": f_ms, "ratio": ms / f_ms, "runs": latency_runs,
                                      "batch": 1, "fp32": f"onnxruntime {name}", "measured_with": others}
            while group:
                variant, staging, _, report = group[0]
                (staging / REPORT_FILE).write_text(report.to_json())
                reports[variant] = report
                log(report.text())
                if not report.passed and not force:
                    failures.append(report)
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    if not report.passed:
                        log(f"{variant}: below the threshold, written anyway (--force)")
                    target = commit_entry(repo, staging, variant, force=force)
                    log(f"wrote {target}")
                group.pop(0)
        finally:
            for _, staging, _, _ in group:  # an error: nothing half-made is left behind
                shutil.rmtree(staging, ignore_errors=True)
            for runner in runners:  # loaded since judge()
                runner.close(final=False)

    # ---- ONNX variants
    group: list = []
    try:
        for precision in onnx_variants:
            variant = f"{name}_{precision}{suffix}"
            staging = stage_entry(repo, base, variant, PLATFORM_ONNX,
                                  parameters={"source": name, "precision": precision})
            group.append((variant, staging, None, None))
            model_path = staging / "1" / "model.onnx"
            extra: dict = {}
            if precision == "int8":
                result = quant.quantize(base.artifact(), model_path, imgs.calibration, qoptions,
                                        input_name=base.input_spec.name, progress=progress)
                extra["calibration"] = result.summary()
                log(f"{variant}: quantized with {result.images_used} calibration images")
                if result.float_between_qdq:
                    log(f"warning: {variant} keeps {len(result.float_between_qdq)} float layer(s) between quantized "
                        f"ones (e.g. {result.float_between_qdq[0]}): Kestrel runs them as written, but onnxruntime's "
                        "default WeightBiasQuantization transformer (Triton, plain onnxruntime) re-quantizes them "
                        "per tensor; pass disabled_optimizers=['WeightBiasQuantization'] there")
            else:
                from . import fp16
                fp16.convert(base.artifact(), model_path)
                extra["notes"] = ["FP16 is meant for GPU runtimes; on CPU onnxruntime runs it through casts (slower)"]
            runner = _onnx_runner(variant, model_path, base)
            group[-1] = (variant, staging, runner, judge(variant, precision, staging, runner, extra))
    except BaseException:
        for _, staging, runner, _ in group:
            shutil.rmtree(staging, ignore_errors=True)
            if runner is not None:
                runner.close(final=False)
        raise
    finish(group)

    # ---- TensorRT engines
    if build_engines:
        device = device or trt_build.probe_device()  # raises with a clear message; ONNX variants are written
        cache_path = trt_build.timing_cache_path(timing_cache, repo.root, device)
        group = []
        try:
            for precision in wanted:
                variant = trt_build.engine_name(name, precision)
                staging = stage_entry(repo, base, variant, PLATFORM_TENSORRT, max_batch_size=profile.max,
                                      parameters={"source": name, "precision": precision})
                group.append((variant, staging, None, None))
                plan = staging / "1" / "model.plan"
                extra = {}
                source = base.artifact()
                if precision == "int8":
                    source = staging / "qdq_tensorrt.onnx"
                    topt = quant.QuantizeOptions(**{**asdict(qoptions), "target": "tensorrt"})
                    result = quant.quantize(base.artifact(), source, imgs.calibration, topt,
                                            input_name=base.input_spec.name)
                    extra["calibration"] = result.summary()
                rebuild = trt_build.rebuild_command(name, repo.root, precision, profile, workspace_mb=workspace_mb,
                                                    calibration=calibration)
                meta = trt_build.make_metadata(
                    device, precision=precision, profile=profile, input_name=base.input_spec.name,
                    output_name=base.output_spec.name, image_size=image_size,
                    source=f"{name}/{base.artifact().parent.name}/{base.artifact().name}",
                    source_sha256=trt_build.sha256(base.artifact()), rebuild=rebuild, workspace_mb=workspace_mb)
                log(f"{variant}: building TensorRT engine (profile {profile.as_dict()}, timing cache {cache_path})")
                trt_build.build_engine(source, plan, meta, profile=profile, workspace_mb=workspace_mb,
                                       timing_cache=cache_path)
                if precision == "int8":
                    Path(source).unlink(missing_ok=True)
                from serve.backends.tensorrt import TensorRTRunner
                runner = TensorRTRunner(variant, plan, base.input_spec, base.output_spec, labels=base.labels(),
                                        max_batch_size=profile.max)
                group[-1] = (variant, staging, runner, judge(variant, precision, staging, runner, extra))
        except BaseException:
            for _, staging, runner, _ in group:
                shutil.rmtree(staging, ignore_errors=True)
                if runner is not None:
                    runner.close(final=False)
            raise
        finish(group)  # the engines against FP32 on onnxruntime, measured together once more

    if failures:
        text = "\n".join(r.text() for r in failures)
        gates = sorted({r.gate for r in failures})
        what = " / ".join("the accuracy threshold" if g == "accuracy" else "the agreement threshold" for g in gates)
        option = " / ".join("--min-accuracy-ratio" if g == "accuracy" else "--min-agreement" for g in gates)
        raise AccuracyError(
            f"{len(failures)} variant(s) below {what} and not written "
            f"(pass --force to write them anyway, or {option}):\n{text}", failures[0])
    return reports


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.optimize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="repository entry of the FP32 ONNX export (models/<name>/)")
    p.add_argument("--repository", default="models", help="model repository folder (default: models)")
    p.add_argument("--precision", default="int8", help="comma-separated: fp32,fp16,int8 (default: int8)")
    p.add_argument("--calibration", help="folder of calibration images (searched recursively); needed for int8")
    p.add_argument("--accuracy-images", action="append", metavar="DIR",
                   help="folder of real images for the accuracy report (repeatable; default: a held-out 20%% "
                        "of the calibration folder)")
    p.add_argument("--holdout", type=float,
                   help="fraction of the calibration folder held out for the report, never calibrated on "
                        "(default: 0.2 without --accuracy-images, 0 with): that fraction of each class folder, at "
                        "least one image each, topped up with whole single-image folders to reach it overall")
    p.add_argument("--min-accuracy-ratio", type=float, default=DEFAULT_MIN_ACCURACY_RATIO,
                   help="labelled accuracy images (class folders named by the model's labels or ImageNet wnids): "
                        "a variant's top-1 accuracy must be at least this fraction of the reference's "
                        "(default %(default)s)")
    p.add_argument("--min-agreement", type=float, help="unlabelled accuracy images: top-1 agreement threshold where "
                   f"the reference is confident (top-1 p >= {CONFIDENT}), a fraction "
                   "(default 0.98 for int8, 0.99 for fp16/fp32)")
    p.add_argument("--class-index", help="ImageNet imagenet_class_index.json for wnid folders "
                                         "(default: $KERAS_HOME/models/)")
    p.add_argument("--unlabelled", action="store_true",
                   help="use the agreement gate even when the accuracy images are labelled")
    p.add_argument("--variant-suffix", default="", metavar="SUFFIX",
                   help="append SUFFIX to the ONNX variants' names (mobilenet_v2_int8_nncf with _nncf), to keep "
                        "several candidates side by side for export.evaluate")
    p.add_argument("--force", action="store_true", help="replace existing entries; write variants below the threshold")
    p.add_argument("--reference", choices=("auto", "keras", "onnx"), default="auto",
                   help="what variants are compared with (default: <name>_keras when loadable, else the FP32 ONNX)")
    p.add_argument("--max-eval-images", type=int, default=DEFAULT_MAX_EVAL_IMAGES)
    p.add_argument("--latency-runs", type=int, default=DEFAULT_LATENCY_RUNS,
                   help="batch-1 latency runs against FP32 in the report (0: skip)")
    q = p.add_argument_group("INT8 quantization")
    q.add_argument("--quantizer", choices=quant.QUANTIZERS, default=quant.QuantizeOptions.quantizer,
                   help="onnxruntime static quantization, or NNCF's post-training quantization (extra 'nncf')")
    q.add_argument("--symmetric-activations", action="store_true",
                   help="onnxruntime: int8 activations with zero point 0 (default: uint8 asymmetric)")
    q.add_argument("--no-bias-correction", action="store_true", help="nncf: skip its fast bias correction")
    q.add_argument("--equalize", choices=quant.EQUALIZATION, default=quant.QuantizeOptions.equalize,
                   help="onnxruntime: equalize channel ranges of Conv -> ReLU -> depthwise pairs before quantizing "
                        "(all pairs, the first only, or none; export/equalize.py)")
    q.add_argument("--no-exact-input", action="store_true",
                   help="onnxruntime: re-quantize the normalised input instead of feeding the uint8 image to the "
                        "stem as its quantized input (export/exact_input.py)")
    q.add_argument("--calibration-method", choices=quant.METHODS, default=quant.QuantizeOptions.method)
    q.add_argument("--percentile", type=float, default=quant.QuantizeOptions.percentile)
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default: per channel)")
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights (for CPUs without VNNI)")
    q.add_argument("--keep-float", default=",".join(quant.DEFAULT_KEEP_FLOAT),
                   help=f"rules for nodes left in float, comma-separated, from {', '.join(quant.KEEP_FLOAT_RULES)} "
                        "('none' for none)")
    q.add_argument("--float-prefix", type=int, default=quant.QuantizeOptions.float_prefix,
                   help="keep the first N compute layers (Conv/MatMul/Gemm) in float (mixed precision)")
    q.add_argument("--exclude-nodes", default="", help="extra node names to leave in float, comma-separated")
    q.add_argument("--min-calibration-images", type=int, default=quant.DEFAULT_MIN_IMAGES)
    q.add_argument("--max-calibration-images", type=int, default=quant.DEFAULT_MAX_IMAGES)
    t = p.add_argument_group("TensorRT")
    t.add_argument("--engine", action="store_true", help="also build TensorRT engines <name>_trt_<precision>")
    t.add_argument("--engine-only", action="store_true", help="build only the TensorRT engines")
    t.add_argument("--min-batch", type=int)
    t.add_argument("--opt-batch", type=int)
    t.add_argument("--max-batch", type=int)
    t.add_argument("--workspace-mb", type=int, default=trt_build.DEFAULT_WORKSPACE_MB)
    t.add_argument("--timing-cache", help="timing cache file or folder (default: <repository>/.tensorrt/)")
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    return console.add_examples(p, "mobilenet_v2 --precision int8 --calibration photos/",
                                "mobilenet_v2 --precision fp16,int8 --calibration photos/ --engine   # on a GPU")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()
    console.quiet_onnxruntime_logs()  # onnxruntime's own warnings (unused initializers ...), unless --verbose
    try:
        keep = tuple(r for r in args.keep_float.split(",") if r and r != "none")
        qoptions = quant.QuantizeOptions(
            method=args.calibration_method, percentile=args.percentile, per_channel=not args.per_tensor,
            reduce_range=args.reduce_range, keep_float=keep, float_prefix=args.float_prefix,
            exclude_nodes=tuple(n for n in args.exclude_nodes.split(",") if n),
            min_images=args.min_calibration_images, max_images=args.max_calibration_images,
            quantizer=args.quantizer, symmetric_activations=args.symmetric_activations,
            fast_bias_correction=not args.no_bias_correction, exact_input=not args.no_exact_input,
            equalize=args.equalize)
        optimize(args.repository, args.name, precisions=args.precision, calibration=args.calibration,
                 engine=args.engine, engine_only=args.engine_only, accuracy_images=args.accuracy_images,
                 min_agreement=args.min_agreement, force=args.force, holdout=args.holdout, quantize_options=qoptions,
                 min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                 workspace_mb=args.workspace_mb, timing_cache=args.timing_cache, reference=args.reference,
                 max_eval_images=args.max_eval_images, latency_runs=args.latency_runs, progress=not args.quiet,
                 min_accuracy_ratio=args.min_accuracy_ratio, class_index=args.class_index,
                 labelled=False if args.unlabelled else None, suffix=args.variant_suffix)
    except AccuracyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KestrelError as exc:  # ModelNotFoundError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
