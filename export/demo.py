"""`make demo`: export an ImageNet ensemble, serve it, classify sample photos through the server.

    python -m export.demo [--models mobilenet_v2,resnet50,xception] [--repository models]
                          [--port 8001] [--photos DIR] [--weights imagenet]

Each step is the public CLI a user would run (`python -m export`, `python -m serve`,
`python -m serve.client`), so the demo shows exactly the documented path. A model
whose weights cannot be had (an offline machine with only some weights in
KERAS_HOME) is reported and left out; the demo goes on with the others.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _exported(repository: Path, name: str) -> bool:
    return (repository / name / "config.pbtxt").is_file() and (repository / f"{name}_keras" / "config.pbtxt").is_file()


def export_models(models: list[str], repository: Path, weights: str) -> list[str]:
    """Export each model that is not in the repository yet; returns those that are ready."""
    ready = []
    for name in models:
        if _exported(repository, name):
            _say(f"{name}: already in {repository}, skipping export")
            ready.append(name)
            continue
        _say(f"{name}: exporting (weights={weights})")
        cmd = [sys.executable, "-m", "export", name, "--weights", weights, "--repository", str(repository)]
        result = subprocess.run(cmd, cwd=ROOT, env=_quiet_env())
        if result.returncode == 0:
            ready.append(name)
        else:
            _say(f"{name}: export failed (see the message above); continuing without it")
    return ready


def _quiet_env() -> dict:
    """TensorFlow's C++ start-up chatter (oneDNN, 'no CUDA driver') hides the demo's own lines: the export and
    the server filter it too (serve/console.py; KESTREL_VERBOSE=1 shows it)."""
    from serve import console

    console.quiet_native_logs()
    return dict(os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(address: str, server: subprocess.Popen, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"[demo] the server exited with code {server.returncode} before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"[demo] the server at {address} was not SERVING after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50,xception")
    parser.add_argument("--repository", default="models")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (0: any free port)")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "photos"),
                        help="a folder of photos to classify")
    parser.add_argument("--limit", type=int, default=6, help="how many photos to send")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--http-port", type=int, default=8000, help="web page / REST port (0: any free port)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave the server running after the photos (Ctrl-C stops it)")
    from serve import console

    console.add_examples(parser, "                                   # what `make demo` runs",
                         "--models mobilenet_v2 --port 0 --keep-serving   # one model, then the web page")
    args = parser.parse_args(argv)

    repository = Path(args.repository)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ready = export_models(models, repository, args.weights)
    if not ready:
        print("[demo] no model could be exported; see the messages above", file=sys.stderr)
        return 1

    from serve.images import find_images  # light: no TensorFlow

    photos_dir = Path(args.photos)
    photos = find_images(photos_dir)[: args.limit] if photos_dir.is_dir() else []
    if not photos:
        print(f"[demo] no photos found in {photos_dir}; pass --photos DIR", file=sys.stderr)
        return 1

    port = args.port or _free_port()
    address = f"127.0.0.1:{port}"
    serve_cmd = [sys.executable, "-m", "serve", "--repository", str(repository), "--models", ",".join(ready),
                 "--ensemble", f"imagenet={','.join(ready)}", "--host", "127.0.0.1", "--port", str(port),
                 "--metrics-port", "0", "--http-port", str(args.http_port)]
    _say(f"starting the server: {' '.join(serve_cmd[1:])}")
    server = subprocess.Popen(serve_cmd, cwd=ROOT, env=_quiet_env())
    try:
        _wait_ready(address, server, args.ready_timeout)
        _say(f"server SERVING on {address}; classifying {len(photos)} photos")
        client_cmd = [sys.executable, "-m", "serve.client", *map(str, photos), "--models", ",".join(ready),
                      "--ensemble", "imagenet", "--address", address, "--top-k", "3"]
        result = subprocess.run(client_cmd, cwd=ROOT, env=_quiet_env())
        if args.keep_serving and result.returncode == 0:
            _say(f"still serving: gRPC {address}; web page and REST on the HTTP port logged above. Ctrl-C stops.")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        return result.returncode
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
