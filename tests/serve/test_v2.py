"""Every KServe V2 call against a live server over the fake backend, and the error statuses:
one suite, run over gRPC and over HTTP/REST (the `v2` fixture is a client for each transport).

The transports share one data plane (serve/dataplane.py) and one error table (serve.errors.STATUS),
so each case states the gRPC code and the HTTP status follows from the table. Transport-only
behaviour (reflection, message limits, HTTP bodies and media types) is tested at the end and in
test_http.py.
"""

import http.client
import json
import logging
import urllib.request

import grpc
import numpy as np
import pytest

from serve._proto import grpc_service_pb2 as pb
from serve.backends.fake import fake_probabilities
from serve.ensemble import fuse
from serve.errors import STATUS

rng = np.random.default_rng(0)
BATCH = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
HTTP_STATUS = {code: status for _, code, status in reversed(STATUS)}  # gRPC code name -> HTTP status
HTTP_STATUS["RESOURCE_EXHAUSTED"] = 503
HTTP_STATUS["INTERNAL"] = 500


class V2Error(Exception):
    def __init__(self, transport: str, code, message: str):
        super().__init__(f"{transport} {code}: {message}")
        self.transport, self.code, self.message = transport, code, message

    def is_(self, grpc_code: str) -> bool:
        """The gRPC code over gRPC; over HTTP, the status the error table gives it."""
        if self.transport == "grpc":
            return self.code == grpc_code
        return self.code == HTTP_STATUS[grpc_code]


class GrpcV2:
    transport = "grpc"

    def __init__(self, port: int):
        from serve._proto import grpc_service_pb2_grpc
        from serve.server import message_options

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(64))
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def _call(self, method, request):
        try:
            return getattr(self.stub, method)(request, timeout=10)
        except grpc.RpcError as exc:
            raise V2Error("grpc", exc.code().name, exc.details()) from None

    def live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def server_metadata(self) -> dict:
        meta = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    def model_ready(self, name, version="") -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready

    def model_metadata(self, name, version="") -> dict:
        meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
        tensors = lambda items: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]
        return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}

    def model_config(self, name, version="") -> dict:
        from google.protobuf.json_format import MessageToDict

        config = self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version)).config
        return MessageToDict(config, preserving_proto_field_name=True)

    def repository_index(self, ready=False) -> list[dict]:
        models = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready)).models
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in models]

    def statistics(self, name="", version="") -> list[dict]:
        from google.protobuf.json_format import MessageToDict

        reply = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
        return MessageToDict(reply, preserving_proto_field_name=True).get("model_stats", [])

    def infer(self, model="a", batch=BATCH, *, datatype="UINT8", shape=None, raw=None, version="", outputs=None,
              classification=0, fusion=None, values=False, inputs=None):
        """-> (response id, model name, model version, FP32 array or rows of classification strings)."""
        req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
        if inputs is None:
            tensor = req.inputs.add(name="images", datatype=datatype,
                                    shape=list(batch.shape if shape is None else shape))
            if values:
                tensor.contents.uint_contents.extend(batch.ravel().tolist())
            elif raw is not False:
                req.raw_input_contents.append(batch.tobytes() if raw is None else raw)
        for name in outputs or []:
            out = req.outputs.add(name=name)
            if classification:
                out.parameters["classification"].int64_param = classification
        if fusion is not None:
            req.parameters["fusion"].string_param = fusion
        response = self._call("ModelInfer", req)
        out = response.outputs[0]
        data = response.raw_output_contents[0]
        if out.datatype == "BYTES":
            items = []
            while data:
                size = int.from_bytes(data[:4], "little")
                items.append(data[4:4 + size].decode())
                data = data[4 + size:]
            result = [items[i:i + out.shape[1]] for i in range(0, len(items), out.shape[1])]
        else:
            assert out.datatype == "FP32"
            result = np.frombuffer(data, "<f4").reshape(tuple(out.shape))
        return response.id, response.model_name, response.model_version, result

    def close(self):
        self.channel.close()


class HttpV2:
    """The same calls over KServe V2 REST: binary tensor data in and out unless `values` (JSON "data")."""

    transport = "http"

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def _request(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        if response.status >= 300 and response.status != 400 or (response.status == 400 and data):
            raise V2Error("http", response.status, json.loads(data)["error"])
        return response.status, response.headers, data

    def _json(self, path, method="GET", body=None):
        return json.loads(self._request(method, path, body)[2])

    @staticmethod
    def _model(name, version):
        return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")

    def live(self) -> bool:
        return self._request("GET", "/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self._request("GET", "/v2/health/ready")[0] == 200

    def server_metadata(self) -> dict:
        return self._json("/v2")

    def model_ready(self, name, version="") -> bool:
        return self._request("GET", self._model(name, version) + "/ready")[0] == 200

    def model_metadata(self, name, version="") -> dict:
        return self._json(self._model(name, version))

    def model_config(self, name, version="") -> dict:
        return self._json(self._model(name, version) + "/config")

    def repository_index(self, ready=False) -> list[dict]:
        return self._json("/v2/repository/index", "POST", json.dumps({"ready": ready}).encode())

    def statistics(self, name="", version="") -> list[dict]:
        path = (self._model(name, version) if name else "/v2/models") + "/stats"
        return self._json(path)["model_stats"]

    def infer(self, model="a", batch=BATCH, *, datatype="UINT8", shape=None, raw=None, version="", outputs=None,
              classification=0, fusion=None, values=False, inputs=None):
        request = {"id": "req-1", "inputs": [], "outputs": []}
        binary = b""
        if inputs is None:
            tensor = {"name": "images", "datatype": datatype, "shape": list(batch.shape if shape is None else shape)}
            if values:
                tensor["data"] = batch.ravel().tolist()
            elif raw is not False:
                binary = batch.tobytes() if raw is None else raw
                tensor["parameters"] = {"binary_data_size": len(binary)}
            request["inputs"].append(tensor)
        for name in outputs or []:
            parameters = {"binary_data": True}
            if classification:
                parameters["classification"] = classification
            request["outputs"].append({"name": name, "parameters": parameters})
        request["parameters"] = {"binary_data_output": True}
        if fusion is not None:
            request["parameters"]["fusion"] = fusion
        header = json.dumps(request).encode()
        _, headers, data = self._request("POST", self._model(model, version) + "/infer", header + binary,
                                         {"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})
        split = int(headers["Inference-Header-Content-Length"])
        answer = json.loads(data[:split])
        out = answer["outputs"][0]
        raw_out = data[split:split + out["parameters"]["binary_data_size"]]
        if out["datatype"] == "BYTES":
            items = []
            while raw_out:
                size = int.from_bytes(raw_out[:4], "little")
                items.append(raw_out[4:4 + size].decode())
                raw_out = raw_out[4 + size:]
            result = [items[i:i + out["shape"][1]] for i in range(0, len(items), out["shape"][1])]
        else:
            result = np.frombuffer(raw_out, "<f4").reshape(tuple(out["shape"]))
        return answer.get("id"), answer["model_name"], answer["model_version"], result

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module")
def v2_server(fake_repo):
    """gRPC and HTTP over one hub: ensembles trio=a,b,c (mean) and pair=a,c (majority)."""
    from serve import create_server

    srv, _ = create_server(fake_repo, ensembles=["trio=a,b,c", "pair=a,c:majority"], port=0, metrics_port=0,
                           http_port=0)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(params=["grpc", "http"])
def v2(request, v2_server):
    client = GrpcV2(v2_server.port) if request.param == "grpc" else HttpV2(v2_server.http_port)
    yield client
    client.close()


def _error(call, *args, **kwargs) -> V2Error:
    with pytest.raises(V2Error) as info:
        call(*args, **kwargs)
    return info.value


# ---- health and metadata ----------------------------------------------------------------------
def test_server_live_ready_metadata(v2):
    assert v2.live() and v2.ready()
    meta = v2.server_metadata()
    assert meta["name"] == "kestrel" and meta["version"] and "statistics" in meta["extensions"]
    assert "classification" in meta["extensions"] and "model_repository" in meta["extensions"]


def test_model_ready(v2):
    assert v2.model_ready("a") and v2.model_ready("a", "1") and v2.model_ready("trio")
    assert not v2.model_ready("broken")  # failed to load, others fine
    err = _error(v2.model_ready, "nope")
    assert err.is_("NOT_FOUND") and "'nope'" in err.message
    err = _error(v2.model_ready, "a", "7")
    assert err.is_("NOT_FOUND") and "no version 7" in err.message and "loaded version: 1" in err.message


def test_model_metadata(v2):
    meta = v2.model_metadata("b")
    assert (meta["name"], meta["platform"], meta["versions"]) == ("b", "fake", ["1"])
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 48, 40, 3]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert v2.model_metadata("b", "1") == meta
    ens = v2.model_metadata("pair")
    assert ens["platform"] == "ensemble" and ens["versions"] == ["1"] and ens["inputs"][0]["shape"] == [-1, 32, 32, 3]


def test_model_config(v2):
    config = v2.model_config("slow")
    assert (config["name"], config["platform"], int(config["max_batch_size"])) == ("slow", "fake", 4)
    assert config["input"][0]["name"] == "images" and config["input"][0]["dims"] == ["32", "32", "3"]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 2
    assert config["output"][0]["label_filename"] == "labels.txt"
    ens = v2.model_config("trio")
    assert ens["platform"] == "ensemble" and ens["parameters"]["members"]["string_value"] == "a,b,c"
    assert ens["parameters"]["fusion"]["string_value"] == "mean" and int(ens["max_batch_size"]) == 32


def test_repository_index(v2):
    index = {m["name"]: m for m in v2.repository_index()}
    assert {"a", "b", "c", "odd", "broken", "slow", "trio", "pair"} <= set(index)
    assert index["a"]["state"] == "READY" and index["a"]["version"] == "1"
    assert index["broken"]["state"] == "UNAVAILABLE" and "simulated load failure" in index["broken"]["reason"]
    ready = {m["name"] for m in v2.repository_index(ready=True)}
    assert "broken" not in ready and "a" in ready


# ---- infer -----------------------------------------------------------------------------------
def test_model_infer_raw(v2):
    request_id, model, version, probs = v2.infer("a")
    assert (request_id, model, version) == ("req-1", "a", "1")
    np.testing.assert_allclose(probs, fake_probabilities(BATCH, 10, seed=1), rtol=1e-6)


def test_model_infer_values_and_requested_output(v2):
    """gRPC typed contents (uint_contents) / HTTP JSON "data"."""
    probs = v2.infer("c", values=True, outputs=["probabilities"])[3]
    np.testing.assert_allclose(probs, fake_probabilities(BATCH, 10, seed=3), rtol=1e-6)
    bad = BATCH.astype(np.int64)
    bad.ravel()[0] = 300
    err = _error(v2.infer, "c", bad, values=True)
    assert err.is_("INVALID_ARGUMENT") and "[0, 255]" in err.message
    err = _error(v2.infer, "c", BATCH[:, :, :, :1].copy(), shape=list(BATCH.shape), values=True)
    assert err.is_("INVALID_ARGUMENT") and f"received {BATCH.size // 3} values" in err.message


def test_model_infer_ensemble_fuses_members(v2):
    members = [fake_probabilities(BATCH, 10, 1), fake_probabilities(BATCH, 10, 3)]
    np.testing.assert_allclose(v2.infer("pair")[3], fuse(members, "majority"))  # its own fusion
    np.testing.assert_allclose(v2.infer("pair", fusion="mean")[3], fuse(members, "mean"), rtol=1e-6)
    err = _error(v2.infer, "trio")  # b takes 48x40
    assert err.is_("INVALID_ARGUMENT") and "different inputs" in err.message
    err = _error(v2.infer, "a", fusion="mean")
    assert err.is_("INVALID_ARGUMENT") and "single model 'a'" in err.message


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(model="nope"), "NOT_FOUND", ["'nope'", "expected one of"]),
    (dict(model="n" * 10_000), "NOT_FOUND", ["received model name 'nnnn", "(10000 characters)"]),
    (dict(version="3"), "NOT_FOUND", ["no version 3"]),
    (dict(version="x"), "NOT_FOUND", ["received version 'x'"]),
    (dict(model="broken"), "UNAVAILABLE", ["not ready", "simulated load failure"]),
    (dict(datatype="FP32"), "INVALID_ARGUMENT", ["received datatype 'FP32'", "expected 'UINT8'"]),
    (dict(datatype="FOO"), "INVALID_ARGUMENT", ["unsupported datatype 'FOO'"]),
    (dict(shape=[3, 32, 32]), "INVALID_ARGUMENT", ["received shape [3, 32, 32]", "expected ['N', 32, 32, 3]"]),
    (dict(shape=[3, 31, 32, 3]), "INVALID_ARGUMENT", ["received shape [3, 31, 32, 3]"]),
    (dict(raw=b"\0" * 100), "INVALID_ARGUMENT", ["received 100 bytes", "expected 9216 bytes"]),
    (dict(raw=False), "INVALID_ARGUMENT", ["received no data"]),
    (dict(inputs=[]), "INVALID_ARGUMENT", ["received 0 input tensors, expected exactly 1"]),
    (dict(outputs=["logits"]), "INVALID_ARGUMENT", ["received requested output 'logits', expected 'probabilities'"]),
    (dict(fusion="median"), "INVALID_ARGUMENT", ["unknown fusion 'median'"]),
    (dict(fusion="m" * 10_000), "INVALID_ARGUMENT", ["unknown fusion 'mmm"]),
    (dict(batch=np.zeros((0, 32, 32, 3), np.uint8)), "INVALID_ARGUMENT", ["empty batch"]),
    (dict(batch=np.zeros((33, 32, 32, 3), np.uint8)), "INVALID_ARGUMENT", ["at most max_batch_size=32"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_model_infer_errors_then_a_good_request(v2, kwargs, code, words):
    err = _error(v2.infer, **kwargs)
    assert err.is_(code), err
    for word in words:
        assert word in err.message, err.message
    assert len(err.message) < 2100  # what a request sends is echoed bounded
    assert v2.infer("a")[3].shape == (3, 10)  # the server keeps serving


def test_model_statistics(v2):
    for _ in range(2):
        v2.infer("c")
    stats = v2.statistics("c")
    assert len(stats) == 1 and stats[0]["name"] == "c" and stats[0]["version"] == "1"
    s = stats[0]
    assert int(s["inference_count"]) >= 6 and int(s["execution_count"]) >= 2 and int(s["last_inference"]) > 0
    assert int(s["inference_stats"]["success"]["count"]) >= 2 and int(s["inference_stats"]["compute_infer"]["ns"]) > 0
    assert sum(int(b["compute_infer"]["count"]) for b in s["batch_stats"]) == int(s["execution_count"])
    assert {"a", "b", "c", "trio"} <= {m["name"] for m in v2.statistics()}
    assert _error(v2.statistics, "zzz").is_("NOT_FOUND")


def test_classification_extension(v2):
    rows = v2.infer("a", outputs=["probabilities"], classification=2)[3]
    expected = fake_probabilities(BATCH, 10, seed=1)
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)
    for row, items in zip(expected, rows):
        order = np.argsort(-row, kind="stable")[:2]
        assert [i.split(":", 1)[1] for i in items] == [f"{k}:label_{k}" for k in order]
        np.testing.assert_allclose([float(i.split(":")[0]) for i in items], row[order], atol=1e-6)


def test_failures_are_counted_and_metrics_scrape(v2_server, v2):
    _error(v2.infer, datatype="FP32")
    v2.infer("a")
    text = urllib.request.urlopen(f"http://127.0.0.1:{v2_server.metrics_port}/metrics", timeout=5).read().decode()
    api, code = ("infer", "INVALID_ARGUMENT") if v2.transport == "grpc" else ("http_infer", "INVALID_ARGUMENT")
    assert f'kestrel_requests_total{{api="{api}",model="a"}}' in text
    assert f'kestrel_request_failures_total{{api="{api}",code="{code}",model="a"}}' in text
    for name in ("kestrel_request_latency_seconds_bucket", "kestrel_queue_latency_seconds_bucket",
                 "kestrel_compute_latency_seconds_bucket", "kestrel_batch_size_bucket"):
        assert f'{name}{{le="+Inf",model="a"}}' in text or f"{name}{{api=" in text, name
    assert 'kestrel_model_ready{model="broken"} 0.0' in text
    assert 'kestrel_model_ready{model="a"} 1.0' in text
    assert 'kestrel_queue_depth{model="a"} 0.0' in text
    assert 'model="nope"' not in text  # unknown names do not create series
    same = urllib.request.urlopen(f"http://127.0.0.1:{v2_server.http_port}/metrics", timeout=5).read().decode()
    assert 'kestrel_model_ready{model="a"} 1.0' in same  # /metrics on the HTTP port too


def test_unexpected_backend_failure_is_internal_and_the_server_keeps_serving(tmp_path, caplog):
    from serve import create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "a", classes=10)
    write_fake_model(tmp_path, "faulty", classes=10, fail_infer="simulated crash")
    server, port = create_server(tmp_path, port=0, http_port=0)
    try:
        message = "model 'faulty': batch of 3 failed: RuntimeError: fake model 'faulty': simulated crash"
        for client in (GrpcV2(port), HttpV2(server.http_port)):
            err = _error(client.infer, "faulty")
            assert err.is_("INTERNAL")
            assert err.message == message  # one line: the model, the batch, the backend's error
            assert client.infer("a")[3].shape == (3, 10)
            client.close()
        # logged once per distinct message (the batcher rate-limits it), not once per request or transport
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [message]
    finally:
        server.stop(1)


def test_shutdown_refuses_new_work_as_unavailable_while_in_flight_requests_finish(tmp_path):
    import threading
    import time

    from serve import create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "sleepy", classes=10, delay_ms=800)
    server, port = create_server(tmp_path, port=0, http_port=0)
    grpc_client, http_client = GrpcV2(port), HttpV2(server.http_port)
    one = BATCH[:1]
    results = []
    thread = threading.Thread(target=lambda: results.append(grpc_client.infer("sleepy", one)[3].shape))
    thread.start()
    time.sleep(0.2)  # the request runs (800 ms)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5})
    stopper.start()
    time.sleep(0.2)
    err = _error(grpc_client.infer, "sleepy", one)  # on the connection that was open before
    assert err.code == "UNAVAILABLE" and "shutting down" in err.message, err
    thread.join(5)
    stopper.join(10)
    assert results == [(1, 10)]
    http_client.close()
    grpc_client.close()


# ---- gRPC only -------------------------------------------------------------------------------
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


def test_grpc_classification_parameter_must_be_an_integer(v2_server):
    client = GrpcV2(v2_server.port)
    req = _request("a")
    req.outputs.add(name="probabilities").parameters["classification"].string_param = "two"
    code, details = _status(client.stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected a positive integer" in details
    client.close()


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


def test_a_busy_port_is_a_clear_error(fake_repo, server):
    from serve import create_server
    from serve.errors import ConfigError

    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        create_server(fake_repo, models=["a"], port=server.port)


def test_grpc_classify_with_a_fusion_for_a_single_model_is_refused(v2_server):
    from serve import KestrelClient
    from serve.errors import KestrelError
    from serve_helpers import png_bytes

    picture = png_bytes(BATCH[0])
    with KestrelClient(f"127.0.0.1:{v2_server.port}", timeout=10) as client:
        with pytest.raises(KestrelError) as info:
            client.classify(picture, ["a"], fusion="majority")
        assert info.value.code.name == "INVALID_ARGUMENT" and "single model 'a'" in str(info.value)
        assert client.classify(picture, ["a", "c"], fusion="majority").ensembles[0].fusion == "majority"
