"""Regenerate docs/benchmarks.md's measured section from the benchmark commands' own reports.

    python -m benchmarks.docs                       # newest reports in benchmarks/results -> docs/benchmarks.md
    python -m benchmarks.docs --results DIR --docs docs/benchmarks.md

Takes the newest in-process report (`inprocess-<time>.md`, written by `kestrel bench inprocess`), the
newest server report (`<time>/report.md`, written by `kestrel bench`), skipping smoke runs, and the newest
Triton comparison (`<time>/report.md` whose results.json says kind "vs-triton", written by `kestrel bench
vs-triton`), skipping `--quick` runs, and writes
them between the markers `<!-- benchmarks:generated:start -->` and `<!-- benchmarks:generated:end -->`:
each report's machine line (CPU, instruction set, cores), versions and load come along as the report
wrote them, so nothing is retyped. The rest of the page is left as it is. Plots are linked where they
are (benchmarks/results/...), not copied.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from serve import console
from serve._files import write_text_atomic

START = "<!-- benchmarks:generated:start -->"
END = "<!-- benchmarks:generated:end -->"
ROOT = Path(__file__).resolve().parents[1]


def newest_inprocess(results: Path) -> Path | None:
    found = sorted(results.glob("inprocess-*.md"))
    return found[-1] if found else None




def _newest(results: Path, kind: str | None, skip: str) -> Path | None:
    """The newest <time>/report.md whose results.json has meta kind `kind` (None: the server benchmark's,
    which has none) and whose settings[`skip`] is not set."""
    candidates = sorted(p for p in results.glob("*/report.md"))
    for report in reversed(candidates):
        try:
            meta = json.loads((report.parent / "results.json").read_text())["meta"]
        except (OSError, ValueError, KeyError):
            continue
        if meta.get("kind") == kind and not meta.get("settings", {}).get(skip):
            return report
    return None


def newest_server_report(results: Path) -> Path | None:
    """The newest `kestrel bench` <time>/report.md that is not a smoke run."""
    return _newest(results, None, "smoke")


def newest_triton_report(results: Path) -> Path | None:
    """The newest `kestrel bench vs-triton` <time>/report.md that is not a --quick run."""
    from .vs_triton import KIND

    return _newest(results, KIND, "quick")


def _sections(markdown: str, keep: tuple[str, ...]) -> str:
    """The report's date line, its **Machine:** (and **Triton:**) line and the `## ` sections named in `keep`."""
    out, current = [], None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            if current in keep:
                out.append("#" + line)  # one level down inside docs/benchmarks.md
            continue
        if current is None:
            if line.startswith(("**Machine:**", "**Triton:**")) or (line and line[0].isdigit()):
                out += [line, ""]
            continue
        if current in keep:
            if line.startswith("### "):
                line = "#" + line
            out.append(line)
    return "\n".join(out).strip()


def _relink(markdown: str, folder: Path, docs: Path) -> str:
    """Make the report's relative image links point at its folder from docs/."""
    rel = Path(os.path.relpath(folder, docs.parent))

    def fix(match):
        target = match.group(2)
        if "://" in target or target.startswith("/"):
            return match.group(0)
        return f"{match.group(1)}({(rel / target).as_posix()})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)]+)\)", fix, markdown)


def generated(results: Path, docs: Path) -> str:
    parts = []
    inprocess = newest_inprocess(results)
    if inprocess is not None:
        text = inprocess.read_text().strip()
        header, _, table = text.partition("\n\n")
        parts += [f"### In process: `{inprocess.relative_to(results.parent) if results.parent in inprocess.parents else inprocess}`",
                  "", "\n".join(f"{line}  " for line in header.splitlines()), "", table]
    server = newest_server_report(results)
    if server is not None:
        body = _sections(server.read_text(), ("Headline", "Results", "Load on the machine"))
        parts += ["", f"### Through the server: `{server.parent.name}/report.md`", "", _relink(body, server.parent, docs)]
    triton = newest_triton_report(results)
    if triton is not None:
        body = _sections(triton.read_text(), ("Headline", "Results", "Latency under load", "The request path alone",
                                              "Ensemble against its physical limit", "Load on the machine"))
        parts += ["", f"### Kestrel vs Triton: `{triton.parent.name}/report.md`", "",
                  f"Full report: [{triton.parent.name}/report.md]"
                  f"({Path(os.path.relpath(triton, docs.parent)).as_posix()}).", "", _relink(body, triton.parent, docs)]
    if not parts:
        return ("No benchmark report found: run the commands above (they write into benchmarks/results/), "
                "then `python -m benchmarks.docs`.")
    return "\n".join(parts).strip()


def update(docs: Path, content: str) -> bool:
    """Replace the text between the markers (appending them when missing); True when the file changed."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{START}\n{content}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        new = text.rstrip() + "\n\n## Latest reports\n\n" + block + "\n"
    if new == text:
        return False
    write_text_atomic(docs, new)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder the benchmarks wrote into (default benchmarks/results)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="page to update")
    console.add_examples(p, "", "--results /tmp/quiet-machine-results --docs docs/benchmarks.md")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: {args.results} is not a folder; run `kestrel bench` / `kestrel bench inprocess` first",
              file=sys.stderr)
        return 2
    changed = update(args.docs, generated(args.results, args.docs))
    print(f"{'updated' if changed else 'unchanged'}: {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
