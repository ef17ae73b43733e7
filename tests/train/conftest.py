"""Fixtures for train/: a tiny generated dataset with one corrupt file (../shared fixtures: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# class name -> (base colour, stripe direction): easy to tell apart, so a head can learn them
TINY_CLASSES = {
    "red_vertical": ((200, 40, 40), "v"),
    "green_horizontal": ((40, 190, 60), "h"),
    "blue_checks": ((50, 60, 210), "c"),
}


def make_image(colour, pattern, rng, size=64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(6, 12)
    if pattern == "v":
        mask = (xx // period) % 2
    elif pattern == "h":
        mask = (yy // period) % 2
    else:
        mask = ((xx // period) + (yy // period)) % 2
    img = np.empty((size, size, 3), np.float32)
    img[:] = colour
    img *= (0.55 + 0.45 * mask)[..., None]
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def build_tiny_dataset(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """`per_class` images per class (JPEG and PNG mixed) plus one corrupt JPEG in the first class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, (colour, pattern) in TINY_CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            suffix = ".png" if i % 3 == 0 else ".jpg"
            Image.fromarray(make_image(colour, pattern, rng)).save(folder / f"{name}_{i:02d}{suffix}")
    (root / "red_vertical" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "shapes")


@pytest.fixture(scope="session")
def dataset_factory():
    """build_tiny_dataset(root, per_class=..., seed=...) for tests that need their own copy."""
    return build_tiny_dataset
