"""The field's usual serving path, as the benchmark's reference row: Flask + `model.predict`.

This is what the transfer-learning web apps Kestrel replaces do: load the
Keras model once at start-up, and for every uploaded image decode it, resize
it, call `model.predict` on a batch of one, and return the top-k as JSON,
served by Flask's own threaded (werkzeug) server.

    python -m benchmarks.flask_app --model models/mobilenet_v2_keras/1/model.keras --port 0
    python -m benchmarks.flask_app --application mobilenet_v2 --weights imagenet
    python -m benchmarks.flask_app --tiny            # a tiny random CNN (smoke tests)

    curl -F image=@cat.jpg http://127.0.0.1:PORT/predict

It prints `listening on http://HOST:PORT` once it serves (port 0 picks a free
port). The image is decoded through serve.images, the project's one decoding
path (Pillow with JPEG draft mode: faster than the apps' usual
`keras.utils.load_img`, so the reference is, if anything, flattered).

- `--model FILE.keras`: a Kestrel-contract model (uint8 images in, its own
  preprocessing inside, as `python -m export` writes to models/<name>_keras);
  labels from the folder's labels.txt when present.
- `--application NAME`: keras.applications.<NAME> with the application's
  `preprocess_input` applied in numpy before predict (the tutorials' way).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve import images as kimages  # noqa: E402
from serve._optional import require  # noqa: E402
from serve.errors import ImageDecodeError, KestrelError  # noqa: E402

MAX_UPLOAD_BYTES = 32 * 1024 * 1024


class Predictor:
    """A Keras model with what it needs around it: input size, preprocessing, labels."""

    def __init__(self, model, *, size: tuple[int, int], preprocess=None, labels: list[str] | None = None,
                 description: str = ""):
        self.model = model
        self.size = size
        self.preprocess = preprocess
        self.labels = labels
        self.description = description

    def predict(self, data: bytes, top_k: int) -> list[dict]:
        array = kimages.load(data, self.size)  # uint8 HxWx3
        batch = np.expand_dims(array, 0)
        if self.preprocess is not None:
            batch = self.preprocess(batch.astype(np.float32))
        probabilities = np.asarray(self.model.predict(batch, verbose=0))[0]
        top = np.argsort(probabilities)[::-1][:top_k]
        return [
            {"label": self.labels[i] if self.labels and i < len(self.labels) else str(int(i)),
             "index": int(i), "probability": float(probabilities[i])}
            for i in top
        ]


def _read_labels(path: Path) -> list[str] | None:
    return path.read_text().splitlines() if path.is_file() else None


def load_predictor(*, model: str | None = None, application: str | None = None, weights: str = "imagenet",
                   tiny: bool = False) -> Predictor:
    """Build the predictor from one of the three sources (imports TensorFlow)."""
    if sum(bool(x) for x in (model, application, tiny)) != 1:
        raise KestrelError("give exactly one of --model, --application, --tiny")
    if model and not Path(model).is_file():
        raise KestrelError(f"model file {model} does not exist; expected a .keras file "
                           "(e.g. models/mobilenet_v2_keras/1/model.keras from `python -m export`)")
    require("tensorflow", "the Flask reference app")
    keras = require("keras", "the Flask reference app")
    if model:
        path = Path(model)
        net = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        shape = net.inputs[0].shape  # (None, H, W, 3)
        labels = _read_labels(path.parent.parent / "labels.txt") or _read_labels(path.parent / "labels.txt")
        return Predictor(net, size=(int(shape[1]), int(shape[2])), labels=labels, description=str(path))
    if application:
        from export import applications

        app = applications.get(application)
        net = app.build(weights=None if weights == "none" else weights)
        try:  # ImageNet class names (the class index is a download: cosmetic, skipped when absent)
            module = __import__(f"keras.applications.{app.module}", fromlist=["decode_predictions"])
            labels = [row[0][1] for row in module.decode_predictions(np.eye(1000, dtype=np.float32), top=1)]
        except Exception:  # noqa: BLE001
            labels = None
        return Predictor(net, size=app.input_size, preprocess=app.reference_preprocess(), labels=labels,
                         description=f"keras.applications.{app.constructor}(weights={weights})")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    net = keras.Model(inputs, outputs)
    return Predictor(net, size=(32, 32), preprocess=lambda b: b, description="tiny random CNN (32x32, 10 classes)")


def create_app(predictor: Predictor, *, top_k: int = 5):
    """The Flask app: POST /predict (multipart field `image`, or the raw body), GET /health."""
    flask = require("flask", "the Flask reference app")
    app = flask.Flask("kestrel_flask_reference")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES

    @app.get("/health")
    def health():
        return {"status": "ok", "model": predictor.description}

    @app.post("/predict")
    def predict():
        upload = flask.request.files.get("image")
        data = upload.read() if upload is not None else flask.request.get_data()
        k = int(flask.request.args.get("top_k", top_k))
        start = time.perf_counter()
        try:
            predictions = predictor.predict(data, k)
        except ImageDecodeError as exc:
            return {"error": str(exc)}, 400
        return {"predictions": predictions, "total_ms": (time.perf_counter() - start) * 1000.0}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flask_app", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Kestrel .keras file (uint8 in, preprocessing inside)")
    source.add_argument("--application", help="a keras.applications name (e.g. mobilenet_v2)")
    source.add_argument("--tiny", action="store_true", help="a tiny random CNN (smoke tests)")
    parser.add_argument("--weights", default="imagenet", help="with --application: imagenet or none")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (default)")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(model=args.model, application=args.application, weights=args.weights,
                                   tiny=args.tiny)
        # the first predict builds Keras' predict function; do it before serving
        warm = np.zeros((1, *predictor.size, 3), np.uint8)
        predictor.model.predict(warm if predictor.preprocess is None else predictor.preprocess(
            warm.astype(np.float32)), verbose=0)
        app = create_app(predictor, top_k=args.top_k)
        from werkzeug.serving import make_server

        server = make_server(args.host, args.port, app, threaded=True)
    except (KestrelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"listening on http://{args.host}:{server.server_port} ({predictor.description})", flush=True)
    stop = threading.Event()

    import signal

    def _shutdown(*_):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
