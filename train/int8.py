"""The trained model's INT8 variant, calibrated on the training photos and gated by labelled test accuracy.

    report = build_int8(repository, "flower_photos", calibration=train_paths, test_images=pixels,
                        test_labels=y_test, min_ratio=0.99)

After `--export` wrote `<repository>/<name>/` (FP32 ONNX), this makes
`<repository>/<name>_int8/` with export's quantizer (`export.quantize.quantize`,
the rules `python -m export.optimize` uses) calibrated on the *training*
photos, then runs both models with Kestrel's onnxruntime backend (which keeps
onnxruntime's WeightBiasQuantization optimizer disabled, as the server does) on
the labelled test split the training run held out:

    FP32 top-1 accuracy, INT8 top-1 accuracy, their ratio, top-1 agreement,
    and batch-1 latency of both (interleaved medians, measured in process)

The variant is written (staged inside the repository, renamed into place) only
when INT8 accuracy >= `min_ratio` x FP32 accuracy (default 0.99), unless
`force`; otherwise `Int8GateError` carries the report and nothing is written.
The gate is on labels, not on agreement with FP32: an INT8 model that changes
answers FP32 got wrong costs nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from serve._optional import require
from serve.errors import ConfigError, KestrelError

DEFAULT_MIN_RATIO = 0.99
DEFAULT_LATENCY_RUNS = 30


@dataclass
class Int8Report:
    variant: str
    fp32_accuracy: float
    int8_accuracy: float
    ratio: float
    min_ratio: float
    passed: bool
    written: bool
    test_images: int
    top1_agreement: float
    calibration_images: int
    calibration: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    int8_predictions: list[int] = field(default_factory=list)
    fp32_predictions: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"{self.variant}: INT8 test accuracy {self.int8_accuracy:.4f} vs FP32 {self.fp32_accuracy:.4f} "
                 f"on {self.test_images} labelled test images = {self.ratio:.2%} of FP32 (gate {self.min_ratio:.0%}: "
                 f"{verdict}); top-1 agreement {self.top1_agreement:.2%}; calibrated on {self.calibration_images} "
                 "training images"]
        if self.latency:
            lines.append(f"  batch-1 latency (in process, {self.latency['runs']} interleaved runs, medians): INT8 "
                         f"{self.latency['int8_ms']:.2f} ms vs FP32 {self.latency['fp32_ms']:.2f} ms = "
                         f"{self.latency['ratio']:.2f}x")
        lines.append("  written" if self.written else "  not written")
        return "\n".join(lines)


class Int8GateError(KestrelError):
    """INT8 accuracy fell below the gate; nothing was written. Carries the report."""

    def __init__(self, message: str, report: Int8Report):
        super().__init__(message)
        self.report = report


def gate(fp32_accuracy: float, int8_accuracy: float, min_ratio: float) -> tuple[float, bool]:
    """(ratio, passed): INT8 passes when its accuracy is at least `min_ratio` of FP32's."""
    if not 0 < min_ratio <= 1:
        raise ConfigError(f"--int8-min-ratio {min_ratio}: expected a fraction in (0, 1], e.g. 0.99")
    from export.optimize import accuracy_ratio  # the ratio export.optimize's labelled gate uses

    ratio = accuracy_ratio(fp32_accuracy, int8_accuracy)
    return ratio, bool(ratio >= min_ratio - 1e-12)


def _runner(name: str, path: Path, entry):
    from serve.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(name, path, entry.input_spec, entry.output_spec, labels=entry.labels(),
                             max_batch_size=entry.max_batch_size)


ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish")
FLIP_LAYERS = ("flip_width_last", "flip_mirror", "flip_width_back")  # train.bases.horizontal_flip's layers


def branch_entry_nodes(model) -> tuple[str, ...]:
    """Nodes export's keep-float rules would keep in float if each branch were the whole model
    (`model`: an onnx.ModelProto or the path of one).

    export.quantize keeps the *first* Conv (rule first_conv) and the *first* depthwise Conv
    (rule sensitive) in float: in graph order, so in a model running the base twice (`--flip-tta`)
    only one branch is protected. Here: every Conv with no Conv before it, every depthwise Conv
    with no depthwise before it (with the activation that follows each), and the mirror layers.
    For a one-branch model these are the nodes the rules keep already.
    """
    from export import _graph

    if not hasattr(model, "graph"):  # a path
        model = require("onnx", "INT8 quantization").load(str(model), load_external_data=False)
    graph = model.graph
    before: dict[str, tuple[int, int]] = {}  # tensor -> (Convs, depthwise Convs) on the longest path to it
    consumers = _graph.consumers(graph)
    keep: list[str] = []
    for node in graph.node:
        convs = max((before.get(t, (0, 0))[0] for t in node.input), default=0)
        depthwise = max((before.get(t, (0, 0))[1] for t in node.input), default=0)
        is_conv = node.op_type == "Conv"
        is_depthwise = _graph.is_depthwise(node)
        if (is_conv and convs == 0) or (is_depthwise and depthwise == 0):
            keep.append(node.name)
            keep.extend(user.name for user in consumers.get(node.output[0], []) if user.op_type in ACTIVATIONS)
        elif any(f"/{layer}" in node.name for layer in FLIP_LAYERS):
            keep.append(node.name)
        for out in node.output:
            before[out] = (convs + is_conv, depthwise + is_depthwise)
    return tuple(dict.fromkeys(keep))


def build_int8(repository: str | Path, name: str, *, calibration: Sequence[Path], test_images: np.ndarray,
               test_labels: np.ndarray, min_ratio: float = DEFAULT_MIN_RATIO, force: bool = False,
               latency_runs: int = DEFAULT_LATENCY_RUNS, quantize_options=None, progress: bool = False,
               log=print) -> Int8Report:
    """Quantize `<repository>/<name>` into `<name>_int8`, gated by labelled accuracy; see the module docstring."""
    from export import optimize
    from export import quantize as quant
    from serve.repository import PLATFORM_ONNX, ModelRepository

    gate(1.0, 1.0, min_ratio)  # validates min_ratio before any slow work
    if len(test_images) == 0:
        raise ConfigError("--precision int8 needs a labelled test split (--test-split > 0) to gate INT8 accuracy")
    repo = ModelRepository(repository)
    base = repo.entry(name)
    variant = f"{name}_int8"
    if repo.folder(variant).exists() and not force:
        raise ConfigError(f"{repo.folder(variant)} already exists; pass --force to replace it")
    options = quantize_options or quant.QuantizeOptions()
    model = require("onnx", "INT8 quantization").load(str(base.artifact()), load_external_data=False)
    ruled = quant.keep_float_nodes(model, options.keep_float, options.float_prefix)
    # only what the rules miss: a one-branch model keeps export's defaults (exact 8-bit input lifts its stem)
    extra = tuple(n for n in branch_entry_nodes(model) if n not in options.exclude_nodes and n not in ruled)
    if extra:  # every copy of the base gets the keep-float rules, not only the first (a --flip-tta model)
        options = dataclasses.replace(options, exclude_nodes=tuple(options.exclude_nodes) + extra)
    size = (int(base.input_spec.shape[0]), int(base.input_spec.shape[1]))
    cal = quant.load_calibration(list(calibration), size, options, source="the training split", progress=progress)
    staging = optimize.stage_entry(repo, base, variant, PLATFORM_ONNX,
                                   parameters={"source": name, "precision": "int8"})
    try:
        model_path = staging / "1" / "model.onnx"
        result = quant.quantize(base.artifact(), model_path, cal, options, input_name=base.input_spec.name,
                                progress=progress)
        log(f"{variant}: quantized with {result.images_used} training images")
        labels = np.asarray(test_labels, np.int64)
        fp32, int8 = _runner(name, base.artifact(), base), _runner(variant, model_path, base)
        with fp32, int8:
            p32 = optimize.predict(fp32, test_images, progress=progress, desc=f"{name} (FP32) on the test split")
            p8 = optimize.predict(int8, test_images, progress=progress, desc=f"{variant} on the test split")
            latency = {}
            if latency_runs > 0:
                i_ms, f_ms = optimize.interleaved_latency([int8, fp32], test_images[0], latency_runs)
                latency = {"int8_ms": i_ms, "fp32_ms": f_ms, "ratio": i_ms / f_ms, "runs": latency_runs, "batch": 1,
                           "runtime": "onnxruntime (serve.backends), in process"}
        pred32, pred8 = p32.argmax(1), p8.argmax(1)
        acc32, acc8 = float((pred32 == labels).mean()), float((pred8 == labels).mean())
        ratio, passed = gate(acc32, acc8, min_ratio)
        report = Int8Report(variant=variant, fp32_accuracy=round(acc32, 4), int8_accuracy=round(acc8, 4),
                            ratio=round(ratio, 4), min_ratio=min_ratio, passed=passed, written=False,
                            test_images=int(len(labels)), top1_agreement=round(float((pred32 == pred8).mean()), 4),
                            calibration_images=int(result.images_used), calibration=result.summary(),
                            latency=latency, int8_predictions=pred8.tolist(), fp32_predictions=pred32.tolist())
        (staging / "accuracy.json").write_text(_json(report))
        if not passed and not force:
            raise Int8GateError(
                f"INT8 test accuracy {acc8:.4f} is {ratio:.2%} of FP32's {acc32:.4f}, below the gate of "
                f"{min_ratio:.0%}; {variant} was not written (pass --force to write it anyway, or lower "
                f"--int8-min-ratio)\n{report.text()}", report)
        if not passed:
            log(f"{variant}: below the gate, written anyway (--force)")
        optimize.commit_entry(repo, staging, variant, force=force)
        report.written = True
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _json(report: Int8Report) -> str:
    import json

    data = report.to_dict()
    data.pop("int8_predictions")
    data.pop("fp32_predictions")
    return json.dumps(data, indent=2, default=str) + "\n"
