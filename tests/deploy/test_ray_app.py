"""deploy/ray without a Ray cluster: options and their defaults from config.pbtxt, the ingress's RPC list
against Kestrel's protos, the config files (Ray's schema when Ray is installed), and the ingress's data
plane and gRPC codec over stand-in deployment handles, answering exactly as one `python -m serve` hub.
(The real cluster: tests/deploy/test_ray_cluster.py, marker slow, `make scale-test`.)"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import grpc
import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install 'kestrel[dev]'")

from deploy.ray import app as rayapp  # noqa: E402
from serve.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LABELS = [f"label_{i}" for i in range(10)]


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("ray_app_repo")
    write_fake_model(root, "a", labels=LABELS, seed=1, max_batch_size=8, max_queue_size=16)
    write_fake_model(root, "b", labels=LABELS, seed=2, size=(48, 40))
    return root


def test_ingress_methods_are_the_rpcs_of_kestrels_protos():
    from serve._proto import grpc_service_pb2, kestrel_pb2

    v2 = [m.name for m in grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
    classify = [m.name for m in kestrel_pb2.DESCRIPTOR.services_by_name["Classifier"].methods]
    assert sorted(rayapp.V2_RPCS) == sorted(v2) and sorted(rayapp.CLASSIFY_RPCS) == sorted(classify)
    for name in v2 + classify:
        assert asyncio.iscoroutinefunction(getattr(rayapp.KestrelIngress, name))
        assert rayapp._response_type(name).DESCRIPTOR.full_name.endswith("Response")


def test_servicer_functions_import_and_alias_the_generated_modules():
    import importlib
    import sys

    for path in rayapp.GRPC_SERVICER_FUNCTIONS:
        module, name = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
    from serve._proto import grpc_service_pb2

    # pickle finds messages by the module protoc names: the alias makes it Kestrel's module
    assert grpc_service_pb2.ModelInferRequest.__module__ in sys.modules
    assert sys.modules[grpc_service_pb2.ModelInferRequest.__module__] is grpc_service_pb2
    import pickle

    request = grpc_service_pb2.ModelInferRequest(model_name="a", id="x")
    assert pickle.loads(pickle.dumps(request)) == request


def test_options_parse_cli_strings_and_refuse_unknown_keys(repo):
    options = rayapp.AppOptions.parse({"repository": str(repo), "models": "a, b", "ensemble": "ab=a,b;aa=a,b:max-confidence",
                                       "num_replicas": "2", "num_cpus": "0.5"})
    assert options.models == ["a", "b"] and options.ensembles == ["ab=a,b", "aa=a,b:max-confidence"]
    assert options.num_replicas == 2 and options.num_cpus == 0.5
    with pytest.raises(ConfigError, match=r"received application arguments \['replicas'\]"):
        rayapp.AppOptions.parse({"replicas": 2})
    with pytest.raises(ConfigError, match=r"options for a: received \['cpus'\]"):
        rayapp.AppOptions.parse({"model_options": {"a": {"cpus": 1}}})
    with pytest.raises(ConfigError, match="num_cpus: received 'many', expected a number"):
        rayapp.AppOptions.parse({"num_cpus": "many"})


def test_deployment_options_default_from_the_models_config(repo):
    from serve import ModelRepository

    repository = ModelRepository(repo)
    options = rayapp.AppOptions.parse({"repository": str(repo), "num_replicas": 3, "num_cpus": 0.25})
    a = rayapp.model_deployment_options(repository, "a", options)
    assert a["name"] == "a" and a["num_replicas"] == 3
    assert a["max_ongoing_requests"] == 16  # 2 x max_batch_size 8: a batch fills while one runs
    assert a["max_queued_requests"] == 16  # the config's max_queue_size
    assert a["ray_actor_options"] == {"num_cpus": 0.25}
    options = rayapp.AppOptions.parse({"repository": str(repo), "model_options": {
        "b": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}, "max_ongoing_requests": 5}}})
    b = rayapp.model_deployment_options(repository, "b", options)
    assert b["num_replicas"] == "auto" and b["autoscaling_config"]["max_replicas"] == 4
    assert b["max_ongoing_requests"] == 5


def test_served_names_follow_python_m_serve(repo):
    assert rayapp.served_names(rayapp.AppOptions.parse({"repository": str(repo)})) == ["a", "b"]
    only = rayapp.AppOptions.parse({"repository": str(repo), "models": "a", "ensembles": ["ab=a,b"]})
    assert rayapp.served_names(only) == ["a", "b"]  # an ensemble's members are deployed
    with pytest.raises(ConfigError, match="'zz' is not in repository"):
        rayapp.served_names(rayapp.AppOptions.parse({"repository": str(repo), "models": "zz"}))


def _serve_configs() -> list[tuple[str, dict]]:
    configs = [("deploy/ray/serve_config.yaml", yaml.safe_load((ROOT / "deploy/ray/serve_config.yaml").read_text()))]
    rayservice = yaml.safe_load((ROOT / "deploy/k8s/kuberay/rayservice.yaml").read_text())
    configs.append(("RayService serveConfigV2", yaml.safe_load(rayservice["spec"]["serveConfigV2"])))
    return configs


def test_config_files_name_the_builder_servicers_and_valid_arguments():
    configs = _serve_configs()
    assert configs[0][1] == configs[1][1], "the RayService's serveConfigV2 differs from deploy/ray/serve_config.yaml"
    for where, config in configs:
        assert config["grpc_options"]["grpc_servicer_functions"] == rayapp.GRPC_SERVICER_FUNCTIONS, where
        for application in config["applications"]:
            module, name = application["import_path"].split(":")
            assert module == "deploy.ray.app" and callable(getattr(rayapp, name)), where
            options = rayapp.AppOptions.parse(application["args"])
            assert options.repository == "/mnt/models"
            for ensemble in options.ensembles:
                from serve import Ensemble

                assert set(Ensemble.parse(ensemble).members) <= set(options.models)
        if importlib.util.find_spec("ray") is not None:
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.parse_obj(config)  # Ray's own validation of the file


def test_rayservice_exposes_the_proxies_ports():
    rayservice = yaml.safe_load((ROOT / "deploy/k8s/kuberay/rayservice.yaml").read_text())
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head["ports"]}
    assert {config["http_options"]["port"], config["grpc_options"]["port"]} <= ports


# ---- the ingress over stand-in handles -----------------------------------------------------------------
class _Response:
    def __init__(self, fn):
        self._fn, self.cancelled = fn, False

    def result(self, timeout_s=None):
        return self._fn()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, replica):
        self.replica = replica
        self.calls = 0

    def remote(self, batch, timeout_s=None):
        self.calls += 1
        return _Response(lambda: asyncio.run(self.replica.infer(batch, timeout_s)))


class _Handle:
    """A DeploymentHandle stand-in over a real ModelReplica in this process."""

    def __init__(self, replica):
        self.infer = _Method(replica)


class _RayContext:
    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def invocation_metadata(self):
        return []


@pytest.fixture(scope="module")
def ingress(repo):
    replicas = {name: rayapp.ModelReplica(str(repo), name) for name in ("a", "b")}
    handles = {name: _Handle(replica) for name, replica in replicas.items()}
    yield rayapp.KestrelIngress(str(repo), ["a", "b"], ["ab=a,b"], handles)
    for replica in replicas.values():
        replica.__del__()


def test_ingress_infer_and_classify_match_one_local_hub(ingress, repo):
    from serve import ModelHub
    from serve.ensemble import Ensemble

    local = ModelHub(repo, ["a", "b"], [Ensemble.parse("ab=a,b")]).load()
    try:
        batch = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        remote = ingress.hub.infer("a", "", batch)
        assert np.array_equal(remote.probabilities, local.infer("a", "", batch).probabilities)
        picture = png_bytes(np.random.default_rng(2).integers(0, 256, (60, 50, 3), dtype=np.uint8))
        ours, theirs = ingress.plane.classify(picture, ["ab"], 3), local.classify(picture, ["ab"], 3)
        assert [(m.model, m.predictions) for m in ours.models] == [(m.model, m.predictions) for m in theirs.models]
        assert ours.ensembles[0].predictions == theirs.ensembles[0].predictions
        assert ingress.hub.handles["b"].infer.calls >= 1  # the member ran in its own deployment
    finally:
        local.close()


def test_ingress_grpc_methods_answer_and_carry_error_codes(ingress):
    from serve._proto import grpc_service_pb2 as pb
    from serve._proto import kestrel_pb2 as kpb

    ctx = _RayContext()
    assert asyncio.run(ingress.ServerReady(pb.ServerReadyRequest(), grpc_context=ctx)).ready and ctx.code is None
    request = pb.ModelInferRequest(model_name="a")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(bytes(32 * 32 * 3))
    response = asyncio.run(ingress.ModelInfer(request, grpc_context=ctx))
    assert list(response.outputs[0].shape) == [1, 10] and ctx.code is None
    missing = _RayContext()
    empty = asyncio.run(ingress.ModelInfer(pb.ModelInferRequest(model_name="zz"), grpc_context=missing))
    assert missing.code == grpc.StatusCode.NOT_FOUND and "'zz'" in missing.details
    assert isinstance(empty, pb.ModelInferResponse) and not empty.outputs
    answer = asyncio.run(ingress.Classify(kpb.ClassifyRequest(
        image=png_bytes(np.full((40, 40, 3), 90, np.uint8)), models=["ab"], top_k=2), grpc_context=_RayContext()))
    assert [r.model for r in answer.results] == ["a", "b"] and answer.ensembles[0].name == "ab"
    meta = asyncio.run(ingress.ModelMetadata(pb.ModelMetadataRequest(name="b"), grpc_context=_RayContext()))
    assert list(meta.inputs[0].shape) == [-1, 48, 40, 3]


async def _asgi_get(app, path: str) -> tuple[int, bytes]:
    """One GET through an ASGI app (what Ray Serve's HTTP proxy does with the ingress's app)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_ingress_http_app_is_serve_http_over_the_same_plane(ingress):
    import json

    app = ingress.__serve_build_asgi_app__()
    try:
        assert asyncio.run(_asgi_get(app, "/v2/health/ready"))[0] == 200
        status, body = asyncio.run(_asgi_get(app, "/v2/models/b"))
        assert status == 200 and json.loads(body)["inputs"][0]["shape"] == [-1, 48, 40, 3]
        status, body = asyncio.run(_asgi_get(app, "/v2/models/ab"))  # members of two input sizes: refused clearly
        assert status == 400 and b"members take different inputs" in body
        status, body = asyncio.run(_asgi_get(app, "/metrics"))
        assert status == 200 and b"nv_inference_request_success" in body
    finally:
        app.state.kestrel.close()


def test_a_request_whose_replica_died_is_sent_again(repo):
    pytest.importorskip("ray", reason="Ray's exceptions: `make scale-test` installs kestrel[scale]")
    from ray.exceptions import ActorDiedError

    replica = rayapp.ModelReplica(str(repo), "a")
    try:
        handle = _Handle(replica)
        sends = []

        def remote(batch, timeout_s=None):
            sends.append(1)
            if len(sends) == 1:
                return _Response(lambda: (_ for _ in ()).throw(ActorDiedError()))
            return _Response(lambda: asyncio.run(replica.infer(batch, timeout_s)))

        handle.infer.remote = remote
        hub = rayapp.RemoteModelHub(str(repo), ["a"], [], {"a": handle}).load()
        out = hub.infer("a", "", np.zeros((1, 32, 32, 3), np.uint8))
        assert out.probabilities.shape == (1, 10) and len(sends) == 2
        assert hub.models["a"].batcher.resent == 1
    finally:
        replica.__del__()
