"""Class names: the ImageNet class index (through Keras' cache) and user label files."""

from __future__ import annotations

import json
from pathlib import Path

from serve._optional import require
from serve.errors import ConfigError

CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"
CLASS_INDEX_FILE = "imagenet_class_index.json"
LABELS_FILE = "labels.txt"


def imagenet_labels() -> list[str]:
    """The 1000 readable ImageNet class names ("tench", "goldfish", ...), in class order.

    Found in $KERAS_HOME/models (checked against Keras' md5) or downloaded from
    the official URL; offline without the file this raises ConfigError saying
    how to provide it.
    """
    keras = require("keras", "reading the ImageNet class index")
    try:
        path = keras.utils.get_file(CLASS_INDEX_FILE, CLASS_INDEX_URL, cache_subdir="models",
                                    file_hash=CLASS_INDEX_MD5)
    except Exception as exc:  # keras raises a bare Exception for fetch failures
        raise ConfigError(
            f"cannot obtain the ImageNet class index ({' '.join(str(exc).split())[:160]}): set KERAS_HOME to a "
            f"folder holding models/{CLASS_INDEX_FILE}, or pass --labels FILE"
        ) from None
    index = json.loads(Path(path).read_text())
    return [index[str(i)][1] for i in range(len(index))]


def read_labels(path: str | Path) -> list[str]:
    """One class name per line; blank trailing lines ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {path} is not UTF-8 text; expected one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"labels file {path} is empty; expected one class name per line")
    return [line.strip() for line in lines]


def check_count(labels: list[str], classes: int, source: str) -> list[str]:
    if len(labels) != classes:
        raise ConfigError(f"{source} has {len(labels)} labels, but the model outputs {classes} classes")
    for label in labels:
        if "\n" in label or "\r" in label:
            raise ConfigError(f"{source}: label {label!r} contains a line break")
    return labels


def write_labels(labels: list[str], folder: Path) -> Path:
    path = Path(folder) / LABELS_FILE
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return path
