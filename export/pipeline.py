"""The export pipeline: a Keras model -> a validated, atomically written repository entry.

    export_model("mobilenet_v2")                 # a Keras application (ImageNet weights)
    export_model("flowers.keras")                # a fine-tuned model (labels.txt beside it)
    export_model(keras_model, name="flowers", labels=[...])   # in memory (train/ calls this)

writes

    models/<name>/config.pbtxt         platform onnxruntime_onnx
    models/<name>/labels.txt
    models/<name>/1/model.onnx
    models/<name>/1/parity.json        Keras vs ONNX on the same uint8 images
    models/<name>/1/export.json        source, options, versions, timings
    models/<name>_keras/config.pbtxt   backend keras (the original path, for comparison)
    models/<name>_keras/labels.txt
    models/<name>_keras/1/model.keras

Everything is built in a temporary folder inside the repository
(models/.tmp-<name>-<random>), checked (parity), and only then renamed into place.
A failed or interrupted export (KeyboardInterrupt included) leaves the previous
model untouched and no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve import images as image_lib
from serve import repository as repo_lib
from serve._files import publish_folder
from serve.errors import ConfigError, KestrelError, ModelLoadError

from . import applications, contract, labels as labels_lib
from . import parity as parity_lib
from .keras_to_onnx import INPUT_NAME, OUTPUT_NAME

KERAS_SUFFIX = "_keras"
EXPORT_INFO_FILE = "export.json"
VERSION = 1
# How new exports resize images (config.pbtxt parameter "resize"), chosen by measurement on
# ../shared/datasets/imagenet_val (docs/accuracy.md).
DEFAULT_RESIZE = image_lib.CROP


@dataclass
class ExportReport:
    """What an export wrote and how well the ONNX model matches Keras."""

    name: str
    source: str
    folder: Path
    keras_folder: Path
    onnx_path: Path
    keras_path: Path
    labels_path: Path
    parity_path: Path | None
    parity: parity_lib.ParityReport | None
    input_size: tuple[int, int]
    classes: int
    preprocessing: str
    opset: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    @property
    def relative_l2(self) -> float | None:
        return self.parity.relative_l2 if self.parity else None

    @property
    def max_abs_diff(self) -> float | None:
        return self.parity.max_abs_diff if self.parity else None

    @property
    def top1_agreement(self) -> float | None:
        return self.parity.top1_agreement if self.parity else None

    def summary(self) -> str:
        lines = [f"exported {self.name} ({self.source}) -> {self.onnx_path} and {self.keras_path}"]
        if self.parity:
            lines.append(self.parity.summary())
        else:
            lines.append("parity check skipped")
        timing = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        lines.append(f"time: {timing}; peak RSS {self.peak_rss_mb:.0f} MB")
        return "\n".join(lines)


class _Steps:
    """Progress for the slow steps (tqdm on stderr), and their timings."""

    def __init__(self, enabled: bool, total: int, name: str):
        self.seconds: dict[str, float] = {}
        self._bar = None
        self._current = None
        self._start = 0.0
        if enabled:
            from serve.console import progress as tqdm  # bar on a terminal, lines in logs

            self._bar = tqdm(total=total, desc=f"export {name}", unit="step", file=sys.stderr,
                             bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")

    def step(self, label: str) -> None:
        self._finish()
        self._current, self._start = label, time.perf_counter()
        if self._bar is not None:
            self._bar.set_postfix_str(label)

    def note(self, message: str) -> None:
        if self._bar is not None:  # keep the step's name: in a log the step's line shows the last note
            self._bar.set_postfix_str(f"{self._current}: {message}" if self._current else message)

    def _finish(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._start
            self._current = None
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        self._finish()
        if self._bar is not None:
            self._bar.close()

    def warn(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"warning: {message}", file=sys.stderr)
        else:
            print(f"warning: {message}", file=sys.stderr)


def _is_keras_model(obj) -> bool:
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and hasattr(obj, "stateless_call")


def _default_name(source) -> str:
    if isinstance(source, (str, Path)) and str(source) in applications.APPLICATIONS:
        return str(source)
    raw = Path(source).stem if isinstance(source, (str, Path)) else getattr(source, "name", "model")
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", raw).lstrip("._-") or "model"
    return name[:100]


def _classify_source(source):
    """('app', Application) | ('file', Path) | ('model', keras.Model); bad sources raise ConfigError."""
    if _is_keras_model(source):
        return "model", source
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"expected an application name, a .keras/.h5 path or a keras.Model, got {type(source).__name__}")
    text = str(source)
    if text in applications.APPLICATIONS:
        return "app", applications.APPLICATIONS[text]
    path = Path(text)
    looks_like_path = path.suffix.lower() in contract.MODEL_SUFFIXES or os.sep in text or path.exists()
    if not looks_like_path:
        applications.get(text)  # raises: unknown application, lists the known ones
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if path.is_dir() or path.suffix.lower() not in contract.MODEL_SUFFIXES:
        raise ConfigError(f"cannot read {path}: expected a Keras model file ending in {', '.join(contract.MODEL_SUFFIXES)}")
    contract.precheck_file(path)
    return "file", path


def _weights_arg(weights):
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if isinstance(weights, str) and weights.lower() == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; expected 'imagenet', 'none' or a path to an .h5 file")
    return str(path)


def _build_app(app: applications.Application, weights, input_size, alpha=None):
    try:
        return contract.build_application(app, weights=weights, input_size=input_size, alpha=alpha)
    except KestrelError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        if weights == "imagenet" and ("URL fetch failure" in text or "HTTP" in text or "urlopen" in text):
            raise ConfigError(
                f"cannot download the ImageNet weights for {app.name} ({app.weights_file_for(alpha)}); offline, set "
                f"KERAS_HOME to a folder holding models/{app.weights_file_for(alpha)}, or pass --weights PATH"
            ) from None
        if isinstance(weights, str) and weights != "imagenet":
            raise ModelLoadError(f"cannot load weights {weights} into {app.name}: {text[:300]}") from None
        raise ConfigError(f"cannot build {app.name}: {text[:300]}") from None


def _resolve_labels(labels, *, default_path: Path | None):
    """labels: a list, a path, or None (then `default_path` when it exists)."""
    if labels is None:
        if default_path is not None and default_path.is_file():
            return labels_lib.read_labels(default_path), str(default_path)
        return None, None
    if isinstance(labels, (list, tuple)):
        return [str(x) for x in labels], "the labels given"
    return labels_lib.read_labels(labels), str(labels)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _replace_folder(new: Path, dest: Path, backup_dir: Path) -> Path | None:
    """Publish `new` at `dest` in one step (serve._files.publish_folder: a polling server never sees half a
    model); the previous `dest`, if any, is moved into `backup_dir` (returned, to put back on failure)."""
    previous = publish_folder(new, dest)
    if previous is None:
        return None
    backup = backup_dir / f"previous-{dest.name}"
    os.replace(previous, backup)
    return backup


def export_model(
    source,
    *,
    name: str | None = None,
    weights: str | None = "imagenet",
    repository: str | Path = "models",
    labels=None,
    parity_images: str | Path | None = None,
    opset: int | None = None,
    input_size: tuple[int, int] | None = None,
    preprocessing: str | None = None,
    alpha: float | None = None,
    progress: bool = True,
    parity: bool = True,
    parity_threshold: float = parity_lib.FP32_THRESHOLD,
    max_batch_size: int = repo_lib.DEFAULT_MAX_BATCH_SIZE,
    resize: str | None = None,
) -> ExportReport:
    """Export `source` (application name, .keras/.h5 path or keras.Model) into `repository`.

    Raises ConfigError / ModelLoadError for bad input and ParityError when the
    ONNX model does not match Keras; in every failure case the repository is
    left as it was.
    """
    started = time.perf_counter()
    kind, resolved = _classify_source(source)
    if alpha is not None:
        if kind != "app":
            raise ConfigError(f"alpha {alpha:g} applies to a Keras application (mobilenet, mobilenet_v2), "
                              "not to a model file: the file fixes its own width")
        alpha = resolved.check_alpha(alpha)
    if name is None:
        name = resolved.default_name(alpha) if kind == "app" else _default_name(source if kind != "model" else resolved)
    repo = repo_lib.ModelRepository(repository)
    final_onnx = repo.folder(name)
    final_keras = repo.folder(name + KERAS_SUFFIX)
    weights = _weights_arg(weights)
    if input_size is not None:
        input_size = (int(input_size[0]), int(input_size[1]))
        if min(input_size) < 32:
            raise ConfigError(f"input size {input_size} is too small; expected at least 32x32")
    mode = applications.check_mode(preprocessing) if preprocessing is not None else None
    resize = image_lib.check_mode(resize or DEFAULT_RESIZE)
    if parity and parity_images is not None and not Path(parity_images).is_dir():
        raise ConfigError(f"--parity-images {parity_images}: the folder does not exist")
    file_labels = None
    if kind == "file":  # the labels before the model: a missing --labels file fails at once, not after the load
        file_labels = _resolve_labels(labels, default_path=resolved.parent / labels_lib.LABELS_FILE)
        if file_labels[0] is None:
            raise ConfigError(f"no class labels for model {name!r}: put {labels_lib.LABELS_FILE} beside {resolved} "
                              "or pass labels (--labels FILE)")
    elif isinstance(labels, (str, Path)):
        file_labels = _resolve_labels(labels, default_path=None)

    steps = _Steps(progress, 4 + int(parity), name)
    try:
        # ---- 1. load / build the Keras model ------------------------------------------------
        steps.step("loading Keras model")
        if kind == "app":
            app = resolved
            if mode not in (None, app.preprocessing):
                raise ConfigError(f"{app.name} uses {app.preprocessing!r} preprocessing; it cannot be changed")
            class_names, label_source = file_labels or _resolve_labels(labels, default_path=None)
            if class_names is None:  # before the (slow) build, so a missing class index fails fast
                try:
                    class_names, label_source = labels_lib.imagenet_labels(), "ImageNet class index"
                except ConfigError as exc:
                    if weights == "imagenet":
                        raise
                    steps.warn(f"{exc}; untrained model ({weights or 'no weights'}): labels are class_0000..")
                    class_names = [f"class_{i:04d}" for i in range(1000)]
                    label_source = "placeholder (no class index)"
            model = _build_app(app, weights, input_size, alpha)
            classes = int(model.outputs[0].shape[-1])
            mode = app.preprocessing
            width = f", alpha={alpha:g}" if alpha is not None else ""
            source_text = f"keras.applications.{app.constructor} (weights={weights}{width})"
        else:
            if kind == "file":
                network = contract.load_user_model(resolved)
                default_labels = resolved.parent / labels_lib.LABELS_FILE
                source_text = str(resolved)
            else:
                network = resolved
                default_labels = None
                source_text = f"keras.Model {network.name!r}"
            if isinstance(weights, str) and weights != "imagenet":
                try:
                    network.load_weights(weights)
                except Exception as exc:
                    raise ModelLoadError(f"cannot load weights {weights}: {' '.join(str(exc).split())[:300]}") from None
            class_names, label_source = file_labels or _resolve_labels(labels, default_path=default_labels)
            model, info = contract.wrap_user_model(network, preprocessing=mode, input_size=input_size)
            mode = applications.check_mode(mode)
            classes = info.classes
            if class_names is None:
                where = f"put {labels_lib.LABELS_FILE} beside {resolved} or " if kind == "file" else ""
                raise ConfigError(f"no class labels for model {name!r}: {where}pass labels (--labels FILE)")
            probe = np.asarray(model(image_sample(model), training=False))
            contract.check_probabilities(probe)
        class_names = labels_lib.check_count(class_names, classes, label_source)
        height, width = (int(d) for d in model.inputs[0].shape[1:3])

        repo.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=repo.root))
        try:
            onnx_dir, keras_dir = tmp / final_onnx.name, tmp / final_keras.name
            (onnx_dir / str(VERSION)).mkdir(parents=True)
            (keras_dir / str(VERSION)).mkdir(parents=True)
            in_spec = repo_lib.TensorSpec(INPUT_NAME, np.uint8, (height, width, 3))
            out_spec = repo_lib.TensorSpec(OUTPUT_NAME, np.float32, (classes,))

            # ---- 2. the Keras model, servable as <name>_keras -------------------------------
            steps.step("saving model.keras")
            keras_path = keras_dir / str(VERSION) / repo_lib.ARTIFACTS[repo_lib.BACKEND_KERAS]
            model.save(keras_path)
            for folder, platform_name, entry_name in ((onnx_dir, repo_lib.PLATFORM_ONNX, final_onnx.name),
                                                      (keras_dir, repo_lib.BACKEND_KERAS, final_keras.name)):
                config = repo_lib.make_config(entry_name, platform_name, in_spec, out_spec,
                                              max_batch_size=max_batch_size, resize=resize)
                repo_lib.write_config(config, folder)
                labels_lib.write_labels(class_names, folder)

            # ---- 3. ONNX ----------------------------------------------------------------------
            steps.step("converting to ONNX")
            from . import keras_to_onnx

            onnx_path = onnx_dir / str(VERSION) / repo_lib.ARTIFACTS[repo_lib.PLATFORM_ONNX]
            converted = keras_to_onnx.convert(model, onnx_path, opset=opset)
            del model

            # ---- 4. parity ---------------------------------------------------------------------
            report = None
            parity_path = None
            if parity:
                steps.step("parity check")
                report = _parity(tmp, final_onnx.name, final_keras.name, parity_images, parity_threshold, steps,
                                 resize)
                parity_path = report.save(onnx_dir / str(VERSION) / parity_lib.REPORT_FILE)
                parity_lib.check(report)

            # ---- 5. into place -------------------------------------------------------------------
            steps.step("writing repository")
            seconds = dict(steps.seconds)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            info_doc = {
                "name": name, "source": source_text, "weights": weights, "alpha": alpha, "preprocessing": mode,
                "resize": resize,
                "input_size": [height, width], "classes": classes, "labels": label_source,
                "opset": converted.opset, "onnx_nodes": converted.nodes, "parameters": converted.parameters,
                "parity": report.summary() if report else None, "seconds": seconds,
                "peak_rss_mb": round(peak, 1), "versions": _versions(),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (onnx_dir / str(VERSION) / EXPORT_INFO_FILE).write_text(json.dumps(info_doc, indent=2) + "\n")
            backups = []
            try:
                backups.append((final_keras, _replace_folder(keras_dir, final_keras, tmp)))
                backups.append((final_onnx, _replace_folder(onnx_dir, final_onnx, tmp)))
            except BaseException:
                for dest, backup in reversed(backups):  # put the previous models back
                    shutil.rmtree(dest, ignore_errors=True)
                    if backup is not None:
                        os.replace(backup, dest)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        steps.close()

    seconds = dict(steps.seconds)
    seconds["total"] = time.perf_counter() - started
    return ExportReport(
        name=name, source=source_text, folder=final_onnx, keras_folder=final_keras,
        onnx_path=final_onnx / str(VERSION) / onnx_path.name, keras_path=final_keras / str(VERSION) / keras_path.name,
        labels_path=final_onnx / labels_lib.LABELS_FILE,
        parity_path=(final_onnx / str(VERSION) / parity_lib.REPORT_FILE) if parity_path else None,
        parity=report, input_size=(height, width), classes=classes, preprocessing=mode, opset=converted.opset,
        seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def image_sample(model, count: int = 2) -> np.ndarray:
    from serve.images import synthetic_images

    height, width = (int(d) for d in model.inputs[0].shape[1:3])
    return synthetic_images(count, (height, width), seed=1)


def _parity(tmp: Path, onnx_name: str, keras_name: str, folder, threshold: float, steps: _Steps,
            resize: str = image_lib.DEFAULT_RESIZE):
    from serve.backends import create_runner

    staged = repo_lib.ModelRepository(tmp)
    keras_runner = create_runner(staged.entry(keras_name))
    onnx_runner = create_runner(staged.entry(onnx_name), providers=["CPUExecutionProvider"])
    try:
        report = parity_lib.compare(keras_runner, onnx_runner, folder=folder, threshold=threshold, progress=steps.note,
                                    mode=resize)
    finally:
        keras_runner.close()
        onnx_runner.close()
    return report


__all__ = ["ExportReport", "export_model"]
