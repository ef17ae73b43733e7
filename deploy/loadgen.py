"""A bounded closed-loop gRPC load against any Kestrel endpoint (`python -m serve`, Ray Serve's gRPC
proxy, a Kubernetes Service): throughput and latency percentiles, to measure per-replica capacity and
how it grows with replicas (docs/scaling.md).

    python -m deploy.loadgen --address 127.0.0.1:9000 --model mobilenet_v2 --api classify \\
        --concurrency 1,4,16 --seconds 30 --images ../shared/photos --json results.json

Each of `concurrency` threads sends one request, waits for the answer, sends the next. Failures are
counted, never raised. Prints one line per level: requests/s, p50/p95/p99 latency, failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_level(address: str, model: str, api: str, concurrency: int, seconds: float, payloads: list,
              max_requests: int | None = None) -> dict:
    """`concurrency` clients for `seconds` (or until `max_requests` answers); returns the level's numbers."""
    from serve import KestrelClient

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with KestrelClient(address, timeout=60) as kc:
            i = worker
            while not stop.is_set():
                payload = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                try:
                    if api == "classify":
                        kc.classify(payload, [model], top_k=1)
                    else:
                        kc.infer(model, payload)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if max_requests and len(latencies) >= max_requests:
                            stop.set()
                except Exception as exc:  # counted: a load run never stops on one failure
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                i += concurrency

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(concurrency)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(120)
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "requests": len(latencies),
            "failures": len(failures), "rps": round(len(latencies) / elapsed, 2),
            "p50_ms": round(_percentile(latencies, 50) * 1000, 2), "p95_ms": round(_percentile(latencies, 95) * 1000, 2),
            "p99_ms": round(_percentile(latencies, 99) * 1000, 2), "first_errors": failures[:3]}


def _payloads(api: str, images: Path | None, size: tuple[int, int]) -> list:
    from serve import images as imgs

    files = imgs.find_images(images) if images is not None else []
    if api == "classify":
        if files:
            return [f.read_bytes() for f in files]
        import io

        from PIL import Image

        out = []
        for array in imgs.synthetic_images(8, (size[0] + 40, size[1] + 60), seed=0):
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out
    if files:
        return [imgs.load(f, size)[None] for f in files]
    return [a[None] for a in imgs.synthetic_images(8, size, seed=0)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="gRPC host:port of a Kestrel endpoint")
    parser.add_argument("--model", required=True, help="model or ensemble name")
    parser.add_argument("--api", choices=["classify", "infer"], default="classify",
                        help="classify: image files in (decoded by the server); infer: V2 uint8 tensors")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client counts (default 1,8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level (default 20)")
    parser.add_argument("--max-requests", type=int, default=0, help="stop a level after this many answers (0 = no)")
    parser.add_argument("--images", type=Path, help="image folder (default: synthetic images)")
    parser.add_argument("--size", default="224x224", help="HxW of infer tensors (default 224x224)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        h, w = (int(d) for d in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"received --concurrency {args.concurrency!r} / --size {args.size!r}; expected e.g. 1,8 and 224x224")
    if not levels or min(levels) < 1 or args.seconds <= 0:
        parser.error("expected concurrency levels >= 1 and --seconds > 0")
    payloads = _payloads(args.api, args.images, (h, w))
    results = []
    for level in levels:
        result = run_level(args.address, args.model, args.api, level, args.seconds, payloads, args.max_requests or None)
        results.append(result)
        print(f"concurrency {level:>3}: {result['rps']:8.2f} req/s  p50 {result['p50_ms']:8.2f} ms  "
              f"p95 {result['p95_ms']:8.2f} ms  p99 {result['p99_ms']:8.2f} ms  failures {result['failures']}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"address": args.address, "model": args.model, "api": args.api,
                                         "levels": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
