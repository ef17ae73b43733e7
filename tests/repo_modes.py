"""Are the files Kestrel wrote readable by a server running as another user?

A repository exported by root (CI, a build machine) is served by the container image's uid 1000: every
file must be as readable as a plain open() makes it (0644 under umask 022) and every folder as
enterable as mkdir() makes it (0755), never mkstemp's 0600 or mkdtemp's 0700.
Imported by name (`from repo_modes import ...`): tests/ is on sys.path beside tests/conftest.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def wrong_modes(root: Path) -> dict[str, str]:
    """{path relative to root: "mode, expected mode"} for every file and folder under root (root included)
    whose permission bits differ from what open()/mkdir() give under the current umask."""
    mask = umask()
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    wrong = {}
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        want = want_dir if path.is_dir() else want_file
        if mode != want:
            wrong[str(path.relative_to(root)) or "."] = f"{mode:04o}, expected {want:04o}"
    return wrong


def assert_readable_by_others(root: Path) -> int:
    """Every file and folder under root has open()/mkdir()'s mode, and the umask lets others read them
    (so another user's server can); returns how many files were checked."""
    root = Path(root)
    assert root.is_dir(), f"{root} is not a folder"
    assert not umask() & 0o044, f"the umask {umask():04o} itself hides files from other users; run with 022"
    wrong = wrong_modes(root)
    assert not wrong, f"files another user's server could not read (mode, expected): {wrong}"
    leftovers = [str(p.relative_to(root)) for p in root.rglob(".tmp*")]
    assert not leftovers, f"temporary files left in {root}: {leftovers}"
    return sum(1 for p in root.rglob("*") if p.is_file())
