"""Files Kestrel publishes are readable by a server running as another user, and a server that cannot read
one says which file and which permission it needs (serve/_files.py, serve/repository.py, the backends).

The permission checks are real: as root (where every read succeeds) the reading side runs in a forked
child that has dropped to another uid; as any other user the file's mode denies its owner too.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest

from repo_modes import assert_readable_by_others, wrong_modes
from serve import _files
from serve.errors import KestrelError
from serve.repository import ModelRepository, TensorSpec, make_config, write_config

OTHER_UID = 65534  # nobody


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(umask027):
    assert _files.current_umask() == 0o027 and _files.file_mode() == 0o640 and _files.folder_mode() == 0o750
    assert _files.current_umask() == 0o027


def test_atomic_writes_and_staging_folders_get_open_and_mkdirs_modes(tmp_path, umask022):
    assert _mode(_files.write_text_atomic(tmp_path / "a" / "config.pbtxt", "x")) == 0o644
    assert _mode(_files.write_bytes_atomic(tmp_path / "b.json", b"{}")) == 0o644
    with _files.atomic_open(tmp_path / "c.npz") as f:
        np.savez(f, x=np.zeros(2))
    assert _mode(tmp_path / "c.npz") == 0o644
    assert _mode(_files.staging_folder(tmp_path, ".tmp-x-")) == 0o755
    # the same writers under a stricter umask: it is respected, never widened
    os.umask(0o027)
    assert _mode(_files.write_text_atomic(tmp_path / "d.txt", "y")) == 0o640
    assert _mode(_files.staging_folder(tmp_path, ".tmp-y-")) == 0o750


def test_replacing_a_private_file_publishes_it(tmp_path, umask022):
    """A config.pbtxt written as 0600 by an older Kestrel becomes 0644 when rewritten."""
    path = tmp_path / "config.pbtxt"
    path.write_text("old")
    path.chmod(0o600)
    _files.write_text_atomic(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o644


def test_an_interrupted_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "labels.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with _files.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


def test_write_config_and_fake_models_publish_readable_repositories(tmp_path, umask022):
    from serve.backends.fake import write_fake_model

    root = tmp_path / "models"
    write_fake_model(root, "m", classes=3)
    assert_readable_by_others(root)
    assert wrong_modes(root) == {}
    (root / "m" / "labels.txt").chmod(0o600)
    assert wrong_modes(root) == {"m/labels.txt": "0600, expected 0644"}  # the check itself sees a bad mode


# ---- reading as another user ------------------------------------------------------------------------
def _as_another_user(fn):
    """fn()'s result (or the KestrelError it raised, as its message) when run by a user who does not own
    the files: a forked child that drops to `nobody` when we are root, else this process."""
    if os.geteuid() != 0:
        try:
            return fn()
        except KestrelError as exc:
            return str(exc)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no new imports, no threads started; always leaves through os._exit
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            try:
                result = ("ok", fn())
            except KestrelError as exc:
                result = ("ok", str(exc))
            except BaseException:  # noqa: BLE001 - sent to the parent, never raised into pytest's child
                result = ("error", traceback.format_exc())
            with os.fdopen(write, "wb") as out:
                pickle.dump(result, out)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child running as another user failed"
    kind, result = pickle.loads(data)
    assert kind == "ok", f"as uid {OTHER_UID}:\n{result}"
    return result


@pytest.fixture
def shared_repo():
    """A repository in a world-enterable folder under /tmp (pytest's tmp_path is private to its user),
    exported with open()/mkdir()'s modes; fn(name) makes one of its files unreadable for another user."""
    old = os.umask(0o022)
    top = Path(tempfile.mkdtemp(prefix="kestrel-modes-"))
    top.chmod(0o755)
    try:
        root = top / "models"
        folder = root / "m"
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(b"not really onnx")
        config = make_config("m", "onnxruntime_onnx", TensorSpec("images", np.uint8, (8, 8, 3)),
                             TensorSpec("probabilities", np.float32, (2,)), max_batch_size=4, labels=True)
        write_config(config, folder)
        (folder / "labels.txt").write_text("a\nb\n")
        assert_readable_by_others(root)
        yield root
    finally:
        os.umask(old)
        shutil.rmtree(top, ignore_errors=True)


def _hide(path: Path) -> Path:
    """Unreadable for another user (as root) or for anyone but root (as a user: not even the owner)."""
    path.chmod((0o600 if path.is_file() else 0o700) if os.geteuid() == 0 else 0o200)
    return path


def test_every_file_of_an_exported_repository_is_readable_by_another_user(shared_repo):
    def read_all():
        entry = ModelRepository(shared_repo).entry("m")
        return entry.labels(), entry.artifact().read_bytes(), entry.versions

    assert _as_another_user(read_all) == (["a", "b"], b"not really onnx", [1])


def test_unreadable_config_names_the_file_its_mode_and_the_permission_needed(shared_repo):
    config = _hide(shared_repo / "m" / "config.pbtxt")
    message = _as_another_user(lambda: ModelRepository(shared_repo).entry("m"))
    st = config.stat()
    assert message.startswith(f"cannot read {config}: Permission denied: file {config} ")
    assert f"({stat.filemode(st.st_mode)}, owner uid {st.st_uid}, gid {st.st_gid})" in message
    assert "needs read (r) permission" in message and "chmod a+r" in message
    assert f"this server (uid {OTHER_UID if os.geteuid() == 0 else os.geteuid()}" in message


def test_unreadable_labels_and_model_file_are_named_too(shared_repo):
    from serve.backends.onnxruntime import OnnxRuntimeRunner

    labels = _hide(shared_repo / "m" / "labels.txt")
    message = _as_another_user(lambda: ModelRepository(shared_repo).entry("m").labels())
    assert message.startswith(f"cannot read {labels}: Permission denied: file {labels} ")
    labels.chmod(0o644)

    model = _hide(shared_repo / "m" / "1" / "model.onnx")
    pytest.importorskip("onnxruntime")

    def load():
        runner = OnnxRuntimeRunner.from_entry(ModelRepository(shared_repo).entry("m"))
        runner._load()

    message = _as_another_user(load)
    assert message.startswith(f"model 'm': cannot read {model}: Permission denied: file {model} ")
    assert "needs read (r) permission" in message


def test_a_folder_in_the_way_is_named_with_the_permission_it_lacks(shared_repo):
    version = _hide(shared_repo / "m" / "1")
    message = _as_another_user(lambda: ModelRepository(shared_repo).entry("m").artifact())
    assert f"folder {version} (" in message and "needs search (x) permission" in message
    assert "no version folder" not in message


def test_a_model_folder_in_the_way_is_listed_and_named(shared_repo):
    folder = _hide(shared_repo / "m")
    names, message = _as_another_user(lambda: (ModelRepository(shared_repo).names(),
                                               _message(lambda: ModelRepository(shared_repo).entry("m"))))
    assert names == ["m"]  # not silently missing from the repository
    assert message.startswith(f"cannot read {folder / 'config.pbtxt'}: Permission denied: folder {folder} (")
    assert "needs search (x) permission" in message


def _message(fn) -> str:
    try:
        fn()
    except KestrelError as exc:
        return str(exc)
    raise AssertionError("no error")
