"""The image set every Kestrel load generator sends: files from a folder (or synthetic JPEGs), decoded
and resized once for tensor APIs, each client cycling through them from its own offset.

Shared by the locust load generators (benchmarks/_loadgen.py, in a gevent-patched locust process) and
the threaded tritonclient one (benchmarks/triton_load.py); imports neither locust nor gevent.
"""

from __future__ import annotations

import io
from pathlib import Path

from serve import images as kimages
from serve.errors import ImageDecodeError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "photos"
MAX_IMAGES = 64  # bounded: the image set is held in memory by every user


def rotated(items: list, offset: int) -> list:
    """`items` starting at `offset` (wrapping round): each user cycles through the same images in its own order."""
    return [items[(offset + i) % len(items)] for i in range(len(items))]


# ---- images ---------------------------------------------------------------------------------
def _synthetic_jpegs(count: int = 8, size: tuple[int, int] = (480, 640)) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for i, array in enumerate(kimages.synthetic_images(count, size, seed=1234)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        out.append((f"synthetic_{i}.jpg", buf.getvalue()))
    return out


_FILES: dict[tuple[str, str], list[tuple[str, bytes]]] = {}


def _as_jpeg(name: str, data: bytes) -> tuple[str, bytes]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return name, data
    rgb = kimages.decode(data)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=92)
    return str(Path(name).with_suffix(".jpg")), buf.getvalue()


def image_files(folder: str = "", encode: str = "jpeg") -> list[tuple[str, bytes]]:
    """[(file name, encoded bytes)] of the decodable images in `folder`, at most MAX_IMAGES.

    encode="jpeg": non-JPEG files are re-encoded to JPEG once (what phones
    upload); "asis": the bytes on disk. With no folder, ../shared/photos is
    used when present, else synthetic JPEGs.
    """
    key = (folder or "", encode)
    if key in _FILES:
        return _FILES[key]
    path = Path(folder) if folder else DEFAULT_PHOTOS
    files: list[tuple[str, bytes]] = []
    if folder or path.is_dir():
        for p in kimages.find_images(path):  # raises ImageDecodeError for a missing folder
            data = p.read_bytes()
            try:
                kimages.decode(data, min_size=(32, 32))
            except ImageDecodeError:
                continue  # not an image we can send as a valid request
            files.append(_as_jpeg(p.name, data) if encode == "jpeg" else (p.name, data))
            if len(files) >= MAX_IMAGES:
                break
        if not files:
            raise ImageDecodeError(f"image folder {path} holds no decodable image")
    else:
        files = _synthetic_jpegs()
    _FILES[key] = files
    return files


_ARRAYS: dict[tuple, list] = {}


def image_arrays(folder: str, size: tuple[int, int]) -> list:
    """The image set decoded and resized to (height, width): uint8 HxWx3 arrays (cached)."""
    key = (folder or "", tuple(size))
    if key not in _ARRAYS:
        _ARRAYS[key] = [kimages.load(data, size) for _, data in image_files(folder, "asis")]
    return _ARRAYS[key]
