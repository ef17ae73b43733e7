"""The natural mistakes of `kestrel serve` and `kestrel classify`, each answered with what is wrong and what to do.

serve: a repository that does not exist or is a file, two flags naming one port, a busy port (found before any
model loads, one line, none of gRPC's C-core log), an address that is not this machine's. classify: --top-k
(0 = the server's default, negative refused before any request), every prediction the server returned printed,
--address with --port refused, pointed at the server's HTTP port, the photo's own size beside the decoded one.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serve_helpers import ROOT, png_bytes

PICTURE = np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def _serve(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _classify(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "serve.client", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def listener():
    """A port something already listens on (127.0.0.1)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


# ---- kestrel serve -------------------------------------------------------------------------------------------
def test_a_repository_that_does_not_exist_or_is_a_file_is_named_as_such(tmp_path, capsys):
    from serve.__main__ import main

    missing = tmp_path / "no_such_folder"
    assert main(["--repository", str(missing), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"--repository {missing}: the folder does not exist" in err and "holds no models" not in err
    assert not missing.exists()  # nothing created on the way

    a_file = tmp_path / "models.txt"
    a_file.write_text("not a repository")
    assert main(["--repository", str(a_file), "--port", "0"]) == 2
    assert f"--repository {a_file}: is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, first, second", [
    (["--port", "9123", "--http-port", "9123"], "--port", "--http-port"),
    (["--port", "9124", "--metrics-port", "9124"], "--port", "--metrics-port"),
    (["--port", "0", "--http-port", "9125", "--metrics-port", "9125"], "--http-port", "--metrics-port"),
])
def test_two_flags_naming_one_port_are_both_named(fake_repo, capsys, args, first, second):
    from serve.__main__ import main

    assert main(["--repository", str(fake_repo), *args]) == 2
    err = capsys.readouterr().err.strip()
    port = args[args.index(second) + 1]
    assert err == (f"error: {first} {port} and {second} {port} name the same port; give each its own "
                   "(0 = any free port)")


def test_port_zero_twice_is_fine_and_a_port_out_of_range_is_refused(fake_repo, capsys):
    from serve.__main__ import check_ports

    assert check_ports({"--port": 0, "--http-port": 0, "--metrics-port": 0}) is None
    assert check_ports({"--port": 0, "--http-port": -1, "--metrics-port": -1}) is None
    assert "--port 70000: expected a port number 0-65535" in check_ports({"--port": 70000})
    assert "--port -1" in check_ports({"--port": -1})


def test_a_busy_grpc_port_is_one_line_before_any_model_loads_without_grpcs_own_log(fake_repo, listener,
                                                                                   subprocess_env):
    result = _serve(["--repository", str(fake_repo), "--port", str(listener), "--metrics-port", "-1",
                     "--http-port", "-1"], subprocess_env)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: cannot serve --port {listener}: 127.0.0.1:{listener} is already in use "
                                     "(another server?); choose another port (0 = any free port)")
    assert "loaded" not in result.stderr  # no model was loaded first


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
def test_a_busy_http_or_metrics_port_names_its_flag(fake_repo, listener, capsys, flag):
    from serve.__main__ import main

    assert main(["--repository", str(fake_repo), "--port", "0", "--http-port", "0", "--metrics-port", "-1",
                 flag, str(listener)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot serve {flag} {listener}: 127.0.0.1:{listener} is already in use" in err
    assert "or -1 to turn it off" in err


def test_a_host_that_is_not_this_machine_is_named(fake_repo, capsys):
    from serve.__main__ import main

    assert main(["--repository", str(fake_repo), "--port", "0", "--host", "192.0.2.1"]) == 1  # TEST-NET-1
    assert "error: --host 192.0.2.1: not an address of this machine" in capsys.readouterr().err


def test_serve_starts_when_its_ports_are_free(fake_repo):
    """The probe binds and closes: the server itself then gets the same fixed port."""
    from serve.__main__ import check_listen

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    check_listen("127.0.0.1", "--port", port)  # free: no error
    check_listen("127.0.0.1", "--port", port)  # and still free afterwards (the probe closed)


# ---- kestrel classify ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_server(fake_repo):
    """gRPC and HTTP ports over the fake repository (models a, b, c: 10 classes)."""
    from serve import create_server

    server, _ = create_server(fake_repo, models=["a", "b", "c"], ensembles=["trio=a,b,c"], port=0, http_port=0)
    yield server
    server.stop(grace=1.0)


def _rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:]}


def test_top_k_default_is_the_servers_and_every_returned_prediction_is_printed(http_server, tmp_path,
                                                                               subprocess_env):
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(PICTURE))
    address = f"127.0.0.1:{http_server.port}"
    default = _classify([str(picture), "--ensemble", "trio", "--address", address], subprocess_env)
    assert default.returncode == 0, default.stderr
    rows = _rows(default.stdout)
    assert set(rows) == {"a", "b", "c", "trio"}
    assert all(row.count("label_") == 5 for row in rows.values())  # the server's default, 5

    zero = _classify([str(picture), "--ensemble", "trio", "--address", address, "--top-k", "0"], subprocess_env)
    assert zero.returncode == 0
    labels = {name: re.findall(r"label_\d+", row) for name, row in rows.items()}
    assert {name: re.findall(r"label_\d+", row) for name, row in _rows(zero.stdout).items()} == labels

    seven = _classify([str(picture), "--models", "a", "--address", address, "--top-k", "7"], subprocess_env)
    assert seven.returncode == 0 and _rows(seven.stdout)["a"].count("label_") == 7


def test_a_negative_top_k_is_refused_before_any_request(tmp_path, subprocess_env):
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(PICTURE))
    # nothing listens on port 9 (discard): a request would fail with "cannot reach"
    result = _classify([str(picture), "--port", "9", "--top-k", "-1"], subprocess_env, timeout=30)
    assert result.returncode == 2
    assert "--top-k: received -1; expected 0 (the server's default, 5) or a positive number" in result.stderr
    assert "cannot reach" not in result.stderr


def test_address_and_port_together_are_refused(tmp_path, subprocess_env):
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(PICTURE))
    result = _classify([str(picture), "--address", "127.0.0.1:9", "--port", "8001"], subprocess_env, timeout=30)
    assert result.returncode == 2
    assert "--address 127.0.0.1:9 and --port both name the server" in result.stderr


def test_pointed_at_the_http_port_it_says_so_and_names_the_grpc_port(http_server, tmp_path, subprocess_env):
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(PICTURE))
    result = _classify([str(picture), "--port", str(http_server.http_port)], subprocess_env)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"error: 127.0.0.1:{http_server.http_port} answers HTTP/1.x, not gRPC: it is the HTTP "
                           "port of a kestrel server")
    assert "kestrel serve --port, default 8001" in line and "Failed parsing HTTP/2" not in line


def test_the_library_raises_not_grpc_error_for_an_http_port(http_server):
    from serve.client import KestrelClient, NotGrpcError

    with KestrelClient(f"127.0.0.1:{http_server.http_port}", timeout=10) as client:
        with pytest.raises(NotGrpcError, match="answers HTTP/1.x, not gRPC"):
            client.classify(png_bytes(PICTURE), ["a"])


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def test_photo_size_reads_the_header_and_applies_exif_rotation():
    from serve.client import photo_size

    assert photo_size(_jpeg(320, 180)) == (320, 180)
    assert photo_size(_jpeg(320, 180, orientation=6)) == (180, 320)  # shown turned by 90 degrees
    assert photo_size(b"not an image") is None


def test_a_photo_decoded_smaller_shows_both_sizes(http_server, tmp_path, subprocess_env):
    """1280x720 JPEG, models of 32x32 and 48x40: libjpeg decodes it at 1/8 (160x90), still above both."""
    photo = tmp_path / "wide.jpg"
    photo.write_bytes(_jpeg(1280, 720))
    result = _classify([str(photo), "--models", "a,b", "--port", str(http_server.port)], subprocess_env)
    assert result.returncode == 0, result.stderr
    head = result.stdout.splitlines()[0]
    assert "1280x720 photo, decoded at 160x90" in head and "JPEG draft decoding at 1/8" in head

    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(PICTURE))
    result = _classify([str(small), "--models", "a", "--port", str(http_server.port)], subprocess_env)
    assert result.stdout.splitlines()[0].startswith(f"{small}  (120x90, decoded in ")  # same size: one size


def test_format_table_prints_every_prediction_it_was_given():
    from serve._proto import kestrel_pb2
    from serve.client import format_table

    response = kestrel_pb2.ClassifyResponse(image_width=10, image_height=8, decode_ms=1.0)
    result = response.results.add(model="m", compute_ms=2.0, batch_size=1)
    for i in range(6):
        result.predictions.add(index=i, label=f"class_{i}", probability=0.1)
    text = format_table("x.png", response)
    assert text.splitlines()[1].count("class_") == 6


def test_a_host_with_one_unavailable_address_is_not_refused(monkeypatch):
    """'localhost' resolves to 127.0.0.1 and ::1; a machine without IPv6 still serves on 127.0.0.1."""
    from serve import __main__ as serve_main

    real = socket.getaddrinfo

    def with_a_missing_address(host, port, *args, **kwargs):
        missing = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0))  # documentation prefix
        return real("127.0.0.1", port, *args, **kwargs) + [missing]

    monkeypatch.setattr(serve_main.socket, "getaddrinfo", with_a_missing_address)
    serve_main.check_listen("localhost", "--port", 0)  # no error: one address is this machine's
