"""Atomic file writes, and files the server can read whoever wrote them.

An atomic write goes to a temporary file in the same folder, renamed over the target: a reader never
sees a half-written file, an interrupted write leaves the old one, and a target that shares its
storage with another path (a copied folder) is replaced, never rewritten in place.

Temporary files (mkstemp) and folders (mkdtemp) are private (0600 / 0700) so that nobody reads them
half-written; renamed into place they would stay private, and a server running as another user (the
container image's uid 1000 over a repository exported by root) could not read them. Everything
published here gets the mode a plain open() / mkdir() would give: 0644 / 0755 under the usual umask
022, and whatever a stricter umask allows.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a thread creating a file meanwhile gets 022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode mkdir() gives a new folder: 0o777 less the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs):
    """open() for writing `path` atomically: the file appears, complete and with open()'s usual mode,
    only when the block ends without an exception."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes new files; mode {mode!r} is not 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def staging_folder(parent: str | Path, prefix: str) -> Path:
    """A new folder in `parent` (mkdtemp: a unique name) with mkdir()'s usual mode, to be renamed into
    place once complete (a model folder as readable as its siblings)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(folder_mode())
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False  # a kernel or file system without it: the two-step fallback
    raise OSError(code, os.strerror(code), str(b))


def publish_folder(new: str | Path, dest: str | Path) -> Path | None:
    """Put the complete folder `new` at `dest` in one step, so that a server polling the repository sees the
    old folder or the new one, never neither nor half of one. An existing `dest` is swapped out (Linux
    renameat2 RENAME_EXCHANGE; elsewhere moved aside, then `new` renamed: a moment without it) and its
    path returned, for the caller to delete (or to put back): a folder beside `dest` either way; None when
    `dest` did not exist."""
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.replace(new, dest)
        return None
    if _exchange(new, dest):
        return new  # the previous folder, now where `new` was
    backup = Path(tempfile.mkdtemp(prefix=f".old-{dest.name}-", dir=dest.parent))
    os.replace(dest, backup)  # a folder renamed onto an empty one replaces it
    os.replace(new, dest)
    return backup


# ---- reading: say which file and which permission ----------------------------------------------
_EFFECTIVE = os.access in os.supports_effective_ids


def _can(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=_EFFECTIVE)


def _who() -> str:
    return f"uid {os.geteuid()}, gid {os.getegid()}"


def _describe(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return f"{path} ({stat.filemode(st.st_mode)}, owner uid {st.st_uid}, gid {st.st_gid})"


def permission_problem(path: str | Path) -> str | None:
    """Why this process cannot read `path`: the first folder on the way it may not enter, or the file it
    may not read, with its mode and owner and the permission needed; None when nothing is in the way."""
    path = Path(os.path.abspath(path))
    for folder in reversed(path.parents):
        if folder.is_dir() and not _can(folder, os.X_OK):
            return (f"folder {_describe(folder)} does not let this server ({_who()}) in: it needs search (x) "
                    f"permission on every folder of the path (folders 0755: chmod a+rx)")
    if path.is_dir():
        if not _can(path, os.R_OK | os.X_OK):
            return (f"folder {_describe(path)} cannot be listed by this server ({_who()}): it needs read and "
                    f"search (r-x) permission (folders 0755: chmod a+rx)")
        return None
    if path.exists() and not _can(path, os.R_OK):
        return (f"file {_describe(path)} is not readable by this server ({_who()}): it needs read (r) "
                f"permission for this user (files 0644: chmod a+r, or chmod -R a+rX on the repository)")
    return None


def read_error(path: str | Path, exc: OSError) -> str:
    """'cannot read PATH: REASON' for an OSError; a permission error names the file or folder in the way,
    its mode and owner, this process's user and the permission it needs."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        problem = permission_problem(path)
        if problem:
            return f"cannot read {path}: {reason}: {problem}"
    return f"cannot read {path}: {reason}"


def check_readable(path: str | Path) -> str | None:
    """read_error's message when `path` exists but this process cannot read it, else None (cheap: no read)."""
    problem = permission_problem(path)
    if problem:
        return f"cannot read {path}: Permission denied: {problem}"
    return None
