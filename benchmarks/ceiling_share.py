"""The server's share of onnxruntime's in-process ceiling, measured interleaved: `kestrel bench ceiling-share`.

    python -m benchmarks.ceiling_share --model mobilenet_v2                    # 4 and 16 clients, 5 rounds
    python -m benchmarks.ceiling_share --model mobilenet_v2_int8 --clients 16 --rounds 7

`kestrel bench vs-triton` measures the ceiling once, after every server run; on a shared machine whose
speed drifts by 10-20 % over minutes that puts the two halves of the share at different times. Here each
round runs the server under the load (benchmarks/triton_load.py, gRPC, batch-1 requests, the server idle
otherwise) and then, with the server idle, the same model in this process (the runner the server would
make) at the whole batch sizes around the mean batch the server just formed; the share is the round's
img/s over the in-process img/s at that batch (linear between the two sizes). The server runs batches
side by side under load (onnxruntime's adaptive threads, on by default), so each round also measures
onnxruntime alone doing the same: two threads, each running batches of the nearest whole size in the
narrow session, for as long as a round's in-process timing; `side_by_side_share` is the server's img/s
over that. Prints each round and the median shares with the range of the rounds, per client count;
`--json FILE` keeps them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from serve.errors import KestrelError

from . import _method
from ._procs import ROOT, KestrelServer
from .vs_triton import ceiling, load_command, run_load
from .vs_triton_report import per_image_seconds


def side_by_side(repository: Path, model: str, size: int, *, images: Path | None, seconds: float) -> float | None:
    """img/s of onnxruntime alone running batches of `size` as the server does under load: two threads, each
    in the narrow session of a runner with adaptive threads, for `seconds` after a warm-up; None when the
    runner has no narrow session (one core, or a thread count set)."""
    import threading
    import time

    from serve.backends import create_runner
    from serve.repository import ModelRepository

    from ._images import image_arrays
    from .vs_triton import _batch_of

    runner = create_runner(ModelRepository(repository).entry(model), adaptive_threads=True).load()
    try:
        if not getattr(runner, "adaptive", False):
            return None
        batch = _batch_of(image_arrays(str(images or ""), runner.image_size), size)
        for _ in range(3):
            runner.run(batch, busy=True)
        counts = [0] * runner.preferred_workers
        start = threading.Barrier(len(counts) + 1)
        end: list[float] = []

        def work(i: int) -> None:
            start.wait()
            while time.perf_counter() < end[0]:
                runner.run(batch, busy=True)
                counts[i] += size

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(counts))]
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        end.append(began + seconds)
        start.wait()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - began)
    finally:
        runner.close()


def share_rounds(repository: Path, model: str, clients: list[int], *, rounds: int, duration: float, warmup: float,
                 images: Path | None, work: Path, server_args: list[str] = (), side_seconds: float = 3.0
                 ) -> dict[int, list[dict]]:
    """{clients: [{"images_per_s", "mean_batch", "ceiling", "share", and with side-by-side batches
    "side_by_side", "side_by_side_share"} per round]}."""
    server = KestrelServer(repository, [model], work / "server.log", extra_args=list(server_args))
    out: dict[int, list[dict]] = {n: [] for n in clients}
    try:
        server.wait_ready(120)
        for r in range(rounds):
            for n in clients:
                record_path = work / f"load_c{n}_r{r}.json"
                command = load_command(server.address, protocol="grpc", model=model, clients=n, batch=1,
                                       duration=duration, warmup=warmup, stats_url=server.address,
                                       output=record_path, images=images)
                record, error = run_load(command, work / f"load_c{n}_r{r}.log", record_path,
                                         timeout=warmup + duration + 120)
                if error:
                    raise KestrelError(error)
                batch = float(record["mean_batch"])
                sizes = {max(1, math.floor(batch)), max(1, math.ceil(batch))}
                costs = ceiling(repository, [model], {model: sizes}, ort_threads=0, images=images, repeats=3,
                                iterations=max(3, int(round(400 / max(batch, 1)))))[model]
                seconds = per_image_seconds(costs, batch)
                row = {"images_per_s": record["images_per_s"], "mean_batch": batch, "p95_ms": record["p95_ms"],
                       "ceiling": 1.0 / seconds, "share": record["images_per_s"] * seconds,
                       "loadgen_cores": record.get("loadgen_cores")}
                pair = side_by_side(repository, model, max(1, round(batch)), images=images, seconds=side_seconds)
                if pair is not None:
                    row["side_by_side"] = pair
                    row["side_by_side_share"] = record["images_per_s"] / pair
                out[n].append(row)
                print(f"round {r + 1}, {n} clients: server {row['images_per_s']:.1f} img/s at mean batch "
                      f"{batch:.2f}; in process {row['ceiling']:.1f} img/s: {100 * row['share']:.0f} %"
                      + (f"; two batches side by side in process {pair:.1f} img/s: "
                         f"{100 * row['side_by_side_share']:.0f} %" if pair is not None else ""), flush=True)
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kestrel bench ceiling-share", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--clients", default="4,16", help="client counts (default 4,16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per load run (default 6)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--images", type=Path, default=None, help="image folder (default ../shared/photos)")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to python -m serve")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
        if not clients or min(clients) < 1 or args.rounds < 1:
            raise KestrelError(f"received --clients {args.clients!r} --rounds {args.rounds}; expected counts >= 1")
        if args.model not in {p.name for p in args.repository.iterdir() if p.is_dir()}:
            raise KestrelError(f"{args.model!r} is not in {args.repository}; export it first (kestrel export)")
        images = args.images or (ROOT.parent / "shared" / "photos")
        images = images if images.is_dir() else None
        with tempfile.TemporaryDirectory(prefix="ceiling-share-") as tmp:
            rounds = share_rounds(args.repository, args.model, clients, rounds=args.rounds, duration=args.duration,
                                  warmup=args.warmup, images=images, work=Path(tmp), server_args=args.server_arg)
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpu = _method.machine_info()
    print(f"\n{args.model}, gRPC batch-1 requests, {cpu['cpu']} ({cpu['isa']}), "
          f"{cpu['cores_usable']} cores usable, load average at the end {', '.join(f'{x:.2f}' for x in cpu['load_average'] or ())}; median of {args.rounds} rounds (range):")
    summary = {}
    for n, rows in rounds.items():
        shares = [r["share"] for r in rows]
        summary[n] = {"share": _method.median(shares), "low": min(shares), "high": max(shares),
                      "images_per_s": _method.median(r["images_per_s"] for r in rows),
                      "mean_batch": _method.median(r["mean_batch"] for r in rows), "rounds": rows}
        pairs = [r["side_by_side_share"] for r in rows if "side_by_side_share" in r]
        if pairs:
            summary[n].update(side_by_side_share=_method.median(pairs), side_by_side_low=min(pairs),
                              side_by_side_high=max(pairs))
        s = summary[n]
        print(f"  {n} clients: {s['images_per_s']:.1f} img/s at mean batch {s['mean_batch']:.2f} = "
              f"{100 * s['share']:.0f} % ({100 * s['low']:.0f}-{100 * s['high']:.0f} %) of onnxruntime in process"
              + (f"; {100 * s['side_by_side_share']:.0f} % ({100 * s['side_by_side_low']:.0f}-"
                 f"{100 * s['side_by_side_high']:.0f} %) of two batches side by side in process" if pairs else ""))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "machine": cpu, "clients": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
