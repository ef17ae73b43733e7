"""python -m serve: serve a model repository over gRPC (KServe V2 + Classify), with health, reflection, metrics,
and over HTTP (KServe V2 REST, /v1/classify, a web page at /).

    python -m serve --repository models --models mobilenet_v2,resnet50 \\
        --ensemble imagenet=mobilenet_v2,resnet50:mean --port 8001 --metrics-port 8002 --http-port 8000

SIGTERM / SIGINT: readiness turns false at once; after --drain-delay seconds (still serving, so that
load balancers and Kubernetes endpoints drop the server first) stop accepting, finish in-flight
requests within --grace seconds, exit 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from . import console
from .errors import KestrelError

log = logging.getLogger("serve")


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def check_repository(path: Path) -> str | None:
    """Why `path` cannot be a model repository (it does not exist, or is a file), or None."""
    if not path.exists():
        return (f"--repository {path}: the folder does not exist (export a model into it first, e.g. "
                f"kestrel export mobilenet_v2 --repository {path})")
    if not path.is_dir():
        return f"--repository {path}: is a file, not a folder; expected a model repository (<name>/config.pbtxt ...)"
    return None


def check_ports(ports: dict[str, int]) -> str | None:
    """Two flags naming the same fixed port: a message naming both, or None. `ports`: {flag: port}, -1 = off."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port < -1 or port > 65535 or (port == -1 and flag == "--port"):
            allowed = "0-65535" if flag == "--port" else "0-65535, or -1 for off"
            return f"{flag} {port}: expected a port number {allowed} (0 = any free port)"
        if port <= 0:
            continue
        if port in seen:
            return (f"{seen[port]} {port} and {flag} {port} name the same port; give each its own "
                    "(0 = any free port)")
        seen[port] = flag
    return None


class ListenError(Exception):
    """A port cannot be listened on; `flag` is the flag to change ("--host" when the address is the problem)."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def check_listen(host: str, flag: str, port: int) -> None:
    """Raise ListenError when `host:port` cannot be listened on: in use, not this machine's address, no permission.
    Binds a probe socket and closes it at once, as the servers will (SO_REUSEADDR; on Linux that still refuses a
    port another socket listens on), so the mistake shows before any model loads, in one line. Port 0 checks the
    host only."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError("--host", f"--host {host}: cannot resolve it ({exc.strerror})") from None
    unavailable = 0  # addresses this machine does not have (e.g. ::1 without IPv6): a problem only if all are
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # an address family this machine does not support
            unavailable += 1
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    unavailable += 1
                    continue
                if exc.errno == errno.EADDRINUSE:
                    why = "is already in use (another server?)"
                elif exc.errno == errno.EACCES:
                    why = "needs privileges (ports below 1024)"
                else:
                    why = f"cannot be listened on ({exc.strerror})"
                off = "" if flag == "--port" else " or -1 to turn it off"
                raise ListenError(flag, f"cannot serve {flag} {port}: {host}:{port} {why}; choose another port "
                                        f"(0 = any free port){off}") from None
    if addresses and unavailable == len(addresses):
        raise ListenError("--host", f"--host {host}: not an address of this machine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve", description=(
        "Serve a model repository over gRPC: the KServe V2 inference protocol and Kestrel's Classify."))
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--models", help="comma-separated models to load (default: all in the repository)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=a,b,c[:FUSION]",
                        help="an ensemble of loaded models; FUSION is mean (default), geometric, max-confidence or majority. "
                             "Ensembles defined in the repository (platform \"ensemble\" folders) are served too "
                             "(with --models: those named there); one given here replaces the repository's")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus /metrics port (default 8002; 0 = any free port; -1 = off)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="HTTP port: KServe V2 REST, /v1/classify and the web page (default 8000, or any free "
                             "port when --port is 0; 0 = any free port; -1 = off)")
    parser.add_argument("--max-message-mb", type=float, default=64.0,
                        help="largest gRPC message (and HTTP request body) in MiB (default 64: 32 float32 "
                             "224x224x3 images fit)")
    http = parser.add_argument_group("HTTP port hardening (also the metrics port's connection limits)")
    http.add_argument("--allowed-hosts", metavar="HOST[,HOST...]",
                      help="Host headers the HTTP port accepts, e.g. localhost,127.0.0.1,*.example.com "
                           "(default: any; set it against DNS rebinding when the page is reachable from a browser)")
    http.add_argument("--http-header-timeout", type=float, default=10.0, metavar="S",
                      help="seconds a request's line and headers may take in total (default 10)")
    http.add_argument("--http-body-timeout", type=float, default=60.0, metavar="S",
                      help="seconds a request's body may take in total (default 60)")
    http.add_argument("--http-idle-timeout", type=float, default=30.0, metavar="S",
                      help="seconds an idle keep-alive connection stays open (default 30)")
    http.add_argument("--http-max-inflight", type=int, default=None, metavar="N",
                      help="POST requests handled at once; more are answered 503 with Retry-After at once "
                           "(default: --threads, one worker thread each)")
    control = parser.add_argument_group("models that change while the server runs")
    control.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none",
                         help="none (default): serve what start-up loads; explicit: load and unload with the "
                              "repository API (tritonclient's load_model/unload_model, `kestrel models`); poll: "
                              "follow the repository's folders")
    control.add_argument("--load-model", action="append", default=[], metavar="NAME",
                         help="a model (or ensemble) to load at start-up, repeatable; '*' = all (with explicit, "
                              "nothing is loaded unless named here or in --models)")
    control.add_argument("--repository-poll-secs", type=float, default=None, metavar="S",
                         help="with --model-control-mode poll: seconds between looks at the repository (default 15)")
    control.add_argument("--auth-tokens", type=Path, metavar="FILE",
                         help="bearer tokens, one per line: TOKEN ROLE[,ROLE...] (roles: infer, control); every "
                              "endpoint but the probes, the page's files and the metrics port then needs one")
    control.add_argument("--allow-unauthenticated-control", action="store_true",
                         help="allow load/unload without --auth-tokens on a server listening beyond loopback")
    parser.add_argument("--strict", action="store_true", help="exit if any model fails to load")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: serve TLS on the gRPC and HTTP ports "
                                                      "(with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument("--threads", type=int, default=64,
                        help="gRPC handler threads, and HTTP worker threads (default 64)")
    parser.add_argument("--max-inflight", type=int, default=None, metavar="N",
                        help="inference and Classify RPCs at once on the gRPC port; more are refused with "
                             "RESOURCE_EXHAUSTED at once (default: --threads minus an eighth, kept for health checks, "
                             "metadata and control: 56)")
    parser.add_argument("--ort-threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    parser.add_argument("--ort-adaptive-threads", action=argparse.BooleanOptionalAction, default=True,
                        help="onnxruntime models without a thread count run a lone batch on every core and, while "
                             "others run or wait, two batches side by side on half the cores each: more throughput "
                             "under load, one more session in memory per model (default on; docs/server.md; a "
                             "model's config parameter adaptive_threads wins)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to finish in-flight requests on shutdown")
    parser.add_argument("--drain-delay", type=float, default=0.0,
                        help="on SIGTERM, seconds to keep serving with readiness false before closing the ports "
                             "(default 0; Kubernetes: a few seconds, within terminationGracePeriodSeconds)")
    parser.add_argument("--port-file", type=Path,
                        help="write {\"port\": ..., \"metrics_port\": ..., \"http_port\": ...} here once serving "
                             "(for --port 0)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return console.add_examples(parser, "--repository models --models mobilenet_v2,mobilenet_v2_int8",
                                "--models mobilenet_v2,resnet50 --ensemble imagenet=mobilenet_v2,resnet50:mean")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()  # the Keras backend imports TensorFlow: no C++ start-up chatter
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    http_port = args.http_port if args.http_port is not None else (0 if args.port == 0 else 8000)
    # mistakes found before any model loads (which may take a minute), each in one line naming the flag
    problem = check_repository(args.repository) or check_ports(
        {"--port": args.port, "--http-port": http_port, "--metrics-port": args.metrics_port})
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        for flag, port in (("--port", args.port), ("--http-port", http_port), ("--metrics-port", args.metrics_port)):
            if port >= 0:
                check_listen(args.host, flag, port)
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from .server import create_server  # grpc and the generated code: after --help

    ort = {}
    if args.ort_threads:
        ort["intra_op_threads"] = args.ort_threads
    if not args.ort_adaptive_threads:
        ort["adaptive_threads"] = False
    runner_options = {"onnxruntime_onnx": ort} if ort else None
    if args.repository_poll_secs is not None and args.model_control_mode != "poll":
        print("error: --repository-poll-secs applies to --model-control-mode poll", file=sys.stderr)
        return 1
    for flag in ("http_header_timeout", "http_body_timeout", "http_idle_timeout", "http_max_inflight",
                 "max_inflight", "threads", "repository_poll_secs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            print(f"error: received --{flag.replace('_', '-')} {getattr(args, flag)}; expected a positive number",
                  file=sys.stderr)
            return 1
    from .http import HttpLimits, HttpOptions

    http_options = HttpOptions(max_body_mb=args.max_message_mb, threads=args.threads,
                               max_inflight=args.http_max_inflight, allowed_hosts=_names(args.allowed_hosts))
    http_limits = HttpLimits(header_timeout_s=args.http_header_timeout, body_timeout_s=args.http_body_timeout,
                             idle_timeout_s=args.http_idle_timeout)
    try:
        server, port = create_server(
            args.repository, models=_names(args.models), ensembles=args.ensemble, host=args.host, port=args.port,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port, max_message_mb=args.max_message_mb,
            strict=args.strict, tls_cert=args.tls_cert, tls_key=args.tls_key, threads=args.threads,
            max_inflight=args.max_inflight, control_mode=args.model_control_mode, load_models=args.load_model,
            poll_secs=args.repository_poll_secs, auth_tokens=args.auth_tokens,
            allow_unauthenticated_control=args.allow_unauthenticated_control,
            runner_options=runner_options, http_port=None if http_port < 0 else http_port,
            http_options=http_options, http_limits=http_limits)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for served in server.hub.models.values():
        if not served.ready:
            log.warning("model %s is UNAVAILABLE: %s", served.name, served.reason)
    ready = [m.name for m in server.hub.models.values() if m.ready]
    scheme = "grpcs" if args.tls_cert else "grpc"
    log.info("listening on %s://%s:%d (models ready: %s; ensembles: %s; model control: %s%s)%s", scheme, args.host,
             port, ", ".join(ready) or "none", ", ".join(server.hub.ensembles) or "none", args.model_control_mode,
             ", tokens required" if args.auth_tokens else "",
             f"; metrics on http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else "")
    if server.http_port is not None:
        log.info("HTTP on %s://%s:%d/ (web page; KServe V2 REST under /v2; POST /v1/classify)",
                 "https" if args.tls_cert else "http", args.host, server.http_port)
    if args.port_file:
        tmp = args.port_file.with_suffix(args.port_file.suffix + ".tmp")
        try:
            tmp.write_text(json.dumps({"port": port, "metrics_port": server.metrics_port,
                                       "http_port": server.http_port, "pid": os.getpid()}))
            tmp.replace(args.port_file)  # atomic: readers never see half a file
        except OSError as exc:
            print(f"error: cannot write the port file {args.port_file}: {exc.strerror}", file=sys.stderr)
            server.stop(grace=0)
            return 1

    stop = threading.Event()

    def _on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():  # a second signal: the operator does not want to wait for the grace period
            log.warning("received %s again: exiting without waiting for in-flight requests", name)
            os._exit(1)
        log.info("received %s", name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(0.5):
        pass
    server.set_not_ready()
    if args.drain_delay > 0:
        log.info("readiness false; still serving for %.1f s (--drain-delay) before closing the ports",
                 args.drain_delay)
        time.sleep(args.drain_delay)
    server.stop(grace=args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
