"""Kestrel's Ray Serve application on a real local two-node Ray cluster (`make scale-test`).

`ray start --head --num-cpus=1` plus a second raylet (`ray start --address=...`) on this machine; the
application deploys 2 replicas of mobilenet_v2 and a copy of it (mobilenet_v2_b) as the second member
of an ensemble. Checked: tritonclient's gRPC answers and Classify through Ray's proxies are the same as
`python -m serve`'s on the same repository and photos; the model deployment answers from both nodes;
one replica is killed (SIGKILL) during a bounded load run: the load keeps succeeding (failures are
counted) and Ray brings the replica back (timed). Numbers are printed and written to
$KESTREL_SCALE_RESULTS (default .cache/scale-test-results.json).

The repository: $KESTREL_SCALE_REPOSITORY (make scale-test exports mobilenet_v2 with its real weights
there); without it, fake models with mobilenet_v2's shapes (the same checks, faster). Bounded for
2 cores / 24 GB: 3 model replicas with 0.5 CPU each, one onnxruntime thread each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="Ray is not installed: `make scale-test` installs kestrel[scale] into .venv-scale"),
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                       reason="tritonclient is not installed (pip install 'kestrel[dev]')"),
    pytest.mark.timeout(1500),
]

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = Path(os.environ.get("KESTREL_PHOTOS", ROOT.parent / "shared" / "photos")).resolve()
MODEL, COPY, ENSEMBLE = "mobilenet_v2", "mobilenet_v2_b", "imagenet"
LOAD_SECONDS, LOAD_THREADS, LOAD_MAX_REQUESTS = 60.0, 3, 2000
RECOVERY_LIMIT_S = 240.0


def _free_port(low: int = 20000) -> int:
    """A free TCP port above Ray's default worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= low:
            return port


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run(["nice", "-n", "10", str(exe), *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _photos() -> list[Path]:
    if PHOTOS.is_dir():
        return sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".bmp", ".png"})
    return []


# ---- the repository ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> tuple[Path, bool]:
    """(repository, real): mobilenet_v2 (real weights) and its copy mobilenet_v2_b, or fakes of their shape."""
    root = tmp_path_factory.mktemp("ray_repo")
    source = os.environ.get("KESTREL_SCALE_REPOSITORY")
    if source and (Path(source) / MODEL / "config.pbtxt").is_file():
        for name in (MODEL, COPY):  # copies (never links: nothing may write through to the source)
            shutil.copytree(Path(source) / MODEL, root / name, copy_function=shutil.copy2)
        config = root / COPY / "config.pbtxt"
        text = config.read_text().replace(f'name: "{MODEL}"', f'name: "{COPY}"')
        tmp = config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(config)
        return root, True
    from serve.backends.fake import write_fake_model

    labels = [f"class_{i}" for i in range(1000)]
    for name in (MODEL, COPY):
        write_fake_model(root, name, classes=1000, size=(224, 224), labels=labels, seed=7, delay_ms=5)
    return root, False


# ---- the cluster -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A head node and a second raylet on this machine, 1 CPU each; `ray stop` at teardown."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="kray", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                "--disable-usage-stats", f"--temp-dir={temp_dir}")
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=1")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        import ray

        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, ray.nodes()
        yield port
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            stop = _ray("stop", "--force", timeout=120)
            print(stop.stdout[-500:], stop.stderr[-500:])
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def app(cluster, repository):
    """The application on the cluster; yields (http port, grpc port)."""
    from ray import serve

    from deploy.ray.app import GRPC_SERVICER_FUNCTIONS, build_app

    repo, _real = repository
    http_port, grpc_port = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
    args = {"repository": str(repo), "models": f"{MODEL},{COPY}", "ensembles": [f"{ENSEMBLE}={MODEL},{COPY}"],
            "num_cpus": 0.5, "ort_threads": 1,
            "model_options": {MODEL: {"num_replicas": 2}, COPY: {"num_replicas": 1}}}
    t0 = time.monotonic()
    serve.run(build_app(args), name="kestrel", route_prefix="/")
    print(f"application RUNNING after {time.monotonic() - t0:.1f} s")
    yield http_port, grpc_port
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(repository, tmp_path_factory):
    """`python -m serve` on the same repository (same onnxruntime threads): the single-process answers."""
    repo, _real = repository
    tmp = tmp_path_factory.mktemp("reference")
    port_file = tmp / "ports.json"
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--repository", str(repo), "--models", f"{MODEL},{COPY}",
                             "--ensemble", f"{ENSEMBLE}={MODEL},{COPY}", "--port", "0", "--http-port", "0",
                             "--metrics-port", "-1", "--ort-threads", "1", "--port-file", str(port_file)],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()
        time.sleep(0.1)
    yield json.loads(port_file.read_text())
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()


# ---- clients -------------------------------------------------------------------------------------------
TRITON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from serve import images

    protocol, url, model, *paths = sys.argv[1:]
    lib = grpcclient if protocol == "grpc" else httpclient
    client = lib.InferenceServerClient(url)
    assert client.is_server_ready() and client.is_model_ready(model)
    meta = client.get_model_metadata(model)
    shape = (meta.inputs[0].shape if protocol == "grpc" else meta["inputs"][0]["shape"])
    size = (int(shape[1]), int(shape[2]))
    out = []
    for path in paths:
        batch = images.load(path, size)[None]
        x = lib.InferInput("images", list(batch.shape), "UINT8")
        x.set_data_from_numpy(batch)
        result = client.infer(model, [x], outputs=[lib.InferRequestedOutput("probabilities")])
        out.append(result.as_numpy("probabilities")[0].tolist())
    json.dump(out, sys.stdout)
    """
)


def _triton(protocol: str, url: str, model: str, photos: list[Path]) -> np.ndarray:
    result = subprocess.run([sys.executable, "-c", TRITON, protocol, url, model, *map(str, photos)], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return np.array(json.loads(result.stdout), dtype=np.float32)


def _inputs(tmp_path) -> list[Path]:
    photos = _photos()
    if photos:
        return photos
    from PIL import Image

    from serve import images

    paths = []
    for i, array in enumerate(images.synthetic_images(6, (240, 300), seed=3)):
        path = tmp_path / f"synthetic-{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def _results() -> Path:
    path = Path(os.environ.get("KESTREL_SCALE_RESULTS", ROOT / ".cache" / "scale-test-results.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _record(key: str, value) -> None:
    path = _results()
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    print(f"{key}: {json.dumps(value)}")


# ---- the checks ----------------------------------------------------------------------------------------
def test_tritonclient_grpc_answers_are_the_single_process_servers(app, reference, repository, tmp_path):
    _http_port, grpc_port = app
    photos = _inputs(tmp_path)
    for model in (MODEL, ENSEMBLE):
        ours = _triton("grpc", f"127.0.0.1:{grpc_port}", model, photos)
        single = _triton("grpc", f"127.0.0.1:{reference['port']}", model, photos)
        assert ours.shape == single.shape == (len(photos), 1000)
        assert (ours.argmax(1) == single.argmax(1)).all()
        diff = float(np.abs(ours - single).max())
        assert diff <= 1e-6, f"{model}: max abs difference {diff}"
        _record(f"tritonclient_grpc_{model}", {"photos": len(photos), "real_weights": repository[1],
                                               "bitwise_equal": bool(np.array_equal(ours, single)),
                                               "max_abs_diff": diff})


def test_http_v2_and_classify_answers_are_the_single_process_servers(app, reference, tmp_path):
    import urllib.error
    import urllib.request

    http_port, _grpc_port = app
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code == 501:
            pytest.skip(f"this serve.http has no ASGI app to mount on Ray's HTTP proxy: {exc.read()[:200]!r}")
        raise
    photos = _inputs(tmp_path)
    ours = _triton("http", f"127.0.0.1:{http_port}", MODEL, photos)
    single = _triton("http", f"127.0.0.1:{reference['http_port']}", MODEL, photos)
    assert float(np.abs(ours - single).max()) <= 1e-6
    for photo in photos[:4]:
        answers = []
        for port in (http_port, reference["http_port"]):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify?models={ENSEMBLE}&top_k=3",
                                             data=photo.read_bytes(), headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answers.append(json.loads(response.read()))
        ray_ens, single_ens = answers[0]["ensembles"][0], answers[1]["ensembles"][0]
        assert [p["label"] for p in ray_ens["predictions"]] == [p["label"] for p in single_ens["predictions"]]
    _record("http", {"photos": len(photos), "tritonclient_http_max_abs_diff": float(np.abs(ours - single).max()),
                     "classify_ensemble_labels_identical_photos": min(4, len(photos))})


def _classify_answers(address: str, photos: list[Path]) -> list:
    from serve import KestrelClient

    out = []
    with KestrelClient(address, timeout=120) as client:
        for photo in photos:
            response = client.classify(photo.read_bytes(), [ENSEMBLE], top_k=5)
            models = {r.model: [(p.label, round(p.probability, 6)) for p in r.predictions] for r in response.results}
            fused = [(p.label, round(p.probability, 6)) for p in response.ensembles[0].predictions]
            out.append({"models": models, "ensemble": fused})
    return out


def test_classify_answers_are_the_single_process_servers(app, reference, tmp_path):
    _http_port, grpc_port = app
    photos = _inputs(tmp_path)
    ours = _classify_answers(f"127.0.0.1:{grpc_port}", photos)
    single = _classify_answers(f"127.0.0.1:{reference['port']}", photos)
    assert ours == single
    _record("classify_grpc", {"photos": len(photos), "identical": ours == single,
                              "first": {"photo": photos[0].name, "ensemble_top1": ours[0]["ensemble"][0]}})


def test_the_model_deployment_answers_from_both_nodes(app, repository):
    from ray import serve

    handle = serve.get_deployment_handle(MODEL, app_name="kestrel")
    batch = np.zeros((1, 224, 224, 3), np.uint8)
    nodes = set()
    deadline = time.monotonic() + 120
    while len(nodes) < 2 and time.monotonic() < deadline:
        responses = [handle.infer.remote(batch) for _ in range(8)]
        nodes |= {r.result(timeout_s=120)["node"] for r in responses}
    _record("model_replica_nodes", sorted(nodes))
    assert len(nodes) == 2, f"both replicas of {MODEL} answered from one node: {nodes}"


def _replica_pids(handle, timeout: float = 60.0) -> dict:
    """{pid: node} of the model deployment's replicas that answer probes now (8 concurrent probes a round)."""
    batch = np.zeros((1, 224, 224, 3), np.uint8)
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline:
        for response in [handle.infer.remote(batch) for _ in range(8)]:
            try:
                out = response.result(timeout_s=30)
                seen[out["pid"]] = out["node"]
            except Exception:  # a probe routed to the dead replica: not what is measured
                pass
    return seen


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["kestrel"].deployments[MODEL]
    return int(status.replica_states.get("RUNNING", 0))


def test_a_killed_replica_under_load_loses_no_request_and_comes_back(app, tmp_path):
    _http_port, grpc_port = app
    from serve import KestrelClient

    assert _running_replicas() == 2
    photos = _inputs(tmp_path)
    images = [p.read_bytes() for p in photos]
    counts = {"ok": 0, "failed": 0, "after_kill_ok": 0}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed_at: list[float] = []

    def load(worker: int):
        with KestrelClient(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            i = worker
            while not stop.is_set():
                with lock:
                    if counts["ok"] + counts["failed"] >= LOAD_MAX_REQUESTS:
                        return
                try:
                    client.classify(images[i % len(images)], [MODEL], top_k=1)
                    with lock:
                        counts["ok"] += 1
                        if killed_at:
                            counts["after_kill_ok"] += 1
                except Exception as exc:  # counted, never raised: the load goes on
                    with lock:
                        counts["failed"] += 1
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                i += LOAD_THREADS

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(LOAD_THREADS)]
    t_start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(8)  # load running on both replicas
    from ray import serve

    handle = serve.get_deployment_handle(MODEL, app_name="kestrel")
    before = _replica_pids(handle)
    assert len(before) == 2, f"expected 2 replicas of {MODEL} to answer, saw {before}"
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)  # a crash, not a graceful stop
    killed_at.append(time.monotonic())
    # Ray notices, starts a new replica: timed until 2 replicas are RUNNING again and two
    # replicas other than the victim answer
    recovered_s = None
    while time.monotonic() - killed_at[0] < RECOVERY_LIMIT_S:
        if _running_replicas() == 2:
            after = _replica_pids(handle, timeout=5)
            if len(after) == 2 and victim not in after:
                recovered_s = time.monotonic() - killed_at[0]
                break
        time.sleep(0.5)
    # keep the load on a little past recovery, within the bound
    while time.monotonic() - t_start < LOAD_SECONDS and recovered_s is not None and \
            time.monotonic() - killed_at[0] < recovered_s + 5:
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(120)
    result = {"requests": counts["ok"] + counts["failed"], "succeeded": counts["ok"], "failed": counts["failed"],
              "succeeded_after_kill": counts["after_kill_ok"], "replica_restored_s": recovered_s,
              "load_threads": LOAD_THREADS, "killed_pid": victim, "replicas_before": before,
              "resent_after_replica_death": serve.get_deployment_handle("KestrelIngress", app_name="kestrel")
              .resent.remote().result(timeout_s=30)[MODEL], "errors": errors[:5]}
    _record("replica_kill", result)
    assert recovered_s is not None, f"Ray did not bring the replica back within {RECOVERY_LIMIT_S} s"
    assert counts["after_kill_ok"] > 0, "no request succeeded after the kill"
    assert counts["failed"] <= max(1, counts["ok"] // 50), f"{counts['failed']} requests failed: {errors[:5]}"
