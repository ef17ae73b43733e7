"""Optional TLS, and the public surface of `serve` (httpx-style: a test guards __all__)."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from serve_helpers import ROOT, png_bytes

EXPECTED_ALL = [
    "BatchResult", "ConfigError", "DeadlineExceededError", "DynamicBatcher", "EngineMismatchError", "Ensemble",
    "FUSIONS", "ImageDecodeError", "InvalidInputError", "KestrelClient", "KestrelError", "Metrics",
    "MissingDependencyError", "ModelEntry", "ModelHub", "ModelLoadError", "ModelNotFoundError", "ModelRepository",
    "ResourceExhaustedError", "Runner", "Server", "TensorSpec", "create_runner", "create_server", "fuse", "images",
    "make_config", "rank", "read_config", "register", "top_k", "write_config",
]


def test_public_surface():
    import serve

    assert sorted(serve.__all__) == sorted(EXPECTED_ALL)
    for name in serve.__all__:
        assert getattr(serve, name) is not None, name
    assert set(EXPECTED_ALL) <= set(dir(serve))
    with pytest.raises(AttributeError):
        serve.no_such_thing


def test_import_serve_loads_no_generated_code_or_runtimes():
    """A process that imports tritonclient can still `import serve` (no `inference` package clash)."""
    code = ("import sys, serve; bad = [m for m in sys.modules if m.startswith('serve._proto') or "
            "m.split('.')[0] in ('onnxruntime', 'tensorflow', 'tritonclient')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; cannot make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return folder / "cert.pem", folder / "key.pem"


def test_tls(fake_repo, certificate):
    from serve import KestrelClient, create_server
    from serve.errors import KestrelError

    cert, key = certificate
    server, port = create_server(fake_repo, models=["a"], port=0, tls_cert=cert, tls_key=key)
    try:
        picture = png_bytes(np.zeros((20, 20, 3), np.uint8))
        with KestrelClient(f"127.0.0.1:{port}", tls_ca=cert, timeout=10) as client:
            client.wait_ready(10)
            assert client.classify(picture, ["a"]).results[0].model == "a"
        with KestrelClient(f"127.0.0.1:{port}", timeout=3) as plain, pytest.raises(KestrelError) as info:
            plain.classify(picture, ["a"])
        assert info.value.code.name == "UNAVAILABLE"
    finally:
        server.stop(1)


def test_tls_covers_the_http_port_too(fake_repo, certificate):
    """--tls-cert/--tls-key serve HTTPS on the HTTP port (a token travels encrypted); plain HTTP is refused."""
    import http.client
    import ssl

    from serve import create_server

    cert, key = certificate
    server, _ = create_server(fake_repo, models=["a"], port=0, http_port=0, tls_cert=cert, tls_key=key)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", server.http_port, timeout=10, context=context)
        conn.request("GET", "/v2/models/a/ready")
        assert conn.getresponse().status == 200
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/v2/health/live")
            plain.getresponse()
    finally:
        server.stop(1)
