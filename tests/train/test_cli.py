"""`python -m train`: one clear line and exit status 2 for bad input; no TensorFlow needed for that."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}/one_class"], "at least 2"),
        (["{data}", "--val-split", "0.7", "--test-split", "0.5"], "summing to less than 1"),
        (["{data}", "--val-split", "0"], "validation set is needed"),
        (["{data}", "--name", "../escape"], "invalid model name"),
        (["{data}", "--heads", "linear,forest"], "--heads"),
        (["{data}", "--epochs", "0"], "--epochs 0"),
        (["{data}", "--weights", "{tmp}/no_such.h5"], "weights file"),
        (["{data}", "--flip-tta", "--fine-tune-layers", "3"], "--flip-tta with --fine-tune-layers"),
        (["{data}", "--base", "{tmp}/no_such.keras"], "no such file"),
        (["{data}", "--precision", "int8", "--calibration-images", "0"], "--calibration-images 0"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(args, message, tiny_dataset, tmp_path, python_env):
    (tmp_path / "one_class" / "a").mkdir(parents=True)
    (tmp_path / "one_class" / "a" / "x.png").write_bytes(b"x")
    args = [a.format(tmp=tmp_path, data=tiny_dataset) for a in args]
    proc = _run(args + ["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                python_env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_base_is_an_argparse_error(tiny_dataset, tmp_path, python_env):
    proc = _run([str(tiny_dataset), "--base", "alexnet"], python_env, tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'alexnet'" in proc.stderr and "mobilenet_v2" in proc.stderr
    proc = _run([str(tiny_dataset), "--base", "MobileNetV2"], python_env, tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'MobileNetV2'; did you mean mobilenet_v2?" in proc.stderr


def test_help_lists_the_issue_options(python_env, tmp_path):
    proc = _run(["--help"], python_env, tmp_path)
    assert proc.returncode == 0
    for option in ("--base", "--name", "--output", "--epochs", "--val-split", "--test-split", "--augment",
                   "--fine-tune-layers", "--pool-stages", "--no-refit", "--seed", "--weights", "--export", "--repository"):
        assert option in proc.stdout


def test_the_last_line_is_the_kestrel_command_that_serves_what_was_trained(tmp_path):
    """train ended with "serve it: python -m serve --repository models", not the tour's `kestrel serve`, and
    without the models' names; without --export it said nothing about how to serve the model."""
    import shlex
    from types import SimpleNamespace

    from export.__main__ import build_parser as export_parser
    from serve.__main__ import build_parser as serve_parser
    from train.__main__ import next_step
    from train.pipeline import TrainResult

    run = tmp_path / "runs" / "flower photos"
    result = TrainResult(output=run, model_path=run / "model.keras", report_path=run / "report.json",
                         test_accuracy=0.9, report={"name": "flower_photos", "int8": {"variant": "flower_photos_int8",
                                                                                      "written": True}},
                         export=SimpleNamespace(name="flower_photos"))
    line = next_step(result, tmp_path / "models")
    assert line.startswith("serve it: kestrel serve ")
    words = shlex.split(line.split(": ", 1)[1])
    served = serve_parser().parse_args(words[2:])
    assert served.models == "flower_photos,flower_photos_int8" and served.repository == tmp_path / "models"
    result.report["int8"]["written"] = False  # below the gate: only the FP32 model is there to serve
    assert serve_parser().parse_args(shlex.split(next_step(result, tmp_path / "models").split(": ", 1)[1])[2:]
                                     ).models == "flower_photos"

    result.export = None  # trained without --export: first the export, then the server
    export_cmd, serve_cmd = next_step(result, tmp_path / "models").split(": ", 1)[1].split(" (labels.txt is beside "
                                                                                          "the model), then ")
    exported = export_parser().parse_args(shlex.split(export_cmd)[2:])
    assert exported.source == str(run / "model.keras") and exported.name == "flower_photos"
    assert serve_parser().parse_args(shlex.split(serve_cmd)[2:]).models == "flower_photos"
