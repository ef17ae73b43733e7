"""Wire compatibility with Triton's clients.

tritonclient's generated modules and ours both define the protobuf package
`inference`, so they cannot share a process: tritonclient always runs in a
subprocess here, against a server (or a descriptor dump) from this process.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from serve_helpers import ROOT, tiny_onnx_expected, write_tiny_onnx

# find_spec, not importorskip: importing tritonclient here would clash with serve._proto
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                reason="tritonclient[grpc] is not installed (pip install 'kestrel[dev]')")

DUMP = textwrap.dedent(
    """
    import json, sys
    from tritonclient.grpc import service_pb2, model_config_pb2

    def fields(message):
        return {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "",
                         f.enum_type.full_name if f.enum_type else "",
                         f.containing_oneof.name if f.containing_oneof else ""] for f in message.fields}

    def walk(message, out):
        out[message.full_name] = fields(message)
        for nested in message.nested_types:
            walk(nested, out)

    messages, enums, methods = {}, {}, {}
    for fd in (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        for message in fd.message_types_by_name.values():
            walk(message, messages)
            for enum in message.enum_types:
                enums[enum.full_name] = {v.name: v.number for v in enum.values}
        for enum in fd.enum_types_by_name.values():
            enums[enum.full_name] = {v.name: v.number for v in enum.values}
    for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        methods[method.name] = [method.input_type.full_name, method.output_type.full_name,
                                method.client_streaming, method.server_streaming]
    json.dump({"messages": messages, "enums": enums, "methods": methods}, sys.stdout)
    """
)


def _ours():
    from serve._proto import grpc_service_pb2, model_config_pb2

    def walk(message, out):
        out[message.full_name] = {
            f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "",
                     f.enum_type.full_name if f.enum_type else "", f.containing_oneof.name if f.containing_oneof else ""]
            for f in message.fields}
        for nested in message.nested_types:
            walk(nested, out)

    messages, enums = {}, {}
    for fd in (grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        assert fd.package == "inference"
        for message in fd.message_types_by_name.values():
            walk(message, messages)
            for enum in message.enum_types:
                enums[enum.full_name] = {v.name: v.number for v in enum.values}
        for enum in fd.enum_types_by_name.values():
            enums[enum.full_name] = {v.name: v.number for v in enum.values}
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
               for m in service.methods}
    return messages, enums, methods


def test_field_numbers_and_types_match_tritonclient():
    dump = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, timeout=60, check=True)
    theirs = json.loads(dump.stdout)
    messages, enums, methods = _ours()
    assert len(messages) > 40 and "inference.ModelInferRequest.InferInputTensor" in messages
    problems = []
    for name, fields in messages.items():
        if name not in theirs["messages"]:
            problems.append(f"message {name} is not in Triton's protocol")
            continue
        for field, spec in fields.items():
            other = theirs["messages"][name].get(field)
            if other != spec:
                problems.append(f"{name}.{field}: ours {spec}, Triton's {other}")
    for name, values in enums.items():
        theirs_enum = theirs["enums"].get(name, {})
        for value, number in values.items():
            if theirs_enum.get(value) != number:
                problems.append(f"enum {name}.{value} = {number}, Triton's {theirs_enum.get(value)}")
    for method, spec in methods.items():
        if theirs["methods"].get(method) != spec:
            problems.append(f"rpc {method}: ours {spec}, Triton's {theirs['methods'].get(method)}")
    assert not problems, "\n".join(problems)
    for required in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                     "ModelConfig", "ModelStatistics", "RepositoryIndex"):
        assert required in methods


TRITON_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    address, batch_path, out_path = sys.argv[1:4]
    client = grpcclient.InferenceServerClient(address)
    report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
              "model_ready": client.is_model_ready("tiny"), "broken_ready": client.is_model_ready("broken"),
              "server": client.get_server_metadata(as_json=True),
              "metadata": client.get_model_metadata("tiny", as_json=True),
              "config": client.get_model_config("tiny", as_json=True),
              "index": client.get_model_repository_index(as_json=True),
              "errors": {}}

    def infer(model, array, datatype=None, output="probabilities"):
        inp = grpcclient.InferInput("images", list(array.shape), datatype or "UINT8")
        inp.set_data_from_numpy(array)
        return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(output)])

    batch = np.load(batch_path)
    result = infer("tiny", batch)
    np.save(out_path, result.as_numpy("probabilities"))
    report["response"] = result.get_response(as_json=True)
    inp = grpcclient.InferInput("images", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    top = client.infer("tiny", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)])
    report["classification"] = [[item.decode() for item in row] for row in top.as_numpy("probabilities")]
    cases = {
        "unknown_model": lambda: infer("nope", batch),
        "wrong_datatype": lambda: infer("tiny", batch.astype(np.float32), "FP32"),
        "wrong_shape": lambda: infer("tiny", np.zeros((2, 15, 16, 3), np.uint8)),
        "empty_batch": lambda: infer("tiny", np.zeros((0, 16, 16, 3), np.uint8)),
        "unknown_output": lambda: infer("tiny", batch, output="logits"),
        "unavailable_model": lambda: infer("broken", np.zeros((1, 32, 32, 3), np.uint8)),
    }
    for name, call in cases.items():
        try:
            call()
            report["errors"][name] = None
        except InferenceServerException as exc:
            report["errors"][name] = [exc.status(), exc.message()]
        report["errors"][name + "_then_good"] = infer("tiny", batch[:1]).as_numpy("probabilities").shape[0]
    report["stats"] = client.get_inference_statistics("tiny", as_json=True)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from serve import create_server
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("triton_repo")
    write_tiny_onnx(root, "tiny", classes=4, size=(16, 16))
    write_fake_model(root, "broken", classes=4, fail_load="simulated")
    server, port = create_server(root, port=0)
    yield server
    server.stop(1)


def test_tritonclient_against_the_server(onnx_server, tmp_path):
    batch = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", batch)
    out = tmp_path / "out.npy"
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{onnx_server.port}", str(tmp_path / "batch.npy"), str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["live"] and report["ready"] and report["model_ready"] and not report["broken_ready"]
    assert report["server"]["name"] == "kestrel"
    meta = report["metadata"]
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "16", "16", "3"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "4"]}]
    config = report["config"]["config"]
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_UINT8" and config["input"][0]["dims"] == ["16", "16", "3"]
    assert {m["name"] for m in report["index"]["models"]} == {"tiny", "broken"}
    probs = np.load(out)
    assert probs.shape == (4, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, tiny_onnx_expected(batch), rtol=1e-4, atol=1e-6)
    assert report["response"]["outputs"][0]["shape"] == ["4", "4"]
    # Triton's classification extension: "probability:index:label", best first
    for row, items in zip(probs, report["classification"]):
        order = np.argsort(-row)[:2]
        assert [item.split(":", 1)[1] for item in items] == [f"{i}:tiny_{i}" for i in order]
        np.testing.assert_allclose([float(item.split(":")[0]) for item in items], row[order], atol=1e-6)
    errors = report["errors"]
    assert errors["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert errors["wrong_datatype"][0] == "StatusCode.INVALID_ARGUMENT" and "received datatype 'FP32'" in errors["wrong_datatype"][1]
    assert errors["wrong_shape"][0] == "StatusCode.INVALID_ARGUMENT" and "received shape [2, 15, 16, 3]" in errors["wrong_shape"][1]
    assert errors["empty_batch"][0] == "StatusCode.INVALID_ARGUMENT" and "empty batch" in errors["empty_batch"][1]
    assert errors["unknown_output"][0] == "StatusCode.INVALID_ARGUMENT" and "'logits'" in errors["unknown_output"][1]
    assert errors["unavailable_model"][0] == "StatusCode.UNAVAILABLE"
    assert all(errors[f"{name}_then_good"] == 1 for name in ("unknown_model", "wrong_datatype", "wrong_shape",
                                                             "empty_batch", "unknown_output", "unavailable_model"))
    stats = report["stats"]["model_stats"][0]
    assert stats["name"] == "tiny" and int(stats["inference_count"]) >= 4 + 6


REPOSITORY_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    grpc_address, http_address, token = sys.argv[1:4]
    headers = {"authorization": f"Bearer {token}"}  # gRPC metadata keys are lower-case
    report = {}
    for kind, client in (("grpc", grpcclient.InferenceServerClient(grpc_address)),
                         ("http", httpclient.InferenceServerClient(http_address))):
        def index():
            rows = client.get_model_repository_index(headers=headers)
            rows = rows["models"] if kind == "grpc" and isinstance(rows, dict) else rows
            if kind == "grpc":
                rows = json.loads(__import__("google.protobuf.json_format", fromlist=["x"]).MessageToJson(
                    rows, preserving_proto_field_name=True)).get("models", [])
            return sorted((r["name"], r.get("version", ""), r["state"]) for r in rows)
        out = report[kind] = {}
        out["before"] = index()
        client.unload_model("m", headers=headers)
        out["after_unload"] = index()
        out["ready_after_unload"] = client.is_model_ready("m", headers=headers)
        client.load_model("m", headers=headers)
        out["after_load"] = index()
        out["ready_after_load"] = client.is_model_ready("m", headers=headers)
        config = json.dumps({"name": "m", "platform": "fake", "max_batch_size": 4,
                             "input": [{"name": "images", "data_type": "TYPE_UINT8", "dims": [32, 32, 3]}],
                             "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [4],
                                         "label_filename": "labels.txt"}]})
        client.load_model("m", config=config, headers=headers)  # a config that replaces config.pbtxt
        out["max_batch_after_config"] = client.get_model_config("m", headers=headers)
        try:
            client.unload_model("m")  # no token
            out["unauthenticated"] = None
        except InferenceServerException as exc:
            out["unauthenticated"] = [str(exc.status()), exc.message()]
    print(json.dumps(report, default=str))
    """
)


def test_tritonclient_loads_unloads_and_lists_the_repository(tmp_path):
    """tritonclient's gRPC and HTTP load_model, unload_model and get_model_repository_index, unchanged, against
    a server in explicit control mode with a token file (sent as tritonclient's headers)."""
    from serve import create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path / "repo", "m", classes=4)
    (tmp_path / "tokens").write_text("control-and-infer-1 infer,control\n")
    server, _ = create_server(tmp_path / "repo", port=0, http_port=0, control_mode="explicit", load_models=["*"],
                              auth_tokens=tmp_path / "tokens")
    try:
        proc = subprocess.run([sys.executable, "-c", REPOSITORY_CLIENT, f"127.0.0.1:{server.port}",
                               f"127.0.0.1:{server.http_port}", "control-and-infer-1"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        server.stop(1)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for kind in ("grpc", "http"):
        out = report[kind]
        assert out["before"] == [["m", "1", "READY"]]
        assert out["after_unload"] == [["m", "1", "UNAVAILABLE"]] and out["ready_after_unload"] is False
        assert out["after_load"] == [["m", "1", "READY"]] and out["ready_after_load"] is True
        assert "4" in json.dumps(out["max_batch_after_config"])  # the config parameter's max_batch_size
        assert out["unauthenticated"] is not None and "token" in out["unauthenticated"][1]
