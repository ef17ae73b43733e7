"""deploy/: the Dockerfile and the Kubernetes / KServe manifests parse, and every flag, port and path they
use exists in the server: flags through `python -m serve`'s own argument parser, probe and scrape paths by
starting the server with each container's exact arguments (repository and ports swapped for a fake
repository and free ports) and calling them; the HPA's metric through the adapter rule to /metrics.
SIGTERM with --drain-delay: readiness false while requests are still answered, then exit 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install 'kestrel[dev]'")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s() -> list[dict]:
    return [doc for path in sorted(K8S.rglob("*.yaml")) for doc in _docs(path)]


def _kind(kind: str) -> list[dict]:
    return [d for d in _all_k8s() if d.get("kind") == kind]


def _dockerfile_instruction(name: str) -> str:
    """The text of a Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = [line[len(name):].strip() for line in text.splitlines() if line.startswith(name + " ")]
    assert len(found) == 1, f"expected one {name} in {DOCKERFILE}, found {len(found)}"
    return found[0]


def _entrypoint() -> list[str]:
    return json.loads(_dockerfile_instruction("ENTRYPOINT"))


def _serve_argv(container: dict) -> list[str]:
    """What the container runs after `python -m serve`: the image's defaults, then the container's args."""
    entry = container.get("command") or _entrypoint()
    assert entry[:3] == ["python", "-m", "serve"], entry
    return list(entry[3:]) + [str(a) for a in container.get("args", [])]


def _containers() -> list[tuple[str, dict]]:
    found = []
    for dep in _kind("Deployment"):
        found += [(f"Deployment/{dep['metadata']['name']}", c) for c in dep["spec"]["template"]["spec"]["containers"]]
    for rt in _kind("ServingRuntime"):
        found += [(f"ServingRuntime/{rt['metadata']['name']}", c) for c in rt["spec"]["containers"]]
    return found


def _parse(argv: list[str]):
    from serve.__main__ import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`python -m serve` refuses these arguments: {argv}")


def test_every_manifest_parses_and_names_its_kind():
    files = sorted(K8S.rglob("*.yaml"))
    assert {p.name for p in files} >= {"kestrel.yaml", "prometheus-adapter-rules.yaml", "servingruntime.yaml",
                                       "inferenceservice.yaml"}
    kinds = {d.get("kind") for d in _all_k8s()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServingRuntime", "InferenceService"} <= kinds
    for doc in _all_k8s():
        if "kind" in doc:
            assert doc["apiVersion"] and doc["metadata"]["name"], doc


def test_dockerfile_defaults_are_server_flags_and_kserve_ports():
    args = _parse(_entrypoint()[3:])
    assert str(args.repository) == "/mnt/models" and args.host == "0.0.0.0"
    assert (args.http_port, args.port, args.metrics_port) == (8080, 8081, 8002)
    assert args.drain_delay > 0 and args.grace > 0
    exposed = {int(p) for p in _dockerfile_instruction("EXPOSE").split()}
    assert exposed == {args.http_port, args.port, args.metrics_port}
    health = _dockerfile_instruction("HEALTHCHECK")
    assert f"127.0.0.1:{args.http_port}/v2/health/ready" in health
    for line in DOCKERFILE.read_text().splitlines():  # everything it copies exists in the checkout
        if line.startswith("COPY ") and not line.startswith("COPY --from="):  # --from: an earlier stage's files
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{DOCKERFILE} copies {source}, which is not in the checkout"


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"probe port {port!r} is not a named port of container {container['name']}"
    return named[port]


def test_container_flags_ports_and_probes_match_the_server():
    containers = _containers()
    assert len(containers) >= 2
    for where, container in containers:
        args = _parse(_serve_argv(container))
        served = {args.http_port, args.port, args.metrics_port}
        declared = {p["containerPort"] for p in container.get("ports", [])}
        assert declared and declared <= served, f"{where}: ports {declared} are not the server's {served}"
        assert args.http_port in declared, f"{where}: the HTTP port {args.http_port} is not declared"
        assert str(args.repository) == "/mnt/models", where
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in container, f"{where} has no {probe}"
            get = container[probe]["httpGet"]
            assert _port_number(container, get["port"]) == args.http_port, (where, probe)
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_grace_period_covers_drain_and_grace():
    for dep in _kind("Deployment"):
        spec = dep["spec"]["template"]["spec"]
        for container in spec["containers"]:
            args = _parse(_serve_argv(container))
            assert spec["terminationGracePeriodSeconds"] > args.drain_delay + args.grace


def test_services_target_declared_ports():
    deployments = {d["spec"]["template"]["metadata"]["labels"]["app"]: d for d in _kind("Deployment")}
    for svc in _kind("Service"):
        dep = deployments[svc["spec"]["selector"]["app"]]
        names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port}"


def test_inferenceservices_use_the_runtime_and_its_grpc_port():
    runtimes = {r["metadata"]["name"]: r for r in _kind("ServingRuntime")}
    for isvc in _kind("InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        runtime = runtimes[model["runtime"]]
        formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
        assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
        args = _parse(_serve_argv(runtime["spec"]["containers"][0]))
        for port in model.get("ports", []):
            assert port["name"] == "h2c" and port["containerPort"] == args.port  # KServe's name for gRPC


# ---- against a running server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_repository(tmp_path_factory) -> Path:
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("deploy_repo")
    write_fake_model(root, "m", classes=4)
    return root


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class _Started:
    """`python -m serve` with a container's arguments, then repository, host and ports overridden (argparse
    keeps the last value), so the flags under test are exactly the manifest's."""

    def __init__(self, argv: list[str], repository: Path, tmp: Path):
        self.port_file = tmp / f"ports-{time.monotonic_ns()}.json"
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        override = ["--repository", str(repository), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                    "--metrics-port", "0", "--port-file", str(self.port_file)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "serve", *argv, *override], cwd=ROOT, env=_env(),
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not start with {argv}:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.ports = json.loads(self.port_file.read_text())

    def get(self, port_key: str, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port_key]}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def test_probe_and_scrape_paths_answer_on_a_server_started_with_the_manifest_args(fake_repository, tmp_path):
    for where, container in _containers():
        started = _Started(_serve_argv(container), fake_repository, tmp_path)
        try:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = container[probe]["httpGet"]["path"]
                status, _ = started.get("http_port", path)
                assert status == 200, f"{where} {probe} {path}: HTTP {status}"
            status, body = started.get("metrics_port", "/metrics")
            assert status == 200 and b"nv_inference_queue_duration_us{" in body
            assert b"nv_inference_request_success{" in body
        finally:
            assert started.stop() == 0, started.log.read_text()


def test_hpa_metric_comes_from_the_adapter_rule_over_served_metrics():
    rules = _docs(K8S / "plain" / "prometheus-adapter-rules.yaml")[0]["rules"]["custom"]
    provided = {r["name"]["as"]: r for r in rules}
    for hpa in _kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in {d["metadata"]["name"] for d in _kind("Deployment")}
        for metric in hpa["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            assert name in provided, f"HPA {hpa['metadata']['name']} reads {name}, which no adapter rule provides"
            query = provided[name]["metricsQuery"]
            used = set(re.findall(r"\b(nv_inference_\w+|kestrel_\w+)\{", query))
            from serve.metrics import Metrics

            metrics = Metrics()
            stats = metrics.model("m")
            stats.version = "1"
            from prometheus_client import generate_latest

            exposed = generate_latest(metrics.registry).decode()
            for series in used:
                assert f"\n{series}{{" in exposed, f"the adapter rule reads {series}, which /metrics does not have"


def test_sigterm_turns_readiness_false_keeps_serving_through_the_drain_delay_then_exits(fake_repository, tmp_path):
    import numpy as np

    started = _Started(["--drain-delay", "3", "--grace", "5"], fake_repository, tmp_path)
    try:
        assert started.get("http_port", "/v2/health/ready")[0] == 200
        started.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + 2
        while started.get("http_port", "/v2/health/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.get("http_port", "/v2/health/ready")[0] != 200, "readiness stayed true after SIGTERM"
        assert time.monotonic() - t0 < 2.0  # within the drain delay: the ports still answer
        assert started.get("http_port", "/v2/health/live")[0] == 200
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                                       "data": np.zeros(32 * 32 * 3, int).tolist()}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{started.ports['http_port']}/v2/models/m/infer",
                                         data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:  # still served while draining
            assert response.status == 200 and json.loads(response.read())["outputs"][0]["shape"] == [1, 4]
        import grpc

        from serve._proto import grpc_service_pb2 as pb
        from serve._proto import grpc_service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{started.ports['port']}") as channel:
            v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert not v2.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            req = pb.ModelInferRequest(model_name="m")
            req.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
            req.raw_input_contents.append(bytes(32 * 32 * 3))
            assert list(v2.ModelInfer(req, timeout=5).outputs[0].shape) == [1, 4]
        assert started.proc.wait(20) == 0
        assert time.monotonic() - t0 >= 2.5  # it waited for the drain delay before closing
        log = started.log.read_text()
        assert "--drain-delay" in log and "server stopped" in log
    finally:
        started.stop()


def test_models_are_warmed_up_before_the_server_answers(tmp_path):
    from serve import create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path, "warm", classes=4, delay_ms=400)
    t0 = time.monotonic()
    server, _ = create_server(tmp_path, port=0)
    try:
        assert time.monotonic() - t0 >= 0.4  # one inference ran before the port opened
        assert server.hub.models["warm"].stats.snapshot()["execution_count"] == 0  # and is not counted
    finally:
        server.stop(grace=1.0)


def test_ray_image_copies_what_exists_and_matches_the_ray_pin():
    dockerfile = DEPLOY / "docker" / "Dockerfile.ray"
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            source = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for item in source:
                assert (ROOT / item).exists(), f"{dockerfile} copies {item}, which is not in the checkout"
    pin = re.search(r'"ray\[serve\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = re.search(r"ARG BASE=rayproject/ray:([0-9.]+)-", text).group(1)
    assert base == pin, f"Dockerfile.ray's Ray {base} differs from the scale extra's ray[serve]=={pin}"
    rayservice = _docs(K8S / "kuberay" / "rayservice.yaml")[0]
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == pin
