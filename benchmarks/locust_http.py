"""Locust load for Kestrel's HTTP Classify (POST /v1/classify on the HTTP port), to compare with gRPC Classify.

    locust -f benchmarks/locust_http.py --headless -u 8 -r 8 --run-time 30s \\
        --host http://127.0.0.1:8000 --kestrel-model mobilenet_v2

Each user uploads the same image files as the gRPC Classify users (benchmarks/locustfile.py),
back to back: as multipart/form-data (image file + models + top_k fields, what browsers,
curl -F and requests send; the default) or, with --kestrel-http-body raw, as the request body
(Content-Type: image/jpeg, ?models=...&top_k=...). FastHttpUser (geventhttpclient) keeps the
client's CPU use low, as for the Flask reference. Timed as request_type POST, name
"http_classify:<model>".

Options: --kestrel-model, --kestrel-http-body, --kestrel-images, --kestrel-encode, --kestrel-warmup,
--kestrel-record, --kestrel-top-k (environment variables KESTREL_MODEL, ...).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from urllib.parse import urlencode

from locust import FastHttpUser, events, task

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _loadgen  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser):
    _loadgen.add_common_arguments(parser)
    group = parser.add_argument_group("kestrel HTTP")
    group.add_argument("--kestrel-model", env_var="KESTREL_MODEL", default="mobilenet_v2",
                       help="model name(s), comma-separated, round-robin; 'a+b' asks for both in one request")
    group.add_argument("--kestrel-top-k", env_var="KESTREL_TOP_K", type=int, default=5, help="top_k (default 5)")
    group.add_argument("--kestrel-http-body", env_var="KESTREL_HTTP_BODY", default="multipart",
                       choices=("multipart", "raw"),
                       help="multipart (default): a form upload; raw: the image as the body, fields in the query")


_loadgen.install_recorder()


class KestrelHttpUser(FastHttpUser):
    """One client uploading images to /v1/classify over a keep-alive connection."""

    connection_timeout = 30.0
    network_timeout = 120.0

    def on_start(self):
        options = self.environment.parsed_options
        files = _loadgen.image_files(options.kestrel_images, options.kestrel_encode)
        models = [m.strip() for m in options.kestrel_model.split(",") if m.strip()]
        if not models:
            raise ValueError("--kestrel-model is empty")
        top_k = int(options.kestrel_top_k)
        self.raw = options.kestrel_http_body == "raw"
        requests = []
        for name, data in _loadgen.rotated(files, _loadgen.next_user()):
            for model in models:
                names = ",".join(_loadgen.model_names(model))
                requests.append((f"http_classify:{model}", name, data, {"models": names, "top_k": str(top_k)}))
        self._cycle = itertools.cycle(requests)

    @task
    def classify(self):
        label, name, data, fields = next(self._cycle)
        if self.raw:
            call = dict(data=data, headers={"Content-Type": "image/jpeg"})
            path = "/v1/classify?" + urlencode(fields)
        else:
            call = dict(data=fields, files={"image": (name, data, "image/jpeg")})
            path = "/v1/classify"
        with self.client.post(path, name=label, context={"images": 1}, catch_response=True, **call) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
                return
            try:
                models = response.json().get("models") or []
                ok = bool(models and models[0].get("predictions"))
            except ValueError:
                ok = False
            if not ok:
                response.failure("no predictions in the response")
