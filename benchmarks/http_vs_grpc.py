"""Before/after, gRPC vs HTTP Classify, interleaved on one machine: did the HTTP port's rewrite cost speed?

    python -m benchmarks.http_vs_grpc --before /path/to/old/checkout --repository models \\
        --model mobilenet_v2 --level 8 --repeats 5 --duration 20

Starts `python -m serve` from each checkout (`--before`, and this one: "after") with the same
repository and model, both at once and idle between runs, then runs locust at `--level` users
against every (checkout, transport) pair in rotated order, `--repeats` times: gRPC Classify
(benchmarks/locustfile.py) and HTTP Classify (benchmarks/locust_http.py, POST /v1/classify,
multipart unless --http-body raw). The load generator is this checkout's for both sides, so only
the server differs. Prints the median images/s and p50/p95 per pair with the ratios the issue asks
for (HTTP / gRPC per side; after / before per transport) and writes results.json to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import _method
from ._procs import ROOT, BenchmarkError, Process, locust_command, run_locust, wait_for

TRANSPORTS = ("grpc", "http")


def _server(name: str, checkout: Path, repository: Path, model: str, logs: Path, extra: list[str]) -> dict:
    port_file = logs / f"{name}.port.json"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "serve", "--repository", str(repository), "--models", model, "--host",
               "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--port-file", str(port_file),
               "--log-level", "WARNING", *extra]
    process = Process(f"the {name} server", command, logs / f"{name}_server.log", env=env, cwd=checkout)
    return {"name": name, "process": process, "port_file": port_file}


def _ready(server: dict, timeout: float) -> None:
    def info():
        try:
            return json.loads(server["port_file"].read_text())
        except (OSError, ValueError):
            return None

    data = wait_for(info, timeout=timeout, process=server["process"], what=f"the {server['name']} server")
    server["grpc"], server["http"] = f"127.0.0.1:{data['port']}", f"http://127.0.0.1:{data['http_port']}"


def schedule(repeats: int) -> list[tuple[int, str, str]]:
    """[(repeat, side, transport)], the pair order rotated each repeat (drift hits every pair alike)."""
    pairs = [(side, transport) for side in ("before", "after") for transport in TRANSPORTS]
    out = []
    for repeat in range(repeats):
        shift = repeat % len(pairs)
        out += [(repeat, *pair) for pair in pairs[shift:] + pairs[:shift]]
    return out


def summary(rows: list[dict]) -> dict:
    """{(side, transport): {"images_per_s", "p50_ms", "p95_ms", "runs"}} of the medians over repeats."""
    out = {}
    for side in ("before", "after"):
        for transport in TRANSPORTS:
            mine = [r for r in rows if r["side"] == side and r["transport"] == transport and r["requests"] > 0]
            if mine:
                out[(side, transport)] = {key: _method.median(r[key] for r in mine)
                                          for key in ("images_per_s", "p50_ms", "p95_ms")} | {"runs": len(mine)}
    return out


def table(agg: dict, level: int) -> str:
    lines = [f"concurrency {level}", "| server | transport | images/s | p50 ms | p95 ms | runs |", "|---|---|---|---|---|---|"]
    for (side, transport), a in agg.items():
        lines.append(f"| {side} | {transport} | {a['images_per_s']:.1f} | {a['p50_ms']:.1f} | {a['p95_ms']:.1f} "
                     f"| {a['runs']} |")
    lines.append("")
    for side in ("before", "after"):
        if (side, "http") in agg and (side, "grpc") in agg:
            value = _method.ratio(agg[(side, "http")]["images_per_s"], agg[(side, "grpc")]["images_per_s"])
            lines.append(f"{side}: HTTP / gRPC Classify throughput = {value:.2f} (goal >= 0.90)")
    for transport in TRANSPORTS:
        if ("before", transport) in agg and ("after", transport) in agg:
            value = _method.ratio(agg[("after", transport)]["images_per_s"], agg[("before", transport)]["images_per_s"])
            lines.append(f"{transport}: after / before throughput = {value:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_vs_grpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the old code (e.g. a worktree of main)")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default models)")
    p.add_argument("--model", default="mobilenet_v2", help="model to classify with (default mobilenet_v2)")
    p.add_argument("--level", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per run (default 3)")
    p.add_argument("--images", type=Path, help="image folder (default ../shared/photos, else synthetic)")
    p.add_argument("--http-body", choices=("multipart", "raw"), default="multipart")
    p.add_argument("--server-arg", action="append", default=[], help="extra `python -m serve` argument (repeatable)")
    p.add_argument("--output", type=Path, help="results folder (default benchmarks/results/http_vs_grpc_<time>)")
    args = p.parse_args(argv)
    if args.level < 1 or args.repeats < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("expected --level >= 1, --repeats >= 1, --duration > 0, --warmup >= 0")
    before = args.before.resolve()
    if not (before / "serve" / "__main__.py").is_file():
        p.error(f"--before {before}: not a Kestrel checkout (no serve/__main__.py)")
    out = args.output or ROOT / "benchmarks" / "results" / f"http_vs_grpc_{_method.timestamp()}"
    logs, raw = out / "logs", out / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    repository = args.repository.resolve()
    servers = {side: _server(side, root, repository, args.model, logs, args.server_arg)
               for side, root in (("before", before), ("after", ROOT))}
    rows = []
    try:
        for server in servers.values():
            _ready(server, 600)
        plan = schedule(args.repeats)
        for index, (repeat, side, transport) in enumerate(plan):
            server = servers[side]
            stem = f"{side}_{transport}_r{repeat}"
            record = raw / f"{stem}.json"
            options = {"kestrel-warmup": args.warmup, "kestrel-record": record, "kestrel-label": stem,
                       "kestrel-model": args.model}
            if args.images:
                options["kestrel-images"] = args.images
            if transport == "grpc":
                locustfile, host = ROOT / "benchmarks" / "locustfile.py", server["grpc"]
                options["kestrel-api"] = "classify"
            else:
                locustfile, host = ROOT / "benchmarks" / "locust_http.py", server["http"]
                options["kestrel-http-body"] = args.http_body
            command = locust_command(locustfile, users=args.level, run_time_s=args.warmup + args.duration, host=host,
                                     csv_prefix=raw / stem, options=options)
            print(f"[{index + 1}/{len(plan)}] {side} {transport}", flush=True)
            code = run_locust(command, logs / f"{stem}.log", timeout=args.warmup + args.duration + 120)
            try:
                data = json.loads(record.read_text())
            except (OSError, ValueError):
                data = {}
            stats = _method.summarize(data.get("response_times_ms", []))
            rows.append(dict(side=side, transport=transport, repeat=repeat, order=index, locust_exit=code,
                             requests=data.get("requests", 0), failures=data.get("failures", 0),
                             images_per_s=data.get("items_per_s", float("nan")), p50_ms=stats["p50"],
                             p95_ms=stats["p95"]))
    finally:
        for server in servers.values():
            server["process"].stop()
    agg = summary(rows)
    text = table(agg, args.level)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows,
                                                  "machine": _method.machine_info(), "summary": text}, indent=1))
    print(text)
    print(f"results: {out / 'results.json'}")
    failed = [r for r in rows if r["failures"] or not r["requests"]]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
