"""Starting and stopping the processes a benchmark drives: the server, the Flask app, locust.

Every process listens on 127.0.0.1 with a port the OS picked (port 0), every
wait is bounded, and every process is stopped (SIGTERM, then SIGKILL) by
its own id, with its output kept in a log file for the report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from serve.errors import KestrelError

ROOT = Path(__file__).resolve().parents[1]


class BenchmarkError(KestrelError):
    """A benchmark step failed (a process did not start, a run produced nothing...)."""


def python_env(extra: dict | None = None) -> dict:
    """Environment for child processes running this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Process:
    """A child process with its log file; `stop()` is idempotent."""

    def __init__(self, name: str, command: list[str], log_path: Path, *, env: dict | None = None,
                 cwd: Path = ROOT):
        self.name = name
        self.command = command
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env or python_env(),
                                      cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)  # its own session: the process and its children
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode


def wait_for(predicate, *, timeout: float, interval: float = 0.2, process: Process | None = None,
             what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value; fail on timeout or when `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and not process.alive():
            raise BenchmarkError(f"{process.name} exited (code {process.popen.returncode}) before {what}; "
                                 f"last output ({process.log_path}):\n{process.log_tail()}")
        time.sleep(interval)
    tail = f"; last output ({process.log_path}):\n{process.log_tail()}" if process is not None else ""
    raise BenchmarkError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


# ---- the Kestrel server ---------------------------------------------------------------------
class KestrelServer:
    """`python -m serve` on 127.0.0.1, a free port, the given models; ready when health says SERVING."""

    def __init__(self, repository: Path, models: list[str], log_path: Path, *, extra_args: list[str] = (),
                 env: dict | None = None):
        self.port_file = log_path.with_suffix(".port.json")
        self.port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "serve", "--repository", str(repository), "--models", ",".join(models),
                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(self.port_file),
                   "--log-level", "WARNING", *extra_args]
        self.process = Process("the Kestrel server", command, log_path, env=env)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        def port():
            try:
                return json.loads(self.port_file.read_text())
            except (OSError, ValueError):
                return None

        info = wait_for(port, timeout=timeout, process=self.process, what="the server to listen")
        self.port, self.metrics_port, self.http_port = int(info["port"]), info.get("metrics_port"), info.get("http_port")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving():
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            wait_for(serving, timeout=timeout, process=self.process, what="health SERVING")

    def model_states(self, models: list[str]) -> dict[str, tuple[bool, str]]:
        """{model: (ready, reason)} from the V2 API (RepositoryIndex for the reasons)."""
        import grpc

        from serve._proto import grpc_service_pb2 as v2
        from serve._proto import grpc_service_pb2_grpc as v2_grpc

        out = {}
        with grpc.insecure_channel(self.address) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            reasons = {}
            try:
                for m in stub.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10).models:
                    reasons[m.name] = m.reason or m.state
            except grpc.RpcError:
                pass
            for name in models:
                try:
                    ready = stub.ModelReady(v2.ModelReadyRequest(name=name), timeout=10).ready
                except grpc.RpcError as exc:
                    ready, reasons[name] = False, f"{exc.code().name}: {exc.details()}"
                out[name] = (bool(ready), "" if ready else reasons.get(name, "not ready"))
        return out

    def counts(self, model: str) -> tuple[int, int] | None:
        """(images inferred, batches executed) so far for `model`, from V2 ModelStatistics."""
        import grpc

        from serve._proto import grpc_service_pb2 as v2
        from serve._proto import grpc_service_pb2_grpc as v2_grpc

        try:
            with grpc.insecure_channel(self.address) as channel:
                stats = v2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                    v2.ModelStatisticsRequest(name=model), timeout=10)
        except grpc.RpcError:
            return None
        for entry in stats.model_stats:
            if entry.name == model:
                return int(entry.inference_count), int(entry.execution_count)
        return None

    def stop(self) -> int | None:
        return self.process.stop(timeout=30)


# ---- the Flask reference --------------------------------------------------------------------
_LISTEN = re.compile(r"listening on (http://[0-9.]+:\d+)")


class FlaskReference:
    """benchmarks/flask_app.py on 127.0.0.1, a free port."""

    def __init__(self, source_args: list[str], log_path: Path, *, env: dict | None = None):
        command = [sys.executable, "-m", "benchmarks.flask_app", *source_args, "--host", "127.0.0.1", "--port", "0"]
        self.process = Process("the Flask reference app", command, log_path, env=env)
        self.url: str | None = None

    def wait_ready(self, timeout: float) -> None:
        def listening():
            match = _LISTEN.search(self.process.log_tail(200))
            return match.group(1) if match else None

        self.url = wait_for(listening, timeout=timeout, process=self.process, what="the Flask app to listen")

    def stop(self) -> int | None:
        return self.process.stop(timeout=15)


# ---- one locust run -------------------------------------------------------------------------
def locust_command(locustfile: Path, *, users: int, run_time_s: float, host: str, csv_prefix: Path,
                   options: dict[str, object]) -> list[str]:
    """`locust -f FILE --headless -u N -r N --run-time Xs --csv PREFIX --only-summary ...`."""
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users),
               "-r", str(users), "--run-time", f"{int(round(run_time_s))}s", "--host", host,
               "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "0"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def run_to_end(name: str, command: list[str], log_path: Path, *, timeout: float, env: dict | None = None) -> int:
    """Run one process to completion (bounded; stopped with its children after `timeout`, then
    BenchmarkError); returns its exit code."""
    process = Process(name, command, log_path, env=env)
    try:
        return process.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.stop(timeout=5)
        raise BenchmarkError(f"{name} did not finish within {timeout:.0f} s; see {log_path}") from None
    finally:
        process.stop(timeout=5)


def run_locust(command: list[str], log_path: Path, *, timeout: float, env: dict | None = None) -> int:
    """Run one locust process to completion (bounded); returns its exit code (1 = some requests failed)."""
    return run_to_end("locust", command, log_path, timeout=timeout, env=env)
