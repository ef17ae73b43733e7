"""A threaded tritonclient load generator for any KServe V2 server (Kestrel or Triton), one run per process.

    python -m benchmarks.triton_load run --url 127.0.0.1:8001 --protocol grpc --model mobilenet_v2 \\
        --clients 8 --batch 1 --duration 6 --warmup 2 --output run.json
    python -m benchmarks.triton_load compare --model mobilenet_v2 --url 127.0.0.1:8001 --url 127.0.0.1:9001

`run`: `--clients` threads, each with its own tritonclient client (gRPC or HTTP with binary tensors),
send ModelInfer requests of `--batch` images back to back (closed loop) for `--warmup` + `--duration`
seconds. The images are the benchmark image set (benchmarks/_images.py: ../shared/photos unless
`--images`), decoded and resized once to the model's input size; client i starts at image i, so
every server gets the same requests in the same order. Every answer is checked: a success with the
output FP32 (batch, classes) and finite; anything else is an error, counted with its message. Only
requests that complete inside the measured window count; their latencies are kept raw. The model's
V2 statistics (inference_count, execution_count) are read over gRPC (`--stats-url`, default the load
URL for gRPC) when the window opens and when it closes: their deltas give the mean batch size the
server executed during the window. With `--cpu-pids`, the CPU time those processes and every process
under them (Triton's python-backend stub) used inside the window is recorded too (`server_cores`): the
server's CPU, without the load generator's or the warm-up's. Writes one JSON record (`--output`).

`compare`: sends each image alone to every `--url` and reports the largest absolute difference between
their probabilities and their top-1 agreement (the same model answers the same on both servers).

tritonclient's gRPC modules and Kestrel's serve._proto both define the protobuf package `inference`,
so this module runs in its own process and never imports serve._proto (the orchestrator,
benchmarks/vs_triton.py, starts it as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

PROTOCOLS = ("grpc", "http")
MAX_MESSAGES = 10


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected grpc or http")
    return module


def make_client(protocol: str, url: str, timeout: float):
    module = _client_module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    return module.InferenceServerClient(url)


def model_io(protocol: str, url: str, model: str, timeout: float = 30.0) -> dict:
    """{'input', 'datatype', 'size': (h, w), 'channels', 'output', 'classes'} from V2 model metadata."""
    client = make_client(protocol, url, timeout)
    try:
        meta = client.get_model_metadata(model, as_json=True) if protocol == "grpc" else \
            client.get_model_metadata(model)
    finally:
        client.close()
    inp, out = meta["inputs"][0], meta["outputs"][0]
    shape = [int(d) for d in inp["shape"]]
    if len(shape) != 4:
        raise ValueError(f"model {model!r} input shape {shape}: expected [batch, height, width, channels]")
    return {"input": inp["name"], "datatype": inp["datatype"], "size": (shape[1], shape[2]), "channels": shape[3],
            "output": out["name"], "classes": int(out["shape"][-1])}


def batches(images: list[np.ndarray], batch: int, offset: int, count: int | None = None) -> list[np.ndarray]:
    """Client `offset`'s requests: consecutive images from position `offset`, `batch` at a time, wrapping
    round. `count` batches; by default enough to come back to the first image, but at most
    max(len(images), 32) images (32 clients of batch 8 hold ~150 MB of 224x224 images, not 500)."""
    n = len(images)
    if count is None:
        count = n // int(np.gcd(n, batch))
        count = max(1, min(count, max(n, 32) // batch))
    out = []
    position = offset
    for _ in range(count):
        out.append(np.stack([images[(position + j) % n] for j in range(batch)]))
        position += batch
    return out


def _inputs(module, protocol: str, io: dict, array: np.ndarray) -> list:
    item = module.InferInput(io["input"], list(array.shape), io["datatype"])
    if protocol == "http":
        item.set_data_from_numpy(array, binary_data=True)
    else:
        item.set_data_from_numpy(array)
    return [item]


def _outputs(module, protocol: str, io: dict) -> list:
    if protocol == "http":
        return [module.InferRequestedOutput(io["output"], binary_data=True)]
    return [module.InferRequestedOutput(io["output"])]


def check_answer(array, batch: int, classes: int) -> str | None:
    """None when `array` is a finite FP32 (batch, classes) answer, else what is wrong with it."""
    if array is None:
        return "the answer has no output tensor"
    if array.shape != (batch, classes) or array.dtype != np.float32:
        return f"received output {array.dtype} {tuple(array.shape)}, expected float32 ({batch}, {classes})"
    if not np.isfinite(array).all():
        return "the output holds NaN or infinity"
    return None


def statistics(url: str, models: list[str], timeout: float = 10.0) -> dict[str, tuple[int, int]] | None:
    """{model: (inference_count, execution_count)} from V2 ModelStatistics over gRPC (None on failure)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = {}
    try:
        for model in models:
            stats = client.get_inference_statistics(model, as_json=True, client_timeout=timeout)
            entries = [e for e in stats.get("model_stats", []) if e.get("name") == model]
            out[model] = (sum(int(e.get("inference_count", 0)) for e in entries),
                          sum(int(e.get("execution_count", 0)) for e in entries))
    except Exception:  # noqa: BLE001 - a server without statistics: the report says n/a
        return None
    finally:
        client.close()
    return out


class _Run:
    """The shared state of one run's client threads."""

    def __init__(self, args, io: dict, images: list[np.ndarray]):
        self.args, self.io, self.images = args, io, images
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ready = threading.Barrier(args.clients + 1)
        self.samples: list[tuple[float, float]] = []  # (completion time, latency ms) of successes
        self.errors: list[tuple[float, str]] = []  # (time, message)

    def client(self, index: int) -> None:
        args, io = self.args, self.io
        module = _client_module(args.protocol)
        try:
            client = make_client(args.protocol, args.url, args.timeout)
            prepared = [_inputs(module, args.protocol, io, b) for b in batches(self.images, args.batch, index)]
            outputs = _outputs(module, args.protocol, io)
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on with the others
            with self.lock:
                self.errors.append((time.perf_counter(), f"client set-up: {type(exc).__name__}: {exc}"[:200]))
            self.ready.wait()
            return
        self.ready.wait()
        samples, errors, k = [], [], 0
        kwargs = {"client_timeout": args.timeout} if args.protocol == "grpc" else {}
        try:
            while not self.stop.is_set():
                inputs = prepared[k % len(prepared)]
                k += 1
                start = time.perf_counter()
                try:
                    result = client.infer(args.model, inputs, outputs=outputs, **kwargs)
                    problem = check_answer(result.as_numpy(io["output"]), args.batch, io["classes"])
                except Exception as exc:  # noqa: BLE001 - any failed request is an error of the run
                    problem = f"{type(exc).__name__}: {exc}"
                end = time.perf_counter()
                if problem is None:
                    samples.append((end, (end - start) * 1000.0))
                else:
                    errors.append((end, " ".join(problem.split())[:200]))
        finally:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
            with self.lock:
                self.samples += samples
                self.errors += errors


def run(args) -> dict:
    from benchmarks._images import image_arrays
    from benchmarks._method import process_tree_cpu

    io = model_io(args.protocol, args.url, args.model, args.timeout)
    if io["datatype"] != "UINT8" or io["channels"] != 3:
        raise SystemExit(f"error: model {args.model!r} takes {io['datatype']} with {io['channels']} channels; "
                         "this load generator sends uint8 RGB images")
    images = image_arrays(str(args.images or ""), io["size"])
    state = _Run(args, io, images)
    threads = [threading.Thread(target=state.client, args=(i,), daemon=True, name=f"client-{i}")
               for i in range(args.clients)]
    for t in threads:
        t.start()
    stats_url = args.stats_url or (args.url if args.protocol == "grpc" else "")
    stats_models = [m for m in (args.stats_models or args.model).split(",") if m]
    state.ready.wait()
    begin = time.perf_counter()
    time.sleep(args.warmup)
    before = statistics(stats_url, stats_models) if stats_url else None
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    server_before = process_tree_cpu(args.cpu_pids) if args.cpu_pids else None
    window_start = time.perf_counter()
    time.sleep(args.duration)
    window_end = time.perf_counter()
    server_after = process_tree_cpu(args.cpu_pids) if args.cpu_pids else None
    server_cpu = None  # a process of the tree that ended in the window took its CPU with it: not measured then
    if server_before is not None and server_after is not None and server_before[1] <= server_after[1]:
        server_cpu = server_after[0] - server_before[0]
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    after = statistics(stats_url, stats_models) if stats_url else None
    state.stop.set()
    for t in threads:
        t.join(timeout=args.timeout + 5)
    stuck = sum(t.is_alive() for t in threads)
    window = window_end - window_start
    measured = [lat for end, lat in state.samples if window_start <= end <= window_end]
    errors = [msg for end, msg in state.errors if window_start <= end <= window_end or end < begin]
    messages = Counter(errors)
    executed = {}
    if before and after:
        for model in stats_models:
            images_done = after[model][0] - before[model][0]
            batches_done = after[model][1] - before[model][1]
            executed[model] = {"inference_count": images_done, "execution_count": batches_done,
                               "mean_batch": images_done / batches_done if batches_done > 0 else None}
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    lat = np.asarray(measured, dtype=np.float64)

    def pct(q):
        return float(np.percentile(lat, q)) if lat.size else None

    return {
        "url": args.url, "protocol": args.protocol, "model": args.model, "clients": args.clients,
        "batch": args.batch, "warmup_s": args.warmup, "duration_s": args.duration, "window_s": round(window, 4),
        "requests": int(lat.size), "images": int(lat.size) * args.batch,
        "errors": len(errors), "error_messages": dict(messages.most_common(MAX_MESSAGES)),
        "requests_per_s": lat.size / window if window > 0 else None,
        "images_per_s": lat.size * args.batch / window if window > 0 else None,
        "mean_ms": float(lat.mean()) if lat.size else None, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_batch": (executed.get(args.model) or {}).get("mean_batch"), "executed": executed,
        "loadgen_cores": cpu / window if window > 0 else None, "stuck_clients": stuck,
        "server_cores": server_cpu / window if server_cpu is not None and window > 0 else None,
        "image_count": len(images), "input_size": list(io["size"]),
        "response_times_ms": [round(v, 3) for v in measured],
    }


def compare(args) -> dict:
    from benchmarks._images import image_arrays

    module = _client_module(args.protocol)
    ios = [model_io(args.protocol, url, args.model, args.timeout) for url in args.url]
    io = ios[0]
    if any((o["size"], o["classes"], o["input"], o["output"]) != (io["size"], io["classes"], io["input"], io["output"])
           for o in ios[1:]):
        return {"model": args.model, "error": f"the servers describe the model differently: {ios}"}
    images = image_arrays(str(args.images or ""), io["size"])
    answers = []
    for url in args.url:
        client = make_client(args.protocol, url, args.timeout)
        try:
            rows = []
            for image in images:
                result = client.infer(args.model, _inputs(module, args.protocol, io, image[None]),
                                      outputs=_outputs(module, args.protocol, io))
                rows.append(result.as_numpy(io["output"])[0])
            answers.append(np.stack(rows))
        finally:
            client.close()
    first = answers[0]
    return {"model": args.model, "images": len(images), "urls": list(args.url),
            "max_abs_diff": max(float(np.abs(a - first).max()) for a in answers[1:]) if len(answers) > 1 else 0.0,
            "top1_agreement": min(float((a.argmax(1) == first.argmax(1)).mean()) for a in answers[1:])
            if len(answers) > 1 else 1.0}


def _write(path: Path | None, data: dict) -> None:
    text = json.dumps(data)
    if path is None:
        print(text)
        return
    from serve._files import write_text_atomic  # serve's pure parts: no serve._proto in this process

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _pids(text: str) -> list[int]:
    try:
        pids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated process ids, received {text!r}") from None
    if any(p < 1 for p in pids):
        raise argparse.ArgumentTypeError(f"expected process ids >= 1, received {text!r}")
    return pids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_load", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one closed-loop load run against one server")
    r.add_argument("--url", required=True, help="host:port of the server's gRPC or HTTP port (--protocol)")
    r.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    r.add_argument("--model", required=True)
    r.add_argument("--clients", type=int, default=1, help="concurrent clients, one thread each (default 1)")
    r.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    r.add_argument("--duration", type=float, default=6.0, help="measured seconds (default 6)")
    r.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    r.add_argument("--stats-url", default="", help="gRPC host:port for V2 statistics (default --url for gRPC)")
    r.add_argument("--stats-models", default="", help="models whose statistics to read (default --model)")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it is an error")
    r.add_argument("--images", type=Path, help="image folder (default ../shared/photos, else synthetic)")
    r.add_argument("--output", type=Path, help="write the JSON record here (default stdout)")
    r.add_argument("--cpu-pids", type=_pids, default=[],
                   help="the server's process ids (comma-separated): record their CPU, and their children's, "
                        "over the measured window")
    c = sub.add_parser("compare", help="the same images through several servers: do the answers agree?")
    c.add_argument("--url", action="append", required=True, help="host:port (repeat for each server)")
    c.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    c.add_argument("--model", required=True)
    c.add_argument("--timeout", type=float, default=60.0)
    c.add_argument("--images", type=Path)
    c.add_argument("--output", type=Path)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and (args.clients < 1 or args.batch < 1 or args.duration <= 0 or args.warmup < 0):
        print("error: expected --clients >= 1, --batch >= 1, --duration > 0, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        data = run(args) if args.command == "run" else compare(args)
    except Exception as exc:  # noqa: BLE001 - tritonclient's errors (server unreachable, unknown model): one line
        if type(exc).__module__.split(".")[0] != "tritonclient":
            raise
        print(f"error: {args.model} at {args.url}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    _write(args.output, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
