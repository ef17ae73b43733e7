"""`make demo`: export an ImageNet ensemble, serve it, classify sample photos through the server.

    python -m export.demo [--models mobilenet_v2,mobilenet,PATH/efficientnet_lite0.keras] [--repository models]
                          [--port 8001|0] [--photos DIR] [--weights imagenet] [--fusion mean]

The default trio runs offline: MobileNetV2 and MobileNet (v1) are Keras applications
whose ImageNet weights are in ../shared/keras_home, and EfficientNet-Lite0 is a user's
own `.keras` file with its labels.txt beside it (../shared/models). With internet, the
seeds' trio is `--models vgg16,resnet50,xception` (weights downloaded by Keras).
The members are defined as one ensemble in the repository (`python -m export.ensemble
create`), served together, and each photo prints every member's top 3 with its time
and the fused answer.

Each step is the public CLI a user would run (`python -m export`, `python -m
export.ensemble`, `python -m serve`, `python -m serve.client`), so the demo shows exactly
the documented path. A model whose weights cannot be had (an offline machine with only
some weights in KERAS_HOME) is reported and left out; the demo goes on with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# offline: two Keras applications with weights in ../shared/keras_home and a user's own .keras file
DEFAULT_MODELS = ("mobilenet_v2", "mobilenet", str(SHARED / "models" / "efficientnet_lite0" / "efficientnet_lite0.keras"))
ONLINE_MODELS = ("vgg16", "resnet50", "xception")  # the seeds' trio (needs internet for the weights)
ENSEMBLE = "imagenet"
DEFAULT_FUSION = "mean"  # chosen by measurement on ImageNet validation images: docs/ensembles.md


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _exported(repository: Path, name: str) -> bool:
    return (repository / name / "config.pbtxt").is_file() and (repository / f"{name}_keras" / "config.pbtxt").is_file()


def model_name(source: str) -> str:
    """The repository name `python -m export SOURCE` gives: the application's, or the file's stem."""
    if source.lower().endswith((".keras", ".h5")) or os.sep in source:
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(source).stem).lstrip("._-")[:100] or "model"
    return source


def export_models(models: list[str], repository: Path, weights: str) -> list[str]:
    """Export each model that is not in the repository yet; returns the names of those that are ready."""
    ready = []
    for source in models:
        name = model_name(source)
        if _exported(repository, name):
            _say(f"{name}: already in {repository}, skipping export")
            ready.append(name)
            continue
        is_file = name != source
        if is_file and not Path(source).is_file():
            _say(f"{name}: {source} does not exist; continuing without it")
            continue
        _say(f"{name}: exporting " + (f"{source} (labels.txt beside it)" if is_file else f"(weights={weights})"))
        cmd = [sys.executable, "-m", "export", source, "--repository", str(repository)]
        if not is_file:
            cmd += ["--weights", weights]
        result = subprocess.run(cmd, cwd=ROOT, env=_quiet_env())
        if result.returncode == 0:
            ready.append(name)
        else:
            _say(f"{name}: export failed (see the message above); continuing without it")
    return ready


def define_ensemble(repository: Path, members: list[str], fusion: str) -> None:
    """Write the ensemble into the repository (`python -m export.ensemble create`), unless it is
    there already with these members (its fitted temperatures are kept)."""
    from serve.repository import ModelRepository  # light: no TensorFlow

    repo = ModelRepository(repository)
    if ENSEMBLE in repo.ensemble_names():
        try:
            if list(repo.ensemble(ENSEMBLE).members) == members:
                _say(f"ensemble {ENSEMBLE}: already in {repository} ({', '.join(members)})")
                return
        except Exception:  # an unreadable folder is rewritten below
            pass
    spec = f"{ENSEMBLE}={','.join(members)}:{fusion}"
    _say(f"ensemble {ENSEMBLE}: defining it in {repository} ({spec})")
    subprocess.run([sys.executable, "-m", "export.ensemble", "create", spec, "--repository", str(repository)],
                   cwd=ROOT, env=_quiet_env(), check=True)


def _quiet_env() -> dict:
    """TensorFlow's C++ start-up chatter (oneDNN, 'no CUDA driver') hides the demo's own lines: the export and
    the server filter it too (serve/console.py; KESTREL_VERBOSE=1 shows it)."""
    from serve import console

    console.quiet_native_logs()
    return dict(os.environ)


DEFAULT_PORT, DEFAULT_HTTP_PORT = 8001, 8000  # serve's defaults: gRPC, HTTP + web page


def choose_ports(port: int | None, http_port: int | None, host: str = "127.0.0.1",
                 defaults: tuple[int, int] = (DEFAULT_PORT, DEFAULT_HTTP_PORT)) -> tuple[int, int, str]:
    """(gRPC port, HTTP port, a note or "") to pass to `python -m serve`.

    --port 0: any free port for HTTP too (as `serve --help` says), unless --http-port names one. No --port:
    the default ports, or, when one of them is taken (another server on this machine), free ports for both,
    with a note saying so: the demo never fails for a port nobody asked for. A port the user named is used as
    given (serve says clearly when it is taken)."""
    from serve.__main__ import ListenError, check_listen  # light: no grpc, no model

    note = ""
    if port is None:
        wanted = [("--port", defaults[0])] + ([("--http-port", defaults[1])] if http_port is None else [])
        busy = []
        for flag, number in wanted:
            try:
                check_listen(host, flag, number)
            except ListenError:
                busy.append(number)
        if busy:
            note = (f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} in use (another server?): "
                    "serving on free ports instead")
            port = 0
        else:
            port = defaults[0]
    if http_port is None:
        http_port = 0 if port == 0 else defaults[1]
    return port, http_port, note


def serve_command(repository: Path, served: list[str], port: int, http_port: int, port_file: Path) -> list[str]:
    return [sys.executable, "-m", "serve", "--repository", str(repository), "--models", ",".join(served),
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", str(http_port),
            "--port-file", str(port_file)]


def _wait_ready(port_file: Path, server: subprocess.Popen, timeout: float) -> dict:
    """The server's ports (its --port-file, written once its models are loaded and its ports open), after its
    gRPC health check says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    ports = None
    while ports is None:
        if server.poll() is not None:
            raise SystemExit(f"[demo] the server exited with code {server.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"[demo] the server had not opened its ports after {timeout:.0f} s")
        try:
            ports = json.loads(port_file.read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    address = f"127.0.0.1:{ports['port']}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"[demo] the server exited with code {server.returncode} before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return ports
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"[demo] the server at {address} was not SERVING after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma list of Keras applications or .keras/.h5 files (labels.txt beside them); "
                             f"default: the offline trio; with internet e.g. {','.join(ONLINE_MODELS)}")
    parser.add_argument("--fusion", default=DEFAULT_FUSION, help=f"the ensemble's fusion (default {DEFAULT_FUSION})")
    parser.add_argument("--repository", default="models")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--port", type=int, default=None,
                        help=f"gRPC port (default {DEFAULT_PORT}, or free ports for gRPC and HTTP when {DEFAULT_PORT} "
                             f"or {DEFAULT_HTTP_PORT} is taken; 0: any free port, HTTP too)")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "photos"),
                        help="a folder of photos to classify")
    parser.add_argument("--limit", type=int, default=6, help="how many photos to send")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--http-port", type=int, default=None,
                        help=f"web page / REST port (default {DEFAULT_HTTP_PORT}, any free port when --port is 0; "
                             "0: any free port)")
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

    if len(ready) > 1:
        define_ensemble(repository, ready, args.fusion)
    port, http_port, note = choose_ports(args.port, args.http_port)
    if note:
        _say(note)
    served = ready + [ENSEMBLE] if len(ready) > 1 else ready
    port_dir = Path(tempfile.mkdtemp(prefix="kestrel-demo-"))
    port_file = port_dir / "ports.json"
    serve_cmd = serve_command(repository, served, port, http_port, port_file)
    _say(f"starting the server: {' '.join(serve_cmd[1:-2])}")
    server = subprocess.Popen(serve_cmd, cwd=ROOT, env=_quiet_env())
    try:
        ports = _wait_ready(port_file, server, args.ready_timeout)
        address = f"127.0.0.1:{ports['port']}"
        web = f"; web page http://127.0.0.1:{ports['http_port']}/" if ports.get("http_port") else ""
        _say(f"server SERVING on {address}{web}; classifying {len(photos)} photo{'s' if len(photos) != 1 else ''}")
        client_cmd = [sys.executable, "-m", "serve.client", *map(str, photos), "--models", ",".join(ready),
                      *(["--ensemble", ENSEMBLE] if len(ready) > 1 else []), "--address", address, "--top-k", "3"]
        result = subprocess.run(client_cmd, cwd=ROOT, env=_quiet_env())
        if args.keep_serving and result.returncode == 0:
            _say(f"still serving: gRPC {address}{web}. Ctrl-C stops.")
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
        shutil.rmtree(port_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
