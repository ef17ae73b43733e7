"""A bounded load test (slow): 16 concurrent clients for 20 s against `python -m serve`.

The model is models/mobilenet_v2 on onnxruntime when `python -m export mobilenet_v2`
has produced it (or KESTREL_LOAD_REPOSITORY points at a repository holding it),
else the tiny ONNX model from conftest. Clients send real photos (../shared/photos,
else synthetic JPEGs) through Classify, the product's front door. Passes with zero
errors, flat server memory (RSS after warm-up vs at the end) and a mean executed
batch size above 1 (requests really were batched).

    KESTREL_LOAD_SECONDS=20 KESTREL_LOAD_CLIENTS=16 pytest -m slow tests/serve/test_load.py -s
"""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import PHOTOS, ROOT, png_bytes, write_tiny_onnx

SECONDS = float(os.environ.get("KESTREL_LOAD_SECONDS", "20"))
CLIENTS = int(os.environ.get("KESTREL_LOAD_CLIENTS", "16"))
WARMUP = float(os.environ.get("KESTREL_LOAD_WARMUP", "5"))
RSS_GROWTH_LIMIT_MB = 64


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _model(tmp_path) -> tuple[Path, str]:
    pytest.importorskip("onnxruntime")
    repo = Path(os.environ.get("KESTREL_LOAD_REPOSITORY", ROOT / "models"))
    if (repo / "mobilenet_v2" / "config.pbtxt").is_file() and any((repo / "mobilenet_v2").glob("*/model.onnx")):
        return repo, "mobilenet_v2"
    write_tiny_onnx(tmp_path / "repo", "tiny", size=(224, 224), max_batch_size=32)
    return tmp_path / "repo", "tiny"


def _pictures() -> list[bytes]:
    if PHOTOS.is_dir():
        from serve import images

        found = [p.read_bytes() for p in images.find_images(PHOTOS)]
        if found:
            return found
    rng = np.random.default_rng(0)
    return [png_bytes(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "JPEG") for _ in range(8)]


def _stats(client, model):
    from serve._proto import grpc_service_pb2 as pb

    s = client.v2.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
    return s.inference_count, s.execution_count


@pytest.mark.slow
def test_sixteen_clients_for_twenty_seconds(serve_process, tmp_path):
    from serve import KestrelClient

    repo, model = _model(tmp_path)
    proc = serve_process("--repository", str(repo), "--models", model, "--metrics-port", "0",
                         "--log-level", "WARNING", timeout=180)
    pictures = _pictures()
    stop = threading.Event()
    measuring = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(index: int):
        with KestrelClient(proc.address, timeout=30) as client:
            i = index
            while not stop.is_set():
                data = pictures[i % len(pictures)]
                i += 1
                t0 = time.perf_counter()
                try:
                    client.classify(data, [model], top_k=3)
                except Exception as exc:  # every failure counts
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if measuring.is_set():
                    with lock:
                        latencies.append(time.perf_counter() - t0)

    with KestrelClient(proc.address) as probe:
        probe.wait_ready(60)
        # warm-up: every batch size once, so the runtime's memory arena reaches its working size before
        # RSS is first read (it grows with the largest batch seen), then a few seconds of the real load
        from serve._proto import grpc_service_pb2 as pb

        config = probe.v2.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
        height, width = config.input[0].dims[0], config.input[0].dims[1]
        for size in range(1, config.max_batch_size + 1):
            probe.infer(model, np.zeros((size, height, width, 3), np.uint8), timeout=60)
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(WARMUP)
        rss_start = _rss_mb(proc.proc.pid)
        images0, batches0 = _stats(probe, model)
        measuring.set()
        t_start = time.perf_counter()
        samples = []
        while time.perf_counter() - t_start < SECONDS:
            time.sleep(1.0)
            samples.append(_rss_mb(proc.proc.pid))
        measuring.clear()
        elapsed = time.perf_counter() - t_start
        rss_end = _rss_mb(proc.proc.pid)
        images1, batches1 = _stats(probe, model)
        stop.set()
        for t in threads:
            t.join(30)
    mean_batch = (images1 - images0) / max(1, batches1 - batches0)
    lat = np.array(latencies) * 1e3
    report = {
        "model": model, "clients": CLIENTS, "seconds": round(elapsed, 1), "requests": len(latencies),
        "errors": len(errors), "throughput_rps": round(len(latencies) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "mean_executed_batch": round(mean_batch, 2), "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1), "rss_mb_max": round(max(samples), 1),
        "rss_mb_per_second": [round(x) for x in samples],
    }
    print("\nLOAD TEST " + json.dumps(report))
    assert proc.stop() == 0
    assert not errors, errors[:5]
    assert len(latencies) > CLIENTS
    assert mean_batch > 1.0, report
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_MB, report


EXPECTED_TOP1 = {"cat.bmp": "Egyptian_cat", "hot_dog.jpg": "hotdog", "parrot.jpg": "macaw"}


@pytest.mark.shared_data
def test_exported_mobilenet_v2_classifies_real_photos(tmp_path):
    """With `python -m export mobilenet_v2` (ImageNet weights) done, the server names real photos right,
    and Classify equals in-process decode + inference. Skipped when no exported model is there."""
    pytest.importorskip("onnxruntime")
    repo = Path(os.environ.get("KESTREL_LOAD_REPOSITORY", ROOT / "models"))
    entry_dir = repo / "mobilenet_v2"
    if not any(entry_dir.glob("*/model.onnx")):
        pytest.skip(f"no exported mobilenet_v2 in {repo} (python -m export mobilenet_v2)")
    export_info = next(entry_dir.glob("*/export.json"), None)
    if export_info is None or '"imagenet"' not in export_info.read_text():
        pytest.skip("the exported mobilenet_v2 does not carry ImageNet weights")
    from serve import KestrelClient, ModelRepository, create_runner, create_server, images

    server, port = create_server(repo, models=["mobilenet_v2"], port=0)
    entry = ModelRepository(repo).entry("mobilenet_v2")
    runner = create_runner(entry).load()
    try:
        with KestrelClient(f"127.0.0.1:{port}", timeout=60) as client:
            for name, label in EXPECTED_TOP1.items():
                data = (PHOTOS / name).read_bytes()
                result = client.classify(data, ["mobilenet_v2"], top_k=3).results[0]
                assert result.predictions[0].label == label, (name, result.predictions)
                local = runner.infer(images.load(data, runner.image_size, mode=entry.resize)[None])[0]  # as served
                assert result.predictions[0].index == int(np.argmax(local))
                np.testing.assert_allclose(result.predictions[0].probability, local.max(), rtol=1e-4)
    finally:
        runner.close()
        server.stop(1)
