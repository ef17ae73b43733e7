"""python -m train DATA_DIR --base mobilenet_v2 [--augment] [--fine-tune-layers K] [--export] [--precision int8] ...

Bad input gives one line on stderr and exit status 2; an INT8 variant below
the accuracy gate gives the report on stderr and exit status 3 (nothing
written for it; the FP32 outputs are); Ctrl-C gives exit status 130 with the
previous outputs untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export import applications
from serve import console
from serve.errors import KestrelError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _base(text: str) -> str:
    if text in applications.APPLICATIONS or text.lower().endswith(".keras"):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r}{console.did_you_mean(text, sorted(applications.APPLICATIONS))}"
                                     f" (expected one of {', '.join(sorted(applications.APPLICATIONS))} or a .keras "
                                     "model file)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Transfer learning: train a classifier head (and optionally the base's top layers) on a "
                    "folder with one sub-folder of images per class; write a .keras model with Kestrel's "
                    "uint8 'images' -> 'probabilities' contract, a report, and optionally export it.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="folder with one sub-folder per class")
    p.add_argument("--base", default="mobilenet_v2", type=_base,
                   help="the frozen base: an application (" + ", ".join(sorted(applications.APPLICATIONS))
                        + "; default mobilenet_v2) or a .keras classifier file cut before its global pooling")
    p.add_argument("--name", help="model name (default: DATA_DIR's folder name)")
    p.add_argument("--output", type=Path, help="output folder (default runs/NAME)")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs of the mlp head (early stopping on "
                   "validation); the linear head is fitted by L-BFGS")
    p.add_argument("--val-split", type=_fraction, default=0.2, help="validation fraction per class (default 0.2)")
    p.add_argument("--test-split", type=_fraction, default=0.1, help="test fraction per class (default 0.1)")
    p.add_argument("--augment", action="store_true",
                   help="also train on features of flipped and cropped training images (cached too)")
    p.add_argument("--flip-tta", action="store_true",
                   help="test-time flip averaging inside the saved model: the base also runs on the mirrored "
                        "photo and the head sees the mean of both features (twice the inference work); the "
                        "report's accuracy is that model's")
    p.add_argument("--fine-tune-layers", type=int, default=0, metavar="K",
                   help="afterwards train the base's top K layers with the head at a low learning rate, "
                        "BatchNorm frozen; the cut moves down to the nearest block boundary, preferring a narrow "
                        "tensor (mobilenet_v2: 10 -> block_15_add); kept only if validation improves (default 0)")
    p.add_argument("--pool-stages", type=int, metavar="N",
                   help="features = the global averages of the base's last layer at each of its N coarsest "
                        "resolutions, concatenated (MobileNetV2: out_relu, block_13_expand_relu, "
                        "block_6_expand_relu); default 3, 1 = the base's output only (and with --fine-tune-layers)")
    p.add_argument("--fine-tune-epochs", type=int, default=6, help="fine-tuning epochs (default 6)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    p.add_argument("--weights", default="imagenet", help="base weights: imagenet (default), none, or an .h5 path")
    p.add_argument("--image-size", type=int, help="square input size (default: the application's, e.g. 224)")
    p.add_argument("--alpha", type=float, help="width multiplier of MobileNet bases (default: the full network)")
    p.add_argument("--heads", default="linear", help="head candidates, comma-separated (linear, mlp): the best "
                   "validation accuracy wins (default linear)")
    p.add_argument("--batch-size", type=int, default=256, help="mlp head training batch size (default 256)")
    p.add_argument("--export", action="store_true", help="export the trained model into the repository")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default models)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="feature cache folder (default .cache)")
    p.add_argument("--classes", help="only these class folders, comma-separated (e.g. a few-shot pair)")
    p.add_argument("--train-per-class", type=int, metavar="N",
                   help="few-shot: N images per class for training (--val-split of them for validation), the "
                        "rest of each class for test (instead of --test-split)")
    p.add_argument("--test-per-class", type=int, metavar="N", help="with --train-per-class: at most N test images "
                   "per class")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss (default 0)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="keep the linear head fitted on the training photos only (default: once validation has "
                        "chosen its L2 strength, it is fitted again on training + validation photos)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                   help="int8: also export <name>_int8, calibrated on the training photos and written only if its "
                        "test accuracy is at least --int8-min-ratio of FP32's (implies --export)")
    p.add_argument("--int8-min-ratio", type=float, default=0.99,
                   help="INT8 gate: minimum INT8/FP32 test accuracy ratio (default 0.99)")
    p.add_argument("--calibration-method", default="percentile", choices=("percentile", "minmax", "entropy"),
                   help="INT8 calibration method (export.quantize's; default percentile)")
    p.add_argument("--calibration-images", type=int, default=300, metavar="N",
                   help="with --precision int8: calibrate on at most N training photos, classes interleaved (default "
                        "300; fewer is faster: the calibration's time grows with N)")
    p.add_argument("--latency-runs", type=int, default=30,
                   help="with --precision int8: interleaved batch-1 latency runs of FP32 and INT8 (0: skip)")
    p.add_argument("--force", action="store_true", help="write the INT8 variant even below the gate, and replace "
                   "an existing one")
    p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    return console.add_examples(p, "../shared/datasets/flower_photos --base mobilenet_v2 --augment --flip-tta "
                                   "--precision int8",
                                "photos/by_class --augment --fine-tune-layers 10 --output runs/mine")


def options_from_args(args):
    """TrainOptions from parsed command-line arguments (also what `python -m train.fewshot` runs in process)."""
    from .pipeline import TrainOptions

    return TrainOptions(
        data_dir=args.data_dir, base=args.base, name=args.name, output=args.output, epochs=args.epochs,
        val_split=args.val_split, test_split=args.test_split, augment=args.augment, flip_tta=args.flip_tta,
        fine_tune_layers=args.fine_tune_layers, pool_stages=args.pool_stages, fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_lr=args.fine_tune_lr, seed=args.seed, weights=args.weights, image_size=args.image_size,
        alpha=args.alpha, heads=tuple(h.strip() for h in args.heads.split(",") if h.strip()),
        batch_size=args.batch_size, export=args.export, repository=args.repository,
        cache_dir=args.cache_dir, progress=not args.no_progress,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else None,
        train_per_class=args.train_per_class, test_per_class=args.test_per_class,
        label_smoothing=args.label_smoothing, precision=args.precision, int8_min_ratio=args.int8_min_ratio,
        latency_runs=args.latency_runs, force=args.force, calibration_method=args.calibration_method,
        calibration_images=args.calibration_images,
        refit=args.refit,
    )


def next_step(result, repository: Path) -> str:
    """The command that serves what was trained: `kestrel serve` with the exported models (the INT8 variant too
    when it was written), or, without --export, the `kestrel export` that puts the model into the repository."""
    import shlex

    report = result.report
    if result.export is None:
        name = report.get("name") or result.output.name
        return (f"serve it: kestrel export {shlex.quote(str(result.model_path))} --name {shlex.quote(name)} "
                f"--repository {shlex.quote(str(repository))} (labels.txt is beside the model), then "
                f"kestrel serve --repository {shlex.quote(str(repository))} --models {shlex.quote(name)}")
    models = [result.export.name]
    if (report.get("int8") or {}).get("written"):
        models.append(report["int8"]["variant"])
    return (f"serve it: kestrel serve --repository {shlex.quote(str(repository))} "
            f"--models {shlex.quote(','.join(models))}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console.quiet_native_logs()  # TensorFlow's C++ start-up chatter, unless KESTREL_VERBOSE=1
    console.quiet_onnxruntime_logs()  # onnxruntime's own warnings (unused initializers ...), unless --verbose
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices from predict()
    from .int8 import Int8GateError

    try:
        from .pipeline import train

        result = train(options_from_args(args))
    except Int8GateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no model was written (earlier outputs are unchanged)", file=sys.stderr)
        return 130
    report = result.report
    accuracy = report.get("test_accuracy")
    seconds = report.get("seconds", {})
    print(f"model: {result.model_path}")
    print(f"report: {result.report_path}")
    if accuracy is not None:
        print(f"test accuracy: {accuracy:.4f} ({report.get('test_images')} images); "
              f"validation accuracy {report.get('val_accuracy')}; head {report.get('chosen_head')}"
              + (", refit on training + validation" if (report.get("refit") or {}).get("done") else ""))
    if report.get("skipped_images"):
        print(f"skipped {len(report['skipped_images'])} undecodable image(s): "
              + ", ".join(s["path"] for s in report["skipped_images"]))
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    if result.export is not None:
        print(f"exported: {result.export.folder}")
    if report.get("int8"):
        q = report["int8"]
        print(f"int8: {q['variant']} test accuracy {q['int8_accuracy']:.4f} vs FP32 {q['fp32_accuracy']:.4f} "
              f"({q['ratio']:.2%}, gate {q['min_ratio']:.0%}: {'PASS' if q['passed'] else 'FAIL'}); "
              + ("written" if q["written"] else "not written"))
    print(next_step(result, args.repository))
    return 0


if __name__ == "__main__":
    sys.exit(main())
