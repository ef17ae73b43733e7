"""One output convention for every long-running command (docs/cli.md, "Output"): bars on a terminal, and
when the output is piped or logged, whole lines: one per finished step, a line per 10 % of a many-image
loop, a single line for a short-lived bar. Never tqdm's carriage-return updates, ANSI cursor codes or
backspaces, which run together in a log (`kestrel evaluate` wrote raw tqdm bars until issue #26).

Each command runs here as a user runs it, `python -m kestrel ...` with stdout and stderr piped, on tiny
or fake models: export (a small .keras file), optimize (INT8 + FP16 of a tiny ONNX model), evaluate,
train (with its export and INT8 steps), train fewshot, bench inprocess, bench (--smoke, fake models)
and demo (fake models). Each must print at least the progress lines named for it, and every progress
line must belong to a bar that only counts up, at most one line per step (per 10 % for long loops).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_helpers import CLASSES, SIZE, tiny_classifier, write_image_folders  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TERMINAL_CODES = re.compile(r"\r|\x1b\[|\x08")
# TensorFlow/absl/CUDA start-up lines: hidden unless --verbose (docs/cli.md, "Quiet by default")
NOISE = re.compile(r"absl::InitializeLog|cudart_stub|cuda_platform|cpu_feature_guard|cuInit|oneDNN custom operations")
# serve.console.LineProgress: "DESC: N/TOTAL UNIT POSTFIX [TIME]" (DESC, UNIT and POSTFIX optional)
PROGRESS = re.compile(r"^(?:(?P<desc>.+?): )?(?P<n>\d+)(?:/(?P<total>\d+))?(?: (?P<unit>[a-z]+))?(?: .*)? "
                      r"\[(?:\d+\.\d s|\d+:\d\d(?::\d\d)?)\]$")
STEP_UNITS = ("step", "run", "epoch", "model", "variant")
TQDM_BAR = re.compile(r"\d+%\|[^|\n]*\|\s*\d|\[\d+:\d\d<|\d\s?[a-z]*/s\]")  # "50%|███  | 45/90 [00:01<00:01, 4img/s]"


def _need(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(PROGRESS.match, text.splitlines()) if m]


def check_convention(text: str) -> list[re.Match]:
    """Assert the piped output follows the convention; returns its progress lines."""
    bad = TERMINAL_CODES.findall(text)
    assert not bad, f"terminal control codes in piped output: {sorted(set(bad))!r}"
    bars = [line for line in text.splitlines() if TQDM_BAR.search(line)]
    assert not bars, f"tqdm bar text in piped output: {bars[:3]}"
    noise = [line for line in text.splitlines() if NOISE.search(line)]
    assert not noise, f"native start-up lines in the output: {noise[:3]}"
    lines = progress_lines(text)
    segments: dict[str, list[list[re.Match]]] = {}
    for match in lines:  # one segment per bar: a desc whose count starts again is a new bar
        runs = segments.setdefault(match["desc"] or "", [])
        if not runs or int(match["n"]) <= int(runs[-1][-1]["n"]) or match["total"] != runs[-1][-1]["total"]:
            runs.append([])
        runs[-1].append(match)
    for desc, runs in segments.items():
        for run in runs:
            total = int(run[0]["total"]) if run[0]["total"] else None
            every_step = run[0]["unit"] in STEP_UNITS or run[0]["unit"] is None or (total or 0) <= 20
            limit = total if every_step and total else 11  # a line per step, or per 10 % (+ the last)
            assert len(run) <= max(limit, 1), (f"{desc!r}: {len(run)} lines for a bar of {total} "
                                               f"{run[0]['unit'] or 'steps'}: " + " | ".join(m.string for m in run))
            if total:
                assert all(int(m["n"]) <= total for m in run), [m.string for m in run]
    return lines


def run_kestrel(args: list[str], python_env: dict, timeout: float = 600) -> str:
    # as a user's shell has it: no progress mode forced, not verbose, no TF_CPP_MIN_LOG_LEVEL of the test fixture
    env = {k: v for k, v in python_env.items() if k not in ("KESTREL_PROGRESS", "KESTREL_VERBOSE",
                                                             "TF_CPP_MIN_LOG_LEVEL")}
    # bytes: text=True would turn every "\r" into "\n" (universal newlines) and hide the carriage returns
    result = subprocess.run([sys.executable, "-m", "kestrel", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, timeout=timeout)
    out = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    assert result.returncode == 0, out[-4000:]
    return out


def _tiny_repo(root: Path) -> Path:
    import onnx

    from serve.repository import TensorSpec, make_config, write_config

    folder = root / "tiny"
    (folder / "1").mkdir(parents=True)
    onnx.save(tiny_classifier(), str(folder / "1" / "model.onnx"))
    write_config(make_config("tiny", "onnxruntime_onnx", TensorSpec("images", np.uint8, (*SIZE, 3)),
                             TensorSpec("probabilities", np.float32, (CLASSES,)), max_batch_size=8), folder)
    (folder / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(CLASSES)))
    return root


def _labelled(root: Path, per_class: int = 30) -> Path:
    """class_0 .. class_2 folders (the tiny model's labels), so evaluate and the gate see labelled images."""
    folders = write_image_folders(root, per_class=per_class, classes=3)
    for k in range(3):
        (folders / f"class{k}").rename(folders / f"class_{k}")
    return folders


# ---- the commands ------------------------------------------------------------------------------------------
def case_export(tmp: Path) -> tuple[list, list[str]]:
    _need("tensorflow", "tf2onnx")
    sys.path.insert(0, str(Path(__file__).parent))
    from keras_helpers import tiny_keras_classifier

    tiny_keras_classifier(size=(32, 32), classes=3, uint8=True).save(tmp / "tiny.keras")
    (tmp / "labels.txt").write_text("a\nb\nc\n")
    return (["export", tmp / "tiny.keras", "--labels", tmp / "labels.txt", "--repository", tmp / "models"],
            [r"export tiny: 1/5 ", r"export tiny: 5/5 "])


def case_optimize(tmp: Path):
    _need("onnx", "onnxruntime")
    repo = _tiny_repo(tmp / "models")
    images = _labelled(tmp / "images")
    return (["optimize", "tiny", "--repository", repo, "--precision", "int8,fp16", "--calibration", images,
             "--min-calibration-images", "16", "--max-calibration-images", "40", "--latency-runs", "2"],
            [r"calibration \(a sample of 40 of 73 images\): 40/40 img", r"held-out images: 50/50 img \(1 undecodable, skipped\)", r"calibrating: 40/40 img",
             r"tiny_int8: \d+/\d+ batch"])


def case_evaluate(tmp: Path):
    _need("onnx", "onnxruntime")
    repo = _tiny_repo(tmp / "models")
    images = _labelled(tmp / "images")
    return (["evaluate", images, "--repository", repo, "--models", "tiny", "--latency-runs", "2", "--no-plot",
             "--output", tmp / "eval"], [r"evaluating: 91/91 img"])


def _train_args(tmp: Path) -> list:
    return ["--weights", "none", "--alpha", "0.35", "--image-size", "96", "--epochs", "3",
            "--cache-dir", tmp / "cache"]


def case_train(tmp: Path):
    _need("tensorflow", "tf2onnx", "onnxruntime")
    data = write_image_folders(tmp / "shapes", per_class=8, classes=3)
    return (["train", data, *_train_args(tmp), "--heads", "linear,mlp", "--output", tmp / "run",
             "--repository", tmp / "models", "--precision", "int8", "--calibration-method", "minmax",
             "--calibration-images", "12", "--latency-runs", "2"],
            [r"decoding images: 25/25 img", r"features \(plain\): 24/24 img", r"training mlp head: 3/3 epoch", r"export shapes: 5/5 ",
             r"calibration \(a sample of 12 of 15 images\)",
             r"\nserve it: kestrel serve --repository \S+ --models shapes,shapes_int8\n"])


def case_train_fewshot(tmp: Path):
    _need("tensorflow")
    data = write_image_folders(tmp / "shapes", per_class=8, classes=3)
    return (["train", "fewshot", data, *_train_args(tmp), "--per-class", "4", "--pair", "class0,class1",
             "--output", tmp / "fs"], [r"\n\[1/1\] class0 vs class1: test accuracy [\d.]+ on 8 images, [\d.]+ s\n"])


def case_bench_inprocess(tmp: Path):
    _need("onnxruntime")
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp / "models", "toy", classes=3, size=(8, 8))
    return (["bench", "inprocess", "--models", "toy", "--repository", tmp / "models", "--batch", "1,8",
             "--repeats", "2", "--iterations", "2", "--warmup", "0", "--output", tmp / "out"], [])


def case_bench(tmp: Path):
    _need("locust", "matplotlib")
    return (["bench", "--smoke", "--no-flask", "--output", tmp / "smoke"],
            [r"1/6 run classify:smoke_reference", r"6/6 run http_classify:smoke_fast"])


def case_demo(tmp: Path):
    _need("grpc")
    from PIL import Image

    from serve.backends.fake import write_fake_model

    labels = [f"kind_{i}" for i in range(10)]
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_fake_model(tmp / "models", name, labels=labels, seed=seed)
        write_fake_model(tmp / "models", f"{name}_keras", labels=labels, seed=seed)
    (tmp / "photos").mkdir()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp / "photos" / "p0.png")
    return (["demo", "--models", "alpha,beta", "--repository", tmp / "models", "--port", "0", "--photos",
             tmp / "photos"], [])


CASES = {"export": case_export, "optimize": case_optimize, "evaluate": case_evaluate, "train": case_train,
         "train fewshot": case_train_fewshot, "bench inprocess": case_bench_inprocess, "bench": case_bench,
         "demo": case_demo}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", list(CASES))
def test_piped_output_is_one_line_per_step(command, tmp_path, python_env):
    args, expected = CASES[command](tmp_path)
    out = run_kestrel(args, python_env)
    check_convention(out)
    for pattern in expected:  # the command's own progress is there, as lines
        assert re.search(pattern, out), f"no line matching {pattern!r} in:\n{out[-3000:]}"


def test_the_checker_catches_what_a_raw_bar_writes():
    """The same checks on what tqdm writes to a pipe, and on a bar that repeats its lines."""
    raw = "evaluating:   0%|          | 0/90 [00:00<?, ?img/s]\revaluating:  50%|█████     | 45/90 [00:01<00:01, 40img/s]"
    with pytest.raises(AssertionError, match="terminal control codes"):
        check_convention(raw)
    with pytest.raises(AssertionError, match="tqdm bar text"):
        check_convention(raw.replace("\r", "\n"))
    chatty = "\n".join(f"evaluating: {n}/90 img [0.{n % 10} s]" for n in range(1, 91))
    with pytest.raises(AssertionError, match="90 lines for a bar of 90 img"):
        check_convention(chatty)
    steps = "\n".join(f"export m: {n}/5 step {n} [1.{n} s]" for n in range(1, 6))
    assert len(check_convention(steps)) == 5
