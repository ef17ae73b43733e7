"""Classify: real photos and formats, ensembles and fusion, and every bad image followed by a good request."""

import struct
import time
import zlib

import numpy as np
import pytest

from serve_helpers import LABELS, PHOTOS, png_bytes
from serve import images
from serve.backends.fake import fake_probabilities
from serve.ensemble import rank, top_k
from serve.errors import InvalidInputError, ModelLoadError, ModelNotFoundError

PICTURE = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def _good(client):
    response = client.classify(png_bytes(PICTURE), ["a"], top_k=3)
    assert len(response.results) == 1 and len(response.results[0].predictions) == 3
    return response


def test_classify_one_model_matches_in_process_decode_and_inference(client):
    data = png_bytes(PICTURE)
    response = client.classify(data, ["a"], top_k=3)
    expected = fake_probabilities(images.load(data, (32, 32))[None], 10, seed=1)[0]
    order = np.argsort(-expected)[:3]
    result = response.results[0]
    assert result.model == "a" and result.version == "1" and (result.input_height, result.input_width) == (32, 32)
    assert [p.index for p in result.predictions] == list(order)
    assert [p.label for p in result.predictions] == [LABELS[i] for i in order]
    np.testing.assert_allclose([p.probability for p in result.predictions], expected[order], rtol=1e-6)
    assert (response.image_width, response.image_height) == (120, 90)
    assert result.compute_ms > 0 and result.batch_size == 1 and response.total_ms >= response.decode_ms
    assert not response.ensembles  # one model: nothing to fuse


def test_ensemble_resizes_once_per_input_size_and_fuses(client):
    data = png_bytes(PICTURE)
    response = client.classify(data, ["trio"], top_k=4)
    assert [r.model for r in response.results] == ["a", "b", "c"]
    assert [(r.input_height, r.input_width) for r in response.results] == [(32, 32), (48, 40), (32, 32)]
    picture = images.decode(data)
    probs = [fake_probabilities(images.resize(picture, size)[None], 10, seed)
             for size, seed in [((32, 32), 1), ((48, 40), 2), ((32, 32), 3)]]
    scores, order = rank(probs, "mean")
    (ens,) = response.ensembles
    assert (ens.name, ens.fusion, list(ens.members)) == ("trio", "mean", ["a", "b", "c"])
    assert [(p.index, pytest.approx(p.probability, rel=1e-5)) for p in ens.predictions] == top_k(scores, order, 4)[0]


@pytest.mark.parametrize("fusion", ["mean", "geometric", "max-confidence", "majority"])
def test_request_fusion_overrides_the_ensemble(client, fusion):
    data = png_bytes(PICTURE)
    response = client.classify(data, ["pair"], top_k=3, fusion=fusion)
    picture = images.load(data, (32, 32))[None]
    scores, order = rank([fake_probabilities(picture, 10, 1), fake_probabilities(picture, 10, 3)], fusion)
    (ens,) = response.ensembles
    assert ens.fusion == fusion
    assert [p.index for p in ens.predictions] == [i for i, _ in top_k(scores, order, 3)[0]]


def test_several_models_are_fused_ad_hoc_when_they_share_labels(client):
    response = client.classify(png_bytes(PICTURE), ["a", "c"], top_k=2)
    assert [r.model for r in response.results] == ["a", "c"]
    assert response.ensembles[0].name == "ensemble" and list(response.ensembles[0].members) == ["a", "c"]
    mixed = client.classify(png_bytes(PICTURE), ["a", "odd"], top_k=2)  # different label sets: no fusion
    assert len(mixed.results) == 2 and not mixed.ensembles


def test_default_target_is_the_first_ensemble(client):
    response = client.classify(png_bytes(PICTURE), top_k=1)
    assert response.ensembles[0].name == "trio"


@pytest.mark.parametrize("fmt, save", [("JPEG", {}), ("BMP", {}), ("WEBP", {}), ("PNG", {})])
def test_formats(client, fmt, save):
    response = client.classify(png_bytes(PICTURE, fmt, **save), ["b"], top_k=1)
    assert response.results[0].predictions[0].label in LABELS


def test_modes_and_exif_orientation(client):
    from PIL import Image
    import io

    gray = png_bytes(PICTURE[..., 0])
    assert client.classify(gray, ["a"]).results[0].predictions
    rgba = np.dstack([PICTURE, np.full(PICTURE.shape[:2], 128, np.uint8)])
    assert client.classify(png_bytes(rgba), ["a"]).results[0].predictions
    # EXIF orientation 6 (rotate 90): a 120 wide x 90 high JPEG is served upright, 90 wide x 120 high
    # (decoded at half scale by JPEG draft mode: 32x32 inputs need no more)
    img = Image.fromarray(PICTURE)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    response = client.classify(buf.getvalue(), ["a"])
    assert (response.image_width, response.image_height) == (45, 60)


def _bomb() -> bytes:
    """A valid small PNG whose header claims 8000 x 6000 pixels (a decompression bomb: over the 40 MP limit)."""
    data = bytearray(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    ihdr = 8  # signature; then length(4) type(4) data(13) crc(4)
    struct.pack_into(">II", data, ihdr + 8, 8000, 6000)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    struct.pack_into(">I", data, ihdr + 8 + 13, crc)
    return bytes(data)


def _truncated() -> bytes:
    jpeg = png_bytes(PICTURE, "JPEG")
    return jpeg[: len(jpeg) // 2]


@pytest.mark.parametrize("data, models, error, words", [
    (b"", ["a"], InvalidInputError, ["empty (zero-byte) image"]),
    (b"this is not an image at all", ["a"], InvalidInputError, ["cannot decode image 27 bytes", "expected"]),
    (_truncated(), ["a"], InvalidInputError, ["cannot decode image", "truncated"]),
    (_bomb(), ["a"], InvalidInputError, ["8000x6000 = 48000000 pixels", "limit is 40000000 pixels"]),
    (png_bytes(PICTURE), ["nope"], ModelNotFoundError, ["'nope'", "expected one of"]),
    (png_bytes(PICTURE), ["broken"], ModelLoadError, ["not ready", "simulated load failure"]),
])
def test_bad_input_then_a_good_request(client, data, models, error, words):
    with pytest.raises(error) as info:
        client.classify(data, models)
    for word in words:
        assert word in str(info.value)
    _good(client)


def test_bad_request_fields(client):
    with pytest.raises(InvalidInputError, match="unknown fusion 'loudest'"):
        client.classify(png_bytes(PICTURE), ["pair"], fusion="loudest")
    with pytest.raises(InvalidInputError, match="top_k=-1"):
        client.classify(png_bytes(PICTURE), ["a"], top_k=-1)
    _good(client)


def test_queue_full_is_resource_exhausted_and_recovers(client, address):
    """slow: one worker, 80 ms per batch of at most 4, queue of 2 -> a burst overflows it."""
    import concurrent.futures as cf
    import threading

    from serve import KestrelClient
    from serve.errors import ResourceExhaustedError

    data = png_bytes(PICTURE)
    ready = threading.Barrier(12)

    def call(_):
        with KestrelClient(address, timeout=10) as c:
            c.wait_ready(5)  # connected before the burst
            ready.wait(10)
            try:
                c.classify(data, ["slow"])
                return "ok"
            except ResourceExhaustedError as exc:
                assert "queue full" in str(exc) and "max_queue_size=2" in str(exc)
                return "full"

    with cf.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(call, range(12)))
    assert outcomes.count("full") > 0 and outcomes.count("ok") > 0
    assert client.classify(data, ["slow"]).results[0].model == "slow"


def test_a_deadline_shorter_than_the_models_batch_time_is_refused_at_once(client):
    """slow takes 80 ms a batch: once a batch has been measured, a request with 30 ms left is refused at
    once (RESOURCE_EXHAUSTED, retry elsewhere) instead of being queued to time out."""
    from serve.errors import ResourceExhaustedError

    assert client.classify(png_bytes(PICTURE), ["slow"]).results[0].predictions  # measures a batch
    t0 = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match="exceeds the request's remaining deadline"):
        client.classify(png_bytes(PICTURE), ["slow"], timeout=0.03)  # 80 ms of compute
    assert time.monotonic() - t0 < 0.03 + 0.5
    assert client.classify(png_bytes(PICTURE), ["slow"]).results[0].predictions


@pytest.mark.shared_data
def test_real_photos(client):
    if not PHOTOS.is_dir():
        pytest.skip(f"photos folder {PHOTOS} is absent")
    paths = images.find_images(PHOTOS)
    assert len(paths) >= 10
    for path in paths:
        response = client.classify(path.read_bytes(), ["trio"], top_k=3)
        picture = images.decode(path.read_bytes())
        assert (response.image_width, response.image_height) == picture.size or "jpg" in path.suffix  # draft mode
        assert len(response.results) == 3 and len(response.ensembles[0].predictions) == 3
        expected = fake_probabilities(images.load(path.read_bytes(), (32, 32))[None], 10, 1)[0]
        assert response.results[0].predictions[0].index == int(np.argmax(expected)), path.name


def test_list_models(client):
    listing = client.list_models()
    models = {m.name: m for m in listing.models}
    assert models["b"].state == "READY" and (models["b"].input_height, models["b"].input_width) == (48, 40)
    assert models["broken"].state == "UNAVAILABLE" and "simulated" in models["broken"].reason
    assert {e.name: list(e.members) for e in listing.ensembles} == {"trio": ["a", "b", "c"], "pair": ["a", "c"]}


def test_client_cli_prints_each_models_top_k_and_the_ensemble(address, tmp_path, subprocess_env):
    import subprocess
    import sys

    from serve_helpers import ROOT

    good = tmp_path / "picture.png"
    good.write_bytes(png_bytes(PICTURE))
    result = subprocess.run(
        [sys.executable, "-m", "serve.client", str(good), "--ensemble", "trio", "--address", address],
        cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(good)) and "(120x90" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"a", "b", "c", "trio"} and "[mean]" in rows["trio"]
    for row in rows.values():
        assert row.count("label_") == 5  # --top-k's default 0: the server's 5, each
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "serve.client", str(bad), str(good), "--models", "a", "--address", address],
        cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {bad}: cannot decode image")
    assert "label_" in result.stdout  # the good image was still classified


def test_ensemble_members_run_concurrently(tmp_path):
    """Two members of 400 ms each answer in about 400 ms, not 800."""
    import time

    from serve import KestrelClient, create_server
    from serve.backends.fake import write_fake_model

    for name, seed in (("x", 1), ("y", 2)):
        write_fake_model(tmp_path, name, classes=3, seed=seed, delay_ms=400)
    server, port = create_server(tmp_path, models=["xy"], ensembles=["xy=x,y"], port=0)
    try:
        assert set(server.hub.models) == {"x", "y"}  # --models may name an ensemble: its members load
        with KestrelClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.classify(png_bytes(PICTURE), ["xy"])  # warm
            t0 = time.perf_counter()
            response = client.classify(png_bytes(PICTURE), ["xy"])
            elapsed = time.perf_counter() - t0
        assert [r.model for r in response.results] == ["x", "y"] and response.ensembles[0].name == "xy"
        assert 0.4 <= elapsed < 0.7, elapsed
    finally:
        server.stop(1)


def test_ensemble_named_like_a_model_is_a_start_up_error(fake_repo):
    from serve import create_server
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match="ensemble 'a' has the name of a model"):
        create_server(fake_repo, ensembles=["a=b,c"], port=0)


def test_a_cancelled_request_is_not_run(tmp_path):
    import time

    import grpc

    from serve import create_server
    from serve._proto import kestrel_pb2, kestrel_pb2_grpc
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "lazy", classes=3, delay_ms=600, thread_safe=False, max_batch_size=1)
    server, port = create_server(tmp_path, port=0)
    runner = server.hub.models["lazy"].runner
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kestrel_pb2_grpc.ClassifierStub(channel)
            request = kestrel_pb2.ClassifyRequest(image=png_bytes(PICTURE), models=["lazy"])
            blocker = stub.Classify.future(request, timeout=10)  # holds the only worker for 600 ms
            time.sleep(0.15)
            doomed = stub.Classify.future(request, timeout=10)  # queued behind it
            time.sleep(0.15)
            doomed.cancel()
            assert blocker.result().results[0].model == "lazy"
            time.sleep(0.3)
            assert runner.batch_sizes == [1]  # the blocker ran; the cancelled request did not
            assert stub.Classify(request, timeout=10).results[0].model == "lazy"
            assert runner.batch_sizes == [1, 1]
    finally:
        server.stop(1)


class _Context:
    """A stand-in for grpc.ServicerContext's add_callback."""

    def __init__(self, ended: bool = False):
        self.ended, self.callbacks = ended, []

    def add_callback(self, callback) -> bool:
        if self.ended:
            return False  # grpc: the RPC has already terminated, the callback will never run
        self.callbacks.append(callback)
        return True

    def end(self):
        self.ended = True
        for callback in self.callbacks:
            callback()


def _pending():
    import numpy as np

    from serve.batching import Pending

    return Pending(np.zeros((1, 2, 2, 3), np.uint8), None)


def test_work_queued_after_the_client_went_away_is_cancelled_too():
    from serve.servicers import _CancelOnTermination as _cancel_on_termination

    context = _Context()
    submitted = _cancel_on_termination(context)
    before = _pending()
    submitted.append(before)
    context.end()  # the client cancels while the server is still decoding
    late = [_pending(), _pending()]
    submitted.extend(late)
    assert before.cancelled and all(p.cancelled for p in late)

    gone = _cancel_on_termination(_Context(ended=True))  # ended before the callback was registered
    first = _pending()
    gone.append(first)
    assert first.cancelled

    fresh = _cancel_on_termination(_Context())
    kept = _pending()
    fresh.append(kept)
    assert not kept.cancelled  # nothing ended: the request runs
