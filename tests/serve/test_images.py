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


# ---- resize modes ---------------------------------------------------------------------------
def test_crop_box_is_the_standard_imagenet_transform():
    # a 500x375 landscape photo to 224x224: shorter side -> 256 (224 / 0.875), centre 224x224
    scaled, box = images.crop_box(500, 375, (224, 224))
    assert scaled == (341, 256)
    assert box == (58, 16, 282, 240)


def test_crop_keeps_aspect_and_takes_the_centre():
    # left third red, middle third green, right third blue, on a 300x100 picture
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    picture = Image.fromarray(arr)
    crop = images.resize(picture, (32, 32), "crop")
    stretch = images.resize(picture, (32, 32), "stretch")
    assert crop.shape == stretch.shape == (32, 32, 3)
    # the centre crop sees only the green middle third; the stretch sees all three colours
    assert crop[..., 1].min() > 200 and crop[..., 0].max() < 60 and crop[..., 2].max() < 60
    assert stretch[16, 2, 0] > 200 and stretch[16, 29, 2] > 200


def test_crop_of_a_square_picture_is_a_central_zoom():
    picture = _gradient(64, 64)
    out = images.resize(picture, (56, 56), "crop")  # 56 / 0.875 = 64: no scaling, an 8 px border dropped
    assert np.array_equal(out, np.asarray(picture)[4:60, 4:60])


def test_load_honours_the_mode_and_draft_covers_the_crop():
    data = _encode(_gradient(2000, 1000), "JPEG")
    assert images.decode_size((224, 224), "crop") == (256, 256)
    out = images.load(data, (224, 224), mode="crop")
    assert out.shape == (224, 224, 3)
    batch = images.load_batch([data, data], (32, 48), mode="crop")
    assert batch.shape == (2, 32, 48, 3)


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown resize mode 'squash'.*stretch, crop"):
        images.resize(_gradient(), (8, 8), "squash")
    assert images.check_mode(None) == images.STRETCH


# ---- the mode as a model property, honoured by serving --------------------------------------
def test_resize_mode_is_a_config_parameter(tmp_path):
    from serve.repository import ModelRepository, TensorSpec, make_config, write_config
    from serve.errors import ConfigError

    spec_in, spec_out = TensorSpec("images", np.uint8, (8, 8, 3)), TensorSpec("probabilities", np.float32, (2,))
    for name, mode in (("cropped", "crop"), ("stretched", "stretch"), ("legacy", None)):
        (tmp_path / name / "1").mkdir(parents=True)
        write_config(make_config(name, "fake", spec_in, spec_out, labels=False, resize=mode), tmp_path / name)
    repo = ModelRepository(tmp_path)
    assert repo.entry("cropped").resize == "crop" and repo.entry("stretched").resize == "stretch"
    assert repo.entry("legacy").resize == "stretch" and "resize" not in repo.entry("legacy").parameters
    text = (tmp_path / "cropped" / "config.pbtxt").read_text()
    assert 'key: "resize"' in text and 'string_value: "crop"' in text  # Triton's parameters syntax
    (tmp_path / "cropped" / "config.pbtxt").write_text(text.replace('"crop"', '"squash"'))
    with pytest.raises(ConfigError, match="parameter 'resize'.*unknown resize mode 'squash'"):
        repo.entry("cropped")
    with pytest.raises(ConfigError, match="unknown resize mode"):
        make_config("x", "fake", spec_in, spec_out, resize="fit")


def test_classify_resizes_each_model_by_its_own_mode(tmp_path):
    from serve.backends.fake import fake_probabilities, write_fake_model
    from serve.hub import ModelHub
    from serve.repository import read_config, write_config

    write_fake_model(tmp_path, "stretchy", classes=5, size=(24, 24), seed=4)
    write_fake_model(tmp_path, "croppy", classes=5, size=(24, 24), seed=4)
    config = read_config(tmp_path / "croppy" / "config.pbtxt")
    config.parameters["resize"].string_value = "crop"
    write_config(config, tmp_path / "croppy")
    photo = _encode(_gradient(90, 40), "PNG")  # wide: a crop and a stretch see different pixels
    hub = ModelHub(tmp_path).load()
    try:
        result = hub.classify(photo, ["stretchy", "croppy"], top=5)
    finally:
        hub.close()
    got = {a.model: a.run.probabilities[0] for a in result.models}
    picture = images.decode(photo)
    for name, mode in (("stretchy", "stretch"), ("croppy", "crop")):
        want = fake_probabilities(images.resize(picture, (24, 24), mode)[None], 5, 4)[0]
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
    assert not np.allclose(got["stretchy"], got["croppy"])


def test_classify_on_a_model_whose_input_is_not_uint8_rgb_is_invalid_input_not_a_backend_failure(tmp_path):
    """The photo is decoded to uint8 RGB; a model that takes something else is refused before its backend."""
    from serve.backends.fake import write_fake_model
    from serve._proto import model_config_pb2
    from serve.errors import InvalidInputError
    from serve.hub import ModelHub
    from serve.repository import read_config, write_config

    write_fake_model(tmp_path, "floaty", classes=5, size=(24, 24))
    config = read_config(tmp_path / "floaty" / "config.pbtxt")
    config.input[0].data_type = model_config_pb2.TYPE_FP32
    write_config(config, tmp_path / "floaty")
    hub = ModelHub(tmp_path).load()
    try:
        with pytest.raises(InvalidInputError, match="dtype uint8, expected float32"):
            hub.classify(_encode(_gradient(40, 40), "PNG"), ["floaty"], top=3)
    finally:
        hub.close()
