"""python -m benchmarks: the server benchmark (Keras path vs onnxruntime vs INT8 vs TensorRT, and Flask).

    python -m benchmarks                                  # mobilenet_v2, concurrency 1, 8, 32, 3 repeats: ~35 min
    python -m benchmarks --quick                          # concurrency 1 and 8, one repeat of 1+5 s: ~4 min
    python -m benchmarks --levels 8 --repeats 5 --duration 20
    python -m benchmarks --smoke                          # under a minute, fake models (make bench-smoke)

Writes benchmarks/results/<timestamp>/report.md (+ plots, CSVs). See
benchmarks/server_bench.py for the method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve import console
from serve.errors import KestrelError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, received {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, received {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Load-test one Kestrel server holding several variants of a model (and a Flask + model.predict "
        "reference) with locust; write a Markdown report with plots. With the defaults this takes about 35 "
        "minutes on 2 cores: 3 variants x 3 APIs + Flask at 3 concurrency levels x 3 repeats = 90 runs of "
        "3 + 15 s (plus the exports of missing variants). --quick takes about 4 minutes; fewer --levels, "
        "--repeats, --apis or a shorter --duration shorten it too. The plan is printed first."))
    p.add_argument("--model", default="mobilenet_v2", help="the model whose variants are compared (default mobilenet_v2)")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default models)")
    p.add_argument("--variants", type=_names,
                   help="variants to compare (default MODEL_keras,MODEL,MODEL_int8 [+ MODEL_trt_fp16 on a GPU])")
    p.add_argument("--baseline", help="variant the ratios are against (default the first variant)")
    p.add_argument("--apis", type=_names, default=["classify", "infer", "http_classify"],
                   help="classify (gRPC, image files in), infer (gRPC V2, uint8 batch), http_classify "
                        "(POST /v1/classify on the HTTP port); default all three")
    p.add_argument("--http-body", choices=("multipart", "raw"), default="multipart",
                   help="http_classify uploads: multipart form (default) or the image as the raw body")
    p.add_argument("--levels", type=_ints, help="concurrent clients (default 1,8,32; --quick 1,8)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per level (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 15; --quick 5)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="about 4 minutes instead of 35: concurrency 1 and 8, one repeat of 1 + 5 s (20 runs); "
                        "--levels/--repeats/--duration/--warmup still win")
    p.add_argument("--batch", type=int, default=1, help="images per V2 ModelInfer request (default 1)")
    p.add_argument("--images", type=Path, help="image folder to send (default ../shared/photos, else synthetic)")
    p.add_argument("--encode", choices=("jpeg", "asis"), default="jpeg",
                   help="jpeg: upload JPEG bytes, other formats re-encoded once (default); asis: the files' bytes")
    p.add_argument("--no-flask", action="store_true", help="skip the Flask + model.predict reference")
    p.add_argument("--flask-application", metavar="NAME",
                   help="reference on keras.applications.NAME + preprocess_input instead of MODEL_keras's file")
    p.add_argument("--no-export", action="store_true", help="do not export missing variants (skip them)")
    p.add_argument("--weights", default="imagenet", help="weights for exports: imagenet or none (default imagenet)")
    p.add_argument("--calibration", type=Path, help="INT8 calibration images (default ../shared/datasets/imagenet_val, else the image folder)")
    p.add_argument("--calibration-images", type=int, metavar="N",
                   help="when MODEL_int8 is exported: calibrate on at most N images (default: export.optimize's, "
                        "300, the same INT8 variant `kestrel optimize` makes; fewer is faster)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for python -m serve (repeatable, e.g. --server-arg=--ort-threads=2)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server (repeatable, e.g. TF_NUM_INTRAOP_THREADS=1)")
    p.add_argument("--budget", type=float, default=60.0, help="minutes; no run starts after (default 60)")
    p.add_argument("--output", type=Path, help="output folder (default benchmarks/results/<timestamp>)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run: fake models, tiny Flask model, one level, seconds per run (make bench-smoke)")
    return console.add_examples(p, "--model mobilenet_v2                    # about 35 min",
                                "--model mobilenet_v2 --quick            # about 4 min",
                                "--smoke --output /tmp/bench-smoke       # under a minute, fake models",
                                note="other benchmarks: `kestrel bench inprocess --help`, "
                                     "`kestrel bench classify-latency --help`, `kestrel bench vs-triton --help` "
                                     "(against Triton); `kestrel bench docs` puts the "
                                     "newest reports into docs/benchmarks.md")


def run_options(args) -> dict:
    """levels, repeats, duration_s, warmup_s: --quick's or the defaults, each overridden by its own flag."""
    from .server_bench import DEFAULT_RUNS, QUICK_RUNS

    values = dict(QUICK_RUNS if args.quick else DEFAULT_RUNS)
    for key, arg in (("levels", "levels"), ("repeats", "repeats"), ("duration_s", "duration"),
                     ("warmup_s", "warmup")):
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    return values


def settings_from_args(args):
    """The Settings the command line asks for (KestrelError for a bad --server-env)."""
    from . import server_bench

    server_env = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KestrelError(f"--server-env expects KEY=VALUE, received {item!r}")
        server_env[key] = value
    common = dict(output=args.output, images=args.images, encode=args.encode, flask=not args.no_flask,
                  server_args=args.server_arg, server_env=server_env)
    if args.smoke:
        return server_bench.smoke_settings(**common)
    flask_args = ["--application", args.flask_application, "--weights", args.weights] if args.flask_application else None
    return server_bench.Settings(
        model=args.model, repository=args.repository, variants=args.variants, baseline=args.baseline,
        apis=args.apis, http_body=args.http_body, batch=args.batch, export=not args.no_export, weights=args.weights,
        calibration=args.calibration, calibration_images=args.calibration_images, budget_s=args.budget * 60.0,
        flask_args=flask_args, **run_options(args), **common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()
    from . import server_bench

    try:
        settings = settings_from_args(args)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out = server_bench.run(settings)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
