"""The HTTP port (serve/http.py): KServe V2 REST, /v1/classify, the page's files, errors -> HTTP statuses.

Runs an HttpFrontend over a ModelHub of fake models in this process; tritonclient's HTTP
client drives it in tests/serve/test_http_triton.py, a browser in tests/web/.
"""

import gzip
import http.client
import json
import threading
import time
import uuid

import numpy as np
import pytest
from serve_helpers import LABELS, png_bytes

from serve import images
from serve.backends.fake import fake_probabilities
from serve.ensemble import rank, top_k

PICTURE = np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)
BATCH = np.random.default_rng(8).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hub(fake_repo):
    from serve.ensemble import Ensemble
    from serve.hub import ModelHub

    hub = ModelHub(fake_repo, ensembles=[Ensemble.parse("trio=a,b,c"), Ensemble.parse("pair=a,c:majority")]).load()
    yield hub
    hub.close(timeout=2)


@pytest.fixture(scope="module")
def frontend(hub):
    from serve.http import HttpFrontend, HttpOptions

    fe = HttpFrontend(hub, port=0, options=HttpOptions(max_body_mb=2)).start()
    yield fe
    fe.stop(grace=2)


class Http:
    """A keep-alive connection: request() -> (status, headers, body)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, response.headers, response.read()  # headers: case-insensitive

    def json(self, method, path, body=None, headers=None):
        status, headers, data = self.request(method, path, body, headers)
        return status, json.loads(data) if data else None

    def close(self):
        self.conn.close()


@pytest.fixture
def web(frontend):
    conn = Http(frontend.port)
    yield conn
    conn.close()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """Encode form fields and files ({name: (filename, bytes, type)}) as multipart/form-data."""
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, kind) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def classify(web, image: bytes, filename="photo.png", kind="image/png", **fields):
    body, content_type = multipart(fields, {"image": (filename, image, kind)})
    return web.json("POST", "/v1/classify", body, {"Content-Type": content_type})


def v2_request(batch, *, datatype="UINT8", binary=False, outputs=None, parameters=None, name="images"):
    tensor = {"name": name, "datatype": datatype, "shape": list(batch.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": batch.nbytes}
    else:
        tensor["data"] = batch.ravel().tolist()
    request = {"id": "req-1", "inputs": [tensor]}
    if outputs is not None:
        request["outputs"] = outputs
    if parameters:
        request["parameters"] = parameters
    header = json.dumps(request).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + batch.tobytes(), {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))}


def good_infer(web):
    status, body = web.json("POST", "/v2/models/a/infer", *v2_request(BATCH))
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(3, 10),
                               fake_probabilities(BATCH, 10, seed=1), rtol=1e-6)


# ---- health and metadata ----------------------------------------------------------------------
def test_health_and_server_metadata(web):
    assert web.request("GET", "/v2/health/live")[0] == 200
    assert web.request("GET", "/v2/health/ready")[0] == 200
    status, meta = web.json("GET", "/v2")
    assert status == 200 and meta["name"] == "kestrel" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_ready_and_config(web):
    status, meta = web.json("GET", "/v2/models/a")
    assert status == 200
    assert meta == {"name": "a", "versions": ["1"], "platform": "fake",
                    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}
    assert web.json("GET", "/v2/models/a/versions/1")[1] == meta
    assert web.request("GET", "/v2/models/a/ready")[0] == 200
    assert web.request("GET", "/v2/models/a/versions/1/ready")[0] == 200
    assert web.request("GET", "/v2/models/broken/ready")[0] == 400  # loaded and failed: not ready
    status, config = web.json("GET", "/v2/models/a/config")
    assert status == 200 and config["name"] == "a" and config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["32", "32", "3"] and config["input"][0]["data_type"] == "TYPE_UINT8"
    status, pair = web.json("GET", "/v2/models/pair/config")
    assert status == 200 and pair["parameters"]["members"]["string_value"] == "a,c"


@pytest.mark.parametrize("path, fragment", [
    ("/v2/models/nope", "received model name 'nope'"),
    ("/v2/models/a/versions/7", "has no version 7"),
    ("/v2/models/a/versions/x/ready", "received version 'x'"),
])
def test_unknown_model_or_version_is_404_with_a_message(web, path, fragment):
    status, body = web.json("GET", path)
    assert status == 404 and fragment in body["error"]


def test_repository_index_and_statistics(web):
    status, index = web.json("POST", "/v2/repository/index", b"{}")
    assert status == 200
    states = {item["name"]: item["state"] for item in index}
    assert states["a"] == "READY" and states["broken"] == "UNAVAILABLE" and states["trio"] == "READY"
    status, ready = web.json("POST", "/v2/repository/index", b'{"ready": true}')
    assert "broken" not in {item["name"] for item in ready}
    good_infer(web)
    status, stats = web.json("GET", "/v2/models/a/stats")
    (a,) = stats["model_stats"]
    assert status == 200 and a["name"] == "a" and a["inference_count"] >= 3
    assert a["inference_stats"]["success"]["count"] >= 1


# ---- infer --------------------------------------------------------------------------------------
def test_infer_json_tensors(web):
    good_infer(web)


def test_infer_binary_in_and_out(web):
    body, headers = v2_request(BATCH, binary=True,
                               outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    status, response_headers, data = web.request("POST", "/v2/models/a/infer", body, headers)
    assert status == 200, data
    split = int(response_headers["Inference-Header-Content-Length"])
    header = json.loads(data[:split])
    assert header["id"] == "req-1" and header["model_version"] == "1"
    (out,) = header["outputs"]
    assert out["shape"] == [3, 10] and out["parameters"]["binary_data_size"] == 3 * 10 * 4 == len(data) - split
    np.testing.assert_allclose(np.frombuffer(data[split:], "<f4").reshape(3, 10), fake_probabilities(BATCH, 10, 1),
                               rtol=1e-6)


def test_infer_binary_output_by_request_parameter_and_gzip_body(web):
    body, headers = v2_request(BATCH, binary=True, parameters={"binary_data_output": True})
    status, response_headers, data = web.request("POST", "/v2/models/c/infer", gzip.compress(body),
                                                 {**headers, "Content-Encoding": "gzip"})
    assert status == 200, data
    split = int(response_headers["Inference-Header-Content-Length"])
    np.testing.assert_allclose(np.frombuffer(data[split:], "<f4").reshape(3, 10), fake_probabilities(BATCH, 10, 3),
                               rtol=1e-6)


def test_infer_classification_extension(web):
    status, body = web.json("POST", "/v2/models/a/infer",
                            *v2_request(BATCH, outputs=[{"name": "probabilities",
                                                         "parameters": {"classification": 2, "binary_data": False}}]))
    assert status == 200, body
    (out,) = body["outputs"]
    probs = fake_probabilities(BATCH, 10, 1)
    assert out["datatype"] == "BYTES" and out["shape"] == [3, 2]
    first = out["data"][0].split(":")
    best = int(np.argmax(probs[0]))
    assert int(first[1]) == best and first[2] == LABELS[best] and float(first[0]) == pytest.approx(probs[0, best],
                                                                                                    abs=1e-6)


def test_infer_ensemble_fuses_members(web):
    status, body = web.json("POST", "/v2/models/pair/infer", *v2_request(BATCH, parameters={"fusion": "mean"}))
    assert status == 200, body
    scores, _ = rank([fake_probabilities(BATCH, 10, 1), fake_probabilities(BATCH, 10, 3)], "mean")
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(3, 10), scores, rtol=1e-6)


def _bad_requests():
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3],
                                     "parameters": {"binary_data_size": BATCH.nbytes}}]}).encode()
    return [
        ("wrong datatype", "a", *v2_request(BATCH.astype(np.float32), datatype="FP32"), 400,
         "received datatype 'FP32'"),
        ("wrong shape", "a", *v2_request(np.zeros((1, 31, 32, 3), np.uint8)), 400, "received shape [1, 31, 32, 3]"),
        ("wrong input name", "a", *v2_request(BATCH, name="pixels"), 400, "received input 'pixels'"),
        ("empty batch", "a", *v2_request(np.zeros((0, 32, 32, 3), np.uint8)), 400, "empty batch"),
        ("values out of range", "a", json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                                             "shape": [1, 32, 32, 3], "data": [300] * 3072}]}).encode(),
         {}, 400, "received values in [300, 300]"),
        ("too few values", "a", json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                                        "data": [1, 2, 3]}]}).encode(), {}, 400, "received 3 values"),
        ("short binary", "a", header + BATCH.tobytes()[:-5],
         {"Inference-Header-Content-Length": str(len(header))}, 400, f"received {BATCH.nbytes - 5} bytes"),
        ("header length past the body", "a", header, {"Inference-Header-Content-Length": "99999"}, 400,
         "Inference-Header-Content-Length"),
        ("not json", "a", b"{nope", {}, 400, "not valid JSON"),
        ("unknown output", "a", *v2_request(BATCH, outputs=[{"name": "logits"}]), 400,
         "received requested output 'logits'"),
        ("unknown fusion", "pair", *v2_request(BATCH, parameters={"fusion": "median"}), 400, "unknown fusion 'median'"),
        ("unknown model", "nope", *v2_request(BATCH), 404, "received model name 'nope'"),
        ("model that failed to load", "broken", *v2_request(BATCH), 503, "simulated load failure"),
    ]


@pytest.mark.parametrize("case, model, body, headers, status, fragment", _bad_requests(), ids=lambda v: v
                         if isinstance(v, str) and " " in v else None)
def test_bad_infer_gets_its_status_and_message_then_a_good_request_works(web, case, model, body, headers, status,
                                                                         fragment):
    got, answer = web.json("POST", f"/v2/models/{model}/infer", body, headers)
    assert got == status and fragment in answer["error"], answer
    good_infer(web)  # same keep-alive connection


def test_deadline_is_504_and_full_queue_is_503(frontend, hub):
    """slow: 80 ms per batch, one worker, a queue of 2."""
    one = np.zeros((1, 32, 32, 3), np.uint8)
    with _Conn(frontend.port) as web:
        status, body = web.json("POST", "/v2/models/slow/infer", *v2_request(one, parameters={"timeout": 1000}))
        assert status == 504 and "deadline" in body["error"]
    time.sleep(0.2)  # let that batch finish
    results = []

    def call():
        with _Conn(frontend.port) as conn:
            status, headers, data = conn.request("POST", "/v2/models/slow/infer", *v2_request(one))
            results.append((status, headers.get("Retry-After"), json.loads(data)))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sorted(s for s, _, _ in results)
    assert len(results) == 12 and 200 in statuses and 503 in statuses, statuses
    full = [(r, b) for s, r, b in results if s == 503]
    assert all(retry == "1" and "queue full" in body["error"] for retry, body in full)
    with _Conn(frontend.port) as web:
        good_infer(web)


class _Conn(Http):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- classify -----------------------------------------------------------------------------------
def test_classify_multipart_matches_in_process_inference(web):
    data = png_bytes(PICTURE)
    status, body = classify(web, data, models="a", top_k="3")
    assert status == 200, body
    expected = fake_probabilities(images.load(data, (32, 32))[None], 10, seed=1)[0]
    order = np.argsort(-expected)[:3]
    (a,) = body["models"]
    assert a["model"] == "a" and [p["index"] for p in a["predictions"]] == list(order)
    assert [p["label"] for p in a["predictions"]] == [LABELS[i] for i in order]
    np.testing.assert_allclose([p["probability"] for p in a["predictions"]], expected[order], rtol=1e-6)
    assert a["compute_ms"] > 0 and a["latency_ms"] >= a["compute_ms"] and a["input_size"] == [32, 32]
    assert body["image"] == {"filename": "photo.png", "bytes": len(data), "height": 90, "width": 120}
    assert body["ensembles"] == []


def test_classify_ensemble_and_models_with_fusion(web):
    data = png_bytes(PICTURE)
    status, body = classify(web, data, ensemble="trio", top_k="3")
    assert status == 200, body
    assert [m["model"] for m in body["models"]] == ["a", "b", "c"]
    picture = images.decode(data)
    probs = [fake_probabilities(images.resize(picture, size)[None], 10, seed)
             for size, seed in [((32, 32), 1), ((48, 40), 2), ((32, 32), 3)]]
    scores, order = rank(probs, "mean")
    (ens,) = body["ensembles"]
    assert (ens["name"], ens["fusion"], ens["members"]) == ("trio", "mean", ["a", "b", "c"])
    shown = [(p["index"], pytest.approx(p["probability"], rel=1e-5)) for p in ens["predictions"]]
    assert shown == top_k(scores, order, 3)[0]
    status, body = classify(web, data, models="a,c", fusion="majority", top_k="2")
    (ens,) = body["ensembles"]
    assert status == 200 and ens["fusion"] == "majority" and len(ens["predictions"]) == 2


def test_classify_raw_image_body_with_query_parameters(web):
    data = png_bytes(PICTURE, "JPEG", quality=90)
    status, body = web.json("POST", "/v1/classify?models=b&top_k=1", data, {"Content-Type": "image/jpeg"})
    assert status == 200 and [m["model"] for m in body["models"]] == ["b"]
    assert len(body["models"][0]["predictions"]) == 1


@pytest.mark.parametrize("image, fields, status, fragment", [
    (b"this is a text file, not a photo", {"models": "a"}, 400, "cannot decode image"),
    (b"", {"models": "a"}, 400, "empty (zero-byte) image"),
    (png_bytes(PICTURE)[:200], {"models": "a"}, 400, "image"),
    (png_bytes(PICTURE), {"models": "nope"}, 404, "received model name 'nope'"),
    (png_bytes(PICTURE), {"models": "a", "top_k": "three"}, 400, "received top_k='three'"),
    (png_bytes(PICTURE), {"models": "a", "fusion": "median"}, 400, "unknown fusion 'median'"),
    (png_bytes(PICTURE), {"models": "broken"}, 503, "simulated load failure"),
    (png_bytes(PICTURE), {"models": "a", "fusion": "mean"}, 400, "single model 'a'"),
    (png_bytes(PICTURE), {"models": "a", **{f"extra{i}": "x" for i in range(20)}}, 400, "Too many fields"),
])
def test_bad_upload_is_a_4xx_json_error_then_a_good_one_works(web, image, fields, status, fragment):
    got, body = classify(web, image, filename="notes.txt", kind="text/plain", **fields)
    assert got == status and fragment in body["error"], body
    assert classify(web, png_bytes(PICTURE), models="a")[0] == 200


def test_classify_needs_an_image_field_and_a_form(web):
    body, content_type = multipart({"models": "a"}, {"photo": ("x.png", png_bytes(PICTURE), "image/png")})
    status, answer = web.json("POST", "/v1/classify", body, {"Content-Type": content_type})
    assert status == 400 and "expected one 'image' file field" in answer["error"] and "photo" in answer["error"]
    status, answer = web.json("POST", "/v1/classify", b"{}", {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in answer["error"]


def test_body_over_the_limit_is_413_and_the_connection_keeps_serving(frontend, web):
    big = bytes(3 * 1024 * 1024)  # the fixture's limit is 2 MiB
    with _Conn(frontend.port) as conn:
        status, headers, data = conn.request("POST", "/v1/classify", big, {"Content-Type": "image/png"})
        assert status == 413
        assert "received an image body of 3145728 bytes; the limit is 2097152 bytes" in json.loads(data)["error"]
        # refused from its Content-Length, unread: the rest is skipped and the connection goes on
        assert classify(conn, png_bytes(PICTURE), models="a")[0] == 200
        status, _, data = conn.request("POST", "/v2/models/a/infer", gzip.compress(bytes(40 * 1024 * 1024)),
                                       {"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert status == 413 and "inflates past the limit" in json.loads(data)["error"]
    assert classify(web, png_bytes(PICTURE), models="a")[0] == 200


def test_multipart_upload_keeps_binary_data_and_utf8_filenames(web):
    data = png_bytes(PICTURE)
    boundary = "XyZ"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="ch\u00e2t \u732b.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="models"\r\n\r\na\r\n--{boundary}--\r\n'
    ).encode()
    assert b"\r\n" in data  # PNG's signature carries CR LF: the parser must not split on it
    status, answer = web.json("POST", "/v1/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    assert answer["image"] == {"filename": "ch\u00e2t \u732b.png", "bytes": len(data), "height": 90, "width": 120}
    assert [m["model"] for m in answer["models"]] == ["a"]
    status, answer = web.json("POST", "/v1/classify", body, {"Content-Type": "multipart/form-data"})
    assert status == 400 and "boundary" in answer["error"].lower()


def test_an_image_over_a_megabyte_stays_in_memory(web, monkeypatch):
    """Starlette spools file parts to a temporary file past 1 MB; the body is capped already, so
    Kestrel keeps the image in memory (no disk write, no thread hop per chunk)."""
    import tempfile

    def to_disk(self):
        raise AssertionError("the uploaded image was spooled to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", to_disk)
    noise = np.random.default_rng(9).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = png_bytes(noise, compress_level=0)
    assert 1024 * 1024 < len(data) < 2 * 1024 * 1024 - 10_000  # over Starlette's spool size, under this max_body
    status, answer = classify(web, data, models="a")
    assert status == 200, answer
    assert answer["image"]["bytes"] == len(data) and answer["image"]["width"] == 700


def test_chunked_upload_classifies(frontend):
    data = png_bytes(PICTURE)

    def chunks():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    conn = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=10)
    try:
        conn.request("POST", "/v1/classify?models=a&top_k=2", body=chunks(), headers={"Content-Type": "image/png"},
                     encode_chunked=True)
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert answer["image"]["bytes"] == len(data) and len(answer["models"][0]["predictions"]) == 2
    finally:
        conn.close()


def test_models_listing_for_the_page(web):
    status, body = web.json("GET", "/v1/models")
    assert status == 200
    models = {m["name"]: m for m in body["models"]}
    assert models["a"]["state"] == "READY" and models["a"]["input_size"] == [32, 32]
    assert models["broken"]["state"] == "UNAVAILABLE" and "simulated load failure" in models["broken"]["reason"]
    assert {e["name"]: e["members"] for e in body["ensembles"]} == {"trio": ["a", "b", "c"], "pair": ["a", "c"]}
    assert body["fusions"] == ["mean", "geometric", "max-confidence", "majority"]


# ---- page, routing, metrics, shutdown -----------------------------------------------------------
def test_page_and_static_files_are_served_locally(web):
    status, headers, page = web.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = page.decode()
    assert "/static/app.js" in text and "/static/style.css" in text
    assert "http://" not in text and "https://" not in text  # nothing from a CDN
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, data = web.request("GET", f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(data) > 500
        assert b"https://" not in data and b"http://" not in data
    assert web.request("GET", "/static/../http.py")[0] == 404
    assert web.request("GET", "/static/.hidden")[0] == 404


def test_security_headers_on_the_page_the_api_and_errors(web):
    for method, path in [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/v2/models/a"), ("GET", "/nothing"),
                         ("POST", "/v2/models/a/infer")]:
        status, headers, _ = web.request(method, path, b"{}" if method == "POST" else None)
        assert headers["X-Content-Type-Options"] == "nosniff", (path, status)
        assert headers["X-Frame-Options"] == "DENY"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "object-src 'none'" in policy


def test_allowed_hosts_refuse_other_host_headers(hub):
    from serve.http import HttpFrontend, HttpOptions

    fe = HttpFrontend(hub, port=0, options=HttpOptions(allowed_hosts=["localhost", "*.kestrel.test"])).start()
    try:
        with _Conn(fe.port) as conn:
            assert conn.request("GET", "/v2/health/live", headers={"Host": f"localhost:{fe.port}"})[0] == 200
            assert conn.request("GET", "/v2/health/live", headers={"Host": "api.kestrel.test"})[0] == 200
        for host in ("evil.example", f"127.0.0.1:{fe.port}"):  # a rebinding name, or one not listed
            with _Conn(fe.port) as conn:
                status, _, data = conn.request("GET", "/", headers={"Host": host})
                assert status == 400 and b"host" in data.lower()
    finally:
        fe.stop(grace=1)


def test_unknown_path_and_wrong_method(web):
    status, body = web.json("GET", "/v3/nothing")
    assert status == 404 and "/v3/nothing" in body["error"]
    status, headers, data = web.request("GET", "/v2/models/a/infer")
    assert status == 405 and headers["Allow"] == "POST" and "received GET" in json.loads(data)["error"]


def test_head_and_malformed_requests_get_answers_too(frontend, web):
    status, headers, data = web.request("HEAD", "/v2/models/a")
    assert status == 200 and data == b"" and int(headers["Content-Length"]) > 50
    import socket

    for request, code, fragment in [
        (b"GET /v2 HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", b"431", "over 65536 bytes"),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"400", "malformed HTTP request"),
        # curl --http2's h2c offer on http://: answered over HTTP/1.1
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
         b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nConnection: close\r\n\r\n", b"200", None),
    ]:
        with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + code) and b"application/json" in head, reply[:200]
        answer = json.loads(body)
        assert fragment in answer["error"] if fragment else answer["name"] == "kestrel"
    good_infer(web)


def test_posts_over_the_in_flight_limit_get_503_and_idle_connections_time_out(hub):
    from serve.http import HttpFrontend, HttpLimits, HttpOptions

    fe = HttpFrontend(hub, port=0, options=HttpOptions(max_inflight=1), limits=HttpLimits(idle_timeout_s=1)).start()
    try:
        one = np.zeros((1, 32, 32, 3), np.uint8)
        results = []

        def slow_call():
            with _Conn(fe.port) as conn:
                results.append(conn.json("POST", "/v2/models/slow/infer", *v2_request(one))[0])

        thread = threading.Thread(target=slow_call)
        thread.start()
        time.sleep(0.03)  # the slow model takes 80 ms
        with _Conn(fe.port) as second:
            status, headers, data = second.request("POST", "/v2/models/a/infer", *v2_request(BATCH))
            assert status == 503 and headers["Retry-After"] == "1"
            assert "too many requests in progress" in json.loads(data)["error"]
            assert second.request("GET", "/v2/health/live")[0] == 200  # GETs are not limited
        thread.join(10)
        assert results == [200]
        with _Conn(fe.port) as again:
            good_infer(again)
            time.sleep(1.6)  # idle past idle_timeout_s: the server closed it
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                again.request("GET", "/v2/health/live")
    finally:
        fe.stop(grace=1)


def test_requests_are_counted_in_the_servers_metrics(hub, web):
    from prometheus_client import generate_latest

    good_infer(web)
    web.json("GET", "/v2/models/a")  # metadata: not a counted request
    web.json("POST", "/v2/models/a/infer", *v2_request(BATCH, datatype="FP32"))
    text = generate_latest(hub.metrics.registry).decode()
    assert 'kestrel_requests_total{api="http_infer",model="a"}' in text
    # the same code name as gRPC's for the same error (one mapping to Triton's failure reason)
    assert 'kestrel_request_failures_total{api="http_infer",code="INVALID_ARGUMENT",model="a"}' in text


def test_stop_finishes_in_flight_requests_then_refuses_connections(hub):
    from serve.http import HttpFrontend, HttpOptions

    fe = HttpFrontend(hub, port=0).start()
    idle = _Conn(fe.port)  # a keep-alive connection that stays idle must not hold up stop()
    assert idle.request("GET", "/v2/health/live")[0] == 200
    results = []

    def slow_call():
        with _Conn(fe.port) as conn:
            results.append(conn.json("POST", "/v2/models/slow/infer", *v2_request(np.zeros((1, 32, 32, 3), np.uint8))))

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.03)  # the request is running (80 ms)
    t0 = time.monotonic()
    fe.stop(grace=5)
    thread.join(5)
    assert results and results[0][0] == 200 and len(results[0][1]["outputs"][0]["data"]) == 10
    assert time.monotonic() - t0 < 3
    with pytest.raises(ConnectionRefusedError):
        _Conn(fe.port).request("GET", "/v2/health/live")
    idle.close()


# ---- wired into the server ----------------------------------------------------------------------
def test_create_server_serves_http_beside_grpc_and_stops_both(fake_repo):
    from serve import KestrelClient, create_server

    server, port = create_server(fake_repo, models=["a"], port=0, http_port=0)
    try:
        assert server.http_port and server.http_port != port
        with _Conn(server.http_port) as web:
            good_infer(web)
            status, body = classify(web, png_bytes(PICTURE), models="a")
            assert status == 200 and body["models"][0]["model"] == "a"
        with KestrelClient(f"127.0.0.1:{port}", timeout=10) as client:  # the same hub, through gRPC
            assert client.classify(png_bytes(PICTURE), ["a"], top_k=3).results[0].model == "a"
        snap = server.hub.metrics.model("a", "1").snapshot()
        assert snap["success"][0] >= 3  # HTTP infer + HTTP classify + gRPC classify, one set of counters
    finally:
        server.stop(grace=2)
    with pytest.raises(ConnectionRefusedError):
        _Conn(server.http_port).request("GET", "/v2/health/live")


def test_http_port_in_use_is_a_clear_error(fake_repo, frontend):
    from serve import create_server
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match=f"cannot serve HTTP on 127.0.0.1:{frontend.port}"):
        create_server(fake_repo, models=["a"], port=0, http_port=frontend.port)


def test_python_m_serve_http_port_and_sigterm(fake_repo, serve_process):
    proc = serve_process("--repository", str(fake_repo), "--models", "a,b", "--ensemble", "ab=a,b",
                         "--metrics-port", "-1", "--allowed-hosts", "127.0.0.1,localhost")
    # --port 0: the HTTP port defaults to a free one too
    http_port = __import__("json").loads(proc.port_file.read_text())["http_port"]
    assert http_port and f"HTTP on http://127.0.0.1:{http_port}/" in proc.output()
    with _Conn(http_port) as web:
        assert web.request("GET", "/v2/health/ready")[0] == 200
        assert classify(web, b"not an image", models="ab")[0] == 400
        status, body = classify(web, png_bytes(PICTURE), ensemble="ab")
        assert status == 200 and body["ensembles"][0]["name"] == "ab"
        assert web.request("GET", "/v2/health/ready", headers={"Host": "rebound.example"})[0] == 400
    assert proc.stop() == 0
    assert "server stopped" in proc.output()


def test_sigterm_lets_an_in_flight_http_request_finish(tmp_path, serve_process):
    from serve.backends.fake import write_fake_model

    repo = tmp_path / "repo"
    write_fake_model(repo, "sleepy", classes=10, labels=LABELS, delay_ms=1000)
    proc = serve_process("--repository", str(repo), "--metrics-port", "-1", "--grace", "10")
    http_port = json.loads(proc.port_file.read_text())["http_port"]
    results = []

    def call():
        with _Conn(http_port) as conn:
            results.append(conn.json("POST", "/v2/models/sleepy/infer", *v2_request(BATCH[:1])))

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.4)  # the request is running (1 s)
    assert proc.stop() == 0
    thread.join(10)
    assert results and results[0][0] == 200, results
    np.testing.assert_allclose(np.array(results[0][1]["outputs"][0]["data"]).reshape(1, 10),
                               fake_probabilities(BATCH[:1], 10, seed=0), rtol=1e-6)
    with pytest.raises(ConnectionRefusedError):
        _Conn(http_port).request("GET", "/v2/health/live")


def test_serve_http_has_no_import_cycle_and_its_server_needs_no_hub():
    """Modules in serve/http import each other one way; _server (also the metrics port's) imports nothing
    of Kestrel, so serve.metrics can use it without a cycle through the hub."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    from serve_helpers import ROOT

    folder = ROOT / "serve" / "http"
    graph = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from ._x import y / from . import _x
                graph[path.stem] |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    assert "_v2" in graph["_app"] and "_app" in graph["_frontend"]
    assert graph["_server"] == set()

    def visit(name, seen):
        assert name not in seen, f"import cycle in serve/http: {' -> '.join(seen + [name])}"
        for dep in graph.get(name, ()):
            visit(dep, seen + [name])

    for name in graph:
        visit(name, [])
    code = "import sys, serve.http._server, serve.metrics; print('serve.hub' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr


def test_responses_do_not_wait_for_delayed_acks(frontend, web):
    """TCP_NODELAY on every connection: uvicorn writes a response's head and body separately, and with
    Nagle on the body would wait for the client's delayed ACK (40 ms a request)."""
    import socket

    good_infer(web)  # the connection is open and has answered
    protocols = list(frontend.server._server.server_state.connections)
    assert protocols
    for protocol in protocols:
        sock = protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
