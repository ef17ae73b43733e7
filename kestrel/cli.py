"""kestrel COMMAND [options]: one command for every Kestrel tool.

Each subcommand is the module users already know (`python -m export` is `kestrel export`), imported only
when it is run, so `kestrel --help` and `kestrel serve` never load TensorFlow. `--verbose` anywhere on the
line lets TensorFlow/absl/CUDA print their start-up logs (serve/console.py); it is also passed on to
subprocesses through KESTREL_VERBOSE=1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from serve import console

from . import __version__


@dataclass(frozen=True)
class Command:
    module: str  # imported when the command runs
    summary: str
    also: str  # the equivalent `python -m` form
    examples: tuple[str, ...] = ()  # for a module whose parser has none of its own (see _with_help_examples)


COMMANDS: dict[str, Command] = {
    "export": Command("export.__main__", "Keras model -> ONNX repository entry, with a Keras-vs-ONNX parity check",
                      "python -m export"),
    "optimize": Command("export.optimize", "INT8 / FP16 variants (accuracy-checked) and TensorRT engines",
                        "python -m export.optimize"),
    "evaluate": Command("export.evaluate", "top-1/top-5 accuracy and latency of the variants on labelled images",
                        "python -m export.evaluate",
                        ("../shared/datasets/imagenet_val --models mobilenet_v2,mobilenet_v2_int8",
                         "../shared/datasets/imagenet_val --limit 200")),
    "serve": Command("serve.__main__", "serve a repository: gRPC + HTTP (KServe V2, Classify, web page), metrics",
                     "python -m serve"),
    "classify": Command("serve.client", "send image files to a server, print each model's and ensemble's top-k",
                        "python -m serve.client"),
    "models": Command("serve.control", "a running server's models: list, load, unload (--model-control-mode explicit)",
                      "python -m serve.control"),
    "train": Command("train.__main__", "transfer learning on a folder of class folders; optionally export; "
                     "`kestrel train fewshot` for every two-class pair", "python -m train"),
    "bench": Command("benchmarks.__main__", "server benchmark (Keras vs ONNX vs INT8 [+TensorRT] vs Flask); "
                     "`kestrel bench inprocess` for in-process latency", "python -m benchmarks"),
    "demo": Command("export.demo", "export an ImageNet ensemble, serve it, classify sample photos (make demo)",
                    "python -m export.demo"),
    "doctor": Command("kestrel.doctor", "what this machine can do and what is missing; --gpu checks TensorRT",
                      "python -m kestrel doctor"),
}
# `kestrel bench TOOL ...`: the other benchmark programs
BENCH_TOOLS: dict[str, Command] = {
    "inprocess": Command("benchmarks.inprocess", "in-process latency of each variant (no server)",
                         "python -m benchmarks.inprocess"),
    "classify-latency": Command("benchmarks.classify_latency", "Classify over gRPC vs in-process: the overhead",
                                "python -m benchmarks.classify_latency"),
    "vs-triton": Command("benchmarks.vs_triton", "Kestrel vs Triton (python backend) on the same ONNX, "
                         "servers alternated under one tritonclient load (make bench-triton)",
                         "python -m benchmarks.vs_triton"),
    "ceiling-share": Command("benchmarks.ceiling_share", "the server's img/s against onnxruntime alone in "
                             "process at the batch it formed, interleaved round by round",
                             "python -m benchmarks.ceiling_share"),
    "docs": Command("benchmarks.docs", "regenerate docs/benchmarks.md's latest reports from benchmarks/results",
                    "python -m benchmarks.docs"),
}
# `kestrel train TOOL ...`: the other training programs
TRAIN_TOOLS: dict[str, Command] = {
    "fewshot": Command("train.fewshot", "every two-class pair of a dataset, 100 training photos per class",
                       "python -m train.fewshot", ("../shared/datasets/flower_photos",
                                                   "../shared/datasets/flower_photos --cold   # a fresh process per pair")),
}
TOOLS = {"bench": BENCH_TOOLS, "train": TRAIN_TOOLS}  # `kestrel COMMAND TOOL`: TOOL is never a data folder's name
VERBOSE_FLAGS = ("-v", "--verbose")

EXAMPLES = """examples:
  kestrel doctor                                   # what this machine can do
  kestrel export mobilenet_v2 --precision fp32,int8 --calibration photos/
  kestrel serve --models mobilenet_v2,mobilenet_v2_int8
  kestrel classify photo.jpg --models mobilenet_v2 --port 8001"""


def usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    lines = [
        "usage: kestrel [-v|--verbose] [--version] COMMAND [options]",
        "",
        "Export Keras image classifiers to ONNX (INT8, FP16, TensorRT), serve them over gRPC and HTTP, "
        "benchmark the gain.",
        "",
        "commands:",
        *[f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items()],
        "",
        "options:",
        "  -h, --help       this message; `kestrel COMMAND --help` for a command's options",
        "  -v, --verbose    show TensorFlow / absl / CUDA start-up logs (hidden by default)",
        "  --version        Kestrel's version",
        "",
        EXAMPLES,
    ]
    return "\n".join(lines) + "\n"


CHECKOUT = Path(__file__).resolve().parents[1]
OFFLINE_KERAS_HOME = CHECKOUT / ".cache" / "keras_home"  # the Makefile's writable copy of ../shared/keras_home


def use_offline_keras_home() -> Path | None:
    """With KERAS_HOME unset, point Keras at the checkout's .cache/keras_home when `make demo` (or `make keras-home`)
    made it, as every make target does: the README's commands then find the offline ImageNet weights in a new shell
    too, not only under make. Returns the folder used, or None (KERAS_HOME set, or no such folder)."""
    if os.environ.get("KERAS_HOME") or not (OFFLINE_KERAS_HOME / "models").is_dir():
        return None
    os.environ["KERAS_HOME"] = str(OFFLINE_KERAS_HOME)  # subprocesses (the demo's export and server) inherit it
    return OFFLINE_KERAS_HOME


def _load(command: Command, prog: str):
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name == command.module or command.module.startswith(f"{exc.name}."):
            raise SystemExit(f"error: `{prog}` needs {command.module}, which this checkout does not have") from None
        raise
    return module.main


@contextlib.contextmanager
def _with_help_examples(prog: str, examples: tuple[str, ...]):
    """The first parser the subcommand parses with shows `prog`, and ends its --help with `examples` when its
    module gave it none (console.add_examples): every `kestrel X --help` names kestrel and has examples."""
    original = argparse.ArgumentParser.parse_known_args

    def first(self, args=None, namespace=None):
        argparse.ArgumentParser.parse_known_args = original
        if not (self.epilog or "").startswith("examples:"):
            console.set_prog(prog)
            console.add_examples(self, *(examples or ("--help",)))
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_known_args = first
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in VERBOSE_FLAGS:
            verbose = True
        elif flag in ("-h", "--help"):
            sys.stdout.write(usage())
            return 0
        elif flag == "--version":
            print(f"kestrel {__version__}")
            return 0
        else:
            sys.stderr.write(usage())
            print(f"error: unknown option {flag!r} before the command", file=sys.stderr)
            return 2
    if not args:
        sys.stderr.write(usage())
        print("error: a command is required", file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    # --verbose after the command too (no subcommand defines its own)
    if any(a in VERBOSE_FLAGS[1:] for a in rest):
        verbose = True
        rest = [a for a in rest if a not in VERBOSE_FLAGS[1:]]
    if name not in COMMANDS:
        hint = console.did_you_mean(name, COMMANDS)
        print(f"error: unknown command {name!r}{hint} (expected one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    console.set_verbose(verbose)
    use_offline_keras_home()
    console.quiet_native_logs()
    command, prog = COMMANDS[name], f"kestrel {name}"
    if rest and rest[0] in TOOLS.get(name, {}):
        command, prog, rest = TOOLS[name][rest[0]], f"kestrel {name} {rest[0]}", rest[1:]
    entry = _load(command, prog)
    console.set_prog(prog)
    try:
        with _with_help_examples(prog, command.examples):
            result = entry(rest)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        console.set_prog(None)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
