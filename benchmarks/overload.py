"""Overload: many more clients than a model can serve, each with a deadline. Every request must be answered
within its deadline or refused at once (RESOURCE_EXHAUSTED), never left to time out in a queue.

    python -m benchmarks.overload                       # 300 clients, 5 s deadlines, a fake model of 4 images / 200 ms
    python -m benchmarks.overload --clients 600 --rounds 3

Starts `python -m serve` with its default settings on a repository holding one fake model (`max_batch_size`
4, 200 ms a batch: 20 images/s), opens one gRPC channel per client, sends one request per client at once,
and prints: answered / refused / other outcomes, the answered requests' latency (p50, p95, max), and how fast
the refusals came (p50, p95, max). `make test` runs the same scenario (tests/serve/test_overload.py)
with assertions on outcomes only; the numbers belong here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ._procs import KestrelServer


def write_model(repository: Path, name: str = "four", batch: int = 4, batch_ms: float = 200.0) -> None:
    from serve.backends.fake import write_fake_model

    write_fake_model(repository, name, classes=10, max_batch_size=batch, delay_ms=batch_ms)


def burst(address: str, clients: int, deadline_s: float, model: str = "four") -> list[tuple[str, float]]:
    """One request per client (one channel each), all sent at once; returns (status code name, seconds)."""
    import grpc

    from serve._proto import grpc_service_pb2 as pb
    from serve._proto import grpc_service_pb2_grpc

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(np.random.default_rng(0).integers(0, 256, 32 * 32 * 3, np.uint8).tobytes())
    channels = [grpc.insecure_channel(address) for _ in range(clients)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
        results: list = [None] * clients
        done = threading.Semaphore(0)

        def finished(i, t0):
            def callback(future):
                code = future.code().name if future.exception() is not None else "OK"
                results[i] = (code, time.monotonic() - t0)
                done.release()
            return callback

        for i, stub in enumerate(stubs):
            t0 = time.monotonic()
            stub.ModelInfer.future(request, timeout=deadline_s).add_done_callback(finished(i, t0))
        for _ in range(clients):
            done.acquire(timeout=deadline_s + 30)
        return [r for r in results if r is not None]
    finally:
        for channel in channels:
            channel.close()


def summary(results: list[tuple[str, float]]) -> dict:
    answered = sorted(s for code, s in results if code == "OK")
    refused = sorted(s for code, s in results if code == "RESOURCE_EXHAUSTED")
    other: dict[str, int] = {}
    for code, _ in results:
        if code not in ("OK", "RESOURCE_EXHAUSTED"):
            other[code] = other.get(code, 0) + 1

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return {"requests": len(results), "answered": len(answered), "refused": len(refused), "other": other,
            "answered_p50_s": pct(answered, 50), "answered_p95_s": pct(answered, 95),
            "answered_max_s": max(answered, default=float("nan")),
            "refused_p50_ms": pct(refused, 50) * 1e3, "refused_p95_ms": pct(refused, 95) * 1e3,
            "refused_max_ms": max(refused, default=float("nan")) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=5.0, help="each request's deadline, seconds (default 5)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-ms", type=float, default=200.0, help="the fake model's time per batch of 4")
    args = parser.parse_args(argv)
    from serve.cpuinfo import cpu_model, summary as isa

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "repo", batch_ms=args.batch_ms)
        server = KestrelServer(work / "repo", ["four"], work / "server.log")
        try:
            server.wait_ready(60)
            print(f"CPU: {cpu_model()}, {isa()}, {os.cpu_count()} cores; server: python -m serve (defaults), model: 4 images / {args.batch_ms:g} ms")
            for round_ in range(1, args.rounds + 1):
                stats = summary(burst(server.address, args.clients, args.deadline))
                print(f"round {round_}: {stats['requests']} requests, {args.deadline:g} s deadlines: "
                      f"answered {stats['answered']} (p50 {stats['answered_p50_s']:.2f} s, p95 "
                      f"{stats['answered_p95_s']:.2f} s, max {stats['answered_max_s']:.2f} s), refused "
                      f"{stats['refused']} (p50 {stats['refused_p50_ms']:.0f} ms, p95 {stats['refused_p95_ms']:.0f} ms, "
                      f"max {stats['refused_max_ms']:.0f} ms), other {stats['other'] or 'none'}")
                time.sleep(args.deadline)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
