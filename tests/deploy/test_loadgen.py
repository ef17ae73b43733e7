"""deploy/loadgen.py against a real server on 127.0.0.1 (fake model): bounded in requests and time."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    from serve import create_server
    from serve.backends.fake import write_fake_model

    root = tmp_path_factory.mktemp("loadgen_repo")
    write_fake_model(root, "m", classes=5, size=(32, 32), delay_ms=2)
    server, port = create_server(root, port=0)
    yield f"127.0.0.1:{port}"
    server.stop(grace=1.0)


def test_a_level_counts_answers_and_percentiles(address):
    from deploy.loadgen import _payloads, run_level

    result = run_level(address, "m", "infer", 2, 10.0, _payloads("infer", None, (32, 32)), max_requests=30)
    assert result["requests"] >= 30 and result["failures"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["seconds"] < 10.0  # stopped by max_requests


def test_cli_classify_writes_json_and_counts_failures(address, tmp_path, capsys):
    from deploy.loadgen import main

    out = tmp_path / "r.json"
    assert main(["--address", address, "--model", "m", "--api", "classify", "--concurrency", "1,2",
                 "--seconds", "5", "--max-requests", "10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [level["concurrency"] for level in data["levels"]] == [1, 2]
    assert all(level["requests"] >= 10 and level["failures"] == 0 for level in data["levels"])
    assert "req/s" in capsys.readouterr().out
    assert main(["--address", address, "--model", "nope", "--api", "classify", "--concurrency", "1",
                 "--seconds", "0.5", "--json", str(out)]) == 0
    bad = json.loads(out.read_text())["levels"][0]
    assert bad["requests"] == 0 and bad["failures"] > 0 and "nope" in bad["first_errors"][0]
