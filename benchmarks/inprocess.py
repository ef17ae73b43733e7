"""In-process inference speed: Keras predict vs Keras tf.function vs onnxruntime (and its variants).

    python -m benchmarks.inprocess [--models mobilenet_v2,resnet50] [--batch 1,8] [--repeats 5]

For each model in the repository it times, on the same uint8 batch:

    keras predict       <name>_keras through model.predict (Keras' own path)
    keras tf.function   <name>_keras through a fixed-signature tf.function
    onnxruntime fp32    <name> (model.onnx)
    <variant>           <name>_fp16, <name>_int8, ... when the repository has them

Method (shared with the server benchmark, benchmarks/_method.py): every
runner is loaded and warmed up first (never measured); then, `repeats` times,
each runner runs `iterations` calls in round-robin order rotated each repeat,
so drift of the machine hits every variant alike. A cell is the median over
repeats of the per-repeat median latency (its range beside it).

Writes the table as Markdown and JSON (with machine, versions and load) to
benchmarks/results/inprocess-<time>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import _method
from serve import console
from serve.errors import KestrelError, ModelNotFoundError
from serve.images import synthetic_images
from serve.repository import ModelRepository

VARIANT_SUFFIXES = ("_fp16", "_int8")
DEFAULT_MODELS = "mobilenet_v2,resnet50"


def time_runners(runners: dict, batch: np.ndarray, repeats: int, *, iterations: int = 10,
                 warmup: int = 3) -> dict[str, dict]:
    """Time each runner's `infer(batch)`, interleaved; returns {label: stats}.

    stats: median_ms (median over repeats of each repeat's median call),
    low_ms/high_ms (range over repeats), images_per_s, repeat_medians_ms,
    samples_ms (every measured call). Warm-up calls are run and discarded.
    """
    for runner in runners.values():
        runner.load()
        for _ in range(max(0, warmup)):
            runner.infer(batch)
    samples: dict[str, list[float]] = {label: [] for label in runners}
    repeat_medians: dict[str, list[float]] = {label: [] for label in runners}
    for _, label in _method.interleaved(list(runners), repeats):
        runner = runners[label]
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            runner.infer(batch)
            times.append((time.perf_counter() - start) * 1000.0)
        samples[label].extend(times)
        repeat_medians[label].append(float(np.median(times)))
    out = {}
    for label in runners:
        spread = _method.over_repeats(repeat_medians[label])
        out[label] = {
            "batch": int(len(batch)),
            "median_ms": spread.median,
            "low_ms": spread.low,
            "high_ms": spread.high,
            "images_per_s": len(batch) / (spread.median / 1000.0) if spread.median > 0 else float("nan"),
            "repeat_medians_ms": repeat_medians[label],
            "samples_ms": samples[label],
        }
    return out


def model_runners(repo: ModelRepository, name: str, *, keras: bool = True) -> dict:
    """The runners to compare for one model: {label: runner} (not loaded)."""
    from serve.backends import create_runner

    names = set(repo.names())
    if name not in names:
        raise ModelNotFoundError(
            f"model '{name}' is not in repository {repo.root}; export it first: python -m export {name} "
            f"--repository {repo.root} (--weights none is fine for timing)"
        )
    runners = {}
    if keras and f"{name}_keras" in names:
        keras_entry = repo.entry(f"{name}_keras")
        runners["keras predict"] = create_runner(keras_entry, mode="predict")
        runners["keras tf.function"] = create_runner(keras_entry, mode="function")
    runners["onnxruntime fp32"] = create_runner(repo.entry(name))
    for suffix in VARIANT_SUFFIXES:
        if f"{name}{suffix}" in names:
            entry = repo.entry(f"{name}{suffix}")
            runners[f"{entry.platform} {suffix[1:]}"] = create_runner(entry)
    return runners


def markdown(results: list[dict]) -> str:
    lines = ["| model | batch | variant | median ms (range over repeats) | images/s | vs Keras predict |",
             "|---|---:|---|---:|---:|---:|"]
    for row in results:
        base = next((r["median_ms"] for r in results if r["model"] == row["model"] and r["batch"] == row["batch"]
                     and r["variant"] == "keras predict"), None)
        speedup = f"{_method.ratio(base, row['median_ms']):.1f}x" if base else "-"
        spread = _method.Spread(row["median_ms"], row["low_ms"], row["high_ms"], len(row["repeat_medians_ms"]))
        lines.append(f"| {row['model']} | {row['batch']} | {row['variant']} | {spread.format(2)} | "
                     f"{row['images_per_s']:.1f} | {speedup} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list (default {DEFAULT_MODELS})")
    parser.add_argument("--batch", type=_ints, default=[1, 8], help="comma list of batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per cell (default 5)")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per runner per repeat (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured calls per runner first (default 3)")
    parser.add_argument("--repository", default="models", help="model repository (default models)")
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras variants")
    parser.add_argument("--out", "--output", dest="out", default="benchmarks/results",
                        help="folder for the .md/.json results")
    console.add_examples(parser, "--repository models --models mobilenet_v2 --batch 1,8",
                         "--models mobilenet_v2,resnet50 --no-keras --output benchmarks/results")
    args = parser.parse_args(argv)
    console.quiet_native_logs()
    if args.repeats < 1 or args.iterations < 1:
        print("error: --repeats and --iterations must be at least 1", file=sys.stderr)
        return 2

    repo = ModelRepository(args.repository)
    results = []
    monitor = _method.LoadMonitor(pids=[os.getpid()])
    monitor.start()
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            runners = model_runners(repo, name, keras=not args.no_keras)
            try:
                size = next(iter(runners.values())).image_size
                for batch_size in args.batch:
                    batch = synthetic_images(batch_size, size, seed=batch_size)
                    print(f"{name}: batch {batch_size}: timing {', '.join(runners)}", file=sys.stderr)
                    timed = time_runners(runners, batch, args.repeats, iterations=args.iterations,
                                         warmup=args.warmup)
                    for label, stats in timed.items():
                        results.append({"model": name, "variant": label, **stats})
            finally:
                for runner in runners.values():
                    runner.close()
    except KestrelError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    load = monitor.stop()

    table = markdown(results)
    info = {"machine": _method.machine_info(), "versions": _method.package_versions(), "load": load,
            "git": _method.git_revision(), "settings": vars(args), "time": _method.timestamp()}
    header = (f"In-process inference, {info['machine']['cpu']} ({info['machine']['isa']}, "
              f"{info['machine']['cores_usable']} cores), "
              f"{info['time']}; load while measuring: {load.get('busy_cores')} cores busy "
              f"(other processes: {load.get('foreign_cores')})\n"
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k in
                          ("tensorflow", "keras", "onnxruntime", "onnxruntime-gpu", "tensorrt")))
    header += f"\nINT8 on this CPU: {info['machine']['int8']}"
    print(header)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"inprocess-{info['time']}"
    stem.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    slim = [{k: v for k, v in row.items() if k != "samples_ms"} for row in results]
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "results": slim,
                                                     "samples": {f"{r['model']}|{r['batch']}|{r['variant']}":
                                                                 r["samples_ms"] for r in results}}, indent=1))
    print(f"written: {stem}.md, {stem}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
