"""The Flask reference app's HTTP contract, with a stand-in model (no TensorFlow needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest

flask = pytest.importorskip("flask")
from PIL import Image  # noqa: E402

from benchmarks import flask_app  # noqa: E402


class _Model:
    """Probabilities from the mean colour: red images -> class 0, others -> class 2."""

    def __init__(self):
        self.shapes = []

    def predict(self, batch, verbose=0):
        self.shapes.append(batch.shape)
        red = float(batch[..., 0].mean() > batch[..., 2].mean())
        return np.array([[0.7 * red + 0.1, 0.2, 0.7 * (1 - red) + 0.1]], dtype=np.float32)


def _jpeg(color, size=(300, 200)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def client():
    model = _Model()
    predictor = flask_app.Predictor(model, size=(24, 32), labels=["red", "green", "blue"], description="stand-in")
    app = flask_app.create_app(predictor, top_k=2)
    client = app.test_client()
    client.model = model
    return client


def test_predict_upload_returns_top_k(client):
    reply = client.post("/predict", data={"image": (io.BytesIO(_jpeg((250, 10, 10))), "red.jpg")})
    assert reply.status_code == 200
    predictions = reply.get_json()["predictions"]
    assert [p["label"] for p in predictions] == ["red", "green"]
    assert predictions[0]["index"] == 0 and predictions[0]["probability"] == pytest.approx(0.8)
    assert client.model.shapes == [(1, 24, 32, 3)]  # one image per predict, resized to the model's size


def test_predict_raw_body_and_top_k_parameter(client):
    reply = client.post("/predict?top_k=3", data=_jpeg((10, 10, 250)))
    assert [p["label"] for p in reply.get_json()["predictions"]] == ["blue", "green", "red"]


def test_bad_image_is_a_400_with_the_reason(client):
    reply = client.post("/predict", data={"image": (io.BytesIO(b"not an image"), "x.jpg")})
    assert reply.status_code == 400
    assert "cannot decode image" in reply.get_json()["error"]
    assert client.get("/health").get_json()["status"] == "ok"


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert flask_app.main(["--model", str(tmp_path / "nope.keras")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model file") and "Traceback" not in err
