"""tritonclient's HTTP client against the HTTP port: health, metadata, config, infer (binary and JSON), errors.

tritonclient.http itself imports no protobuf modules, but its package shares the `inference`
protobuf package with serve._proto, so (as with the gRPC client) it runs in a subprocess.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from serve.backends.fake import fake_probabilities

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None
                                or importlib.util.find_spec("geventhttpclient") is None,
                                reason="tritonclient[http] is not installed (pip install 'kestrel[dev]')")

CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url, batch_path, out_dir = sys.argv[1:4]
    client = httpclient.InferenceServerClient(url)
    report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
              "model_ready": client.is_model_ready("a"), "version_ready": client.is_model_ready("a", "1"),
              "broken_ready": client.is_model_ready("broken"),
              "server": client.get_server_metadata(), "metadata": client.get_model_metadata("a"),
              "config": client.get_model_config("a"), "index": client.get_model_repository_index(),
              "stats": client.get_inference_statistics("a"), "errors": {}}

    def infer(model, array, datatype="UINT8", binary_in=True, binary_out=True, class_count=0, output="probabilities"):
        inp = httpclient.InferInput("images", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary_in)
        out = httpclient.InferRequestedOutput(output, binary_data=binary_out, class_count=class_count)
        return client.infer(model, [inp], outputs=[out], request_id="r1")

    batch = np.load(batch_path)
    binary = infer("a", batch)
    np.save(out_dir + "/binary.npy", binary.as_numpy("probabilities"))
    report["binary_response"] = binary.get_response()
    as_json = infer("a", batch, binary_in=False, binary_out=False)
    np.save(out_dir + "/json.npy", as_json.as_numpy("probabilities"))
    top = infer("a", batch, class_count=3)
    report["classification"] = [[x.decode() for x in row] for row in top.as_numpy("probabilities")]
    cases = {
        "unknown_model": lambda: infer("nope", batch),
        "wrong_datatype": lambda: infer("a", batch.astype(np.float32), "FP32"),
        "wrong_shape": lambda: infer("a", np.zeros((2, 31, 32, 3), np.uint8)),
        "unknown_output": lambda: infer("a", batch, output="logits"),
        "unavailable_model": lambda: infer("broken", batch),
    }
    for name, call in cases.items():
        try:
            call()
            report["errors"][name] = None
        except InferenceServerException as exc:
            report["errors"][name] = [exc.status(), exc.message()]
        # the server keeps serving: a good request after each bad one
        np.testing.assert_allclose(infer("a", batch).as_numpy("probabilities"), binary.as_numpy("probabilities"))
    json.dump(report, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def http_server(fake_repo):
    from serve import create_server

    server, _ = create_server(fake_repo, models=["a", "broken"], port=0, http_port=0)
    yield server
    server.stop(grace=1)


def test_tritonclient_http_health_metadata_infer_and_errors(http_server, tmp_path):
    batch = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", batch)
    run = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{http_server.http_port}",
                          str(tmp_path / "batch.npy"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["live"] and report["ready"] and report["model_ready"] and report["version_ready"]
    assert report["broken_ready"] is False
    assert report["server"]["name"] == "kestrel"
    assert report["metadata"]["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert report["config"]["max_batch_size"] == 32 and report["config"]["input"][0]["format"] == "FORMAT_NHWC"
    assert {m["name"]: m["state"] for m in report["index"]} == {"a": "READY", "b": "UNAVAILABLE", "broken":
                                                               "UNAVAILABLE", "c": "UNAVAILABLE", "odd":
                                                               "UNAVAILABLE", "slow": "UNAVAILABLE"}
    assert report["stats"]["model_stats"][0]["name"] == "a"

    expected = fake_probabilities(batch, 10, seed=1)
    for name in ("binary", "json"):
        got = np.load(tmp_path / f"{name}.npy")
        assert got.dtype == np.float32 and got.shape == (4, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    (out,) = report["binary_response"]["outputs"]
    assert out["parameters"]["binary_data_size"] == 4 * 10 * 4 and report["binary_response"]["id"] == "r1"
    best = np.argsort(-expected[0], kind="stable")[:3]
    assert [int(s.split(":")[1]) for s in report["classification"][0]] == list(best)
    assert report["classification"][0][0].endswith(f":label_{best[0]}")

    errors = report["errors"]
    assert errors["unknown_model"][0] == "404" and "received model name 'nope'" in errors["unknown_model"][1]
    assert errors["wrong_datatype"][0] == "400"
    assert "received datatype 'FP32', expected 'UINT8'" in errors["wrong_datatype"][1]
    assert errors["wrong_shape"][0] == "400" and "received shape [2, 31, 32, 3]" in errors["wrong_shape"][1]
    assert errors["unknown_output"][0] == "400" and "'logits'" in errors["unknown_output"][1]
    assert errors["unavailable_model"][0] == "503" and "simulated load failure" in errors["unavailable_model"][1]
