"""python -m export SOURCE [options]: a Keras model -> a validated ONNX model repository entry.

    python -m export mobilenet_v2                          # ImageNet weights (KERAS_HOME offline)
    python -m export mobilenet --alpha 0.25                # MobileNet v1 at width 0.25 -> models/mobilenet_0.25
    python -m export resnet50 --weights none               # untrained, e.g. for speed tests
    python -m export runs/flower_photos/model.keras --labels runs/flower_photos/labels.txt --name flowers
                                                           # a fine-tuned model (what `kestrel train` writes)
    python -m export mobilenet_v2 --precision fp32,int8 --calibration photos/

Bad input prints one line on stderr and exits non-zero (2 for usage/input
errors, 1 when the parity check fails).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from serve import console

from . import applications

PRECISIONS = ("fp32", "fp16", "int8")


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH (e.g. 224x224), got {text!r}")


def _precisions(text: str) -> list[str]:
    values = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in values if p not in PRECISIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown precision {','.join(bad) or text!r}; expected a comma list of {', '.join(PRECISIONS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a Keras image classifier to an ONNX model repository entry (uint8 images in, "
                    "probabilities out), with the original Keras model beside it and a parity report.",
    )
    parser.add_argument("source", help=f"a Keras application ({', '.join(applications.APPLICATIONS)}) "
                                       "or a path to a .keras/.h5 model")
    parser.add_argument("--name", help="model name in the repository (default: the application or file name)")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (default; offline: KERAS_HOME holding models/<file>.h5), none, or a path to weights")
    parser.add_argument("--repository", default="models", help="model repository folder (default: models)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: tf2onnx's default)")
    parser.add_argument("--labels", help="class names, one per line (default: ImageNet, or labels.txt beside the model)")
    parser.add_argument("--preprocessing", choices=applications.PREPROCESSING_MODES,
                        help="for a model taking float images: the preprocessing to put in front (default: none)")
    parser.add_argument("--alpha", type=float,
                        help="MobileNet width multiplier (mobilenet: 0.25, 0.5, 0.75, 1.0; mobilenet_v2: 0.35 ... 1.4; "
                             "default 1.0); the name gets the alpha when it is not 1.0 (mobilenet_0.25)")
    parser.add_argument("--input-size", type=_size, metavar="HxW",
                        help="input size for an application with --weights none, or a model with dynamic size")
    parser.add_argument("--resize", choices=("stretch", "crop"),
                        help="how images are resized for this model, recorded in its config.pbtxt and honoured by "
                             "serving, calibration and evaluation: stretch to the input size, or crop (shorter side to "
                             "size/0.875, centre crop: the ImageNet evaluation transform). Default: see docs/accuracy.md")
    parser.add_argument("--parity-images", metavar="DIR", help="images for the parity check (default: synthetic)")
    parser.add_argument("--no-parity", action="store_true", help="skip the Keras vs ONNX parity check")
    parser.add_argument("--precision", type=_precisions, default=["fp32"],
                        help="comma list of fp32, fp16, int8: variants to build after the FP32 export")
    parser.add_argument("--calibration", metavar="DIR", help="calibration images for int8")
    parser.add_argument("--engine", action="store_true", help="also build TensorRT engines (needs a GPU)")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    return console.add_examples(parser, "mobilenet_v2                      # ImageNet weights (offline: KERAS_HOME)",
                                "mobilenet_v2 --precision fp32,int8 --calibration photos/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()  # TensorFlow's C++ start-up lines, unless KESTREL_VERBOSE=1
    console.quiet_onnxruntime_logs()  # onnxruntime's own warnings (unused initializers ...), unless --verbose

    from serve.errors import KestrelError

    from .parity import ParityError
    from .pipeline import export_model

    extra = [p for p in args.precision if p != "fp32"]
    if (extra or args.engine) and importlib.util.find_spec("export.optimize") is None:
        print("error: --precision fp16/int8 and --engine need export/optimize.py, which this checkout "
              "does not have yet", file=sys.stderr)
        return 2
    try:
        if extra or args.engine:  # the variants' inputs, before the FP32 export that takes a while
            from .optimize import check_image_inputs

            check_image_inputs(calibration=args.calibration, accuracy_images=None,
                               need_calibration="int8" in args.precision)
        report = export_model(
            args.source, name=args.name, weights=args.weights, repository=args.repository, labels=args.labels,
            parity_images=args.parity_images, opset=args.opset, input_size=args.input_size,
            preprocessing=args.preprocessing, alpha=args.alpha, progress=not args.quiet, parity=not args.no_parity,
            resize=args.resize,
        )
        print(report.summary())
        if extra or args.engine:
            from .optimize import optimize

            optimize(Path(args.repository), report.name, precisions=args.precision, calibration=args.calibration,
                     engine=args.engine, progress=not args.quiet)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KestrelError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the repository was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
