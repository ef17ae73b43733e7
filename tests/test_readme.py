"""The README is a user guide whose commands work: its first screen has the two commands and the two
pictures; every `kestrel ...` / `python -m ...` line in the README (and in the docs this branch wrote)
parses with that subcommand's own argparse parser, every `make X` is a Makefile target, every
`pip install` names extras and pins pyproject.toml has; and every subcommand the README shows is run by
a test (or `make demo`)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from kestrel import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README] + [ROOT / "docs" / n for n in ("cli.md", "benchmarks.md", "export.md", "server.md", "training.md")]
MODULES = {c.also.split()[-1]: name for name, c in cli.COMMANDS.items() if c.also.startswith("python -m ")}
MODULES.update({c.also.split()[-1]: f"{group} {name}" for group, tools in cli.TOOLS.items()
                for name, c in tools.items()})
MODULES.pop("kestrel", None)


def code_lines(path: Path) -> list[str]:
    """Commands in indented and fenced code blocks (```text blocks are output, skipped); `\\` joins lines,
    `# comments` and `$ ` prompts are dropped."""
    lines, fence, out = path.read_text().splitlines(), None, []
    pending = ""
    for line in lines:
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "sh")
            continue
        if fence == "text":
            continue
        if fence is None and not line.startswith("    "):
            continue
        text = line.strip()
        if pending:
            text = pending + " " + text
            pending = ""
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        if text:
            out.append(text)
    return out


def _strip_comment(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def commands(paths=DOCS) -> list[tuple[str, str]]:
    found = []
    for path in paths:
        for text in code_lines(path):
            for part in re.split(r"\s+&&\s+", text):
                words = _strip_comment(part)
                ours = len(words) > 2 and words[2].split(".")[0] in ("serve", "export", "train", "benchmarks", "kestrel")
                if words and (words[0] in ("kestrel", "make", "pip")
                              or (words[:2] in (["python", "-m"], ["python3", "-m"]) and ours)):
                    found.append((path.name, shlex.join(words)))
    return found


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_with_the_subcommand(words: list[str], monkeypatch) -> argparse.Namespace:
    """Run the subcommand's main() up to its parse_args(), which returns the namespace instead of going on."""
    if words[0] == "kestrel":
        name, rest = words[1], words[2:]
        command = cli.COMMANDS[name]
        if rest and rest[0] in cli.TOOLS.get(name, {}):
            command, rest = cli.TOOLS[name][rest[0]], rest[1:]
        module = command.module
    else:  # python -m MODULE
        module, rest = words[2], words[3:]
        module = "kestrel.cli" if module == "kestrel" else module
        if module == "kestrel.cli":
            return parse_with_the_subcommand(["kestrel", *rest], monkeypatch)
        spec = importlib.util.find_spec(module)
        is_package = spec is not None and spec.submodule_search_locations is not None
        module = f"{module}.__main__" if is_package and importlib.util.find_spec(f"{module}.__main__") else module
    if module == "export.evaluate" and importlib.util.find_spec("export.evaluate") is None:
        pytest.skip("export/evaluate.py comes with the accuracy branch")
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main = importlib.import_module(module).main
    with pytest.raises(_Parsed) as parsed:
        main(rest)
    return parsed.value.namespace


def test_first_screen_has_the_two_commands_and_the_two_pictures():
    text = README.read_text()
    first = text.split("\n## ", 1)[0]
    assert len(first.splitlines()) <= 30, "the first screen runs past 30 lines"
    blocks = [ln.strip() for ln in first.splitlines() if ln.startswith("    ")]
    assert [b.split()[:2] for b in blocks] == [["make", "demo"], ["make", "test"]]
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", first)
    assert images == ["docs/img/web.png", "docs/img/accuracy_latency.png"]


def test_the_web_page_picture_exists():
    data = (ROOT / "docs" / "img" / "web.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_the_accuracy_chart_exists():
    path = ROOT / "docs" / "img" / "accuracy_latency.png"
    if not path.exists():
        pytest.skip("docs/img/accuracy_latency.png is produced by `kestrel evaluate` on imagenet_val "
                    "(docs/accuracy.md); not generated in this checkout yet")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_shows_every_subcommand():
    shown = {shlex.split(c)[1] for _, c in commands([README]) if c.startswith("kestrel ")}
    expected = {"export", "optimize", "evaluate", "serve", "classify", "train", "bench", "doctor"}
    assert expected <= shown, f"no README example of: {sorted(expected - shown)}"
    assert "docs/scaling.md" in README.read_text()


DOC_COMMANDS = commands()


def test_commands_were_found():
    assert len([c for f, c in DOC_COMMANDS if f == "README.md"]) >= 15


@pytest.mark.parametrize("where, command", DOC_COMMANDS, ids=[f"{f}: {c[:60]}" for f, c in DOC_COMMANDS])
def test_every_documented_command_parses(where, command, monkeypatch):
    words = shlex.split(command)
    if words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in [w for w in words[1:] if "=" not in w and not w.startswith("-")]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target!r}"
        return
    if words[0] == "pip":
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        pins = {re.split(r"[=<>\[]", d)[0]: d for group in project["optional-dependencies"].values() for d in group}
        for word in words[2:]:
            extras = re.fullmatch(r"(?:-e\s*)?\.\[([\w,-]+)\]", word)
            if extras:
                missing = set(extras.group(1).split(",")) - set(project["optional-dependencies"])
                assert not missing, f"{where}: pyproject.toml has no extra {missing}"
            elif "==" in word:
                name = word.split("==")[0]
                assert pins.get(name) == word, f"{where}: {word} is not pyproject's pin {pins.get(name)}"
        return
    namespace = parse_with_the_subcommand(words, monkeypatch)
    assert isinstance(namespace, argparse.Namespace)


# Which test runs each subcommand for real (file, a string in it that shows it does).
COVERED_BY = {
    "export": [("tests/export/keras_helpers.py", '"-m", "export"'), ("tests/export/test_demo_output.py", "export.demo")],
    "optimize": [("tests/export/test_quantize.py", "export.optimize")],
    "evaluate": [("tests/export/test_evaluate.py", "evaluate")],
    "serve": [("tests/serve/test_server_process.py", '"-m", "serve"')],
    "classify": [("tests/serve/test_classify.py", "serve.client")],
    "models": [("tests/serve/test_lifecycle.py", "serve.control")],
    "train": [("tests/train/test_cli.py", '"-m", "train"')],
    "bench": [("tests/benchmarks/test_bench_smoke.py", "bench-smoke")],
    "bench inprocess": [("tests/benchmarks/test_inprocess.py", "benchmarks.inprocess")],
    "demo": [("tests/export/test_demo.py", "export.demo")],
    "doctor": [("tests/kestrel/test_doctor.py", '"kestrel", "doctor"')],
}


def test_every_readme_subcommand_is_run_by_a_test():
    shown = set()
    for _, command in commands([README]):
        words = shlex.split(command)
        if words[0] == "kestrel":
            shown.add(" ".join(words[1:3]) if words[1] == "bench" and words[2:3] == ["inprocess"] else words[1])
    for sub in sorted(shown):
        assert sub in COVERED_BY, f"README shows `kestrel {sub}` but no test is listed as running it"
        for path, needle in COVERED_BY[sub]:
            file = ROOT / path
            if sub == "evaluate" and not file.exists():
                continue  # the accuracy branch brings export/evaluate.py and its tests
            assert needle in file.read_text(), f"{path} does not run {sub} ({needle!r} not found)"
