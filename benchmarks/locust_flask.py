"""Locust load for the Flask + model.predict reference app (benchmarks/flask_app.py).

    locust -f benchmarks/locust_flask.py --headless -u 8 -r 8 --run-time 30s \\
        --host http://127.0.0.1:5000

Each user uploads the same image files as the gRPC Classify users
(benchmarks/locustfile.py), as multipart form data to POST /predict, back to
back. FastHttpUser (locust's geventhttpclient user) keeps the client's own
CPU use low: on a small machine the load generator shares the cores with
the server, and a cheaper client flatters the reference, not Kestrel.

Options: --kestrel-images, --kestrel-encode, --kestrel-warmup, --kestrel-record, --kestrel-top-k
(environment variables KESTREL_IMAGES, ...).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from locust import FastHttpUser, events, task

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _loadgen  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser):
    _loadgen.add_common_arguments(parser)
    parser.add_argument("--kestrel-top-k", env_var="KESTREL_TOP_K", type=int, default=5,
                        help="top_k asked of the app (default 5)")


_loadgen.install_recorder()


class FlaskPredictUser(FastHttpUser):
    """One client uploading images to /predict."""

    connection_timeout = 30.0
    network_timeout = 120.0

    def on_start(self):
        options = self.environment.parsed_options
        files = _loadgen.image_files(options.kestrel_images, options.kestrel_encode)
        self._files = itertools.cycle(_loadgen.rotated(files, _loadgen.next_user()))
        self._path = f"/predict?top_k={int(options.kestrel_top_k)}"

    @task
    def predict(self):
        name, data = next(self._files)
        with self.client.post(self._path, files={"image": (name, data, "application/octet-stream")},
                              name="http:predict", context={"images": 1}, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
                return
            try:
                ok = bool(response.json().get("predictions"))
            except ValueError:
                ok = False
            if not ok:
                response.failure("no predictions in the response")
