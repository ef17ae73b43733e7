"""Fault injection: a server that serves production traffic never hangs, on either transport.

Each case breaks one thing (a backend that raises on every batch, one that raises on one batch of many,
one slower than the deadline, requests of mixed image sizes, a member refused inside an ensemble,
SIGTERM with requests in flight longer than the grace) and checks what a user of the server sees:
no request waits past its deadline + 1 s, the other models keep answering, the server's threads (other
than its handler pools) and memory come back to their baseline, and the metrics count what happened.

Deterministic: models that must be busy are gated (a test double around the fake runner's _infer that
blocks until the test opens it) and the test waits for states, not durations; the only sleeps are the
fake backend's simulated compute times. Every case is bounded (the whole module runs in ~20 s).
"""

from __future__ import annotations

import json
import http.client
import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from serve._proto import grpc_service_pb2 as pb
from serve.backends.fake import fake_probabilities
from serve_helpers import Gate, wait_for

rng = np.random.default_rng(5)
IMAGE = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
UNHEALTHY_AFTER_S = 0.5  # the crashing model is reported not ready after half a second of failures
SLACK_S = 1.0  # no request may wait past its deadline + this


# ---- two clients that report what a user sees: (code, seconds, data or message) -------------------------
class Grpc:
    transport = "grpc"

    def __init__(self, port: int):
        from serve._proto import grpc_service_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def infer(self, model: str, batch: np.ndarray, deadline_s: float | None = 10.0):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="images", datatype="UINT8", shape=list(batch.shape))
        request.raw_input_contents.append(batch.tobytes())
        t0 = time.monotonic()
        try:
            reply = self.stub.ModelInfer(request, timeout=deadline_s)
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - t0, exc.details()
        out = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(tuple(reply.outputs[0].shape))
        return "OK", time.monotonic() - t0, out

    def ready(self, model: str) -> bool:
        return self.stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=5).ready

    def close(self):
        self.channel.close()


_HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}


class Http:
    """V2 REST with binary tensors; a deadline travels as tritonclient's `timeout` parameter (microseconds)."""

    transport = "http"

    def __init__(self, port: int):
        self.port = port

    def infer(self, model: str, batch: np.ndarray, deadline_s: float | None = 10.0):
        header = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                              "parameters": {"binary_data_size": batch.nbytes}}],
                  "parameters": {"binary_data_output": True}}
        if deadline_s is not None:
            header["parameters"]["timeout"] = int(deadline_s * 1e6)
        head = json.dumps(header).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=(deadline_s or 10) + 5)
        t0 = time.monotonic()
        try:
            conn.request("POST", f"/v2/models/{model}/infer", body=head + batch.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(head)),
                                  "Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            body = response.read()
            seconds = time.monotonic() - t0
            if response.status != 200:
                code = _HTTP_CODES.get(response.status)
                if response.status == 503:  # Retry-After: refused (busy); without: unavailable
                    code = "RESOURCE_EXHAUSTED" if response.getheader("Retry-After") else "UNAVAILABLE"
                return code or str(response.status), seconds, json.loads(body)["error"]
            split = int(response.getheader("Inference-Header-Content-Length"))
            meta = json.loads(body[:split])
            out = np.frombuffer(body[split:], "<f4").reshape(meta["outputs"][0]["shape"])
            return "OK", seconds, out
        finally:
            conn.close()

    def ready(self, model: str) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/{model}/ready",
                                          timeout=5).status == 200
        except urllib.error.HTTPError:
            return False

    def close(self):
        pass


# ---- the server and its baseline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gRPC + HTTP over: ok (healthy), crash (every batch raises), flaky (its 2nd batch raises), slow (400 ms a
    batch), dyn (any image size, 20 ms a batch), gated + partner in ensemble 'duo' (gated: one worker, a
    queue of 1)."""
    from serve import create_server
    from serve.backends.fake import write_fake_model

    repo = tmp_path_factory.mktemp("faults")
    write_fake_model(repo, "ok", classes=5, seed=1)
    write_fake_model(repo, "crash", classes=5, fail_infer="simulated crash")
    write_fake_model(repo, "flaky", classes=5, fail_batches=[2], max_queue_delay_us=0)
    write_fake_model(repo, "slow", classes=5, delay_ms=400, max_queue_delay_us=0)
    write_fake_model(repo, "dyn", classes=5, size=(-1, -1), delay_ms=20, max_batch_size=8)
    write_fake_model(repo, "partner", classes=5, seed=2)
    write_fake_model(repo, "gated", classes=5, seed=3, thread_safe=False, max_batch_size=1, max_queue_size=1,
                     max_queue_delay_us=0)
    srv, _ = create_server(repo, ensembles=["duo=partner,gated"], port=0, http_port=0, metrics_port=0,
                           unhealthy_after_s=UNHEALTHY_AFTER_S)
    yield srv
    srv.stop(grace=2.0)


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    made = Grpc(server.port) if request.param == "grpc" else Http(server.http_port)
    yield made
    made.close()


def _server_threads() -> set[str]:
    """The server's own threads: batcher workers, drains, closers; not the handler pools (grpc's and the HTTP
    executor's), which keep the threads a burst made, by design."""
    return {t.name for t in threading.enumerate()
            if not t.name.startswith(("grpc", "http", "ThreadPoolExecutor", "Thread-", "asyncio"))}


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def baseline(server, client):
    """The server's threads and RSS before a case, checked after it (RSS within 30 MB: numpy and gRPC keep
    the buffers a burst made), and 'ok' answering after it."""
    client.infer("ok", IMAGE)  # the transport's own first-use allocations are not the case's
    threads, rss = _server_threads(), _rss_mb()
    yield
    wait_for(lambda: _server_threads() == threads, f"the server's threads to return to {sorted(threads)}")
    assert _rss_mb() - rss < 30, f"RSS grew from {rss:.0f} MB to {_rss_mb():.0f} MB"
    code, _, out = client.infer("ok", IMAGE)
    assert code == "OK" and out.shape == (1, 5)


def _stats(server, model: str, version: str = "1") -> dict:
    return server.hub.metrics.model(model, version).snapshot()


def _failures(server, model: str, reason: str) -> int:
    return _stats(server, model)["fail_reasons"].get(reason, 0)


# ---- the cases ----------------------------------------------------------------------------------------------
def test_a_backend_that_raises_on_every_batch(server, client, baseline):
    before = _failures(server, "crash", "BACKEND")
    outcomes = []
    started = time.monotonic()
    while time.monotonic() - started < UNHEALTHY_AFTER_S + 0.3 or len(outcomes) < 4:
        outcomes.append(client.infer("crash", IMAGE, deadline_s=2.0))
    assert {code for code, _, _ in outcomes} == {"INTERNAL"}
    assert all(seconds < 2.0 + SLACK_S for _, seconds, _ in outcomes)
    print(f"\n[{client.transport}] raises on every batch: {len(outcomes)} requests, all INTERNAL, slowest "
          f"{max(s for _, s, _ in outcomes) * 1e3:.1f} ms")
    assert all("batch of 1 failed: RuntimeError: fake model 'crash': simulated crash" in msg
               for _, _, msg in outcomes)
    # the worker lives on, and after failing on every batch for a while the model says so in its readiness
    failing = server.hub.models["crash"].batcher
    wait_for(lambda: failing.health() is not None, "the crashing model to be reported unhealthy", timeout=2)
    assert not client.ready("crash")
    state, reason = server.hub.registry.state("crash")
    assert state == "UNAVAILABLE" and "every batch failed" in reason and "simulated crash" in reason
    assert server.hub.models["crash"].batcher.health() is not None
    assert client.ready("ok")  # the others are unaffected
    assert _failures(server, "crash", "BACKEND") - before == len(outcomes)


def test_a_backend_that_raises_on_one_batch_of_many(server, client, baseline):
    runner = server.hub.models["flaky"].runner
    runner._count, runner.fail_batches = 0, {2}  # each transport: its 2nd batch fails
    before = _stats(server, "flaky")
    outcomes = [client.infer("flaky", IMAGE, deadline_s=5.0) for _ in range(6)]
    assert [code for code, _, _ in outcomes] == ["OK", "INTERNAL", "OK", "OK", "OK", "OK"]
    print(f"\n[{client.transport}] one bad batch of 6: codes {[c for c, _, _ in outcomes]}, slowest "
          f"{max(s for _, s, _ in outcomes) * 1e3:.1f} ms")
    assert "simulated failure of batch 2" in outcomes[1][2]
    expected = fake_probabilities(IMAGE, 5, seed=0)
    assert all(np.allclose(out, expected, atol=1e-6) for code, _, out in outcomes if code == "OK")
    assert client.ready("flaky")  # one bad batch does not make a model unready
    after = _stats(server, "flaky")
    assert after["success"][0] - before["success"][0] == 5
    assert after["fail_reasons"].get("BACKEND", 0) - before["fail_reasons"].get("BACKEND", 0) == 1


def test_a_backend_slower_than_the_deadline(server, client, baseline):
    """400 ms a batch, 200 ms deadlines: the first request waits out its deadline (nothing is known of the
    model's speed yet on a fresh batcher, as after a load), later ones are refused at once."""
    batcher = server.hub.models["slow"].batcher
    batcher._times._times.clear()  # as freshly loaded: no batch measured
    before = _stats(server, "slow")
    first = client.infer("slow", IMAGE, deadline_s=0.2)
    assert first[0] == "DEADLINE_EXCEEDED" and first[1] < 0.2 + SLACK_S
    wait_for(lambda: batcher._times.time(1) is not None, "the batch to finish and be measured")
    wait_for(lambda: batcher._outstanding == 0, "the slow model to be idle")
    refused = [client.infer("slow", IMAGE, deadline_s=0.2) for _ in range(3)]
    assert {code for code, _, _ in refused} == {"RESOURCE_EXHAUSTED"}
    assert all(seconds < 0.2 for _, seconds, _ in refused)  # refused before the deadline could pass
    assert "exceeds the request's remaining deadline" in refused[0][2]
    print(f"\n[{client.transport}] slower than the deadline: first DEADLINE_EXCEEDED after {first[1] * 1e3:.0f} ms "
          f"(deadline 200), then refused in {max(s for _, s, _ in refused) * 1e3:.1f} ms")
    code, seconds, out = client.infer("slow", IMAGE, deadline_s=5.0)  # a deadline it can meet: served
    assert code == "OK" and seconds < 5.0
    after = _stats(server, "slow")
    assert after["fail_reasons"].get("CANCELED", 0) - before["fail_reasons"].get("CANCELED", 0) == 1
    assert after["fail_reasons"].get("REJECTED", 0) - before["fail_reasons"].get("REJECTED", 0) == 3


def test_mixed_image_sizes_on_a_dynamic_model(server, client, baseline):
    """8 clients x 10 requests alternating 100x100 and 110x100 images on a model that takes any size:
    every answer correct (a batch never concatenates two sizes), and the model answers afterwards."""
    sizes = [(100, 100), (110, 100)]
    images = {s: rng.integers(0, 256, (1, *s, 3), dtype=np.uint8) for s in sizes}
    expected = {s: fake_probabilities(images[s], 5) for s in sizes}
    results = []

    def worker(i):
        local = Grpc(server.port) if client.transport == "grpc" else Http(server.http_port)
        try:
            for j in range(10):
                size = sizes[(i + j) % 2]
                code, seconds, out = local.infer("dyn", images[size], deadline_s=10.0)
                results.append((code, seconds, code == "OK" and np.allclose(out, expected[size], atol=1e-6)))
        finally:
            local.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 80 and all(code == "OK" and right for code, _, right in results), results
    print(f"\n[{client.transport}] mixed sizes: {sum(1 for c, _, r in results if c == 'OK' and r)}/80 correct, "
          f"slowest {max(s for _, s, _ in results) * 1e3:.0f} ms")
    assert max(server.hub.models["dyn"].runner.batch_sizes) > 1  # batches did form (per size)
    assert client.ready("dyn") and server.hub.models["dyn"].batcher.health() is None
    code, _, out = client.infer("dyn", images[sizes[0]])
    assert code == "OK" and np.allclose(out, expected[sizes[0]], atol=1e-6)


def test_a_member_refused_inside_an_ensemble_cancels_its_queued_siblings(server, client, baseline):
    """gated has one worker and a queue of 1: one request runs (held at the gate), one waits; an ensemble
    request then queues for partner first and is refused by gated: partner must never run it."""
    gated = server.hub.models["gated"]
    partner = server.hub.models["partner"].runner
    gate = Gate(gated.runner)
    direct = Grpc(server.port)
    try:
        holders = [threading.Thread(target=direct.infer, args=("gated", IMAGE, 10.0)) for _ in range(2)]
        holders[0].start()
        wait_for(lambda: gate.calls == [1], "the first request to reach the gated model")
        holders[1].start()
        wait_for(lambda: gated.batcher.queued == 1, "the second request to fill gated's queue")
        ran_before = len(partner.batch_sizes)
        duo_before = server.hub.ensembles["duo"].stats.snapshot()["fail_reasons"].get("REJECTED", 0)
        code, seconds, message = client.infer("duo", IMAGE, deadline_s=5.0)
        assert code == "RESOURCE_EXHAUSTED" and "queue full" in message and seconds < 1.0
        print(f"\n[{client.transport}] member refused inside an ensemble: {code} in {seconds * 1e3:.1f} ms")
        gate.open.set()
        for t in holders:
            t.join(10)
        wait_for(lambda: gated.batcher._outstanding == 0 and server.hub.models["partner"].batcher._outstanding == 0,
                 "both members to be idle")
        assert len(partner.batch_sizes) == ran_before  # the sibling queued for partner was cancelled, never run
        after = server.hub.ensembles["duo"].stats.snapshot()["fail_reasons"].get("REJECTED", 0)
        assert after - duo_before == 1
        code, _, out = client.infer("duo", IMAGE)  # and the ensemble answers again
        assert code == "OK" and out.shape == (1, 5)
    finally:
        gate.restore()
        direct.close()


def test_sigterm_with_requests_in_flight_longer_than_the_grace(tmp_path, serve_process):
    """A model that takes 4 s a batch, --grace 1: SIGTERM with requests in flight ends the process in about
    the grace period, exit code 0; the requests in flight are answered (UNAVAILABLE), none hangs."""
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path / "repo", "glacial", classes=3, delay_ms=4000, max_queue_delay_us=0, max_batch_size=1,
                     thread_safe=False)
    proc = serve_process("--repository", str(tmp_path / "repo"), "--grace", "1", "--http-port", "0",
                         "--metrics-port", "-1")
    info = json.loads(proc.port_file.read_text())
    outcomes: list = []
    clients = [Grpc(proc.port), Grpc(proc.port), Http(info["http_port"])]
    threads = [threading.Thread(target=lambda c=c: outcomes.append(c.infer("glacial", IMAGE, deadline_s=None)))
               for c in clients]
    for t in threads:
        t.start()
    stats_url = f"http://127.0.0.1:{info['http_port']}/v2/models/glacial/stats"
    wait_for(lambda: json.loads(urllib.request.urlopen(stats_url, timeout=5).read())["model_stats"][0]
             ["inference_stats"]["success"]["count"] == 0 and _queued(info["http_port"]) >= 1,
             "requests to be in flight", timeout=10)
    t0 = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=15)
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert code == 0, proc.output()
    print(f"\nSIGTERM with requests in flight, --grace 1: exit {code} after {took:.2f} s, outcomes "
          f"{sorted(c for c, _, _ in outcomes)}, each in {max(s for _, s, _ in outcomes):.2f} s at most")
    assert took < 1.0 + 3.0  # the grace and the answers: not the batch still inside the model (4 s)
    assert len(outcomes) == 3 and {c for c, _, _ in outcomes} <= {"UNAVAILABLE", "CANCELLED"}, outcomes
    assert "did not finish before the shutdown deadline" in proc.output()


def _queued(http_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    match = re.search(r'^kestrel_queue_depth\{model="glacial"\} (\S+)', text, re.M)
    return int(float(match.group(1))) if match else 0
