"""The labelled image folder: classes, files, the stratified split, decoding.

    DATA_DIR/
      daisy/    *.jpg ...        one sub-folder per class (its name is the label)
      tulip/    ...

Every image is decoded through `serve.images` (the serving path), so a model is
trained on exactly the pixels it will be served. A file that cannot be decoded
is listed with the reason and left out: never a crash, never dropped silently.
Files lying directly in DATA_DIR (outside any class folder) are listed as ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve import images as image_io
from serve.errors import ConfigError, ImageDecodeError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """The files of a class-per-folder dataset (nothing decoded yet)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64, index into classes, one per path
    ignored: list[Path] = field(default_factory=list)  # image files outside any class folder

    def counts(self, labels: np.ndarray | None = None) -> dict[str, int]:
        labels = self.labels if labels is None else labels
        hist = np.bincount(labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, hist)}

    def fingerprint(self, indices=None) -> str:
        """sha256 over (relative path, size, mtime) of the chosen files: changes when any file does."""
        digest = hashlib.sha256()
        chosen = range(len(self.paths)) if indices is None else indices
        for i in chosen:
            path = self.paths[int(i)]
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def scan(root: str | Path, classes: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """List a DATA_DIR with one sub-folder per class; ConfigError when it is not one.

    `classes` keeps only those class folders (in sorted order), e.g. a pair for few-shot runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder {root} does not exist or is not a folder; expected one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        names = {p.name for p in class_dirs}
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ConfigError(f"--classes {','.join(classes)}: no class folder {', '.join(unknown)} in {root}; "
                              f"expected some of {', '.join(sorted(names))}")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"--classes {','.join(classes)}: a class is named twice")
        class_dirs = [p for p in class_dirs if p.name in set(classes)]
    classes, paths, labels, empty = [], [], [], []
    for folder in class_dirs:
        files = image_io.find_images(folder)
        if not files:
            empty.append(folder.name)
            continue
        labels.extend([len(classes)] * len(files))
        classes.append(folder.name)
        paths.extend(files)
    if len(classes) < 2:
        found = ", ".join(f"{p.name}/" for p in class_dirs) or "no sub-folders"
        raise ConfigError(
            f"data folder {root} has {len(classes)} class folder(s) with images ({found}); expected at least 2 "
            "sub-folders, one per class, each holding images"
        )
    if empty:
        raise ConfigError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images (by suffix: "
            f"{', '.join(sorted(image_io.IMAGE_SUFFIXES))}); remove them or add images"
        )
    ignored = image_io.find_images(root, recursive=False)
    return Dataset(root=root, classes=classes, paths=paths, labels=np.asarray(labels, np.int64), ignored=ignored)


def imbalance(counts: dict[str, int]) -> dict:
    """How unbalanced the classes are: the largest / smallest class size, and which they are."""
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    ratio = counts[largest] / max(counts[smallest], 1)
    return {
        "largest": largest, "largest_count": counts[largest],
        "smallest": smallest, "smallest_count": counts[smallest],
        "ratio": round(ratio, 3),
        "balanced": ratio <= 1.5,
    }


def describe_sizes(images: int, counts: dict[str, int]) -> str:
    """The dataset line train prints: '1500 images in 5 classes, 300 in each', or the smallest and largest class
    and the imbalance ratio when the sizes differ."""
    head = f"{images} images in {len(counts)} class{'es' if len(counts) != 1 else ''}"
    if len(set(counts.values())) == 1:
        return f"{head}, {next(iter(counts.values()))} in each"
    info = imbalance(counts)
    return (f"{head}; class sizes {info['smallest_count']} ({info['smallest']}) .. {info['largest_count']} "
            f"({info['largest']}), imbalance ratio {info['ratio']}"
            + ("" if info["balanced"] else ": unbalanced, using balanced class weights"))


def stratified_split(labels: np.ndarray, *, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of train / val / test, the same fractions in every class, reproducible for a seed.

    Each class is shuffled with its own seeded generator, then cut: round(n*test)
    for test, round(n*val) for validation, the rest for training. A class too
    small to give every non-empty split an image raises ConfigError.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"--val-split {val} and --test-split {test}: expected fractions >= 0 summing to less than 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = int(round(n * test))
        n_val = int(round(n * val))
        if test > 0:
            n_test = max(n_test, 1)
        if val > 0:
            n_val = max(n_val, 1)
        if n - n_test - n_val < 1:
            raise ConfigError(
                f"class {int(cls)} has {n} image(s): too few for a validation fraction of {val} and a test "
                f"fraction of {test} (each non-empty split needs one image, training at least one)"
            )
        parts["test"].extend(members[:n_test].tolist())
        parts["val"].extend(members[n_test:n_test + n_val].tolist())
        parts["train"].extend(members[n_test + n_val:].tolist())
    return {name: np.asarray(sorted(idx), np.int64) for name, idx in parts.items()}


def per_class_split(labels: np.ndarray, *, per_class: int, val: float, seed: int,
                    test_per_class: int | None = None) -> dict[str, np.ndarray]:
    """Few-shot split: `per_class` images of each class for training (of which round(per_class*val),
    at least 1, are the validation set), the class's remaining images (at most `test_per_class`) for test.

    Seeded and stratified like `stratified_split`; a class with no image left for test raises ConfigError.
    """
    if per_class < 2:
        raise ConfigError(f"--train-per-class {per_class}: expected at least 2 (training and validation images)")
    if not 0 < val < 1:
        raise ConfigError(f"--val-split {val}: expected a fraction between 0 and 1 of the training images")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    n_val = min(max(1, int(round(per_class * val))), per_class - 1)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        if len(members) <= per_class:
            raise ConfigError(f"class {int(cls)} has {len(members)} image(s): --train-per-class {per_class} "
                              "leaves none for the test set")
        chosen, rest = members[:per_class], members[per_class:]
        if test_per_class is not None:
            rest = rest[:test_per_class]
        parts["val"].extend(chosen[:n_val].tolist())
        parts["train"].extend(chosen[n_val:].tolist())
        parts["test"].extend(rest.tolist())
    return {name: np.asarray(sorted(idx), np.int64) for name, idx in parts.items()}


def decode(paths: list[Path], size: tuple[int, int], *, progress: bool = False
           ) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Decode and resize images: (uint8 batch, indices of the decoded ones, [(path, reason)] skipped)."""
    from serve.console import progress as tqdm  # bar on a terminal, lines in logs

    arrays, kept, skipped = [], [], []
    for i, path in enumerate(tqdm(paths, desc="decoding images", unit="img", disable=not progress, leave=False)):
        try:
            arrays.append(image_io.load(path, size))
            kept.append(i)
        except ImageDecodeError as exc:
            skipped.append((path, str(exc)))
    height, width = int(size[0]), int(size[1])
    batch = np.stack(arrays) if arrays else np.zeros((0, height, width, 3), np.uint8)
    return batch, np.asarray(kept, np.int64), skipped


def summary(dataset: Dataset) -> dict:
    counts = dataset.counts()
    return {
        "root": str(dataset.root),
        "classes": dataset.classes,
        "images": len(dataset.paths),
        "per_class": counts,
        "imbalance": imbalance(counts),
        "ignored_outside_class_folders": [str(p) for p in dataset.ignored],
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
