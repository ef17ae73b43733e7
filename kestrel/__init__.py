"""The `kestrel` command: one entry point for every Kestrel tool (kestrel/cli.py)."""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kestrel")
except PackageNotFoundError:  # a plain checkout, not installed
    __version__ = "0.1.0"
