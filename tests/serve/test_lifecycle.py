"""Models that change while the server runs, over both transports (Triton's qa/L0_lifecycle, for Kestrel):
a new version loaded under load, loads that fail, unloads with requests in flight, load/unload cycles that
must not leak, load and unload racing inference, and the repository index telling the truth throughout.

Deterministic where it matters: slow loads are the fake backend's `load_delay_ms`, slow requests its
`delay_ms`; the tests wait for states (a version LOADING, requests in flight), and bound every wait.
"""

from __future__ import annotations

import json
import http.client
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from serve._proto import grpc_service_pb2 as pb
from serve.backends.fake import fake_probabilities, write_fake_model
from serve.repository import read_config, write_config
from serve_helpers import wait_for

rng = np.random.default_rng(3)
IMAGE = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
CLASSES = 5


# ---- clients: V2 infer and the repository extension on each transport -----------------------------------------
class Outcome(tuple):
    """(code, model_version, data or message)"""

    @property
    def code(self):
        return self[0]


class GrpcClient:
    transport = "grpc"

    def __init__(self, port: int, token: str | None = None):
        from serve._proto import grpc_service_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def _call(self, method, request, timeout=30):
        try:
            return "OK", getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()

    def infer(self, model: str, version: str = "", batch: np.ndarray = IMAGE, timeout: float = 10) -> Outcome:
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.add(name="images", datatype="UINT8", shape=list(batch.shape))
        request.raw_input_contents.append(batch.tobytes())
        code, reply = self._call("ModelInfer", request, timeout)
        if code != "OK":
            return Outcome((code, "", reply))
        out = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(tuple(reply.outputs[0].shape))
        return Outcome(("OK", reply.model_version, out))

    def load(self, model: str, config: dict | None = None, force: bool = False):
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = json.dumps(config)
        if force:
            request.parameters["force"].bool_param = True
        code, reply = self._call("RepositoryModelLoad", request)
        return code, "" if code == "OK" else reply

    def unload(self, model: str, unload_dependents: bool = False):
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        if unload_dependents:
            request.parameters["unload_dependents"].bool_param = True
        code, reply = self._call("RepositoryModelUnload", request)
        return code, "" if code == "OK" else reply

    def index(self, ready: bool = False):
        code, reply = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        if code != "OK":
            return code, reply
        return code, [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                      for m in reply.models]

    def close(self):
        self.channel.close()


_HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
               404: "NOT_FOUND", 409: "ABORTED", 500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}


class HttpClient:
    transport = "http"

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _post(self, path: str, body: bytes, headers: dict, timeout: float = 30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout + 5)
        try:
            conn.request("POST", path, body=body, headers={**self.headers, **headers})
            response = conn.getresponse()
            data = response.read()
            code = _HTTP_CODES.get(response.status, str(response.status))
            if response.status == 503:
                code = "RESOURCE_EXHAUSTED" if response.getheader("Retry-After") else "UNAVAILABLE"
            return code, response, data
        finally:
            conn.close()

    def infer(self, model: str, version: str = "", batch: np.ndarray = IMAGE, timeout: float = 10) -> Outcome:
        head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                                       "parameters": {"binary_data_size": batch.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        code, response, data = self._post(path, head + batch.tobytes(),
                                          {"Inference-Header-Content-Length": str(len(head))}, timeout)
        if code != "OK":
            return Outcome((code, "", json.loads(data)["error"]))
        split = int(response.getheader("Inference-Header-Content-Length"))
        meta = json.loads(data[:split])
        return Outcome(("OK", meta["model_version"],
                        np.frombuffer(data[split:], "<f4").reshape(meta["outputs"][0]["shape"])))

    def load(self, model: str, config: dict | None = None, force: bool = False):
        parameters = {}
        if config is not None:
            parameters["config"] = json.dumps(config)
        if force:
            parameters["force"] = True
        code, _, data = self._post(f"/v2/repository/models/{model}/load",
                                   json.dumps({"parameters": parameters}).encode(), {"Content-Type": "application/json"})
        return code, "" if code == "OK" else json.loads(data)["error"]

    def unload(self, model: str, unload_dependents: bool = False):
        body = json.dumps({"parameters": {"unload_dependents": unload_dependents}}).encode()
        code, _, data = self._post(f"/v2/repository/models/{model}/unload", body, {"Content-Type": "application/json"})
        return code, "" if code == "OK" else json.loads(data)["error"]

    def index(self, ready: bool = False):
        code, _, data = self._post("/v2/repository/index", json.dumps({"ready": ready}).encode(),
                                   {"Content-Type": "application/json"})
        return code, json.loads(data) if code == "OK" else json.loads(data)["error"]

    def close(self):
        pass


def make_client(transport: str, server, token: str | None = None):
    return GrpcClient(server.port, token) if transport == "grpc" else HttpClient(server.http_port, token)


def rows(server, name: str) -> dict[str, dict]:
    return {r["version"]: r for r in server.hub.registry.index() if r["name"] == name}


def fake_version(folder: Path, version: int, **settings) -> None:
    """Add version `version` to a fake model folder (its settings in model.json)."""
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / str(version) / "model.json").write_text(json.dumps(settings))


def set_policy(folder: Path, kind: str, **values) -> None:
    config = read_config(folder / "config.pbtxt")
    config.ClearField("version_policy")
    if kind == "all":
        config.version_policy.all.SetInParent()
    elif kind == "latest":
        config.version_policy.latest.num_versions = values.get("num_versions", 1)
    else:
        config.version_policy.specific.versions.extend(values["versions"])
    write_config(config, folder)


@pytest.fixture
def explicit_server(tmp_path):
    """A server in explicit control mode over a fresh repository (tests add models), gRPC + HTTP."""
    from serve import create_server

    repo = tmp_path / "repo"
    repo.mkdir()
    write_fake_model(repo, "keep", classes=CLASSES, seed=9)
    srv, _ = create_server(repo, port=0, http_port=0, metrics_port=0, control_mode="explicit", load_models=["keep"])
    yield srv
    srv.stop(grace=2.0)


# ---- 1. hot swap under load -------------------------------------------------------------------------------------
def test_a_new_version_loads_under_load_with_no_failed_request(explicit_server):
    server = explicit_server
    folder = write_fake_model(server.hub.repository.root, "swap", classes=CLASSES, seed=1, max_queue_delay_us=500)
    set_policy(folder, "all")
    assert GrpcClient(server.port).load("swap") == ("OK", "")
    expected = {"1": fake_probabilities(IMAGE, CLASSES, seed=1), "2": fake_probabilities(IMAGE, CLASSES, seed=2)}
    stop = threading.Event()
    seen: dict[int, list] = {}

    def client_loop(i: int):
        client = make_client("grpc" if i % 2 == 0 else "http", server)
        pinned = "1" if i >= 8 else ""
        history = seen.setdefault(i, [])
        try:
            while not stop.is_set():
                outcome = client.infer("swap", pinned)
                history.append(outcome)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(h) >= 3 for h in seen.values()) and len(seen) == 16, "every client to be answered")
    fake_version(folder, 2, seed=2, load_delay_ms=600)
    loader = threading.Thread(target=lambda: seen.setdefault("load", []).append(GrpcClient(server.port).load("swap")))
    loader.start()
    wait_for(lambda: rows(server, "swap").get("2", {}).get("state") == "LOADING", "version 2 to be LOADING")
    assert rows(server, "swap")["1"]["state"] == "READY"  # the old version serves while the new one loads
    loader.join(30)
    assert seen["load"] == [("OK", "")]
    counts = {i: len(seen[i]) for i in range(16)}
    wait_for(lambda: all(len(seen[i]) >= counts[i] + 3 for i in range(16)), "more answers after the swap")
    stop.set()
    for t in threads:
        t.join(30)
    for i in range(16):
        history = seen[i]
        assert all(o.code == "OK" for o in history), [o for o in history if o.code != "OK"][:3]
        versions = [o[1] for o in history]
        for o in history:  # every answer is exactly its version's output
            assert np.allclose(o[2], expected[o[1]], atol=1e-6)
        if i >= 8:
            assert set(versions) == {"1"}  # pinned
        else:  # unversioned: 1 until the swap, then 2, never back
            switch = versions.index("2")
            assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}
    one, two = server.hub.models["swap"].versions[1], server.hub.models["swap"].versions[2]
    answered = {v: sum(1 for i in range(16) for o in seen[i] if o[1] == v) for v in ("1", "2")}
    # no batch mixes versions: each version's runner ran exactly the images its answers say
    assert sum(one.runner.batch_sizes) == answered["1"] and sum(two.runner.batch_sizes) == answered["2"]
    print(f"\nhot swap: {sum(len(seen[i]) for i in range(16))} requests from 16 clients (8 gRPC, 8 HTTP), 0 failed; "
          f"version 1 answered {answered['1']}, version 2 {answered['2']}; version 2 loaded in 0.6 s + warm-up")


# ---- 2. failed loads change nothing that serves ----------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_failed_loads_leave_the_old_version_serving(explicit_server, transport, tmp_path):
    from serve_helpers import write_tiny_onnx

    server = explicit_server
    root = server.hub.repository.root
    client = make_client(transport, server)
    tiny = write_tiny_onnx(root, "tiny", classes=4, size=(32, 32))
    assert client.load("tiny") == ("OK", "")
    stop = threading.Event()
    errors, served = [], []

    def keep_inferring():
        other = make_client(transport, server)
        while not stop.is_set():
            outcome = other.infer("tiny")
            (served if outcome.code == "OK" and outcome[1] == "1" else errors).append(outcome)

    background = threading.Thread(target=keep_inferring)
    background.start()
    try:
        # a truncated model.onnx as version 2
        (tiny / "2").mkdir()
        data = (tiny / "1" / "model.onnx").read_bytes()
        (tiny / "2" / "model.onnx").write_bytes(data[: len(data) // 2])
        t0 = time.monotonic()
        code, message = client.load("tiny")
        took = time.monotonic() - t0
        assert code == "UNAVAILABLE" and "onnxruntime cannot load" in message and took < 10
        print(f"\n[{transport}] truncated model.onnx: the load failed in {took * 1e3:.0f} ms: {message[:100]}")
        assert rows(server, "tiny")["2"]["state"] == "UNAVAILABLE" and "cannot load" in rows(server, "tiny")["2"]["reason"]
        assert rows(server, "tiny")["1"]["state"] == "READY"
        assert client.infer("tiny", "2").code == "NOT_FOUND"  # nothing from that call serves
        # an invalid configuration (the load's "config" parameter)
        code, message = client.load("tiny", config={"name": "tiny", "max_batch_size": "lots"})
        assert code == "INVALID_ARGUMENT", (code, message)
        assert "not a valid model configuration" in message
        assert rows(server, "tiny")["1"]["state"] == "READY"
        # one bad version among two new ones: version 2 good, version 3 fails: neither serves
        import shutil

        shutil.rmtree(tiny / "2")
        shutil.copytree(tiny / "1", tiny / "2")
        (tiny / "3").mkdir()
        (tiny / "3" / "model.onnx").write_bytes(b"not an onnx model")
        set_policy(tiny, "all")
        code, message = client.load("tiny")
        assert code == "UNAVAILABLE" and "model.onnx" in message
        assert client.infer("tiny", "2").code == "NOT_FOUND" and client.infer("tiny", "3").code == "NOT_FOUND"
        index = rows(server, "tiny")
        assert index["3"]["state"] == "UNAVAILABLE" and index["1"]["state"] == "READY"
        assert "2" not in index or index["2"]["state"] != "READY"
    finally:
        stop.set()
        background.join(10)
    assert errors == [] and len(served) > 0  # the old version kept serving, with 0 errors
    print(f"[{transport}] meanwhile version 1 answered {len(served)} requests, 0 errors")


# ---- 3. unload with slow requests in flight --------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_unload_answers_the_requests_in_flight_then_refuses_clearly(explicit_server, transport):
    server = explicit_server
    write_fake_model(server.hub.repository.root, "slowpoke", classes=CLASSES, delay_ms=300, max_batch_size=2,
                     max_queue_delay_us=0)
    client = make_client(transport, server)
    assert client.load("slowpoke") == ("OK", "")
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(make_client(transport, server).infer("slowpoke")))
               for _ in range(6)]
    for t in threads:
        t.start()
    version = server.hub.models["slowpoke"].versions[1]
    wait_for(lambda: version.holders == 6, "six requests in flight")
    t0 = time.monotonic()
    assert client.unload("slowpoke") == ("OK", "")
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert [o.code for o in outcomes] == ["OK"] * 6  # every request in flight answered
    print(f"\n[{transport}] unload with 6 requests in flight: all answered OK; the call returned after {took:.2f} s")
    assert took >= 0.2  # unload returned once they were answered (3 batches of 300 ms)
    later = [client.infer("slowpoke") for _ in range(3)]
    assert all(o.code == "UNAVAILABLE" and "unloaded" in o[2] for o in later), later
    assert rows(server, "slowpoke")["1"]["state"] == "UNAVAILABLE"
    assert version.closed.is_set() and version.runner is None


# ---- 4. load / infer / unload cycles do not leak ---------------------------------------------------------------
def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    """The server's own threads (batcher workers, drains, onnxruntime's pools): not the handler pools of gRPC
    and HTTP, which keep the threads a burst made, by design."""
    return sum(1 for t in threading.enumerate()
               if not t.name.startswith(("grpc", "http", "ThreadPoolExecutor", "asyncio")))


def _cycles(server, name: str, batch: np.ndarray, cycles: int, fail_every: int) -> dict:
    client = GrpcClient(server.port)
    measured = {}
    try:
        for cycle in range(1, cycles + 1):
            if cycle % fail_every == 0:  # a load that fails (a configuration that cannot serve)
                code, message = client.load(name, config={"name": name, "platform": "onnxruntime_onnx",
                                                          "input": [], "output": []})
                assert code != "OK"
            else:
                assert client.load(name, force=True) == ("OK", "")
                outcome = client.infer(name, batch=batch)
                assert outcome.code == "OK", outcome
                assert client.unload(name) == ("OK", "")
            if cycle in (10, cycles):
                measured[cycle] = (_rss_mb(), _fds(), _threads())
    finally:
        client.close()
    return measured


def test_load_infer_unload_cycles_do_not_leak(explicit_server):
    from serve_helpers import write_tiny_onnx

    server = explicit_server
    write_tiny_onnx(server.hub.repository.root, "cycle", classes=4, size=(32, 32))
    fds_before = _fds()
    measured = _cycles(server, "cycle", IMAGE, cycles=200, fail_every=10)
    rss10, fds10, threads10 = measured[10]
    rss200, fds200, threads200 = measured[200]
    print(f"\ncycle 10: RSS {rss10:.1f} MB, {fds10} fds, {threads10} threads; cycle 200: RSS {rss200:.1f} MB, "
          f"{fds200} fds, {threads200} threads")
    assert rss200 <= rss10 * 1.10
    assert fds200 <= fds10 and threads200 <= threads10  # every cycle ends unloaded: nothing left behind
    wait_for(lambda: _fds() <= fds_before + 2, f"open files to return to {fds_before}")


@pytest.mark.slow
@pytest.mark.shared_data
def test_load_infer_unload_cycles_of_mobilenet_v2_do_not_leak(tmp_path):
    """The same with a real mobilenet_v2 ONNX (14 MB, onnxruntime sessions and thread pools)."""
    import shutil

    from serve import create_server

    source = Path(__file__).resolve().parents[2] / "models" / "mobilenet_v2"
    if not (source / "1" / "model.onnx").is_file():
        pytest.skip(f"no exported mobilenet_v2 in {source.parent} (kestrel export mobilenet_v2)")
    repo = tmp_path / "repo"
    shutil.copytree(source, repo / "mobilenet_v2")
    server, _ = create_server(repo, port=0, control_mode="explicit", metrics_port=None)
    try:
        batch = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        fds_before = _fds()
        measured = _cycles(server, "mobilenet_v2", batch, cycles=200, fail_every=10)
    finally:
        server.stop(grace=2.0)
    rss10, _, _ = measured[10]
    rss200, _, _ = measured[200]
    print(f"\nmobilenet_v2: RSS at cycle 10 {rss10:.0f} MB, at cycle 200 {rss200:.0f} MB")
    assert rss200 <= rss10 * 1.10
    assert _fds() <= fds_before + 2


# ---- 5. load and unload racing inference --------------------------------------------------------------------------
def test_loads_and_unloads_racing_inference(explicit_server):
    server = explicit_server
    write_fake_model(server.hub.repository.root, "race", classes=CLASSES, delay_ms=5, load_delay_ms=20)
    assert GrpcClient(server.port).load("race") == ("OK", "")
    documented = {"OK", "ABORTED", "UNAVAILABLE", "NOT_FOUND"}
    ops, samples, answers = [], [], []
    stop = threading.Event()
    lock = threading.Lock()

    def operator(i: int):
        import random

        client = make_client("grpc" if i % 2 else "http", server)
        pauses = random.Random(i)  # seeded: calls overlap, and some land alone long enough to complete
        for j in range(6):
            kind = "load" if (i + j) % 2 == 0 else "unload"
            time.sleep(pauses.uniform(0, 0.15))
            t0 = time.monotonic()
            code, message = client.load("race") if kind == "load" else client.unload("race")
            with lock:
                ops.append((t0, time.monotonic(), kind, code, message))

    def inferrer(i: int):
        client = make_client("grpc" if i % 2 else "http", server)
        while not stop.is_set():
            outcome = client.infer("race")
            answers.append(outcome.code)

    def checker():
        client = GrpcClient(server.port)
        while not stop.is_set():
            t0 = time.monotonic()
            code, index = client.index()
            state = next((r["state"] for r in index if r["name"] == "race"), None)
            outcome = client.infer("race")
            samples.append((t0, state, outcome.code, time.monotonic()))

    operators = [threading.Thread(target=operator, args=(i,)) for i in range(16)]
    others = [threading.Thread(target=inferrer, args=(i,)) for i in range(8)] + [threading.Thread(target=checker)]
    for t in others + operators:
        t.start()
    for t in operators:
        t.join(60)
    stop.set()
    for t in others:
        t.join(30)
    from collections import Counter

    print(f"\nops: {Counter((kind, code) for _, _, kind, code, _ in ops)}; answers: {Counter(answers)}; "
          f"index/infer samples: {len(samples)}")
    assert len(ops) == 96 and {code for *_, code, _ in ops} <= documented, {code for *_, code, _ in ops}
    assert all(("superseded" in m) for *_, code, m in ops if code == "ABORTED")
    assert set(answers) <= documented and "OK" in answers and "UNAVAILABLE" in answers
    # the final state matches the last call that completed (successfully: a superseded one changed nothing)
    done = sorted((end, kind) for _, end, kind, code, _ in ops if code == "OK")
    last = done[-1][1]
    assert server.hub.registry.state("race")[0] == ("READY" if last == "load" else "UNAVAILABLE")
    code = GrpcClient(server.port).infer("race").code
    assert code == ("OK" if last == "load" else "UNAVAILABLE")
    # the index never says READY for a model that answers not-ready, unless an unload ran in between
    for t0, state, code, t1 in samples:
        if state == "READY" and code != "OK":
            assert any(kind == "unload" and start <= t1 and end >= t0 for start, end, kind, *_ in ops), \
                (t0, state, code, t1)
    # and nothing is wedged: a load after the race serves
    assert GrpcClient(server.port).load("race") == ("OK", "")
    assert GrpcClient(server.port).infer("race").code == "OK"
    assert rows(server, "race")["1"]["state"] == "READY"


# ---- 6. poll mode ---------------------------------------------------------------------------------------------
def test_poll_mode_never_serves_a_half_copied_version_and_drains_a_removed_one(tmp_path):
    from serve import create_server

    repo = tmp_path / "repo"
    folder = write_fake_model(repo, "polled", classes=CLASSES, seed=1)
    set_policy(folder, "latest", num_versions=2)
    server, _ = create_server(repo, port=0, http_port=0, metrics_port=0, control_mode="poll", poll_secs=3600)
    poller = server.poller  # the test drives its looks
    client = GrpcClient(server.port)
    try:
        settings = json.dumps({"seed": 2})
        (folder / "2").mkdir()
        (folder / "2" / "model.json").write_text(settings[:5])  # the first half of the copy
        assert poller.poll_once() == []  # changed since the last look: wait
        assert client.infer("polled", "2").code == "NOT_FOUND"
        (folder / "2" / "model.json").write_text(settings)  # the rest arrives
        assert poller.poll_once() == []  # still changing
        assert client.infer("polled", "2").code == "NOT_FOUND"
        assert poller.poll_once() == ["load polled"]  # the same files twice in a row: loaded
        outcome = client.infer("polled")
        assert outcome.code == "OK" and outcome[1] == "2"
        assert np.allclose(outcome[2], fake_probabilities(IMAGE, CLASSES, seed=2), atol=1e-6)
        # a removed version drains, then unloads (its requests in flight are answered)
        import shutil

        version2 = server.hub.models["polled"].versions[2]
        shutil.rmtree(folder / "2")
        assert poller.poll_once() == []
        assert poller.poll_once() == ["load polled"]
        wait_for(lambda: version2.closed.is_set(), "version 2 to be closed")
        assert client.infer("polled").code == "OK" and client.infer("polled")[1] == "1"
        assert rows(server, "polled")["2"]["state"] == "UNAVAILABLE"
        # the control API is refused in poll mode, as in Triton
        assert client.load("polled")[0] == "FAILED_PRECONDITION"
    finally:
        client.close()
        server.stop(grace=1.0)


# ---- 7. who may control the server ------------------------------------------------------------------------------
TOKENS = "# role tokens\ninfer-token-1 infer\ncontrol-token-1 control\nboth-token-1 infer,control\n"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_auth_matrix(tmp_path, transport, caplog):
    import logging

    from serve import create_server

    caplog.set_level(logging.DEBUG)
    repo = tmp_path / "repo"
    write_fake_model(repo, "guarded", classes=CLASSES)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    server, _ = create_server(repo, port=0, http_port=0, metrics_port=0, control_mode="explicit",
                              load_models=["*"], auth_tokens=tokens)
    try:
        def as_(token):
            return make_client(transport, server, token)

        # probes need no token
        if transport == "http":
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            assert conn.getresponse().status == 200
        for token in (None, "wrong-token-9"):
            assert as_(token).infer("guarded").code == "UNAUTHENTICATED"
            assert as_(token).unload("guarded")[0] == "UNAUTHENTICATED"
            assert as_(token).index()[0] == "UNAUTHENTICATED"
        assert as_("infer-token-1").infer("guarded").code == "OK"
        assert as_("infer-token-1").unload("guarded")[0] == "PERMISSION_DENIED"
        assert as_("infer-token-1").index()[0] == "PERMISSION_DENIED"
        assert as_("control-token-1").infer("guarded").code == "PERMISSION_DENIED"
        assert server.hub.registry.state("guarded")[0] == "READY"  # nothing the refused calls asked changed
        assert as_("control-token-1").unload("guarded") == ("OK", "")
        assert as_("both-token-1").infer("guarded").code == "UNAVAILABLE"
        assert as_("control-token-1").load("guarded") == ("OK", "")
        # rotation: the new token added beside the old one, then the old one removed
        tokens.write_text(TOKENS + "rotated-token-2 infer\n")
        wait_for(lambda: as_("rotated-token-2").infer("guarded").code == "OK", "the new token", timeout=5)
        assert as_("infer-token-1").infer("guarded").code == "OK"  # both valid during the rotation
        tokens.write_text(TOKENS.replace("infer-token-1 infer\n", "") + "rotated-token-2 infer\n")
        wait_for(lambda: as_("infer-token-1").infer("guarded").code == "UNAUTHENTICATED", "the old token's end",
                 timeout=5)
        assert as_("rotated-token-2").infer("guarded").code == "OK"
    finally:
        server.stop(grace=1.0)
    assert "refused" in caplog.text  # the refusals were logged (at info), the tokens never
    assert not any(t in caplog.text for t in ("infer-token-1", "control-token-1", "wrong-token-9", "rotated-token-2"))


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_control_without_a_token_file_is_refused_beyond_loopback(tmp_path, transport):
    from serve import create_server

    repo = tmp_path / "repo"
    write_fake_model(repo, "open", classes=CLASSES)
    # control_open=False: what a server listening beyond loopback decides (tests listen on 127.0.0.1 only)
    server, _ = create_server(repo, port=0, http_port=0, metrics_port=0, control_mode="explicit", load_models=["*"],
                              control_open=False)
    try:
        client = make_client(transport, server)
        assert client.infer("open").code == "OK"  # inference stays open
        code, message = client.unload("open")
        assert code == "PERMISSION_DENIED" and "--auth-tokens" in message
        assert server.hub.registry.state("open")[0] == "READY"
    finally:
        server.stop(grace=1.0)


# ---- control modes, versions and the rules of an operation ---------------------------------------------------------
def test_control_modes_none_and_explicit_start_up(tmp_path):
    from serve import create_server
    from serve.errors import ConfigError

    repo = tmp_path / "repo"
    for name in ("a", "b"):
        write_fake_model(repo, name, classes=CLASSES)
    none, _ = create_server(repo, port=0, http_port=0, metrics_port=None)  # none: everything, no control API
    try:
        for transport in ("grpc", "http"):
            code, message = make_client(transport, none).unload("a")
            # gRPC FAILED_PRECONDITION, HTTP 400 (what Triton answers for a load it does not take)
            assert code == ("FAILED_PRECONDITION" if transport == "grpc" else "INVALID_ARGUMENT")
            assert "--model-control-mode explicit" in message
        assert none.hub.registry.state("a")[0] == "READY"
    finally:
        none.stop(1)
    explicit, _ = create_server(repo, port=0, metrics_port=None, control_mode="explicit")  # nothing named: nothing
    try:
        assert {r["name"]: r["state"] for r in explicit.hub.registry.index()} == {"a": "UNAVAILABLE",
                                                                                  "b": "UNAVAILABLE"}
        assert GrpcClient(explicit.port).infer("a").code == "UNAVAILABLE"
        assert GrpcClient(explicit.port).load("a") == ("OK", "")
        assert GrpcClient(explicit.port).infer("a").code == "OK"
        assert GrpcClient(explicit.port).load("nope")[0] == "NOT_FOUND"
    finally:
        explicit.stop(1)
    everything, _ = create_server(repo, port=0, metrics_port=None, control_mode="explicit", load_models=["*"])
    try:
        assert all(everything.hub.registry.state(n)[0] == "READY" for n in ("a", "b"))
    finally:
        everything.stop(1)
    with pytest.raises(ConfigError, match="give it alone"):
        create_server(repo, port=0, metrics_port=None, control_mode="explicit", load_models=["*", "a"])


def test_version_policies_and_the_version_that_answers(explicit_server):
    server = explicit_server
    folder = write_fake_model(server.hub.repository.root, "ver", classes=CLASSES, seed=1)
    fake_version(folder, 2, seed=2)
    fake_version(folder, 3, seed=3)
    client = GrpcClient(server.port)
    assert client.load("ver") == ("OK", "")  # default: latest { num_versions: 1 }
    assert sorted(server.hub.models["ver"].versions) == [3]
    outcome = client.infer("ver")
    assert outcome[1] == "3" and np.allclose(outcome[2], fake_probabilities(IMAGE, CLASSES, seed=3), atol=1e-6)
    set_policy(folder, "latest", num_versions=2)
    assert client.load("ver") == ("OK", "")
    assert sorted(server.hub.models["ver"].versions) == [2, 3]
    set_policy(folder, "specific", versions=[1, 2])
    assert client.load("ver") == ("OK", "")
    assert sorted(server.hub.models["ver"].versions) == [1, 2]
    assert client.infer("ver")[1] == "2"  # unversioned: the highest READY version
    http = HttpClient(server.http_port)
    assert http.infer("ver", "1")[1] == "1" and client.infer("ver", "3").code == "NOT_FOUND"
    set_policy(folder, "all")
    assert client.load("ver") == ("OK", "")
    assert sorted(server.hub.models["ver"].versions) == [1, 2, 3]
    set_policy(folder, "specific", versions=[7])
    code, message = client.load("ver")
    assert code == "FAILED_PRECONDITION" and "version(s) [7]" in message
    assert sorted(server.hub.models["ver"].versions) == [1, 2, 3]  # a failed load changes nothing
    # the metrics keep each version apart
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'nv_inference_request_success{model="ver",version="3"}' in text
    assert 'nv_inference_request_success{model="ver",version="1"}' in text


def test_unchanged_versions_are_kept_and_a_forced_load_reloads(explicit_server):
    server = explicit_server
    folder = write_fake_model(server.hub.repository.root, "same", classes=CLASSES, seed=1)
    client = GrpcClient(server.port)
    assert client.load("same") == ("OK", "")
    first = server.hub.models["same"].versions[1]
    os.utime(folder / "1" / "model.json")  # a new timestamp, the same content
    assert client.load("same") == ("OK", "")
    assert server.hub.models["same"].versions[1] is first  # decided by content: not reloaded
    assert client.load("same", force=True) == ("OK", "")
    second = server.hub.models["same"].versions[1]
    assert second is not first
    wait_for(lambda: first.closed.is_set(), "the replaced version to be closed")
    (folder / "1" / "model.json").write_text(json.dumps({"seed": 4}))  # new content: reloaded
    assert client.load("same") == ("OK", "")
    third = server.hub.models["same"].versions[1]
    assert third is not second
    assert np.allclose(client.infer("same")[2], fake_probabilities(IMAGE, CLASSES, seed=4), atol=1e-6)


def test_the_newer_operation_wins_and_other_models_are_not_blocked(explicit_server):
    server = explicit_server
    root = server.hub.repository.root
    write_fake_model(root, "heavy", classes=CLASSES, load_delay_ms=1500)
    write_fake_model(root, "light", classes=CLASSES)
    client = GrpcClient(server.port)
    results = {}
    loading = threading.Thread(target=lambda: results.setdefault("load", client.load("heavy")))
    loading.start()
    wait_for(lambda: rows(server, "heavy").get("1", {}).get("state") == "LOADING", "heavy to be LOADING")
    assert GrpcClient(server.port).load("light") == ("OK", "")  # another model: not blocked by heavy's load
    assert GrpcClient(server.port).infer("keep").code == "OK"  # nor is inference
    assert rows(server, "heavy")["1"]["state"] == "LOADING"  # both happened while heavy was still loading
    assert GrpcClient(server.port).unload("heavy") == ("OK", "")  # newer than the load still running
    loading.join(10)
    code, message = results["load"]
    assert code == "ABORTED" and "superseded" in message  # the older reports it was superseded
    assert server.hub.registry.state("heavy") == ("UNAVAILABLE", "unloaded")  # the newer decided


def test_ensembles_follow_their_members(tmp_path):
    from serve import create_server

    repo = tmp_path / "repo"
    labels = [f"c{i}" for i in range(CLASSES)]
    member_a = write_fake_model(repo, "ma", classes=CLASSES, labels=labels, seed=1)
    write_fake_model(repo, "mb", classes=CLASSES, labels=labels, seed=2)
    write_fake_model(repo, "solo", classes=CLASSES, labels=labels, seed=5)
    server, _ = create_server(repo, port=0, http_port=0, metrics_port=None, control_mode="explicit",
                              ensembles=["pair=ma,mb"])
    client = GrpcClient(server.port)
    try:
        assert client.infer("pair").code == "OK"
        # reloading a member (a new version, slowly) never makes the ensemble unavailable
        fake_version(member_a, 2, seed=3, load_delay_ms=400)
        outcomes, stop = [], threading.Event()

        def read():
            other = GrpcClient(server.port)
            while not stop.is_set():
                outcomes.append(other.infer("pair").code)
            other.close()

        reader = threading.Thread(target=read)
        reader.start()
        assert GrpcClient(server.port).load("ma") == ("OK", "")
        time.sleep(0.05)
        stop.set()
        reader.join(10)
        assert outcomes and set(outcomes) == {"OK"}
        # unloading a member makes it unavailable, naming the member
        assert client.unload("mb") == ("OK", "")
        outcome = client.infer("pair")
        assert outcome.code == "UNAVAILABLE" and "'mb'" in outcome[2]
        state, reason = server.hub.registry.state("pair")
        assert state == "UNAVAILABLE" and "mb" in reason
        assert client.load("pair") == ("OK", "")  # loading the ensemble loads its members
        assert client.infer("pair").code == "OK"
        # unload_dependents: the ensemble and the members loaded with it
        assert client.unload("pair", unload_dependents=True) == ("OK", "")
        assert [server.hub.registry.state(n)[0] for n in ("pair", "ma", "mb")] == ["UNAVAILABLE"] * 3
    finally:
        client.close()
        server.stop(1)


def test_kestrel_models_lists_loads_and_unloads(explicit_server, capsys):
    from serve.control import main

    server = explicit_server
    write_fake_model(server.hub.repository.root, "cli", classes=CLASSES)
    address = ["--address", f"127.0.0.1:{server.port}"]
    assert main(address + ["load", "cli"]) == 0
    assert "cli: loaded" in capsys.readouterr().out
    assert main(["list"] + address) == 0  # the connection flags after the action work too
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert any(line.split()[:3] == ["cli", "1", "READY"] for line in table.splitlines())
    assert main(address + ["unload", "cli"]) == 0
    assert main(address + ["list", "--ready"]) == 0
    assert "cli" not in capsys.readouterr().out.replace("cli: unloaded", "")
    assert main(address + ["load", "missing"]) == 1
    assert "missing" in capsys.readouterr().err


def test_poll_mode_checks_a_new_ensembles_members_as_a_load_call_does(tmp_path):
    """An ensemble folder appearing in poll mode is loaded through the same path as RepositoryModelLoad: members
    whose labels disagree are refused (not served as an ensemble), members that agree serve."""
    from serve import create_server
    from serve.repository import write_ensemble

    repo = tmp_path / "repo"
    write_fake_model(repo, "left", classes=CLASSES, seed=1)
    write_fake_model(repo, "right", classes=CLASSES, seed=2)
    write_fake_model(repo, "other", classes=CLASSES, seed=3, labels=[f"other_{i}" for i in range(CLASSES)])
    server, _ = create_server(repo, port=0, metrics_port=None, control_mode="poll", poll_secs=3600)
    poller, client = server.poller, GrpcClient(server.port)
    try:
        write_ensemble(repo, "mixed", ["left", "other"])
        assert poller.poll_once() == []
        assert poller.poll_once() == ["load mixed failed"]
        assert client.infer("mixed").code != "OK"
        write_ensemble(repo, "pair", ["left", "right"])
        assert poller.poll_once() == []
        assert poller.poll_once() == ["load pair"]
        assert client.infer("pair").code == "OK"
    finally:
        client.close()
        server.stop(1)


def test_poll_mode_follows_whole_models_appearing_and_disappearing(tmp_path):
    from serve import create_server

    repo = tmp_path / "repo"
    write_fake_model(repo, "first", classes=CLASSES)
    server, _ = create_server(repo, port=0, metrics_port=None, control_mode="poll", poll_secs=3600)
    poller, client = server.poller, GrpcClient(server.port)
    try:
        write_fake_model(repo, "second", classes=CLASSES, seed=2)
        assert poller.poll_once() == []
        assert poller.poll_once() == ["load second"]
        assert client.infer("second").code == "OK"
        import shutil

        shutil.rmtree(repo / "second")
        assert poller.poll_once() == []  # missing from one look: perhaps a folder being replaced
        assert client.infer("second").code == "OK"
        assert poller.poll_once() == ["unload second"]
        assert client.infer("second").code in ("UNAVAILABLE", "NOT_FOUND")
        assert client.infer("first").code == "OK"
    finally:
        client.close()
        server.stop(1)
