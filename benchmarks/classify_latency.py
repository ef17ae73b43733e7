"""Classify latency through the server at concurrency 1 vs the same work in-process.

    python -m benchmarks.classify_latency --repository models --model mobilenet_v2 \\
        --images ../shared/photos --repeats 200

In-process: serve.images.decode + resize + runner.infer (batch of 1), i.e.
exactly what the server does for one request, minus gRPC. Through the server:
one client calling Classify sequentially against `python -m serve` in its own
process. Both paths alternate in blocks (--block images in-process, then the
same images through the server, ...) so that background load on a shared
machine hits both alike, with a pause between blocks: onnxruntime's worker
threads spin after each run, and a spinning in-process session would steal
the server's cores if the paths alternated image by image. The report gives
medians and two overheads, which should be within 3 ms:

- overhead_median_ms: Classify median - in-process median (two samples, taken
  in turn; on a machine shared with other work both swing by tens of ms);
- transport_overhead_median_ms: per request, the client's round trip minus
  the server's own time for that request (decode + queue + inference, its
  `total_ms`): what gRPC, protobuf and the servicer add, paired request by
  request, so it holds up when the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve import console, cpuinfo

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 3.0


def _start_server(repository: Path, model: str, threads: int) -> tuple[subprocess.Popen, int, Path]:
    folder = Path(tempfile.mkdtemp(prefix="kestrel-latency-"))
    port_file, log = folder / "port.json", folder / "serve.log"
    cmd = [sys.executable, "-m", "serve", "--repository", str(repository), "--models", model, "--port", "0",
           "--port-file", str(port_file), "--metrics-port", "-1", "--log-level", "WARNING"]
    if threads:
        cmd += ["--ort-threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())["port"], log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classify_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "photos",
                        help="an image file or a folder of images (default ../shared/photos)")
    parser.add_argument("--repeats", type=int, default=200, help="measured requests per path (default 200)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--block", type=int, default=13, help="requests per path before switching (default 13)")
    parser.add_argument("--ort-threads", type=int, default=0, help="onnxruntime intra-op threads for both paths")
    parser.add_argument("--json", type=Path, help="also write the result here")
    console.add_examples(parser, "--repository models --model mobilenet_v2_int8 --repeats 200",
                         "--model mobilenet_v2 --images ../shared/photos --json /tmp/latency.json")
    args = parser.parse_args(argv)

    from serve import KestrelClient, ModelRepository, create_runner, images
    from serve.errors import KestrelError

    try:
        entry = ModelRepository(args.repository).entry(args.model)
        paths = [args.images] if args.images.is_file() else images.find_images(args.images)
        if not paths:
            raise KestrelError(f"no images in {args.images}")
        pictures = [p.read_bytes() for p in paths]
        options = {"intra_op_threads": args.ort_threads} if args.ort_threads and entry.platform == "onnxruntime_onnx" else {}
        runner = create_runner(entry, **options).load()
    except KestrelError as exc:
        print(f"error: {exc} (export one with: python -m export {args.model} --weights none)", file=sys.stderr)
        return 1
    size = runner.image_size

    def in_process(data: bytes) -> None:
        picture = images.decode(data, min_size=size)
        runner.infer(images.resize(picture, size)[None])

    proc, port, log = _start_server(args.repository, args.model, args.ort_threads)
    local, remote, paired, sizes = [], [], [], []
    try:
        with KestrelClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_ready(60)
            for i in range(args.warmup):
                in_process(pictures[i % len(pictures)])
                client.classify(pictures[i % len(pictures)], [args.model], top_k=3)
            for start in range(0, args.repeats, args.block):
                block = [pictures[i % len(pictures)] for i in range(start, min(start + args.block, args.repeats))]
                for data in block:
                    t0 = time.perf_counter()
                    in_process(data)
                    local.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.05)
                for data in block:
                    t0 = time.perf_counter()
                    response = client.classify(data, [args.model], top_k=3)
                    remote.append((time.perf_counter() - t0) * 1e3)
                    paired.append(remote[-1] - response.total_ms)
                    sizes.append(len(data))
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        runner.close()
    local_ms, remote_ms = statistics.median(local), statistics.median(remote)
    overhead = remote_ms - local_ms
    transport = statistics.median(paired)
    small = [p for p, n in zip(paired, sizes) if n < 256 * 1024]
    large = [p for p, n in zip(paired, sizes) if n >= 256 * 1024]
    result = {
        "model": args.model, "platform": entry.platform, "images": len(pictures), "repeats": args.repeats,
        "in_process_median_ms": round(local_ms, 2), "classify_median_ms": round(remote_ms, 2),
        "overhead_median_ms": round(overhead, 2),
        "transport_overhead_median_ms": round(transport, 2),
        "transport_overhead_p90_ms": round(sorted(paired)[int(0.9 * len(paired))], 2),
        "transport_overhead_median_ms_under_256kb": round(statistics.median(small), 2) if small else None,
        "transport_overhead_median_ms_over_256kb": round(statistics.median(large), 2) if large else None,
        "in_process_p90_ms": round(sorted(local)[int(0.9 * len(local))], 2),
        "classify_p90_ms": round(sorted(remote)[int(0.9 * len(remote))], 2),
        "within_target": overhead <= TARGET_MS and transport <= TARGET_MS, "target_ms": TARGET_MS,
        "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "cpu": cpuinfo.cpu_model(), "isa": cpuinfo.summary(),
    }
    print(f"{'path':<34}{'median ms':>10}")
    print(f"{'in-process decode + infer':<34}{local_ms:>10.2f}")
    print(f"{'Classify via gRPC (concurrency 1)':<34}{remote_ms:>10.2f}")
    print(f"{'overhead (difference of medians)':<34}{overhead:>10.2f}")
    print(f"{'overhead (paired, transport)':<34}{transport:>10.2f}")
    print(f"target <= {TARGET_MS} ms: {'yes' if result['within_target'] else 'NO'} "
          f"(load average {result['load_average_1min']} on {result['cpus']} CPUs, {result['isa']})")
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
