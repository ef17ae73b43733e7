"""Every KServe V2 RPC against a live server over the fake backend, and the error statuses."""

import urllib.request

import grpc
import numpy as np
import pytest

from serve._proto import grpc_service_pb2 as pb
from serve.backends.fake import fake_probabilities
from serve.ensemble import fuse

rng = np.random.default_rng(0)
BATCH = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def _request(model="a", batch=BATCH, datatype="UINT8", shape=None, raw=None, version=""):
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    req.inputs.add(name="images", datatype=datatype, shape=list(batch.shape if shape is None else shape))
    req.raw_input_contents.append(batch.tobytes() if raw is None else raw)
    return req


def _probs(response):
    out = response.outputs[0]
    assert out.name == "probabilities" and out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(out.shape))


def _status(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


def test_server_live_ready_metadata(v2):
    assert v2.ServerLive(pb.ServerLiveRequest()).live
    assert v2.ServerReady(pb.ServerReadyRequest()).ready
    meta = v2.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "kestrel" and meta.version and "statistics" in meta.extensions


def test_model_ready(v2):
    assert v2.ModelReady(pb.ModelReadyRequest(name="a")).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="a", version="1")).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="trio")).ready
    assert not v2.ModelReady(pb.ModelReadyRequest(name="broken")).ready  # failed to load, others fine
    code, details = _status(v2.ModelReady, pb.ModelReadyRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    code, details = _status(v2.ModelReady, pb.ModelReadyRequest(name="a", version="7"))
    assert code == grpc.StatusCode.NOT_FOUND and "no version 7" in details and "loaded version: 1" in details


def test_model_metadata(v2):
    meta = v2.ModelMetadata(pb.ModelMetadataRequest(name="b"))
    assert (meta.name, meta.platform, list(meta.versions)) == ("b", "fake", ["1"])
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("images", "UINT8", [-1, 48, 40, 3])
    assert (meta.outputs[0].name, meta.outputs[0].datatype, list(meta.outputs[0].shape)) == ("probabilities", "FP32", [-1, 10])
    ens = v2.ModelMetadata(pb.ModelMetadataRequest(name="pair"))
    assert ens.platform == "ensemble" and list(ens.inputs[0].shape) == [-1, 32, 32, 3]


def test_model_config(v2):
    config = v2.ModelConfig(pb.ModelConfigRequest(name="slow")).config
    assert (config.name, config.platform, config.max_batch_size) == ("slow", "fake", 4)
    assert config.input[0].name == "images" and list(config.input[0].dims) == [32, 32, 3]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 2
    assert config.output[0].label_filename == "labels.txt"
    ens = v2.ModelConfig(pb.ModelConfigRequest(name="trio")).config
    assert ens.platform == "ensemble" and ens.parameters["members"].string_value == "a,b,c"


def test_repository_index(v2):
    index = {m.name: m for m in v2.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert {"a", "b", "c", "odd", "broken", "slow", "trio", "pair"} <= set(index)
    assert index["a"].state == "READY" and index["a"].version == "1"
    assert index["broken"].state == "UNAVAILABLE" and "simulated load failure" in index["broken"].reason
    ready = {m.name for m in v2.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models}
    assert "broken" not in ready and "a" in ready


def test_model_infer_raw(v2):
    response = v2.ModelInfer(_request("a"))
    assert (response.model_name, response.model_version, response.id) == ("a", "1", "req-1")
    np.testing.assert_allclose(_probs(response), fake_probabilities(BATCH, 10, seed=1), rtol=1e-6)


def test_model_infer_typed_contents_and_requested_output(v2):
    req = pb.ModelInferRequest(model_name="c")
    tensor = req.inputs.add(name="images", datatype="UINT8", shape=list(BATCH.shape))
    tensor.contents.uint_contents.extend(BATCH.ravel().tolist())
    req.outputs.add(name="probabilities")
    np.testing.assert_allclose(_probs(v2.ModelInfer(req)), fake_probabilities(BATCH, 10, seed=3), rtol=1e-6)
    tensor.contents.uint_contents[0] = 300
    code, details = _status(v2.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[0, 255]" in details


def test_model_infer_ensemble_fuses_members(v2):
    probs = _probs(v2.ModelInfer(_request("pair")))  # majority of a and c
    expected = fuse([fake_probabilities(BATCH, 10, 1), fake_probabilities(BATCH, 10, 3)], "majority")
    np.testing.assert_allclose(probs, expected)
    req = _request("pair")
    req.parameters["fusion"].string_param = "mean"
    expected = fuse([fake_probabilities(BATCH, 10, 1), fake_probabilities(BATCH, 10, 3)], "mean")
    np.testing.assert_allclose(_probs(v2.ModelInfer(req)), expected, rtol=1e-6)
    code, details = _status(v2.ModelInfer, _request("trio"))  # b takes 48x40
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "different inputs" in details


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, ["'nope'", "expected one of"]),
    (dict(version="3"), grpc.StatusCode.NOT_FOUND, ["no version 3"]),
    (dict(version="x"), grpc.StatusCode.NOT_FOUND, ["received version 'x'"]),
    (dict(model="broken"), grpc.StatusCode.UNAVAILABLE, ["not ready", "simulated load failure"]),
    (dict(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, ["received datatype 'FP32'", "expected 'UINT8'"]),
    (dict(datatype="FOO"), grpc.StatusCode.INVALID_ARGUMENT, ["unsupported datatype 'FOO'"]),
    (dict(shape=[3, 32, 32]), grpc.StatusCode.INVALID_ARGUMENT, ["received shape [3, 32, 32]", "expected ['N', 32, 32, 3]"]),
    (dict(shape=[3, 31, 32, 3]), grpc.StatusCode.INVALID_ARGUMENT, ["received shape [3, 31, 32, 3]"]),
    (dict(raw=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT, ["received 100 bytes", "expected 9216 bytes"]),
    (dict(batch=np.zeros((0, 32, 32, 3), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT, ["empty batch"]),
    (dict(batch=np.zeros((33, 32, 32, 3), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT, ["at most max_batch_size=32"]),
])
def test_model_infer_errors_then_a_good_request(v2, kwargs, code, words):
    got, details = _status(v2.ModelInfer, _request(**kwargs))
    assert got == code, details
    for word in words:
        assert word in details
    assert _probs(v2.ModelInfer(_request("a"))).shape == (3, 10)  # the server keeps serving


def test_model_infer_structural_errors(v2):
    req = _request()
    req.inputs[0].name = "pixels"
    assert _status(v2.ModelInfer, req)[1] == "model 'a': received input 'pixels', expected 'images'"
    req = _request()
    req.outputs.add(name="logits")
    assert "received requested output 'logits', expected 'probabilities'" in _status(v2.ModelInfer, req)[1]
    req = pb.ModelInferRequest(model_name="a")
    req.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    code, details = _status(v2.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "received no data" in details
    code, details = _status(v2.ModelInfer, pb.ModelInferRequest(model_name="a"))
    assert "received 0 input tensors, expected exactly 1" in details


def test_model_statistics(v2):
    for _ in range(2):
        v2.ModelInfer(_request("c"))
    stats = v2.ModelStatistics(pb.ModelStatisticsRequest(name="c")).model_stats
    assert len(stats) == 1 and stats[0].name == "c" and stats[0].version == "1"
    s = stats[0]
    assert s.inference_count >= 6 and s.execution_count >= 2 and s.last_inference > 0
    assert s.inference_stats.success.count >= 2 and s.inference_stats.compute_infer.ns > 0
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    everything = {m.name for m in v2.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    assert {"a", "b", "c", "trio"} <= everything
    assert _status(v2.ModelStatistics, pb.ModelStatisticsRequest(name="zzz"))[0] == grpc.StatusCode.NOT_FOUND


def test_failures_are_counted_and_metrics_scrape(server, v2):
    _status(v2.ModelInfer, _request(datatype="FP32"))
    v2.ModelInfer(_request("a"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kestrel_requests_total{api="infer",model="a"}' in text
    assert 'kestrel_request_failures_total{api="infer",code="INVALID_ARGUMENT",model="a"}' in text
    for name in ("kestrel_request_latency_seconds_bucket", "kestrel_queue_latency_seconds_bucket",
                 "kestrel_compute_latency_seconds_bucket", "kestrel_batch_size_bucket"):
        assert f'{name}{{le="+Inf",model="a"}}' in text or f"{name}{{api=" in text, name
    assert 'kestrel_model_ready{model="broken"} 0.0' in text
    assert 'kestrel_model_ready{model="a"} 1.0' in text
    assert 'kestrel_queue_depth{model="a"} 0.0' in text
    assert 'model="nope"' not in text  # unknown names do not create series


def test_health_and_reflection(address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "kestrel.v1.Classifier"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "kestrel.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_oversized_message_is_resource_exhausted_and_server_keeps_serving(fake_repo):
    from serve import create_server
    from serve.server import message_options

    server, port = create_server(fake_repo, models=["a"], port=0, max_message_mb=0.5)
    try:
        from serve._proto import grpc_service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(64)) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            big = np.zeros((32, 32, 32, 3), np.uint8)  # 98 KB: fine
            assert _probs(stub.ModelInfer(_request("a", batch=big))).shape == (32, 10)
            req = _request("a", batch=big, raw=b"\0" * (1024 * 1024))  # 1 MiB > 0.5 MiB
            code, details = _status(stub.ModelInfer, req)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert _probs(stub.ModelInfer(_request("a"))).shape == (3, 10)
    finally:
        server.stop(1)


def test_default_limit_carries_32_float32_images(fake_repo):
    """32 x 224x224x3 float32 = 19.3 MB passes the default limit (and is then refused for its datatype)."""
    from serve._proto import grpc_service_pb2_grpc
    from serve import create_server
    from serve.server import message_options

    server, port = create_server(fake_repo, models=["a"], port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(64)) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            floats = np.zeros((32, 224, 224, 3), np.float32)
            code, details = _status(stub.ModelInfer, _request("a", batch=floats, datatype="FP32"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "received datatype 'FP32'" in details
    finally:
        server.stop(1)


def test_metrics_port_in_use_is_a_clear_error_and_releases_everything(fake_repo, server):
    from serve import create_server
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{server.metrics_port}"):
        create_server(fake_repo, models=["a"], port=0, metrics_port=server.metrics_port)


def test_unexpected_backend_failure_is_internal_and_the_server_keeps_serving(tmp_path, caplog):
    from serve import create_server
    from serve._proto import grpc_service_pb2_grpc
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "a", classes=10)
    write_fake_model(tmp_path, "faulty", classes=10, fail_infer="simulated crash")
    server, port = create_server(tmp_path, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            code, details = _status(stub.ModelInfer, _request("faulty"))
            assert code == grpc.StatusCode.INTERNAL
            assert details == "internal error: RuntimeError: fake model 'faulty': simulated crash"
            assert any("failed unexpectedly" in r.message and r.exc_info for r in caplog.records)
            assert _probs(stub.ModelInfer(_request("a"))).shape == (3, 10)
    finally:
        server.stop(1)


def test_classification_extension(v2):
    req = _request("a")
    req.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    response = v2.ModelInfer(req)
    out = response.outputs[0]
    assert out.datatype == "BYTES" and list(out.shape) == [3, 2]
    raw, items = response.raw_output_contents[0], []
    while raw:
        size = int.from_bytes(raw[:4], "little")
        items.append(raw[4 : 4 + size].decode())
        raw = raw[4 + size :]
    expected = fake_probabilities(BATCH, 10, seed=1)
    for row in range(3):
        order = np.argsort(-expected[row])[:2]
        assert [i.split(":", 1)[1] for i in items[2 * row : 2 * row + 2]] == [f"{k}:label_{k}" for k in order]
    req.outputs[0].parameters["classification"].string_param = "two"
    code, details = _status(v2.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected a positive integer" in details


def test_a_busy_port_is_a_clear_error(fake_repo, server):
    from serve import create_server
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        create_server(fake_repo, models=["a"], port=server.port)
