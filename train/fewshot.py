"""Few-shot transfer learning over every class pair: `python -m train.fewshot DATA_DIR`.

    python -m train.fewshot ../shared/datasets/flower_photos --per-class 100 [--cold] [--output DIR]

For each of the C(n, 2) pairs of class folders it trains a two-class model on
`--per-class` photos of each class (`--val-split` of them for validation, the
head chosen and stopped on those), and tests it on every other photo of the two
classes (at most `--test-per-class`): the training run is `python -m train
DATA_DIR --classes A,B --train-per-class N` (train.pipeline, nothing special).

Output (in --output, default runs/fewshot):

    fewshot.json   per pair: classes, train / val / test images, test accuracy, wall seconds, phases;
                   summary: median / min / max accuracy, the slowest run
    fewshot.md     the same as a Markdown table
    pairs/A__B/    each run's outputs (model.keras, report.json, confusion matrix)

Timing: by default the pairs run one after another in this process with one
feature cache, so the first pair pays for TensorFlow's import and the base's
ONNX conversion and the others reuse the converted base. `--cold` runs every
pair in a fresh `python -m train` process with its own empty cache and times
the whole process: the cold wall time of each run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve import console
from serve._files import write_text_atomic
from serve.errors import ConfigError, KestrelError


def pairs_of(classes: list[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(sorted(classes), 2))


def pair_dir(a: str, b: str) -> str:
    return f"{a}__{b}"


def summarize(rows: list[dict]) -> dict:
    accuracies = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    seconds = [r["seconds"] for r in rows]
    slowest = max(rows, key=lambda r: r["seconds"]) if rows else None
    return {
        "pairs": len(rows),
        "median_accuracy": round(statistics.median(accuracies), 4) if accuracies else None,
        "min_accuracy": round(min(accuracies), 4) if accuracies else None,
        "max_accuracy": round(max(accuracies), 4) if accuracies else None,
        "max_seconds": round(max(seconds), 2) if seconds else None,
        "median_seconds": round(statistics.median(seconds), 2) if seconds else None,
        "slowest_pair": slowest["pair"] if slowest else None,
    }


def markdown(rows: list[dict], summary: dict, header: str) -> str:
    lines = [header, "", "| pair | train | val | test | test accuracy | wall s | features s | heads s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.3f}"
        phases = r.get("phases", {})
        lines.append(f"| {r['pair']} | {r['train_images']} | {r['val_images']} | {r['test_images']} | {acc} | "
                     f"{r['seconds']:.1f} | {phases.get('features', 0):.1f} | {phases.get('heads', 0):.1f} |")
    lines += ["", f"median test accuracy {summary['median_accuracy']} (min {summary['min_accuracy']}, max "
              f"{summary['max_accuracy']}); wall time median {summary['median_seconds']} s, max "
              f"{summary['max_seconds']} s ({summary['slowest_pair']})", ""]
    return "\n".join(lines)


def _row(a: str, b: str, report: dict, seconds: float, mode: str) -> dict:
    split = report["split"]
    return {"pair": f"{a} vs {b}", "classes": [a, b], "train_images": split["train"]["images"],
            "val_images": split["val"]["images"], "test_images": split["test"]["images"],
            "test_accuracy": report.get("test_accuracy"), "val_accuracy": report.get("val_accuracy"),
            "chosen_head": report.get("chosen_head"),
            # the linear head's final fit: training + validation photos (train's refit), when it was made
            "refit_photos": (report.get("refit") or {}).get("photos"), "seconds": round(seconds, 2), "timing": mode,
            "phases": report.get("seconds", {}), "extracted_images": report["features"]["extracted_images"]}


def train_args(data_dir: Path, a: str, b: str, args) -> list[str]:
    out = [str(data_dir), "--classes", f"{a},{b}", "--train-per-class", str(args.per_class),
           "--val-split", str(args.val_split), "--base", args.base, "--heads", args.heads, "--seed", str(args.seed),
           "--name", pair_dir(a, b).replace(" ", "_")]
    if args.test_per_class:
        out += ["--test-per-class", str(args.test_per_class)]
    if args.image_size:
        out += ["--image-size", str(args.image_size)]
    if args.weights != "imagenet":
        out += ["--weights", args.weights]
    if args.alpha:
        out += ["--alpha", str(args.alpha)]
    if args.epochs:
        out += ["--epochs", str(args.epochs)]
    if args.augment:
        out += ["--augment"]
    if args.flip_tta:
        out += ["--flip-tta"]
    if args.pool_stages is not None:
        out += ["--pool-stages", str(args.pool_stages)]
    if not args.refit:
        out += ["--no-refit"]
    return out


def run(args) -> dict:
    from . import data as data_lib

    data_dir = Path(args.data_dir)
    classes = data_lib.scan(data_dir).classes
    pairs = pairs_of(classes)
    if args.pairs:
        wanted = {tuple(sorted(p.split(","))) for p in args.pairs}
        unknown = sorted(wanted - set(pairs))
        if unknown:
            raise ConfigError(f"--pair {','.join(unknown[0])}: not a pair of class folders of {data_dir}")
        pairs = [p for p in pairs if p in wanted]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    mode = "cold: a fresh process and an empty cache per pair" if args.cold else \
        "in process, one cache: the first pair converts the base, the others reuse it"
    print(f"{len(pairs)} pair{'s' if len(pairs) != 1 else ''} of {len(classes)} classes, {args.per_class} training images per class ({mode})",
          file=sys.stderr)
    for number, (a, b) in enumerate(pairs, 1):
        out_dir = output / "pairs" / pair_dir(a, b)
        cli = train_args(data_dir, a, b, args) + ["--output", str(out_dir), "--no-progress"]
        if args.cold:
            with tempfile.TemporaryDirectory(prefix="kestrel-fewshot-cache-") as cache:
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "train", *cli, "--cache-dir", cache],
                                      capture_output=True, text=True, env=dict(os.environ))
                seconds = time.perf_counter() - started
            if proc.returncode != 0:
                raise ConfigError(f"pair {a} vs {b} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
            report = json.loads((out_dir / "report.json").read_text())
        else:
            from . import __main__ as cli_main
            from .pipeline import train

            parsed = cli_main.parser().parse_args(cli + ["--cache-dir", str(args.cache_dir)])
            options = cli_main.options_from_args(parsed)
            started = time.perf_counter()
            report = train(options).report
            seconds = time.perf_counter() - started
        row = _row(a, b, report, seconds, "cold" if args.cold else "in-process")
        rows.append(row)
        print(f"[{number}/{len(pairs)}] {row['pair']}: test accuracy {row['test_accuracy']} on "
              f"{row['test_images']} images, {row['seconds']:.1f} s", file=sys.stderr)
    summary = summarize(rows)
    result = {"data_dir": str(data_dir), "per_class": args.per_class, "base": args.base, "timing": mode,
              "cpu_count": os.cpu_count(), "pairs": rows, "summary": summary}
    _write(output / "fewshot.json", json.dumps(result, indent=2) + "\n")
    header = (f"Few-shot on {data_dir}: {args.per_class} training images per class "
              f"({args.val_split:.0%} of them validation), base {args.base}; timing {mode}")
    _write(output / "fewshot.md", markdown(rows, summary, header))
    return result


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # mode 0644 (umask 022), not mkstemp's 0600


def parser() -> argparse.ArgumentParser:
    from export import applications

    p = argparse.ArgumentParser(prog="python -m train.fewshot",
                                description="Two-class few-shot transfer learning over every pair of class folders: "
                                            "test accuracy and wall time per pair, a table and a JSON file.")
    p.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="folder with one sub-folder per class")
    p.add_argument("--per-class", type=int, default=100, help="training images per class, validation included "
                   "(default 100)")
    p.add_argument("--val-split", type=float, default=0.2, help="fraction of those for validation (default 0.2)")
    p.add_argument("--test-per-class", type=int, help="at most this many test images per class (default: all others)")
    p.add_argument("--pair", dest="pairs", action="append", metavar="A,B", help="only this pair (repeatable)")
    p.add_argument("--base", default="mobilenet_v2", help="an application of "
                   f"{', '.join(sorted(applications.APPLICATIONS))} or a .keras model file (train's --base)")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--heads", default="linear", help="head candidates (default linear)")
    p.add_argument("--epochs", type=int, default=0, help="maximum head epochs (default: train's)")
    p.add_argument("--augment", action="store_true")
    p.add_argument("--flip-tta", action="store_true",
                   help="test-time flip averaging in each model (train's --flip-tta)")
    p.add_argument("--pool-stages", type=int, metavar="N", help="as train's --pool-stages (default: train's, 3)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="as train's --no-refit: each pair's head fitted on its training photos only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("runs") / "fewshot", help="output folder (default runs/fewshot)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="feature cache (not used with --cold)")
    p.add_argument("--cold", action="store_true", help="every pair in a fresh process with an empty cache, timed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console.quiet_native_logs()  # TensorFlow/absl start-up lines, unless --verbose (KESTREL_VERBOSE=1)
    console.quiet_onnxruntime_logs()  # onnxruntime's own warnings (unused initializers ...), unless --verbose
    if args.per_class < 2:
        print(f"error: --per-class {args.per_class}: expected at least 2", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(markdown(result["pairs"], result["summary"], f"few-shot ({result['timing']})"))
    print(f"wrote {Path(args.output) / 'fewshot.json'} and {Path(args.output) / 'fewshot.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
