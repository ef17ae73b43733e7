import io

import numpy as np
import pytest
from PIL import Image

from serve import images
from serve.errors import ImageDecodeError


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w=64, h=48) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]
    arr[..., 1] = np.linspace(0, 255, h)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP"])
def test_formats_decode_to_rgb_of_requested_size(fmt):
    out = images.load(_encode(_gradient(), fmt), (32, 40))
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    # red rises left to right in every format
    assert out[16, 35, 0] > out[16, 4, 0] + 100


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_modes_become_rgb(mode):
    image = _gradient().convert(mode) if mode != "I;16" else Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = images.decode(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = images.load(_encode(rgba, "PNG"), (8, 8))
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    image = _gradient(64, 32)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    decoded = images.decode(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (32, 64)  # now portrait


def test_draft_mode_never_goes_below_the_requested_size():
    big = _gradient(2000, 1600)
    data = _encode(big, "JPEG")
    decoded = images.decode(data, min_size=(224, 224))
    assert decoded.size[0] >= 224 and decoded.size[1] >= 224
    assert decoded.size[0] < 2000  # it did decode at a reduced scale


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "cannot decode"),
        (None, "cannot decode"),  # truncated JPEG, filled in below
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    if data is None:
        data = _encode(_gradient(), "JPEG")[:200]
    with pytest.raises(ImageDecodeError, match=message):
        images.load(data, (32, 32))


def test_pixel_limit_refuses_decompression_bombs():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="limit is 1000000 pixels"):
        images.decode(data, max_pixels=1_000_000)


def test_load_folder_reports_undecodable_files(tmp_path):
    (tmp_path / "a").mkdir()
    _gradient().save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    batch, loaded, skipped = images.load_folder(tmp_path, (16, 16))
    assert batch.shape == (1, 16, 16, 3)
    assert [p.name for p in loaded] == ["good.png"]
    assert [p.name for p, _ in skipped] == ["broken.jpg"]


def test_synthetic_images_are_deterministic():
    a = images.synthetic_images(3, (20, 30), seed=1)
    b = images.synthetic_images(3, (20, 30), seed=1)
    assert a.shape == (3, 20, 30, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.std() > 20  # not flat


@pytest.mark.shared_data
def test_real_photos_decode(photos_dir):
    paths = images.find_images(photos_dir)
    assert len(paths) >= 13
    batch = images.load_batch(paths, (224, 224))
    assert batch.shape == (len(paths), 224, 224, 3)
