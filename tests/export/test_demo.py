"""`make demo`'s orchestration: skip what is exported, serve, classify through the client, stop.

The export step itself is covered by test_export.py; here the repository already
holds (fake-backend) models, so the demo runs without TensorFlow in seconds.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from serve.backends.fake import write_fake_model

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_and_prints_each_models_top3_and_the_ensemble(tmp_path, python_env):
    repo = tmp_path / "models"
    labels = [f"kind_{i}" for i in range(10)]
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_fake_model(repo, name, labels=labels, seed=seed)
        write_fake_model(repo, f"{name}_keras", labels=labels, seed=seed)  # "already exported"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")

    result = subprocess.run(
        [sys.executable, "-m", "export.demo", "--models", "alpha,beta", "--repository", str(repo),
         "--port", "0", "--http-port", "0", "--photos", str(photos)],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "alpha: already in" in out and "beta: already in" in out
    for photo in ("p0.png", "p1.png"):
        assert photo in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("alpha", "beta", "imagenet"))]
    assert {row[0] for row in rows} == {"alpha", "beta", "imagenet"}
    # each row names three labels (the top 3)
    assert all(sum(token.startswith("kind_") for token in row) == 3 for row in rows)
    assert "server stopped" in result.stderr


def test_demo_without_any_exportable_model_fails_clearly(tmp_path, python_env):
    result = subprocess.run(
        [sys.executable, "-m", "export.demo", "--models", "not_an_app", "--repository", str(tmp_path / "m"),
         "--port", "0", "--photos", str(tmp_path)],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "unknown" in result.stderr.lower() and "no model could be exported" in result.stderr


def test_demo_serves_three_members_of_different_sizes_one_a_keras_file_as_a_repository_ensemble(tmp_path, python_env):
    """The offline default's shape: two applications and a user's .keras file (named by its stem),
    of different input sizes, defined as one ensemble in the repository and served together."""
    from serve.repository import ModelRepository

    repo = tmp_path / "models"
    labels = [f"kind_{i}" for i in range(10)]
    for name, seed, size in (("alpha", 1, (32, 32)), ("beta", 2, (48, 40)), ("gamma", 3, (40, 40))):
        for suffix in ("", "_keras"):
            write_fake_model(repo, name + suffix, labels=labels, seed=seed, size=size)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)).save(photos / "p.png")
    user_file = tmp_path / "mine" / "gamma.keras"  # already exported: only its name matters here

    result = subprocess.run(
        [sys.executable, "-m", "export.demo", "--models", f"alpha,beta,{user_file}", "--repository", str(repo),
         "--port", "0", "--http-port", "0", "--photos", str(photos), "--fusion", "geometric"],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gamma: already in" in result.stdout
    ensemble = ModelRepository(repo).ensemble("imagenet")
    assert ensemble.members == ("alpha", "beta", "gamma") and ensemble.fusion == "geometric"
    rows = [line.split() for line in result.stdout.splitlines()
            if line.strip().startswith(("alpha", "beta", "gamma", "imagenet"))]
    assert [row[0] for row in rows] == ["alpha", "beta", "gamma", "imagenet"]
    assert all(sum(token.startswith("kind_") for token in row) == 3 for row in rows)
    assert all("ms" in row for row in rows[:3])  # each member's time
    assert "[geometric]" in rows[3]


def _fake_pair(tmp_path):
    repo = tmp_path / "models"
    labels = [f"kind_{i}" for i in range(10)]
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_fake_model(repo, name, labels=labels, seed=seed)
        write_fake_model(repo, f"{name}_keras", labels=labels, seed=seed)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(photos / "p0.png")
    return repo, photos


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_demo_port_choice_never_takes_a_port_nobody_asked_for():
    import socket

    from export.demo import choose_ports

    assert choose_ports(0, None)[:2] == (0, 0)  # --port 0: HTTP on any free port too (serve --help's rule)
    assert choose_ports(0, 9005)[:2] == (0, 9005)  # unless --http-port names one
    grpc_port, http_port = _free_ports(2)
    assert choose_ports(None, None, defaults=(grpc_port, http_port)) == (grpc_port, http_port, "")
    for busy_one in (grpc_port, http_port):  # another server on either default port: free ports for both
        with socket.socket() as other:
            other.bind(("127.0.0.1", busy_one))
            other.listen()
            port, http, note = choose_ports(None, None, defaults=(grpc_port, http_port))
            assert (port, http) == (0, 0) and f"port {busy_one} in use" in note
            # a port the user named is passed on as given: serve refuses it in one line if it is taken
            assert choose_ports(busy_one, None, defaults=(grpc_port, http_port))[:2] == (busy_one, http_port)


def test_demo_with_port_0_serves_its_web_page_on_a_free_http_port(tmp_path, python_env):
    """`kestrel demo --port 0` used to pass --http-port 8000 itself, failing beside another server."""
    import re
    import signal
    import time
    import urllib.request

    repo, photos = _fake_pair(tmp_path)
    demo = subprocess.Popen([sys.executable, "-m", "kestrel", "demo", "--models", "alpha,beta", "--repository",
                             str(repo), "--port", "0", "--photos", str(photos), "--keep-serving"],
                            cwd=ROOT, env=python_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            found = re.search(r"still serving: gRPC 127\.0\.0\.1:\d+; web page (http://127\.0\.0\.1:(\d+)/)", line)
            if found:
                url, http_port = found.group(1), int(found.group(2))
        assert url is not None, "the demo never said where its web page is"
        assert http_port != 8000
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
