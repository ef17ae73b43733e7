"""Transfer learning in one call: a folder of labelled images -> a trained, reported (and exported) model.

    result = train(TrainOptions(data_dir="flowers", base="mobilenet_v2", augment=True, export=True))

Phases (each timed in report.json):

    scan        list class folders and files (ConfigError for a folder that is not a dataset)
    base        build the headless application (export's table and preprocessing)
    features    decode through serve.images, run the base as ONNX with onnxruntime, cache on disk;
                undecodable files are listed in the report and left out
    heads       train each head candidate on the cached features; the best validation accuracy wins
    fine_tune   (--fine-tune-layers K) train the top layers with the head on cached feature maps
    refit       the linear head's chosen L2 strength fitted again on training + validation photos
    evaluate    test-set accuracy, per-class precision/recall, confusion matrix
    save        the joined uint8 -> probabilities .keras model, labels.txt, report.json, PNGs
    export      (--export) export.pipeline.export_model: ONNX + Keras entries, parity checked
    int8        (--precision int8) <name>_int8 calibrated on the training photos, gated by test accuracy

Outputs are written into a hidden staging folder inside --output and renamed
into place at the end, so an interrupted run (Ctrl-C) never leaves a
half-written model; the previous outputs stay as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serve._files import write_text_atomic
from serve.errors import ConfigError
from serve.images import DEFAULT_RESIZE as TRAIN_RESIZE  # how train decodes every image
from serve.repository import validate_name

from . import data as data_lib
from . import features as features_lib

OUTPUT_FILES = ("model.keras", "labels.txt", "report.json", "confusion_matrix.txt", "confusion_matrix.png",
                "training_curves.png")
DEFAULT_POOL_STAGES = 3  # chosen by 5-fold cross-validation on flower_photos (train/README.md)
PARITY_IMAGES = 16  # held-out photos for export's parity check
JOINED_CHECK_IMAGES = 8  # ... and for the joined Keras model vs the feature path (a MobileNetV2 pass each)


@dataclass(frozen=True)
class TrainOptions:
    data_dir: Path
    base: str = "mobilenet_v2"
    name: str | None = None
    output: Path | None = None
    epochs: int = 40
    val_split: float = 0.2
    test_split: float = 0.1
    augment: bool = False
    flip_tta: bool = False  # the saved model averages the features of the photo and its mirror image
    fine_tune_layers: int = 0
    # multi-scale features: pool the last layer of the base's N coarsest resolutions (bases.stage_layers);
    # None = DEFAULT_POOL_STAGES, or 1 with fine_tune_layers (the fine-tuned top pools its own output)
    pool_stages: int | None = None
    fine_tune_epochs: int = 6
    fine_tune_lr: float = 1e-4
    seed: int = 0
    weights: str | None = "imagenet"
    image_size: int | None = None
    alpha: float | None = None
    heads: tuple[str, ...] = ("linear",)
    batch_size: int = 256
    export: bool = False
    repository: Path = Path("models")
    cache_dir: Path = Path(".cache")
    progress: bool = True
    classes: tuple[str, ...] | None = None  # only these class folders (few-shot pairs)
    train_per_class: int | None = None  # few-shot: this many images per class for training (incl. validation)
    test_per_class: int | None = None  # with train_per_class: at most this many test images per class
    label_smoothing: float = 0.0
    # after validation chose the linear head's L2 strength, fit it again on training + validation photos
    # (not with fine_tune_layers: fine-tuning is kept or reverted on validation)
    refit: bool = True
    precision: str = "fp32"  # "int8": also the gated INT8 variant (implies export)
    int8_min_ratio: float = 0.99
    calibration_method: str = "percentile"  # export.quantize's: percentile, minmax, entropy
    # training photos the INT8 variant is calibrated on (at most; classes interleaved). Calibration time grows with
    # it: on flower_photos 300 gave INT8 0.940, 150 gave 0.933 (one test photo) in about 60 % of the INT8 step
    calibration_images: int = 300
    latency_runs: int = 30
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "repository", Path(self.repository))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes) or None)
        name = self.name if self.name is not None else default_name(self.data_dir)
        object.__setattr__(self, "name", validate_name(name))
        if self.output is None:
            object.__setattr__(self, "output", Path("runs") / name)
        else:
            object.__setattr__(self, "output", Path(self.output))
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: expected at least 1")
        if self.fine_tune_layers < 0:
            raise ConfigError(f"--fine-tune-layers {self.fine_tune_layers}: expected 0 (off) or more")
        if self.fine_tune_epochs < 1:
            raise ConfigError(f"--fine-tune-epochs {self.fine_tune_epochs}: expected at least 1")
        if not 0 < self.fine_tune_lr < 1:
            raise ConfigError(f"--fine-tune-lr {self.fine_tune_lr}: expected a small positive learning rate")
        if self.image_size is not None and self.image_size < 32:
            raise ConfigError(f"--image-size {self.image_size}: expected at least 32")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: expected at least 1")
        from .bases import is_model_file, weights_arg
        from .head import HEADS

        object.__setattr__(self, "weights", weights_arg(self.weights))  # before any slow work
        if is_model_file(self.base) and not Path(self.base).is_file():
            raise ConfigError(f"--base {self.base}: no such file; expected an application name or a .keras model file")

        unknown = [h for h in self.heads if h not in HEADS]
        if unknown or not self.heads:
            raise ConfigError(f"--heads {','.join(self.heads)}: expected one or more of {', '.join(HEADS)}")
        if not (0 <= self.val_split < 1 and 0 <= self.test_split < 1 and self.val_split + self.test_split < 1):
            raise ConfigError(f"--val-split {self.val_split} and --test-split {self.test_split}: expected "
                              "fractions >= 0 summing to less than 1")
        if self.val_split == 0:
            raise ConfigError("--val-split 0: a validation set is needed to choose the head and stop training")
        if self.train_per_class is not None and self.train_per_class < 2:
            raise ConfigError(f"--train-per-class {self.train_per_class}: expected at least 2 (training and "
                              "validation images)")
        if self.test_per_class is not None and (self.test_per_class < 1 or self.train_per_class is None):
            raise ConfigError(f"--test-per-class {self.test_per_class}: expected a positive number, with "
                              "--train-per-class")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: expected a value in [0, 1), e.g. 0.1")
        if self.precision not in ("fp32", "int8"):
            raise ConfigError(f"--precision {self.precision}: expected fp32 or int8")
        if not 0 < self.int8_min_ratio <= 1:
            raise ConfigError(f"--int8-min-ratio {self.int8_min_ratio}: expected a fraction in (0, 1], e.g. 0.99")
        if self.precision == "int8":
            if self.test_split == 0 and self.train_per_class is None:
                raise ConfigError("--precision int8 --test-split 0: the INT8 gate needs a labelled test split")
            object.__setattr__(self, "export", True)  # the INT8 variant is made from the FP32 export
        if self.pool_stages is None:
            object.__setattr__(self, "pool_stages", 1 if self.fine_tune_layers else DEFAULT_POOL_STAGES)
        if self.pool_stages < 1:
            raise ConfigError(f"--pool-stages {self.pool_stages}: expected 1 (the base's output only) or more")
        if self.pool_stages > 1 and self.fine_tune_layers:
            raise ConfigError(f"--pool-stages {self.pool_stages} with --fine-tune-layers: not supported (the "
                              "fine-tuned top pools its own output); use --pool-stages 1 or no fine-tuning")
        if self.flip_tta and self.fine_tune_layers:
            raise ConfigError("--flip-tta with --fine-tune-layers: not supported (the fine-tuned top is trained on "
                              "single views); use one of them")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images {self.calibration_images}: expected a positive number, e.g. 300")
        if self.calibration_method not in ("percentile", "minmax", "entropy"):
            raise ConfigError(f"--calibration-method {self.calibration_method}: expected percentile, minmax or "
                              "entropy")


def default_name(data_dir: Path) -> str:
    raw = Path(data_dir).resolve().name
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", raw).lstrip("._-")[:100] or "model"


@dataclass
class TrainResult:
    output: Path
    model_path: Path
    report_path: Path
    test_accuracy: float | None
    report: dict
    export: object | None = None  # export.pipeline.ExportReport


class _Phases:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    def run(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self_inner):
                self_inner.t = time.perf_counter()

            def __exit__(self_inner, *exc):
                phases.seconds[name] = round(phases.seconds.get(name, 0.0) + time.perf_counter() - self_inner.t, 3)

        return _Timer()

    def total(self) -> float:
        return round(time.perf_counter() - self._started, 3)


def say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def train(options: TrainOptions) -> TrainResult:
    """Run every phase; raises KestrelError subclasses (ConfigError, ModelLoadError...) for bad input."""
    phases = _Phases()
    report: dict = {"name": options.name, "options": _options_dict(options)}
    variant = Path(options.repository) / f"{options.name}_int8"
    if options.precision == "int8" and variant.exists() and not options.force:
        # found before any work, and before the FP32 export replaces the model that INT8 variant was made from
        raise ConfigError(f"{variant} already exists (an earlier --precision int8 run); pass --force to replace it, "
                          "or --name / --repository to write elsewhere")

    with phases.run("scan"):
        dataset = data_lib.scan(options.data_dir, options.classes)
    report["dataset"] = data_lib.summary(dataset)
    info = report["dataset"]["imbalance"]
    say(data_lib.describe_sizes(len(dataset.paths), report["dataset"]["per_class"]))
    for path in dataset.ignored:
        say(f"ignored (not in a class folder): {path}")

    from . import bases

    with phases.run("base"):
        size = (options.image_size, options.image_size) if options.image_size else None
        base = bases.build_base(options.base, weights=options.weights, input_size=size, alpha=options.alpha,
                                 seed=options.seed)
        if options.pool_stages > 1:
            base = bases.with_stages(base, options.pool_stages)
        cut, top, top_layers = None, None, []
        if options.fine_tune_layers:
            cut, top, top_layers = bases.split_top(base, options.fine_tune_layers)
    report["base"] = {**base.key(), "description": base.description, "weights": base.weights,
                      "fine_tune_cut": cut, "flip_tta": options.flip_tta,
                      # the features: these layers' global averages, concatenated
                      "pooled_layers": bases.pooled_layer_names(base),
                      # the saved / exported model runs the base this many times per photo
                      "base_passes_per_image": 2 if options.flip_tta else 1}
    say(f"base: {base.description}" + (f"; fine-tuning from {cut} ({len(top_layers)} layers)" if cut else "")
        + (f"; features pooled from {', '.join(base.pooled_layers)}" if base.pooled_layers else ""))

    store = features_lib.FeatureStore(base, cache_dir=options.cache_dir, cut=cut, progress=options.progress)
    try:
        with phases.run("features"):
            plain = store.get(dataset.paths, dataset.fingerprint(), "plain")
            report["skipped_images"] = [{"path": p, "reason": r} for p, r in plain.skipped]
            for path, reason in plain.skipped:
                say(f"skipped undecodable image: {reason}")
            labels = dataset.labels[plain.kept]
            counts = np.bincount(labels, minlength=len(dataset.classes))
            missing = [dataset.classes[i] for i, c in enumerate(counts) if c == 0]
            if missing:
                raise ConfigError(f"class folder(s) {', '.join(missing)} hold no decodable image")
            if options.train_per_class:
                split = data_lib.per_class_split(labels, per_class=options.train_per_class, val=options.val_split,
                                                 seed=options.seed, test_per_class=options.test_per_class)
            else:
                split = data_lib.stratified_split(labels, val=options.val_split, test=options.test_split,
                                                  seed=options.seed)
            views = {"plain": plain.values[split["train"]]}
            evaluated = plain.values  # what the saved model computes for each photo (val / test / checks)
            if options.flip_tta:  # the mirror image of every photo: averaged for evaluation, a training view
                mirrored = store.get(dataset.paths, dataset.fingerprint(), "flip")
                if not np.array_equal(mirrored.kept, plain.kept):
                    raise ConfigError("the photos decoded differently for the flipped view; were files modified "
                                      "during training?")
                views["flip"] = mirrored.values[split["train"]]
                evaluated = (plain.values + mirrored.values) / 2
            if options.augment:
                views.update(_more_views(store, dataset, plain.kept[split["train"]],
                                         [v for v in features_lib.AUGMENT_VIEWS if v not in views], "training"))
            refit_views = {}  # the same views of the validation photos, for the refit
            if options.refit and not options.fine_tune_layers and len(split["val"]):
                refit_views = {"plain": plain.values[split["val"]]}
                if options.flip_tta:
                    refit_views["flip"] = mirrored.values[split["val"]]
                refit_views.update(_more_views(store, dataset, plain.kept[split["val"]],
                                               [v for v in views if v not in refit_views], "validation"))
    finally:
        store.close()
    report["split"] = {name: {"images": int(len(idx)), "per_class": dataset.counts(labels[idx])}
                       for name, idx in split.items()}
    report["features"] = {**store.stats.to_dict(), "views": list(views), "cache_dir": str(options.cache_dir),
                          "feature_shape": list(plain.values.shape[1:]), "runtime": "onnxruntime"}
    y_train_one = labels[split["train"]]
    y_train = np.concatenate([y_train_one] * len(views))
    maps_train = np.concatenate(list(views.values()))
    maps_val, y_val = evaluated[split["val"]], labels[split["val"]]
    maps_test, y_test = evaluated[split["test"]], labels[split["test"]]

    from . import head as head_lib

    with phases.run("heads"):
        if top is not None:  # feature maps at the cut: the frozen top gives the pooled features
            pooled = _pooled_through_top(top)
            x_train, x_val = head_lib.predict(pooled, maps_train), head_lib.predict(pooled, maps_val)
            x_test = head_lib.predict(pooled, maps_test) if len(maps_test) else maps_test
        else:
            x_train, x_val, x_test = maps_train, maps_val, maps_test
        results = head_lib.train_heads(
            x_train, y_train, x_val, y_val, classes=len(dataset.classes), kinds=options.heads,
            epochs=options.epochs, batch_size=options.batch_size, seed=options.seed,
            balance=not info["balanced"], progress=options.progress, label_smoothing=options.label_smoothing)
    best = results[0]
    report["heads"] = [{"kind": r.kind, "val_accuracy": round(r.val_accuracy, 4), "epochs": r.epochs,
                        "best_epoch": r.best_epoch, "seconds": round(r.seconds, 2), **r.options} for r in results]
    report["chosen_head"] = best.kind
    say("heads: " + ", ".join(f"{r.kind} val {r.val_accuracy:.3f}" for r in results) + f" -> {best.kind}")
    curves = [(f"{best.kind} head", best.history)]
    val_accuracy = best.val_accuracy

    fine = None
    if top is not None:
        with phases.run("fine_tune"):
            fine = head_lib.fine_tune(top, best.model, maps_train, y_train, maps_val, y_val,
                                      baseline=best.val_accuracy, epochs=options.fine_tune_epochs,
                                      lr=options.fine_tune_lr, seed=options.seed, balance=not info["balanced"],
                                      progress=options.progress, label_smoothing=options.label_smoothing)
        report["fine_tune"] = {"cut": cut, "layers": fine.layers, "trainable_parameters": fine.trainable_weights,
                               "val_accuracy": round(fine.val_accuracy, 4), "kept": fine.kept,
                               "epochs": fine.epochs, "best_epoch": fine.best_epoch, "lr": options.fine_tune_lr,
                               "batchnorm": "frozen (inference mode)", "seconds": round(fine.seconds, 2)}
        curves.append(("fine-tune", fine.history))
        say(f"fine-tuning: val {fine.val_accuracy:.3f} vs head {best.val_accuracy:.3f} -> "
            + ("kept" if fine.kept else "reverted"))
        if fine.kept:
            val_accuracy = fine.val_accuracy
    report["val_accuracy"] = round(val_accuracy, 4)
    report["refit"] = _refit(options, best, views, refit_views, x_train, y_train, labels[split["val"]],
                             len(dataset.classes), balance=not info["balanced"], phases=phases)

    with phases.run("evaluate"):
        evaluation = _evaluate(dataset.classes, best.model, top if (fine and fine.kept) else None,
                               x_test if not (fine and fine.kept) else maps_test, y_test)
    report.update(evaluation["report"])
    test_files_all = plain.kept[split["test"]]
    if evaluation.get("predictions") is not None:  # what the served model must answer, photo by photo
        report["test_predictions"] = [
            {"path": str(dataset.paths[int(i)]), "label": dataset.classes[int(t)],
             "predicted": dataset.classes[int(p)]}
            for i, t, p in zip(test_files_all, y_test, evaluation["predictions"])]
    if report["test_accuracy"] is not None:
        say(f"test accuracy {report['test_accuracy']:.4f} on {len(y_test)} images")

    model = bases.classifier(base, best.model, flip_tta=options.flip_tta)
    test_files = plain.kept[split["test"]] if len(split["test"]) else plain.kept[split["val"]]
    sample_paths = [dataset.paths[i] for i in test_files[:PARITY_IMAGES]]
    save_started = time.perf_counter()
    with phases.run("save"):
        # plain.values are the cut's feature maps whenever fine-tuning was asked for: through the top
        report["joined_model_check"] = _check_joined(model, base, sample_paths[:JOINED_CHECK_IMAGES], plain.kept,
                                                     evaluated, test_files[:JOINED_CHECK_IMAGES], best.model, top)
        result = _write_outputs(options, model, dataset.classes, report, evaluation, curves, phases,
                                save_started)

    if options.export:
        with phases.run("export"):
            result.export = _export(options, model, dataset.classes, sample_paths)
        exp = result.export
        report["export"] = {"repository": str(options.repository), "name": exp.name, "onnx": str(exp.onnx_path),
                            "keras": str(exp.keras_path), "parity": exp.parity.summary() if exp.parity else None,
                            "relative_l2": exp.relative_l2, "top1_agreement": exp.top1_agreement,
                            "seconds": {k: round(v, 2) for k, v in exp.seconds.items()}}
        say(exp.summary())
        report["seconds"] = {**phases.seconds, "total": phases.total()}
        _rewrite_report(result, report)

    if options.precision == "int8":
        from export.quantize import DEFAULT_MIN_IMAGES, QuantizeOptions

        from . import int8 as int8_lib

        train_paths = [dataset.paths[int(i)] for i in plain.kept[split["train"]]]
        test_paths = [dataset.paths[int(i)] for i in test_files_all]
        failure = None
        with phases.run("int8"):
            pixels = data_lib.decode(test_paths, base.input_size)[0]
            try:
                q = int8_lib.build_int8(options.repository, options.name, calibration=train_paths,
                                        test_images=pixels, test_labels=y_test, min_ratio=options.int8_min_ratio,
                                        force=options.force, latency_runs=options.latency_runs,
                                        quantize_options=QuantizeOptions(
                                            method=options.calibration_method, max_images=options.calibration_images,
                                            min_images=min(DEFAULT_MIN_IMAGES, options.calibration_images)),
                                        progress=options.progress, log=say)
            except int8_lib.Int8GateError as exc:
                q, failure = exc.report, exc
        report["int8"] = {k: v for k, v in q.to_dict().items() if not k.endswith("_predictions")}
        report["int8"]["repository"] = str(options.repository)
        report["int8_test_predictions"] = [dataset.classes[int(p)] for p in q.int8_predictions]
        say(q.text())
        report["seconds"] = {**phases.seconds, "total": phases.total()}
        _rewrite_report(result, report)
        if failure is not None:
            raise failure
    return result


def _more_views(store, dataset, files, names, what: str) -> dict:
    """Views `names` of the photos `files` (indices into dataset.paths), from the store's cache or extracted."""
    paths = [dataset.paths[int(i)] for i in files]
    fingerprint = dataset.fingerprint(files)
    out = {}
    for view in names:
        got = store.get(paths, fingerprint, view)
        if len(got.kept) != len(paths):  # a file changed between the two reads
            raise ConfigError(f"{len(paths) - len(got.kept)} {what} image(s) could not be decoded a second time; "
                              "were files modified during training?")
        out[view] = got.values
    return out


def _refit(options, best, views, refit_views, x_train, y_train, y_val_one, classes, *, balance, phases) -> dict:
    """Fit the chosen linear head's L2 strength again on training + validation views; replaces best.model.

    Validation has done its job (it chose the strength; GridSearchCV's refit): the final weights see its
    photos too, 29 % more on flower_photos' 70/20/10 split. Cross-validated on flower_photos' training and
    validation photos (test untouched, train/README.md): +0.6 points. Skipped for the MLP head (early
    stopping needs validation) and with --fine-tune-layers.
    """
    if not options.refit:
        return {"done": False, "why": "--no-refit"}
    if options.fine_tune_layers:
        return {"done": False, "why": "--fine-tune-layers (kept or reverted on validation)"}
    if best.kind != "linear" or best.fit is None:
        return {"done": False, "why": f"the {best.kind} head stops early on validation"}
    if not refit_views:
        return {"done": False, "why": "no validation photos"}
    from . import head as head_lib

    with phases.run("refit"):
        x_all = np.concatenate([x_train] + [refit_views[v] for v in views])
        y_all = np.concatenate([y_train] + [y_val_one] * len(views))
        sample_weight = head_lib.balanced_sample_weights(y_all, classes) if balance else None
        with head_lib.one_blas_thread():
            fit = head_lib.refit_linear(best.fit, x_all, y_all, classes=classes, sample_weight=sample_weight,
                                        label_smoothing=options.label_smoothing)
        best.model, best.fit = head_lib.linear_head_model(fit), fit
    photos = len(y_all) // len(views)
    say(f"refit: the linear head (L2 {fit.l2:g}) fitted again on training + validation, {photos} photos x "
        f"{len(views)} view(s)")
    return {"done": True, "photos": int(photos), "views": list(views), "feature_vectors": int(len(y_all)),
            "l2": fit.l2, "iterations": fit.iterations, "seconds": round(phases.seconds["refit"], 2)}


def _options_dict(options: TrainOptions) -> dict:
    out = asdict(options)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _pooled_through_top(top):
    import keras

    inputs = keras.Input(shape=tuple(top.inputs[0].shape[1:]))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(top(inputs)))


def _predict_probabilities(head, top, x) -> np.ndarray:
    from . import head as head_lib

    if top is None:
        return head_lib.predict(head, x)
    return head_lib.predict(head, head_lib.predict(_pooled_through_top(top), x))


def _evaluate(classes: list[str], head, top, x_test, y_test) -> dict:
    from . import report as report_lib

    if len(y_test) == 0:
        return {"report": {"test_accuracy": None, "per_class": None, "confusion_matrix": None,
                           "confusion_matrix_text": None}, "matrix": None}
    probs = _predict_probabilities(head, top, x_test)
    pred = probs.argmax(axis=1)
    matrix = report_lib.confusion_matrix(y_test, pred, len(classes))
    text = report_lib.matrix_text(matrix, classes)
    return {
        "report": {
            "test_accuracy": round(float((pred == y_test).mean()), 4),
            "test_images": int(len(y_test)),
            "per_class": report_lib.per_class(matrix, classes),
            "confusion_matrix": matrix.tolist(),
            "confusion_matrix_text": text,
        },
        "matrix": matrix,
        "predictions": pred,
    }


def _check_joined(model, base, paths, kept, evaluated, kept_indices, head, top) -> dict:
    """The saved model (uint8 images in) must agree with the feature path it was trained on."""
    from serve import images as image_io

    if not paths:
        return {"images": 0}
    batch = np.stack([image_io.load(p, base.input_size) for p in paths])
    joined = np.asarray(model(batch, training=False))  # a direct call: predict() would trace the graph first
    index = {int(k): i for i, k in enumerate(kept)}
    feats = evaluated[[index[int(k)] for k in kept_indices]]
    via_features = _predict_probabilities(head, top, feats)
    diff = float(np.abs(joined - via_features).max())
    agree = float((joined.argmax(1) == via_features.argmax(1)).mean())
    if agree < 1.0 or diff > 1e-2:
        say(f"warning: the joined Keras model and the onnxruntime feature path differ (max |diff| {diff:.3g}, "
            f"top-1 agreement {agree:.1%})")
    return {"images": len(paths), "max_abs_diff": diff, "top1_agreement": agree}


def _write_outputs(options, model, classes, report, evaluation, curves, phases, save_started) -> TrainResult:
    from . import report as report_lib

    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-train-", dir=output))
    try:
        model.save(staging / "model.keras")
        (staging / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        if evaluation["matrix"] is not None:
            (staging / "confusion_matrix.txt").write_text(evaluation["report"]["confusion_matrix_text"])
            report_lib.plot_confusion(evaluation["matrix"], classes, staging / "confusion_matrix.png",
                                      f"{options.name}: test accuracy {evaluation['report']['test_accuracy']:.3f}")
        report_lib.plot_curves(curves, staging / "training_curves.png")
        report["outputs"] = {name: str(output / name) for name in OUTPUT_FILES if (staging / name).exists()
                             or name == "report.json"}
        report["seconds"] = {**phases.seconds, "save": round(time.perf_counter() - save_started, 3),
                             "total": phases.total()}
        (staging / "report.json").write_text(data_lib.dumps(report))
        # all written: move into place (the model last-but-one, the report last)
        order = [n for n in OUTPUT_FILES if n not in ("model.keras", "report.json")] + ["model.keras", "report.json"]
        for name in order:
            if (staging / name).exists():
                os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TrainResult(output=output, model_path=output / "model.keras", report_path=output / "report.json",
                       test_accuracy=report.get("test_accuracy"), report=report)


def _rewrite_report(result: TrainResult, report: dict) -> None:
    write_text_atomic(result.report_path, data_lib.dumps(report))  # mode 0644 (umask 022), not mkstemp's 0600
    result.report = report


def _export(options, model, classes, sample_paths):
    """export.pipeline.export_model with a few held-out images as the parity set."""
    from export.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="kestrel-parity-") as folder:
        for i, path in enumerate(sample_paths):
            shutil.copyfile(path, Path(folder) / f"{i:03d}{Path(path).suffix.lower()}")
        return export_model(model, name=options.name, weights=None, repository=options.repository,
                            labels=list(classes), parity_images=folder if sample_paths else None,
                            # train decodes every image with serve.images' default (stretch): the exported
                            # model must be served the same way, whatever export's own default is
                            resize=TRAIN_RESIZE, progress=options.progress)
