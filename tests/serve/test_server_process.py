"""`python -m serve` as a process: start-up log and port file, start-up errors, --strict, graceful SIGTERM."""

import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from serve_helpers import ROOT, png_bytes
from serve.backends.fake import write_fake_model

PICTURE = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)


def _run(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_starts_logs_serves_and_scrapes(serve_process, fake_repo):
    from serve import KestrelClient

    proc = serve_process("--repository", str(fake_repo), "--models", "a,b", "--ensemble", "ab=a,b:max-confidence",
                         "--metrics-port", "0")
    log = proc.output()
    assert f"listening on grpc://127.0.0.1:{proc.port}" in log and "models ready: a, b" in log
    assert "ensembles: ab" in log and f"metrics on http://127.0.0.1:{proc.metrics_port}/metrics" in log
    with KestrelClient(proc.address) as client:
        client.wait_ready(10)
        response = client.classify(png_bytes(PICTURE), ["ab"], top_k=3)
        assert response.ensembles[0].fusion == "max-confidence" and len(response.results) == 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kestrel_requests_total{api="classify",model="ab"} 1.0' in text
    assert 'kestrel_batch_size_count{model="a"} 1.0' in text
    assert proc.stop() == 0
    assert "server stopped" in proc.output()


def test_failed_model_is_reported_and_strict_refuses_to_start(serve_process, fake_repo, subprocess_env):
    proc = serve_process("--repository", str(fake_repo), "--models", "a,broken", "--metrics-port", "-1")
    assert "model broken is UNAVAILABLE: fake model 'broken': simulated load failure" in proc.output()
    proc.stop()
    result = _run(["--repository", str(fake_repo), "--models", "a,broken", "--strict", "--port", "0",
                   "--metrics-port", "-1"], subprocess_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model 'broken' failed to load (--strict): fake model 'broken': simulated load failure")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--ensemble", "e=a,odd"], "error: ensemble 'e': member 'odd' has 7 classes but 'a' has 10; members must share one label set"),
    (["--ensemble", "e=a,ghost"], "error: model 'ghost' is not in repository"),
    (["--models", "a", "--ensemble", "e"], "error: invalid ensemble 'e'; expected NAME=model1,model2"),
    (["--tls-cert", "/nonexistent.pem"], "error: TLS needs both a certificate and a key"),
])
def test_start_up_errors_are_one_clear_line(fake_repo, subprocess_env, args, message):
    result = _run(["--repository", str(fake_repo), "--port", "0", "--metrics-port", "-1", *args], subprocess_env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_empty_repository_is_an_error(tmp_path, subprocess_env):
    result = _run(["--repository", str(tmp_path), "--port", "0", "--metrics-port", "-1"], subprocess_env)
    assert result.returncode == 1 and "holds no models" in result.stderr


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(serve_process, tmp_path):
    from serve import KestrelClient
    from serve.errors import KestrelError

    repo = tmp_path / "repo"
    write_fake_model(repo, "sleepy", classes=3, delay_ms=1500)
    proc = serve_process("--repository", str(repo), "--metrics-port", "-1", "--grace", "10")
    outcome = {}

    def in_flight():
        with KestrelClient(proc.address, timeout=20) as client:
            t0 = time.perf_counter()
            outcome["response"] = client.classify(png_bytes(PICTURE), ["sleepy"], top_k=1)
            outcome["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(0.4)  # the request is running (1.5 s)
    t_signal = time.perf_counter()
    proc.proc.send_signal(15)
    time.sleep(0.3)
    with KestrelClient(proc.address, timeout=5) as client, pytest.raises(KestrelError) as refused:
        client.classify(png_bytes(PICTURE), ["sleepy"])
    assert refused.value.code.name == "UNAVAILABLE"
    thread.join(20)
    assert outcome["response"].results[0].model == "sleepy"  # finished, not cut off
    assert proc.proc.wait(20) == 0
    assert time.perf_counter() - t_signal < 8  # did not wait for the whole grace period
    log = proc.output()
    assert "received SIGTERM" in log and "shutting down" in log and "server stopped" in log


def test_a_second_signal_exits_at_once(serve_process, tmp_path):
    from serve import KestrelClient

    repo = tmp_path / "repo"
    write_fake_model(repo, "sleepy", classes=3, delay_ms=5000)
    proc = serve_process("--repository", str(repo), "--metrics-port", "-1", "--grace", "30")

    def in_flight():
        with KestrelClient(proc.address, timeout=20) as client:
            try:
                client.classify(png_bytes(PICTURE), ["sleepy"])
            except Exception:
                pass  # the server goes away under it

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    time.sleep(0.4)
    t0 = time.perf_counter()
    proc.proc.send_signal(15)
    time.sleep(0.3)
    proc.proc.send_signal(2)
    assert proc.proc.wait(10) == 1
    assert time.perf_counter() - t0 < 4  # neither the 5 s request nor the 30 s grace period
    assert "received SIGINT again: exiting without waiting" in proc.output()
