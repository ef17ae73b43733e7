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


def test_help_lists_the_issue_options(python_env, tmp_path):
    proc = _run(["--help"], python_env, tmp_path)
    assert proc.returncode == 0
    for option in ("--base", "--name", "--output", "--epochs", "--val-split", "--test-split", "--augment",
                   "--fine-tune-layers", "--pool-stages", "--no-refit", "--seed", "--weights", "--export", "--repository"):
        assert option in proc.stdout
