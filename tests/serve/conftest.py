"""Fixtures for the server tests: fake-model repositories, a running server, a tiny real ONNX model.

Most tests use the dependency-free fake backend (serve/backends/fake.py); the
ONNX fixture builds a 5-node model with onnx.helper in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_helpers import LABELS, ROOT


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory) -> Path:
    """a, c: 32x32; b: 48x40 (same 10 labels); odd: other labels; broken: fails to load;
    slow: 80 ms per batch, not thread-safe, queue of 2. Other test files assert this exact set:
    add models for new tests in their own repositories, not here."""
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("fake_repo")
    write_fake_model(root, "a", classes=10, labels=LABELS, seed=1)
    write_fake_model(root, "b", classes=10, labels=LABELS, seed=2, size=(48, 40))
    write_fake_model(root, "c", classes=10, labels=LABELS, seed=3)
    write_fake_model(root, "odd", classes=7, seed=4)
    write_fake_model(root, "broken", classes=10, labels=LABELS, fail_load="simulated load failure")
    write_fake_model(root, "slow", classes=10, labels=LABELS, delay_ms=80, thread_safe=False, max_queue_size=2,
                     max_queue_delay_us=0, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
def server(fake_repo):
    """A running server over fake_repo with ensembles trio=a,b,c (mean) and pair=a,c (majority)."""
    from serve import create_server

    srv, port = create_server(fake_repo, ensembles=["trio=a,b,c", "pair=a,c:majority"], port=0, metrics_port=0)
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def address(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(address):
    from serve import KestrelClient

    with KestrelClient(address, timeout=10) as c:
        yield c


@pytest.fixture
def v2(address):
    """The generated V2 stub over an insecure channel with 64 MB limits."""
    import grpc

    from serve._proto import grpc_service_pb2_grpc
    from serve.server import message_options

    channel = grpc.insecure_channel(address, options=message_options(64))
    yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture
def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """`python -m serve ... --port 0 --port-file F` in a subprocess; waits for the port file."""

    def __init__(self, args: list[str], env: dict, tmp: Path, timeout: float = 60.0):
        self.port_file = tmp / f"port-{time.monotonic_ns()}.json"
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--port", "0", "--port-file", str(self.port_file), *args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start (exit {self.proc.returncode}):\n{self.output()}")
            time.sleep(0.05)
        info = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        self.address = f"127.0.0.1:{self.port}"

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def serve_process(subprocess_env, tmp_path):
    """Factory: start `python -m serve` with extra args; every process is stopped at teardown."""
    started: list[ServeProcess] = []

    def start(*args: str, **kw) -> ServeProcess:
        proc = ServeProcess(list(args), subprocess_env, tmp_path, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
