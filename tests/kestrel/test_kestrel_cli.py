"""The `kestrel` command: --help of the dispatcher and of every subcommand, the console-script entry in
pyproject.toml, consistent flag names across subcommands, --verbose, bad input."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kestrel import cli
from serve import console

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ["export", "optimize", "evaluate", "serve", "classify", "models", "train", "bench", "demo", "doctor"]
BENCH_TOOLS = ["inprocess", "classify-latency", "docs"]
TRAIN_TOOLS = ["fewshot"]


def _has_evaluate() -> bool:
    return (ROOT / "export" / "evaluate.py").exists()


def _kestrel(*args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kestrel", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _help(command: str) -> str:
    result = _kestrel(*command.split(), "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_pyproject_registers_the_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["scripts"]["kestrel"]
    module, _, attr = target.partition(":")
    function = getattr(importlib.import_module(module), attr)
    assert callable(function) and function is cli.main
    assert "kestrel*" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def test_kestrel_help_lists_every_subcommand_and_ends_with_examples():
    out = _help("")
    assert out.startswith("usage: kestrel")
    listed = re.findall(r"^  (\w+)\s{2,}", out.split("commands:")[1].split("options:")[0], re.M)
    assert listed == SUBCOMMANDS == list(cli.COMMANDS)
    tail = out.rstrip().split("examples:")[1].strip().splitlines()
    assert 1 <= len(tail) <= 5 and all(line.strip().startswith("kestrel ") for line in tail)
    # python -m kestrel with no argument: usage on stderr, exit 2
    none = _kestrel()
    assert none.returncode == 2 and "a command is required" in none.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS + [f"bench {t}" for t in BENCH_TOOLS]
                         + [f"train {t}" for t in TRAIN_TOOLS])
def test_every_subcommand_help_names_kestrel_and_ends_with_examples(command):
    if command == "evaluate" and not _has_evaluate():
        pytest.skip("export/evaluate.py comes with the accuracy branch; this passes once it is merged")
    out = _help(command)
    assert out.startswith(f"usage: kestrel {command}"), out[:200]
    epilog = out.rstrip().rsplit("examples:", 1)
    assert len(epilog) == 2, f"kestrel {command} --help has no examples"
    examples = [ln for ln in epilog[1].strip().splitlines() if ln.startswith("  ")]
    assert 1 <= len(examples) <= 3
    assert all(ln.strip().startswith(f"kestrel {command}") for ln in examples), examples


def test_python_m_forms_keep_their_own_names():
    for module in ("export", "serve.client", "train"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: python -m {module}")
        assert f"\n  python -m {module} " in result.stdout  # examples in the form that was typed


def _options(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _help(command)))


# flag -> the commands that must all spell it that way
CONSISTENT = {
    "--repository": ["export", "optimize", "evaluate", "serve", "train", "bench", "demo", "bench inprocess",
                     "bench classify-latency"],
    "--models": ["serve", "classify", "evaluate", "demo", "bench inprocess"],
    "--port": ["serve", "classify", "demo"],
    "--host": ["serve", "classify"],
    "--http-port": ["serve", "demo"],
    "--output": ["evaluate", "train", "train fewshot", "bench", "bench inprocess"],
    "--quiet": ["export", "optimize", "evaluate", "train"],
    "--no-progress": ["export", "optimize", "evaluate", "train"],
    "--weights": ["export", "train", "bench", "demo"],
    "--precision": ["export", "optimize"],
    "--calibration": ["export", "optimize", "bench"],
    "--engine": ["export", "optimize"],
}


def test_flag_names_are_consistent_across_subcommands():
    commands = sorted({c for cs in CONSISTENT.values() for c in cs})
    options = {c: _options(c) for c in commands}
    missing = {flag: [c for c in cs if flag not in options[c]] for flag, cs in CONSISTENT.items()}
    assert not any(missing.values()), {f: cs for f, cs in missing.items() if cs}


def test_aliases_parse_to_the_same_settings(tmp_path):
    from export.__main__ import build_parser as export_parser
    from train.__main__ import parser as train_parser

    assert export_parser().parse_args(["m", "--no-progress"]).quiet is True
    assert export_parser().parse_args(["m", "--quiet"]).quiet is True
    assert train_parser().parse_args([str(tmp_path), "--quiet"]).no_progress is True
    assert train_parser().parse_args([str(tmp_path), "--no-progress"]).no_progress is True
    from export.evaluate import build_parser as evaluate_parser

    for flag in ("--output", "--out"):  # evaluate took only --out, unlike train and bench
        assert evaluate_parser().parse_args(["data", flag, str(tmp_path)]).out == str(tmp_path)
    assert evaluate_parser().parse_args(["data", "--no-progress"]).quiet is True


def test_classify_host_and_port_build_the_address(monkeypatch):
    import serve.client as client

    seen = []

    class FakeClient:
        def __init__(self, address, **kwargs):
            seen.append(address)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(client, "KestrelClient", FakeClient)
    assert client.main(["--port", "9001", "nonexistent.jpg"]) == 1  # the file is missing: one error, exit 1
    assert client.main(["--host", "10.0.0.2", "--port", "9002", "nonexistent.jpg"]) == 1
    assert client.main(["--address", "h:1", "nonexistent.jpg"]) == 1
    assert seen == ["127.0.0.1:9001", "10.0.0.2:9002", "h:1"]


def test_verbose_anywhere_sets_the_environment_for_subprocesses(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    calls = []
    monkeypatch.setitem(cli.COMMANDS, "probe", cli.Command("json", "test", "python -m json"))
    monkeypatch.setattr(cli, "_load", lambda command, prog: (lambda argv: calls.append(argv) or 0))
    assert cli.main(["probe", "--verbose", "a"]) == 0
    assert calls[-1] == ["a"] and console.is_verbose()
    console.set_verbose(False)
    assert cli.main(["-v", "probe", "b"]) == 0
    assert calls[-1] == ["b"] and console.is_verbose()
    console.set_verbose(False)
    assert cli.main(["probe", "-v"]) == 0  # after the command, -v belongs to the subcommand
    assert calls[-1] == ["-v"] and not console.is_verbose()


def test_unknown_command_and_option(capsys):
    assert cli.main(["exprot"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'exprot'" in err and "did you mean export" in err
    assert cli.main(["--frobnicate", "export"]) == 2
    assert "unknown option '--frobnicate'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kestrel ")


def test_subcommand_exit_status_and_errors_pass_through():
    # a usage error inside a subcommand: argparse's exit 2 and message, under the kestrel name
    result = _kestrel("optimize")
    assert result.returncode == 2
    assert "usage: kestrel optimize" in result.stderr and "required" in result.stderr


def test_a_module_without_examples_gets_the_dispatchers(monkeypatch, capsys):
    """export.evaluate (the accuracy branch) builds its own parser without an epilog: `kestrel evaluate --help`
    still names kestrel and ends with the examples kept in kestrel/cli.py."""
    import argparse
    import types

    module = types.ModuleType("plain_tool")

    def main(argv=None):
        parser = argparse.ArgumentParser(prog="python -m plain_tool")
        parser.add_argument("data")
        return 0 if parser.parse_args(argv).data == "d" else 1

    module.main = main
    monkeypatch.setitem(sys.modules, "plain_tool", module)
    monkeypatch.setitem(cli.COMMANDS, "plain", cli.Command("plain_tool", "t", "python -m plain_tool", ("DATA --x",)))
    original = argparse.ArgumentParser.parse_known_args
    with pytest.raises(SystemExit) as done:
        cli.main(["plain", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kestrel plain") and out.rstrip().endswith("examples:\n  kestrel plain DATA --x")
    assert argparse.ArgumentParser.parse_known_args is original  # the hook is gone after one parse
    assert cli.main(["plain", "d"]) == 0 and argparse.ArgumentParser.parse_known_args is original
    assert cli.COMMANDS["evaluate"].examples  # evaluate's examples live here until its module has its own


def test_the_checkouts_offline_keras_home_is_used_when_keras_home_is_unset(tmp_path, monkeypatch):
    """make demo copies ../shared/keras_home to .cache/keras_home and sets KERAS_HOME for make's own commands only;
    `kestrel export mobilenet_v2` typed in a new shell afterwards must find the same weights, not try to download."""
    from kestrel import cli

    home = tmp_path / ".cache" / "keras_home"
    monkeypatch.setattr(cli, "OFFLINE_KERAS_HOME", home)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    assert cli.use_offline_keras_home() is None and "KERAS_HOME" not in os.environ  # make demo has not run
    (home / "models").mkdir(parents=True)
    assert cli.use_offline_keras_home() == home and os.environ["KERAS_HOME"] == str(home)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "mine"))
    assert cli.use_offline_keras_home() is None and os.environ["KERAS_HOME"] == str(tmp_path / "mine")  # kept
