"""/metrics carries Triton's metric names with the right values after a known sequence of requests.

A real server on 127.0.0.1 (free ports) over fake models: 5 sequential batch-2 ModelInfer requests, 1 Classify (of an ensemble),
2 malformed requests, and a queue-full rejection on a slow model while one request runs and one waits
(the pending gauge is read at that moment). Values are checked against the sequence, against the V2
ModelStatistics counters and against Kestrel's own histograms.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve._proto import grpc_service_pb2 as pb
from serve._proto import grpc_service_pb2_grpc
from serve_helpers import LABELS, png_bytes

DELAY_MS = 20  # the fast model's simulated compute per batch
SLOW_MS = 1500  # the slow model's: long enough to see a request waiting behind a running one


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    from serve import create_server
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("triton_metrics_repo")
    write_fake_model(root, "m", labels=LABELS, seed=1, delay_ms=DELAY_MS, version=3)
    write_fake_model(root, "n", labels=LABELS, seed=2)
    write_fake_model(root, "slow", labels=LABELS, delay_ms=SLOW_MS, thread_safe=False, max_queue_size=1,
                     max_queue_delay_us=0, max_batch_size=1)
    srv, port = create_server(root, ensembles=["duo=m,n"], port=0, metrics_port=0)
    yield srv
    srv.stop(grace=1.0)


def _infer_request(model: str, batch: np.ndarray, datatype: str = "UINT8") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="images", datatype=datatype, shape=list(batch.shape))
    req.raw_input_contents.append(batch.tobytes())
    return req


def _scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample on /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, text


def _get(samples, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} missing from /metrics"
    return samples[key]


def test_triton_names_and_values_after_known_requests(triton_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{triton_server.port}")
    v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    try:
        for _ in range(5):  # sequential: each request is its own batch of 2
            v2.ModelInfer(_infer_request("m", batch), timeout=10)
        for _ in range(2):  # FP32 data for a UINT8 input: INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as info:
                v2.ModelInfer(_infer_request("m", batch.astype(np.float32), "FP32"), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        from serve import KestrelClient

        with KestrelClient(f"127.0.0.1:{triton_server.port}", timeout=10) as client:
            client.classify(png_bytes(batch[0]), ["duo"], top_k=3)  # m and n once each, fused as duo

        # slow: one request runs (1.5 s), one waits in its queue of 1, a third is rejected (queue full)
        one = batch[:1]
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(
            v2.ModelInfer(_infer_request("slow", one), timeout=30))) for _ in range(2)]
        threads[0].start()
        deadline = time.monotonic() + 10
        while triton_server.hub.models["slow"].batcher._outstanding < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        while triton_server.hub.models["slow"].batcher.queued > 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the first request left the queue: it is running
        threads[1].start()
        while triton_server.hub.models["slow"].batcher.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        during, _ = _scrape(triton_server)
        with pytest.raises(grpc.RpcError) as info:
            v2.ModelInfer(_infer_request("slow", one), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for thread in threads:
            thread.join(30)
        assert len(results) == 2

        samples, text = _scrape(triton_server)
        stats = {s.name: s for s in v2.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats}
    finally:
        channel.close()

    # Triton's names exactly (no _total suffix: exposed untyped), labelled model + version
    assert "# TYPE nv_inference_request_success untyped" in text
    assert 'nv_inference_request_success{model="m",version="3"} 6.0' in text
    assert "# TYPE nv_inference_pending_request_count gauge" in text

    m = dict(model="m", version="3")
    # 5 infer requests + the classify request through duo: a member that answered counts the request, as a
    # composing model does in Triton
    assert _get(samples, "nv_inference_request_success", **m) == 6
    assert _get(samples, "nv_inference_request_failure", **m, reason="OTHER") == 2
    assert _get(samples, "nv_inference_request_failure", **m, reason="REJECTED") == 0
    assert _get(samples, "nv_inference_count", **m) == 11  # 5 x 2 images + the photo classified through duo
    assert _get(samples, "nv_inference_exec_count", **m) == 6
    compute_us = _get(samples, "nv_inference_compute_infer_duration_us", **m)
    queue_us = _get(samples, "nv_inference_queue_duration_us", **m)
    request_us = _get(samples, "nv_inference_request_duration_us", **m)
    assert compute_us >= 6 * DELAY_MS * 1000 * 0.9  # each batch slept DELAY_MS
    assert request_us >= 5 * DELAY_MS * 1000 * 0.9  # each of the 5 requests waited for its batch
    # the same counters as the V2 statistics and Kestrel's own histograms
    s = stats["m"].inference_stats
    assert request_us == s.success.ns // 1000 and queue_us == s.queue.ns // 1000
    assert compute_us == s.compute_infer.ns // 1000
    assert stats["m"].inference_count == 11 and stats["m"].execution_count == 6
    kestrel_compute = _get(samples, "kestrel_compute_latency_seconds_sum", model="m")
    assert abs(kestrel_compute * 1e6 - compute_us) < 50  # one request per batch: per-request = per-batch time
    assert abs(_get(samples, "kestrel_queue_latency_seconds_sum", model="m") * 1e6 - queue_us) < 50

    # the ensemble counts its request, and so does each member that answered it (with its inferences)
    duo = dict(model="duo", version="1")
    assert _get(samples, "nv_inference_request_success", **duo) == 1
    assert _get(samples, "nv_inference_exec_count", **duo) == 0
    assert _get(samples, "nv_inference_count", model="n", version="1") == 1
    assert _get(samples, "nv_inference_request_success", model="n", version="1") == 1  # named only via duo

    slow = dict(model="slow", version="1")
    assert _get(during, "nv_inference_pending_request_count", **slow) == 1  # one waited behind the running one
    assert _get(samples, "nv_inference_pending_request_count", **slow) == 0
    assert _get(samples, "nv_inference_request_success", **slow) == 2
    assert _get(samples, "nv_inference_request_failure", **slow, reason="REJECTED") == 1
    assert _get(samples, "nv_inference_exec_count", **slow) == 2
    assert _get(samples, "nv_inference_queue_duration_us", **slow) >= SLOW_MS * 1000 * 0.5  # the second waited
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count"):
        assert all(key[0] != name or dict(key[1]).keys() == {"model", "version"} for key in samples), name


@pytest.mark.parametrize("with_ensemble", [True, False])
def test_classify_without_names_is_counted_against_its_default_targets(tmp_path, with_ensemble):
    """The web page and `kestrel classify` name no model: their requests count against what answered them
    (the server's default: its first ready ensemble and that ensemble's members, else every ready model),
    on both transports."""
    import http.client

    from serve import KestrelClient, create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "p", labels=LABELS, seed=1)
    write_fake_model(tmp_path, "q", labels=LABELS, seed=2)
    srv, _ = create_server(tmp_path, ensembles=["pq=p,q"] if with_ensemble else [], port=0, metrics_port=0,
                           http_port=0)
    image = png_bytes(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    try:
        with KestrelClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            for _ in range(10):
                client.classify(image, [])
        for _ in range(10):
            conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
            conn.request("POST", "/v1/classify", body=image, headers={"Content-Type": "image/png"})
            assert conn.getresponse().status == 200
            conn.close()
        samples, _ = _scrape(srv)
    finally:
        srv.stop(grace=1.0)
    targets = [("pq", "1"), ("p", "1"), ("q", "1")] if with_ensemble else [("p", "1"), ("q", "1")]
    for model, version in targets:
        assert _get(samples, "nv_inference_request_success", model=model, version=version) == 20, model
        assert _get(samples, "kestrel_requests_total", model=model, api="classify") == 10
        assert _get(samples, "kestrel_requests_total", model=model, api="http_classify") == 10
