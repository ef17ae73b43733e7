#!/usr/bin/env python3
"""`make arm64-wheels`: can the serving install run on a 64-bit ARM Linux box, without one?

    python3 deploy/docker/arm64_wheels.py [--python-version 3.11] [--extra cpu] [--keep DIR]

Resolves pyproject.toml's base dependencies plus the `cpu` extra's pins (what the image installs) with
`pip download --only-binary=:all:` for CPython 3.11 on manylinux aarch64, dependencies included, and
fails if any package has no aarch64 wheel (a source build would need compilers on the device). The
accepted platform tags are manylinux2014 (glibc 2.17) up to manylinux_2_36 (Debian bookworm's glibc,
the image's base); the report names the glibc each wheel needs. Needs PyPI (not part of `make test`);
offline it says so and exits 2. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import pip_cert  # noqa: E402  (deploy/docker/engine.py)

ROOT = Path(__file__).resolve().parents[2]
GLIBC_MAX = 36  # Debian bookworm
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, GLIBC_MAX + 1)]


def requirements(extra: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"error: pyproject.toml has no extra {extra!r} (extras: {', '.join(sorted(extras))})")
    return list(project["dependencies"]) + list(extras[extra])


def pypi_reachable(index: str) -> bool:
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def wheel_glibc(name: str) -> str:
    """The glibc a wheel's platform tag needs ('any' for pure Python)."""
    tags = name[:-4].split("-")[-1].split(".")
    versions = []
    for tag in tags:
        if tag == "any":
            return "any (pure Python)"
        if tag.startswith("manylinux2014"):
            versions.append((2, 17))
        m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
        if m:
            versions.append((int(m.group(1)), int(m.group(2))))
    return "glibc %d.%d" % min(versions) if versions else "+".join(tags)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python-version", default="3.11", help="the image's Python (Debian bookworm: 3.11)")
    p.add_argument("--extra", default="cpu")
    p.add_argument("--index-url", default="https://pypi.org/simple")
    p.add_argument("--keep", type=Path, help="download the wheels here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=ROOT / ".cache" / "arm64-wheels.json")
    args = p.parse_args(argv)
    if not pypi_reachable(args.index_url):
        print(f"arm64-wheels: {args.index_url} is not reachable; this check needs PyPI", file=sys.stderr)
        return 2
    reqs = requirements(args.extra)
    abi = "cp" + args.python_version.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="kestrel-arm64-") as tmp:
        dest = args.keep or Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-cache-dir", "--dest", str(dest),
               "--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
               "--abi", "none", "--index-url", args.index_url, "--isolated",
               *[a for plat in PLATFORMS for a in ("--platform", plat)], *reqs]
        cert = pip_cert()  # behind a TLS-inspecting proxy: --isolated would drop pip's configured CA bundle
        if cert:
            cmd[4:4] = ["--cert", cert]
        print(f"pip download --only-binary=:all: --platform manylinux_2_17..2_{GLIBC_MAX}_aarch64 "
              f"--python-version {args.python_version}: {' '.join(reqs)}", flush=True)
        # --isolated: this machine's pip config (local x86 wheel folders, constraints) must not answer
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(w.name for w in dest.glob("*.whl"))
        if done.returncode != 0:
            missing = re.findall(r"No matching distribution found for (\S+)", done.stderr)
            print(done.stderr[-3000:], file=sys.stderr)
            print(f"FAILED: no aarch64 wheel for {', '.join(missing) or 'some requirement (see above)'}",
                  file=sys.stderr)
            return 1
    rows = [(w.split("-")[0], w.split("-")[1], wheel_glibc(w), w) for w in wheels]
    width = max(len(r[0]) for r in rows)
    for name, version, glibc, _ in rows:
        print(f"  {name:<{width}}  {version:<12} {glibc}")
    needs = max((tuple(map(int, g.split()[1].split("."))) for _, _, g, _ in rows if g.startswith("glibc")),
                default=(2, 17))
    print(f"OK: {len(rows)} wheels for manylinux aarch64 / CPython {args.python_version}; the newest glibc any "
          f"needs is {needs[0]}.{needs[1]} (Debian bookworm has 2.{GLIBC_MAX})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"python": args.python_version, "requirements": reqs,
                                     "wheels": [r[3] for r in rows], "max_glibc": "%d.%d" % needs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
