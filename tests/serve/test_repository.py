import os

import numpy as np
import pytest

from serve import repository as repo
from serve.errors import ConfigError, ModelNotFoundError

IMAGES = repo.TensorSpec("images", np.uint8, (224, 224, 3))
PROBS = repo.TensorSpec("probabilities", np.float32, (5,))


def _write_model(root, name, platform="onnxruntime_onnx", versions=(1,), labels=("a", "b", "c", "d", "e")):
    folder = root / name
    folder.mkdir(parents=True)
    repo.write_config(repo.make_config(name, platform, IMAGES, PROBS), folder)
    (folder / repo.LABELS_FILE).write_text("\n".join(labels) + "\n")
    for v in versions:
        (folder / str(v)).mkdir()
        (folder / str(v) / repo.ARTIFACTS[platform]).write_bytes(b"x")
    return folder


def test_config_round_trip(tmp_path):
    _write_model(tmp_path, "m1", versions=(1, 3))
    entry = repo.ModelRepository(tmp_path).entry("m1")
    assert entry.platform == "onnxruntime_onnx"
    assert entry.input_spec == IMAGES
    assert entry.output_spec == PROBS
    assert entry.input_spec.datatype == "UINT8"
    assert entry.max_batch_size == repo.DEFAULT_MAX_BATCH_SIZE
    assert entry.versions == [1, 3]
    assert entry.artifact().parent.name == "3"
    assert entry.artifact(1) == tmp_path / "m1" / "1" / "model.onnx"
    assert entry.labels() == ["a", "b", "c", "d", "e"]
    assert entry.config.dynamic_batching.default_queue_policy.max_queue_size == 256


def test_keras_backend_config(tmp_path):
    _write_model(tmp_path, "m_keras", platform="keras")
    entry = repo.ModelRepository(tmp_path).entry("m_keras")
    assert entry.platform == "keras"
    assert entry.config.platform == ""
    assert entry.artifact().name == "model.keras"


def test_unknown_model_and_version(tmp_path):
    _write_model(tmp_path, "m1")
    r = repo.ModelRepository(tmp_path)
    with pytest.raises(ModelNotFoundError, match="models there: m1"):
        r.entry("nope")
    with pytest.raises(ModelNotFoundError, match=r"no version 7; available versions: \[1\]"):
        r.entry("m1").artifact(7)
    assert r.names() == ["m1"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "a\\b"])
def test_names_cannot_escape_the_repository(tmp_path, name):
    with pytest.raises(ConfigError, match="invalid model name"):
        repo.ModelRepository(tmp_path).folder(name)


def test_broken_config_names_the_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.pbtxt").write_text("name: 'bad'\nmax_batch_size: notanumber\n")
    with pytest.raises(ConfigError, match=r"bad/config.pbtxt: invalid model configuration"):
        repo.ModelRepository(tmp_path).entry("bad")


def test_config_name_must_match_folder(tmp_path):
    folder = _write_model(tmp_path, "m1")
    (folder / "config.pbtxt").write_text((folder / "config.pbtxt").read_text().replace('"m1"', '"other"'))
    with pytest.raises(ConfigError, match="does not match its folder"):
        repo.ModelRepository(tmp_path).entry("m1")


def test_missing_label_file_is_reported(tmp_path):
    folder = _write_model(tmp_path, "m1")
    (folder / "labels.txt").unlink()
    with pytest.raises(ConfigError, match="labels.txt"):
        repo.ModelRepository(tmp_path).entry("m1").labels()


def test_write_config_replaces_the_file_instead_of_rewriting_it(tmp_path):
    folder = _write_model(tmp_path, "m1")
    shared = tmp_path / "copy_of_config.pbtxt"
    os.link(folder / repo.CONFIG_FILE, shared)  # another name for the same storage, as a copied folder can be
    before = shared.read_text()
    repo.write_config(repo.make_config("m1", "onnxruntime_onnx", IMAGES, PROBS, max_batch_size=4), folder)
    assert shared.read_text() == before  # the other name still holds the old config
    assert repo.ModelRepository(tmp_path).entry("m1").max_batch_size == 4
    assert sorted(p.name for p in folder.iterdir()) == ["1", repo.CONFIG_FILE, repo.LABELS_FILE]  # no temp left


def test_publish_folder_swaps_a_model_folder_in_one_step(tmp_path):
    """Kestrel's writers publish a model folder whole: at every moment the folder holds the old files or the
    new ones (a reader polling it never finds it missing or mixed); the previous one is handed back."""
    import threading

    from serve._files import publish_folder

    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.pbtxt").write_text("old")
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.add((dest / "config.pbtxt").read_text())
            except OSError:
                seen.add("missing")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(200):
            new = tmp_path / f".tmp-m-{i}"
            new.mkdir()
            (new / "config.pbtxt").write_text(f"new {i}")
            previous = publish_folder(new, dest)
            assert previous is not None and previous.is_dir()
            import shutil

            shutil.rmtree(previous)
    finally:
        stop.set()
        watcher.join(10)
    assert (dest / "config.pbtxt").read_text() == "new 199"
    assert "missing" not in seen  # renameat2 RENAME_EXCHANGE on Linux: never a moment without the folder
    fresh = tmp_path / "fresh"
    assert publish_folder(dest, fresh) is None and (fresh / "config.pbtxt").is_file()


def test_publish_folder_without_renameat2_returns_the_previous_folder_beside_dest(tmp_path, monkeypatch):
    from serve import _files

    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)  # a kernel or file system without it
    dest, new = tmp_path / "m", tmp_path / ".tmp-m"
    for folder, text in ((dest, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.pbtxt").write_text(text)
    previous = _files.publish_folder(new, dest)
    assert (dest / "config.pbtxt").read_text() == "new"
    assert previous.parent == tmp_path and previous.name.startswith(".old-m-")
    assert (previous / "config.pbtxt").read_text() == "old"
    assert not new.exists()
