"""The HTTP port under attack, as issue 13 tried it: request smuggling, slow sockets, cheap requests
with expensive answers, deep JSON, connection resets. Against `python -m serve` in a subprocess, so
its CPU time and memory (from /proc) and its log are the server's alone. Bounded: every case
sends a fixed number of requests/sockets and every socket has a timeout.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import LABELS, ROOT, png_bytes

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc for CPU and RSS")

PICTURE = np.random.default_rng(5).integers(0, 256, (60, 80, 3), dtype=np.uint8)
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server over fake models a (32x32, max batch 32) and slow (80 ms a batch), HTTP head deadline 2 s."""
    from serve.backends.fake import write_fake_model

    tmp = tmp_path_factory.mktemp("abuse")
    repo = tmp / "repo"
    write_fake_model(repo, "a", classes=10, labels=LABELS, seed=1)
    write_fake_model(repo, "slow", classes=10, labels=LABELS, delay_ms=80, max_batch_size=4)
    port_file, log_path = tmp / "port.json", tmp / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repo), "--port", "0",
                             "--metrics-port", "0", "--port-file", str(port_file),
                             "--http-header-timeout", str(HEADER_TIMEOUT), "--http-body-timeout", "5"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(port_file.read_text())
    yield {"pid": proc.pid, "http": info["http_port"], "metrics": info["metrics_port"], "log": log_path}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# ---- helpers ----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (clear_refs 5); returns that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[list[tuple[int, bytes]], bool]:
    """Send raw bytes, read until the server closes (or `timeout`): ([(status, body), ...], closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received, closed = b"", False
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return parse_responses(received), closed


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(headers.get(b"content-length", b"0"))
        responses.append((status, rest[:length]))
        data = rest[length:]
    return responses


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def classify_form(image: bytes, **fields) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
           for k, v in fields.items()]
    out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
               "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


SMUGGLED = b"GET /v2/models/a/stats HTTP/1.1\r\nHost: x\r\n\r\n"


# ---- smuggling --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, head", [
    ("Transfer-Encoding and Content-Length", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}"),
    ("a Content-Length list", b"Content-Length: 2, 40\r\n\r\n{}"),
    ("Content-Length with a sign", b"Content-Length: +2\r\n\r\n{}"),
    ("two Transfer-Encodings", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("an unknown transfer coding", b"Transfer-Encoding: xchunked\r\nContent-Length: 2\r\n\r\n{}"),
    ("chunked not last", b"Transfer-Encoding: chunked, identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    ("a space before the colon", b"Transfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\n{}"),
    ("obsolete line folding", b"Content-Length: 2\r\nX-Folded: a\r\n b\r\n\r\n{}"),
    ("a bare LF chunk line", b"Transfer-Encoding: chunked\r\n\r\n2;x\n{}\r\n0\r\n\r\n"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(target, name, head):
    data = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + head + SMUGGLED
    responses, closed = exchange(target["http"], data)
    assert [status for status, _ in responses] == [400], (name, responses)
    assert "malformed HTTP request" in json.loads(responses[0][1])["error"]
    assert closed, f"{name}: the connection stayed open"


def test_bare_lf_request_is_refused(target):
    responses, closed = exchange(target["http"], b"POST /v2/repository/index HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"
                                 + SMUGGLED)
    assert [s for s, _ in responses] == [400] and closed


def test_a_request_line_in_a_chunked_body_stays_body(target):
    body = SMUGGLED
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    data = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    responses, _ = exchange(target["http"], data, timeout=1.5)
    assert [s for s, _ in responses] == [400]  # the body is not JSON: one answer, nothing smuggled
    assert "not valid JSON" in json.loads(responses[0][1])["error"]


def test_pipelined_requests_get_one_answer_each(target):
    chunked = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    data = chunked + SMUGGLED + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses, closed = exchange(target["http"], data)
    assert [s for s, _ in responses] == [200, 200, 200] and closed
    assert {m["name"] for m in json.loads(responses[0][1])} == {"a", "slow"}


def test_chunked_upload_classifies(target):
    import http.client

    data = png_bytes(PICTURE)
    body, content_type = classify_form(data, models="a", top_k="2")
    conn = http.client.HTTPConnection("127.0.0.1", target["http"], timeout=10)
    try:
        conn.request("POST", "/v1/classify", body=iter([body[i:i + 777] for i in range(0, len(body), 777)]),
                     headers={"Content-Type": content_type}, encode_chunked=True)
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    assert answer["image"]["bytes"] == len(data) and answer["models"][0]["model"] == "a"


# ---- truncated or malformed multipart ---------------------------------------------------------
def _cut(body: bytes, boundary: bytes, case: str) -> bytes:
    closing = b"--" + boundary + b"--\r\n"
    assert body.endswith(closing)
    if case == "no closing boundary":
        return body[:-len(closing)]
    if case == "delimiter but no closing --":
        return body[:-len(closing)] + b"--" + boundary + b"\r\n"
    if case == "cut inside the image part":
        return body[:body.index(b"\x89PNG") + 200]
    if case == "cut inside a part's headers":
        return body[:body.index(b'name="image"') + 8]
    raise AssertionError(case)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("case, where", [
    ("no closing boundary", "inside part 'image'"),
    ("delimiter but no closing --", "in the headers of a part"),
    ("cut inside the image part", "inside part 'image'"),
    ("cut inside a part's headers", "in the headers of a part"),
])
def test_a_multipart_body_cut_short_is_a_clear_400(target, case, where, chunked):
    import http.client

    body, content_type = classify_form(png_bytes(PICTURE), models="a")
    boundary = content_type.split("boundary=")[1].encode()
    cut = _cut(body, boundary, case)
    before = target["log"].stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", target["http"], timeout=10)
    try:
        if chunked:
            conn.request("POST", "/v1/classify", body=iter([cut[i:i + 500] for i in range(0, len(cut), 500)]),
                         headers={"Content-Type": content_type}, encode_chunked=True)
        else:
            conn.request("POST", "/v1/classify", body=cut, headers={"Content-Type": content_type})
        response = conn.getresponse()
        status, data = response.status, response.read()
        conn.request("GET", "/v2/health/ready")  # the connection is still in sync: the next request works
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert status == 400, data[:300]
    error = json.loads(data)["error"]
    assert f"body of {len(cut)} bytes that ends {where}" in error and "cut short" in error, error
    assert f"'--{boundary.decode()}--'" in error, error
    added = target["log"].read_text()[before:]
    assert "Traceback" not in added and "multipart" not in added, added[:2000]


@pytest.mark.parametrize("body, expected", [
    (b"", "empty multipart/form-data body"),
    (b"not a form at all", "Expected boundary character"),
    (b"--BOUNDARY\r\nContent-Disposition: form-data\r\n\r\nx\r\n--BOUNDARY--\r\n", '"name" must be provided'),
])
def test_a_malformed_multipart_body_is_a_clear_400_and_not_logged(target, body, expected):
    before = target["log"].stat().st_size
    status, data = request(target["http"], "POST", "/v1/classify", body,
                           {"Content-Type": "multipart/form-data; boundary=BOUNDARY"})
    assert status == 400, data[:300]
    assert expected in json.loads(data)["error"]
    added = target["log"].read_text()[before:]
    assert "Traceback" not in added and "boundary" not in added.lower(), added[:2000]


# ---- slow clients -------------------------------------------------------------------------------
def test_a_thousand_slow_sockets_neither_block_others_nor_stay_open(target):
    count = 1000
    raise_fd_limit(count + 256)
    sockets = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", target["http"]), timeout=5)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            sockets.append(sock)
        for i in range(0, count, 10):  # a byte now and then, as slowloris does
            sockets[i].sendall(b"a")
        t0 = time.perf_counter()
        assert request(target["http"], "GET", "/v2/health/ready")[0] == 200
        body, content_type = classify_form(png_bytes(PICTURE), models="a")
        status, answer = request(target["http"], "POST", "/v1/classify", body, {"Content-Type": content_type})
        elapsed = time.perf_counter() - t0
        print(f"{count} slow sockets open: health + classify answered in {elapsed * 1000:.0f} ms")
        assert status == 200, answer
        assert elapsed < 1.0, f"health + classify took {elapsed:.2f} s with {count} slow sockets open"
        # every slow socket is closed by the server once the head deadline passed (408, then EOF)
        time.sleep(HEADER_TIMEOUT + 0.5)
        still_open, timed_out = 0, 0
        for sock in sockets:
            sock.settimeout(2.0)
            try:
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                timed_out += data.startswith(b"HTTP/1.1 408")
            except (socket.timeout, TimeoutError):
                still_open += 1
            except ConnectionResetError:
                pass
        assert still_open == 0, f"{still_open} of {count} slow sockets still open after the head deadline"
        assert timed_out == count
    finally:
        for sock in sockets:
            sock.close()


def test_slow_sockets_on_the_metrics_port(target):
    count = 300
    raise_fd_limit(count + 256)
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", target["metrics"]), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        t0 = time.perf_counter()
        status, text = request(target["metrics"], "GET", "/metrics")
        assert status == 200 and b"kestrel_model_ready" in text
        assert time.perf_counter() - t0 < 1.0
        time.sleep(HEADER_TIMEOUT + 0.5)
        for sock in sockets:
            sock.settimeout(2.0)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in sockets:
            sock.close()


def test_a_slow_body_is_cut_at_the_body_deadline(target):
    with socket.create_connection(("127.0.0.1", target["http"]), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, BrokenPipeError, OSError)):
            while time.monotonic() - t0 < 9:  # a byte every 0.5 s: each read is quick, the total is not
                sock.sendall(b"x")
                time.sleep(0.5)
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    raise ConnectionError("closed by the server")
        assert time.monotonic() - t0 < 7  # --http-body-timeout 5


# ---- cheap attacks, expensive answers ---------------------------------------------------------
def _costs(target, send) -> tuple[float, float, object]:
    pid = target["pid"]
    base_rss = reset_peak_rss(pid)
    cpu0 = cpu_seconds(pid)
    result = send()
    time.sleep(0.2)  # let the server finish whatever it still does with the request
    return cpu_seconds(pid) - cpu0, (peak_rss(pid) - base_rss) / 2**20, result


def test_multipart_with_50000_fields_is_refused_cheaply(target):
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(50_000)]
    body = "".join(parts).encode() + f"--{boundary}--\r\n".encode()
    assert len(body) > 2_500_000
    cpu, rss_mb, (status, data) = _costs(target, lambda: request(
        target["http"], "POST", "/v1/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
    assert status == 400 and "Too many fields" in json.loads(data)["error"]
    print(f"50,000-field multipart: {cpu:.3f} s server CPU, +{rss_mb:.1f} MB peak RSS")
    assert cpu < 1.0 and rss_mb < 100, f"{cpu:.2f} s CPU, +{rss_mb:.0f} MB RSS"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_64_mib_json_infer_body_is_refused_before_parsing(target, chunked):
    head = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,32,32,3],"data":['
    body = head + b"0," * ((64 * 2**20 - len(head)) // 2 - 1) + b"0]}]}"
    assert len(body) >= 64 * 2**20 - 8

    def send():
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", target["http"], timeout=30)
        try:
            if chunked:
                step = 1 << 20
                conn.request("POST", "/v2/models/a/infer", body=iter([body[i:i + step] for i in range(0, len(body), step)]),
                             headers={"Content-Type": "application/json"}, encode_chunked=True)
            else:
                conn.request("POST", "/v2/models/a/infer", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        except (BrokenPipeError, ConnectionResetError) as exc:  # refused mid-upload: still an answer
            return 0, str(exc).encode()
        finally:
            conn.close()

    cpu, rss_mb, (status, data) = _costs(target, send)
    assert status == 413, data[:300]
    assert "limit" in json.loads(data)["error"]
    print(f"64 MiB JSON ({'chunked' if chunked else 'content-length'}): {cpu:.3f} s server CPU, "
          f"+{rss_mb:.1f} MB peak RSS")
    assert cpu < 1.0 and rss_mb < 100, f"{cpu:.2f} s CPU, +{rss_mb:.0f} MB RSS"
    assert request(target["http"], "GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("path, body", [
    ("/v2/models/a/infer", b"[" * 100_000 + b"]" * 100_000),
    ("/v2/models/a/infer", b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,32,32,3],"data":'
     + b"[" * 50_000 + b"]" * 50_000 + b"}]}"),
    ("/v2/repository/index", b"[" * 30_000 + b"]" * 30_000),
])
def test_deeply_nested_json_is_a_400(target, path, body):
    status, data = request(target["http"], "POST", path, body, {"Content-Type": "application/json"})
    assert status == 400, data[:300]
    assert "nested too deeply" in json.loads(data)["error"]


# ---- resets -----------------------------------------------------------------------------------
def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    sock.close()


def test_a_thousand_resets_add_almost_nothing_to_the_log(target):
    log_path = target["log"]
    before = log_path.stat().st_size
    port = target["http"]
    good_header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                          "parameters": {"binary_data_size": 3072}}]}).encode()
    for i in range(1000):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        kind = i % 4
        if kind == 0:  # mid-head
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        elif kind == 1:  # mid-body
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000"
                         b"\r\n\r\n" + b"x" * 100)
        elif kind == 2:  # while the model runs (80 ms)
            sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
                         + f"\r\nInference-Header-Content-Length: {len(good_header)}\r\nContent-Length: "
                           f"{len(good_header) + 3072}\r\n\r\n".encode() + good_header + bytes(3072))
        else:  # while the answer is written
            sock.sendall(b"GET /static/app.js HTTP/1.1\r\nHost: x\r\n\r\n")
        if kind in (1, 2):
            time.sleep(0.002)
        _reset(sock)
    time.sleep(1.0)  # requests still running finish (and must not log either)
    assert request(port, "GET", "/v2/health/ready")[0] == 200
    grown = log_path.stat().st_size - before
    added = log_path.read_text()[before:]
    print(f"1000 resets: +{grown} bytes of log")
    assert grown < 10_000, f"1000 resets added {grown} bytes of log:\n{added[:2000]}"
    assert "Traceback" not in added
