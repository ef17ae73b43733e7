"""--model-control-mode poll: the repository is looked at every --repository-poll-secs seconds and the
server follows it, without a restart.

    poller = RepositoryPoller(hub, interval_s=5).start()
    poller.poll_once()          # what one look does (tests call it directly)
    poller.stop()

A model's files are summed up by each look (config.pbtxt, its labels and every file of every version
folder: path, size, modification time). A change is acted on only once two looks in a row saw the same
files, so a version copied file by file (rsync, cp, a slow network volume) is never loaded half-copied:
  - a model whose files changed and then stayed the same for one more look is loaded again (the registry
    reloads only the versions whose content changed, and keeps serving the others meanwhile);
  - a new model folder is loaded; a model folder missing from two looks in a row is unloaded (its
    requests finish);
  - a version folder that disappeared leaves as the version policy says (drained, then closed);
  - ensembles defined in the repository follow their folders the same way.
Kestrel's own writers (export, optimize, train --export) publish a version as a whole (a staging folder
renamed into place), so it appears complete in one look; the two-look rule is for files copied by anything
else. A load that fails is logged and tried again only when the files change again.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

from .errors import KestrelError
from .repository import CONFIG_FILE

log = logging.getLogger(__name__)


def signature(folder: Path) -> tuple:
    """What a look sees of a model or ensemble folder: every file's relative path, size and mtime."""
    items = []
    try:
        for path in sorted(folder.rglob("*")):
            if path.name.startswith("."):  # staging folders and temporary files of atomic writers
                continue
            try:
                if path.is_file():
                    st = path.stat()
                    items.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
            except OSError:
                items.append((str(path.relative_to(folder)), -1, -1))
    except OSError:
        return ()
    return tuple(items)


class RepositoryPoller:
    """Follows the repository's folders (see the module docstring)."""

    def __init__(self, hub, interval_s: float, names: Sequence[str] | None = None):
        self.hub = hub
        self.interval_s = float(interval_s)
        self.names = set(names) if names else None  # restrict to these (--models / --load-model)
        self._seen: dict[str, tuple] = {}  # name -> signature at the previous look
        self._applied: dict[str, tuple] = {}  # name -> signature the server serves (or last tried)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for name in self._folders():  # what start-up loaded is what the server serves now
            sig = signature(self.hub.repository.root / name)
            self._seen[name] = self._applied[name] = sig

    def _folders(self) -> list[str]:
        return [n for n in self.hub.repository.folder_names() if self.names is None or n in self.names]

    def start(self) -> "RepositoryPoller":
        self._thread = threading.Thread(target=self._run, name="repository-poll", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one look
                log.exception("repository poll failed; trying again in %.0f s", self.interval_s)

    def poll_once(self) -> list[str]:
        """One look; returns what it did ("load NAME", "unload NAME") for logs and tests."""
        with self._lock:
            done = []
            present = set(self._folders())
            for name in sorted(present):
                sig = signature(self.hub.repository.root / name)
                previous = self._seen.get(name)
                self._seen[name] = sig
                if sig != previous or sig == self._applied.get(name):
                    continue  # changing (wait for a quiet look), or nothing new
                if not any(item[0] == CONFIG_FILE for item in sig):
                    continue
                self._applied[name] = sig
                done.append(self._load(name))
            for name in sorted(set(self._applied) - present):
                if self._seen.get(name) != ():  # gone since this look: make sure with the next one
                    self._seen[name] = ()
                    continue
                self._applied.pop(name, None)
                self._seen.pop(name, None)
                done.append(self._unload(name))
            return [d for d in done if d]

    def _load(self, name: str) -> str:
        try:
            self.hub.registry.load(name)  # a model, or an ensemble: its members loaded, their labels checked
            log.info("repository poll: %s loaded", name)
            return f"load {name}"
        except KestrelError as exc:
            log.error("repository poll: %s failed to load: %s (tried again when its files change)", name, exc)
            return f"load {name} failed"

    def _unload(self, name: str) -> str:
        try:
            self.hub.registry.unload(name)
            log.info("repository poll: %s removed from the repository; unloaded", name)
            return f"unload {name}"
        except KestrelError as exc:
            log.error("repository poll: %s could not be unloaded: %s", name, exc)
            return f"unload {name} failed"
