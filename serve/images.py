"""Image decoding and resizing: the one path every Kestrel image takes.

The server's Classify, export's calibration and parity images, and train's
datasets all go through `decode` + `resize`, so a model is calibrated and
validated on exactly the pixels it is served.

- Formats: whatever Pillow reads (JPEG, PNG, BMP, WebP, GIF, TIFF...).
- EXIF orientation is applied; grayscale, CMYK, palette and alpha images
  become RGB (transparent pixels on white).
- Large JPEGs decode fast: Pillow's draft mode lets libjpeg scale by 1/2, 1/4
  or 1/8 while decoding, never below the size the models need.
- A decompression bomb (more than `max_pixels`) is refused before decoding.
- Resizing (a property of each model, `resize` in its config.pbtxt parameters):
  "stretch": bilinear to exactly (height, width), aspect not kept, as Keras'
  `image_dataset_from_directory` does; "crop": the standard ImageNet
  evaluation transform: resize the shorter side to size / 0.875 (256 for 224)
  keeping the aspect ratio, then take the centre (height, width).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError, ImageDecodeError

DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo; more is refused
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
STRETCH, CROP = "stretch", "crop"
RESIZE_MODES = (STRETCH, CROP)
DEFAULT_RESIZE = STRETCH
CROP_FRACTION = 0.875  # the centre crop keeps 87.5 % of the shorter side (224 of 256)


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    return str(source)


def decode(
    source: bytes | str | Path,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode image bytes or a file into an RGB PIL image.

    `min_size` (height, width) is the largest size it will be resized to; JPEGs
    are then decoded at a reduced scale that still covers it.
    """
    what = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("received an empty (zero-byte) image; expected JPEG, PNG, BMP or WebP bytes")
        fp = io.BytesIO(bytes(source))
    else:
        fp = Path(source)
    try:
        image = Image.open(fp)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image {what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
            )
        if min_size is not None and image.format == "JPEG":
            # draft() picks the smallest libjpeg scale >= the requested size.
            image.draft("RGB", (int(min_size[1]), int(min_size[0])))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # (not in place, it copies every upright image)
        return to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard fired first: quote Kestrel's limit
        raise ImageDecodeError(f"image {what} refused as a decompression bomb: it has more pixels than "
                               f"Pillow opens; the limit is {max_pixels} pixels") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"image file {what} does not exist") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot decode image {what}: not a recognised image format; expected JPEG, PNG, BMP or WebP"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"cannot decode image {what}: {exc}; expected a complete JPEG, PNG, BMP or WebP image"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L")
    return image.convert("RGB")


def check_mode(mode: str | None) -> str:
    """A resize mode ("stretch" or "crop"); None means the default. ConfigError names what is allowed."""
    if mode is None or mode == "":
        return DEFAULT_RESIZE
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    return mode


def crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """For a (width, height) picture and a target (height, width): the size the picture is
    resized to (shorter side scaled to target / CROP_FRACTION, aspect kept) and the centre
    crop box (left, top, right, bottom) in that resized picture."""
    out_h, out_w = int(size[0]), int(size[1])
    scale = max(out_h / CROP_FRACTION / height, out_w / CROP_FRACTION / width)
    new_w = max(out_w, int(round(width * scale)))
    new_h = max(out_h, int(round(height * scale)))
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    return (new_w, new_h), (left, top, left + out_w, top + out_h)


def resize(image: Image.Image, size: tuple[int, int], mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """Resize to (height, width) by `mode` (bilinear); returns a uint8 HxWx3 array.

    "stretch" scales each side independently; "crop" scales the shorter side to
    size / 0.875 keeping the aspect ratio and takes the centre (see crop_box).
    """
    height, width = int(size[0]), int(size[1])
    if check_mode(mode) == CROP:
        scaled, box = crop_box(image.width, image.height, (height, width))
        if image.size != scaled:
            image = image.resize(scaled, Image.BILINEAR)
        return np.asarray(image.crop(box), dtype=np.uint8)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_size(size: tuple[int, int], mode: str = DEFAULT_RESIZE) -> tuple[int, int]:
    """The smallest (height, width) a picture must be decoded at to be resized to `size` by `mode`
    (JPEG draft decoding never goes below it)."""
    if check_mode(mode) == CROP:
        return int(np.ceil(size[0] / CROP_FRACTION)), int(np.ceil(size[1] / CROP_FRACTION))
    return int(size[0]), int(size[1])


def load(source: bytes | str | Path, size: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS,
         mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode and resize (by `mode`) one image to a uint8 (height, width, 3) array."""
    return resize(decode(source, min_size=decode_size(size, mode), max_pixels=max_pixels), size, mode)


def load_batch(sources: Sequence[bytes | str | Path], size: tuple[int, int], *,
               mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode and resize several images into one uint8 (N, height, width, 3) batch."""
    if not sources:
        return np.zeros((0, int(size[0]), int(size[1]), 3), dtype=np.uint8)
    return np.stack([load(s, size, mode=mode) for s in sources])


def find_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (by suffix), sorted for reproducibility."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageDecodeError(f"image folder {folder} does not exist or is not a folder")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(
    folder: str | Path, size: tuple[int, int], *, limit: int | None = None, recursive: bool = True,
    mode: str = DEFAULT_RESIZE,
) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Load every decodable image in `folder`.

    Returns (batch, paths loaded, [(path, reason)] skipped): an undecodable file
    is reported, never fatal and never dropped silently.
    """
    arrays, loaded, skipped = [], [], []
    for path in find_images(folder, recursive=recursive):
        if limit is not None and len(loaded) >= limit:
            break
        try:
            arrays.append(load(path, size, mode=mode))
            loaded.append(path)
        except ImageDecodeError as exc:
            skipped.append((path, str(exc)))
    batch = np.stack(arrays) if arrays else np.zeros((0, int(size[0]), int(size[1]), 3), np.uint8)
    return batch, loaded, skipped


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic smooth random images (uint8), for parity checks when no folder is given.

    Smooth gradients plus noise exercise the network more like photos than
    uniform noise does.
    """
    rng = np.random.default_rng(seed)
    height, width = int(size[0]), int(size[1])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        channels = []
        for _ in range(3):
            a, b, c = rng.uniform(-1, 1, 3)
            field = a * xx / width + b * yy / height + c * np.sin(xx / rng.uniform(5, 40)) * np.cos(yy / rng.uniform(5, 40))
            channels.append(field)
        img = np.stack(channels, axis=-1)
        img = (img - img.min()) / (np.ptp(img) + 1e-6) * 255.0
        img += rng.normal(0, 12, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def iter_chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
