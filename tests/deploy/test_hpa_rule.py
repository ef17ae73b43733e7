"""The HPA's metric, evaluated for real: Debian's Prometheus scrapes a Kestrel server's /metrics and runs the
prometheus-adapter rule's query (deploy/k8s/plain/prometheus-adapter-rules.yaml) with the labels and grouping
the adapter would fill in. Idle, the queue time per request reads 0 (not a huge number from dividing by a
clamped zero, which would scale the Deployment to its maximum); under load it reads a finite positive value
close to Kestrel's own mean queue time; a window with queue time but no successful request reads 0 too.

Skipped without a `prometheus` binary (`apt-get install prometheus`; .ci/run installs it). The rule's 1 m
windows become 4 s here and Prometheus scrapes every 0.5 s, so the test takes ~15 s."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "k8s" / "plain" / "prometheus-adapter-rules.yaml"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _query_text() -> str:
    rule = yaml.safe_load(RULES.read_text())["rules"]["custom"][0]
    query = rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query and "[1m]" in query
    return (query.replace("<<.LabelMatchers>>", 'namespace="ns",pod="pod-0"').replace("<<.GroupBy>>", "pod")
            .replace("[1m]", "[4s]"))


class Prometheus:
    def __init__(self, target_port: int, work: Path):
        self.port = _free_port()
        config = {"global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                  "scrape_configs": [{"job_name": "kestrel", "scrape_interval": "500ms", "scrape_timeout": "400ms",
                                      "static_configs": [{"targets": [f"127.0.0.1:{target_port}"],
                                                          "labels": {"namespace": "ns", "pod": "pod-0"}}]}]}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(work / "prometheus.log", "w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def wait_scrapes(self, count: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                found = self.query('count_over_time(up{job="kestrel"}[10s])')
                if found and float(found[0]["value"][1]) >= count and self.query('up{job="kestrel"}')[0]["value"][1] == "1":
                    return
            except (OSError, AssertionError, IndexError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"Prometheus did not scrape Kestrel {count} times in {timeout} s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _eventually(read, good, what: str, timeout: float = 15.0):
    """read() until good(value) (Prometheus scrapes every 0.5 s and evaluates over 4 s windows)."""
    end = time.monotonic() + timeout
    while True:
        value = read()
        if good(value) or time.monotonic() > end:
            assert good(value), f"{what}: still {value} after {timeout} s"
            return value
        time.sleep(0.25)


def _value(result: list) -> float:
    assert len(result) == 1, f"the rule returned {result}: expected one value for the pod"
    return float(result[0]["value"][1])


@pytest.mark.timeout(120)
def test_the_hpa_queue_time_rule_reads_zero_when_idle_and_the_queue_time_under_load(tmp_path):
    from serve import create_server
    from serve.backends.fake import write_fake_model

    write_fake_model(tmp_path / "repo", "m", classes=4, delay_ms=30, max_batch_size=2, max_queue_delay_us=0)
    write_fake_model(tmp_path / "repo", "late", classes=4, delay_ms=300, max_queue_delay_us=0)
    server, _ = create_server(tmp_path / "repo", port=0, metrics_port=0)
    prometheus = Prometheus(server.metrics_port, tmp_path)
    query = _query_text()
    try:
        prometheus.wait_scrapes(6)
        idle = _value(prometheus.query(query))
        assert idle == 0.0  # idle: no queue time, and no division by a clamped zero

        stop = threading.Event()

        def load(model):
            from serve import KestrelClient

            batch = np.zeros((1, 32, 32, 3), np.uint8)
            with KestrelClient(f"127.0.0.1:{server.port}", timeout=10) as client:
                while not stop.is_set():
                    try:
                        client.infer(model, batch)
                    except Exception:  # noqa: BLE001 - a busy moment is not this test's concern
                        pass

        threads = [threading.Thread(target=load, args=("m",)) for _ in range(6)]
        for t in threads:
            t.start()
        loaded = _eventually(lambda: _value(prometheus.query(query)), lambda v: v > 0, "the load to show")
        stop.set()
        for t in threads:
            t.join(10)
        snap = server.hub.models["m"].stats.snapshot()
        mean_queue_us = snap["queue"][1] / 1e3 / max(1, snap["queue"][0])
        assert math.isfinite(loaded) and loaded > 0
        assert loaded < 20 * mean_queue_us + 1e5  # the same order as Kestrel's own mean (windows differ)
        _eventually(lambda: _value(prometheus.query(query)), lambda v: v == 0.0, "the load to leave the window")

        # a window with queue time and no success (a request that ran past its deadline): a clamped division
        # would read the queue time / 0.001, a huge value; the rule reads 0
        from serve import KestrelClient
        from serve.errors import KestrelError

        with KestrelClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            with pytest.raises(KestrelError) as info:
                client.infer("late", np.zeros((1, 32, 32, 3), np.uint8), timeout=0.1)
        assert info.value.code.name == "DEADLINE_EXCEEDED"
        late = server.hub.models["late"].stats
        deadline = time.monotonic() + 5
        while late.snapshot()["queue"][0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the batch ends 300 ms after it began: its queue time is recorded then

        def window():
            queued = _value(prometheus.query('sum(rate(nv_inference_queue_duration_us{pod="pod-0"}[4s])) by (pod)'))
            succeeded = _value(prometheus.query('sum(rate(nv_inference_request_success{pod="pod-0"}[4s])) by (pod)'))
            return queued, succeeded, _value(prometheus.query(query))

        queued, succeeded, value = _eventually(window, lambda w: w[0] > 0 and w[1] == 0, "the late request's window")
        assert value == 0.0  # the case the guard is for: queue time, no success
    finally:
        prometheus.close()
        server.stop(grace=1.0)
