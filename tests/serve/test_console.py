"""serve/console.py: progress as bars on a terminal and whole lines otherwise; TensorFlow's native start-up
noise filtered (with a stand-in `tensorflow` package writing the real lines to file descriptor 2, as its C++
code does); warnings and unrelated stderr lines kept; --help examples."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serve import console

ROOT = Path(__file__).resolve().parents[2]
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796156329.453416   12476 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "I0000 00:00:1796156329.700874   12476 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
    "E0000 00:00:1796156348.457402   12476 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
]


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_steps_print_one_line_each_without_a_terminal(monkeypatch):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    out = _Stream(tty=False)
    bar = console.progress(total=3, desc="export m", unit="step", file=out)
    assert isinstance(bar, console.LineProgress)
    for label in ("loading Keras model", "converting to ONNX", "parity check"):
        bar.set_postfix_str(label)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.rsplit(" [", 1)[0] for ln in lines] == ["export m: 1/3 loading Keras model",
                                                      "export m: 2/3 converting to ONNX",
                                                      "export m: 3/3 parity check"]
    assert "\r" not in out.getvalue()


def test_long_loops_print_every_tenth_and_inner_loops_once(monkeypatch):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    out = _Stream(tty=False)
    assert sum(1 for _ in console.progress(range(250), desc="calibrating", unit="img", file=out)) == 250
    lines = out.getvalue().splitlines()
    assert [ln.split(" [")[0] for ln in lines] == [f"calibrating: {n}/250 img" for n in range(25, 251, 25)]
    out = _Stream(tty=False)
    list(console.progress(range(40), desc="batches", unit="batch", leave=False, file=out))
    assert [ln.split(" [")[0] for ln in out.getvalue().splitlines()] == ["batches: 40/40 batch"]
    out = _Stream(tty=False)
    with console.progress(total=100, desc="stopped", file=out) as bar:
        bar.update(37)  # an interrupted loop: the line at 30 % (37 of 100), nothing repeated at close
    assert [ln.split(" [")[0] for ln in out.getvalue().splitlines()] == ["stopped: 37/100"]
    out = _Stream(tty=False)
    list(console.progress(range(30), desc="bench", unit="run", file=out))  # runs are steps: 30 lines
    assert [ln.split(" [")[0] for ln in out.getvalue().splitlines()] == [f"bench: {n}/30 run" for n in range(1, 31)]
    out = _Stream(tty=False)
    list(console.progress(range(5), desc="off", file=out, disable=True))
    assert out.getvalue() == ""


def test_terminal_gets_tqdm_and_the_environment_can_force_either(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    tty = _Stream(tty=True)
    bar = console.progress(total=2, desc="x", file=tty)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    assert isinstance(console.progress(total=2, file=tty), console.LineProgress)
    monkeypatch.setenv(console.PROGRESS_ENV, "bar")
    bar = console.progress(total=2, file=_Stream(tty=False))
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv(console.PROGRESS_ENV, "off")
    off = _Stream(tty=False)
    bar = console.progress(total=2, file=off)
    bar.update(2)
    bar.close()
    assert off.getvalue() == ""


def _stub_tensorflow(root: Path) -> Path:
    package = root / "tensorflow"
    package.mkdir(parents=True)
    writes = "".join(f"os.write(2, {(line + chr(10)).encode()!r})\n" for line in NOISE_LINES)
    (package / "__init__.py").write_text(
        "import os, warnings\n" + writes + "os.write(2, b'libfoo.so: a line that matters\\n')\n"
        "__version__ = '0.0-stub'\n")
    return root


def _run(code: str, stub: Path, **env) -> subprocess.CompletedProcess:
    import os

    environ = {k: v for k, v in os.environ.items() if k not in ("KESTREL_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    environ["PYTHONPATH"] = os.pathsep.join([str(stub), str(ROOT)])
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=60)


CODE = """
    import logging, os, sys, warnings
    from serve import console
    console.quiet_native_logs()
    import tensorflow
    print("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
    warnings.warn("a warning that matters")
    logging.getLogger("tensorflow").error("an error from tensorflow's logger")
    print("imported", tensorflow.__version__)
"""


def test_tensorflow_import_noise_is_filtered_and_the_rest_kept(tmp_path):
    result = _run(CODE, _stub_tensorflow(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "imported 0.0-stub" in result.stdout and "TF_CPP_MIN_LOG_LEVEL 3" in result.stdout
    for line in NOISE_LINES:
        assert line not in result.stderr
    assert "libfoo.so: a line that matters" in result.stderr
    assert "UserWarning: a warning that matters" in result.stderr
    assert "an error from tensorflow's logger" in result.stderr


def test_verbose_keeps_every_line(tmp_path):
    result = _run(CODE, _stub_tensorflow(tmp_path), KESTREL_VERBOSE="1")
    assert result.returncode == 0, result.stderr
    assert "TF_CPP_MIN_LOG_LEVEL None" in result.stdout
    for line in NOISE_LINES:
        assert line in result.stderr


def test_a_users_own_log_level_is_kept(tmp_path):
    result = _run(CODE, _stub_tensorflow(tmp_path), TF_CPP_MIN_LOG_LEVEL="0")
    assert "TF_CPP_MIN_LOG_LEVEL 0" in result.stdout


def test_is_noise_matches_only_known_lines():
    assert all(console.is_noise(line) for line in NOISE_LINES)
    assert not console.is_noise("error: model 'x' is not in repository models")
    assert not console.is_noise("W0000 00:00:17.0 1 some_kernel.cc:1] Out of memory while allocating")


def test_add_examples_keeps_the_epilog_as_written_and_takes_the_kestrel_name():
    parser = argparse.ArgumentParser(prog="python -m thing", description="A " + "long description " * 10)
    console.add_examples(parser, "one --flag", "two   # aligned comment")
    text = parser.format_help()
    assert text.rstrip().endswith("examples:\n  python -m thing one --flag\n  python -m thing two   # aligned comment")
    console.set_prog("kestrel thing")
    parser = console.add_examples(argparse.ArgumentParser(prog="python -m thing"), "x")
    assert parser.format_usage().startswith("usage: kestrel thing") and "  kestrel thing x" in parser.format_help()
    # the override is used once
    assert console.add_examples(argparse.ArgumentParser(prog="python -m other"), "y").prog == "python -m other"


def test_verbose_flag_round_trip(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.is_verbose()
    console.set_verbose(True)
    assert console.is_verbose()
    console.set_verbose(False)
    assert not console.is_verbose()


@pytest.mark.parametrize("forced", ["lines"])
def test_pipeline_steps_use_the_console(monkeypatch, forced):
    """export's step bar (export/pipeline.py _Steps) goes through serve.console.progress."""
    from export.pipeline import _Steps

    monkeypatch.setenv(console.PROGRESS_ENV, forced)
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    steps = _Steps(True, 2, "toy")
    steps.step("loading Keras model")
    steps.step("converting to ONNX")
    steps.close()
    assert [ln.split(" [")[0] for ln in err.getvalue().splitlines()] == ["export toy: 1/2 loading Keras model",
                                                                        "export toy: 2/2 converting to ONNX"]


def test_an_import_blocker_earlier_on_the_path_still_blocks(tmp_path):
    """The quiet finder goes first but asks the other finders: tests/test_light_imports.py's blocker holds."""
    code = """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow":
                    raise ImportError("tensorflow is blocked")
        sys.meta_path.insert(0, Block())
        from serve import console
        console.quiet_native_logs()
        try:
            import tensorflow
        except ImportError as exc:
            print("blocked:", exc)
    """
    result = _run(code, _stub_tensorflow(tmp_path))
    assert "blocked: tensorflow is blocked" in result.stdout, result.stdout + result.stderr


def test_did_you_mean_finds_the_name_a_user_meant():
    from serve.console import close_names, did_you_mean

    apps = ["densenet121", "efficientnet_b0", "mobilenet", "mobilenet_v2", "resnet50", "vgg16", "xception"]
    assert close_names("mobilenetv2", apps) == ["mobilenet_v2"]  # case, '_' and '-' do not count
    assert close_names("ResNet-50", apps) == ["resnet50"]
    assert close_names("xcepton", apps) == ["xception"]
    assert did_you_mean("alexnet", apps) == ""
    assert did_you_mean("exprot", ["export", "optimize", "serve"]) == "; did you mean export?"
