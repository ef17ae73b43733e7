#!/usr/bin/env python3
"""`make image-test`: run the serving image as a user would and check it against the host's server.

    .venv/bin/python deploy/docker/image_test.py --repository .cache/image-repo --photos ../shared/photos

The image runs with its ENTRYPOINT's defaults (ports 8080/8081/8002, /mnt/models) and its own user, the
repository mounted read-only at /mnt/models. The repository must have been exported by another user than
the image's uid 1000 (root here) and is not changed for the image. Checks:

  1. the image keeps its HEALTHCHECK (Docker format), runs as uid 1000, ENTRYPOINT as documented;
  2. the HEALTHCHECK's URL answers ready within 10 s of the container's start, and the HEALTHCHECK
     command itself exits 0 inside the container;
  3. the server process runs as uid 1000 (real, effective, saved) and cannot write the repository;
  4. tritonclient gRPC (8081) and HTTP (8080) outputs are bit-equal to the host's `python -m serve` on the
     same repository, for every ready model and every photo (requests one at a time: no batching);
  5. Classify (HTTP /v1/classify and gRPC Classify) answers as the host's server does;
  6. /metrics on 8002 counts the requests sent;
  7. SIGTERM with 8 clients sending: every request started before it is answered correctly, readiness
     turns false while requests are still answered (--drain-delay), the process exits 0 within
     drain + grace;
  8. the repository's files are unchanged (mode, owner, content).

With buildah (no docker daemon, `podman run` broken) the script re-runs itself in a private network
namespace (unshare --net) so the image's fixed ports clash with nothing else on the machine. Figures go
to --json (default .cache/image-test.json). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as eng  # noqa: E402  (deploy/docker/engine.py, beside this file)

ROOT = eng.ROOT
IMAGE_UID = 1000
READY_WITHIN_S = 10.0  # the limit; --ready-within for an emulated architecture
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CLIENTS = 8


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    print(f"  ok  {message}", flush=True)


# ---- the repository --------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid, digest)
    return out


# ---- talking to a server ---------------------------------------------------------------------------
def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def classify_http(base: str, photo: bytes, models: str, timeout: float = 30.0) -> dict:
    request = urllib.request.Request(f"{base}/v1/classify?models={models}&top_k=5", data=photo, method="POST",
                                     headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def without_timings(value):
    """A Classify answer without what differs from run to run (times, batch sizes)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not (k.endswith("_ms") or k in ("batch_size", "batchSize") or k.endswith("Ms"))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


GRPC_CLASSIFY = r"""
import json, sys
from google.protobuf import json_format
from serve.client import KestrelClient
address, models = sys.argv[1], sys.argv[2].split(",")
out = []
with KestrelClient(address) as client:
    for path in sys.argv[3:]:
        out.append(json_format.MessageToDict(client.classify(path, models, top_k=5)))
print(json.dumps(out))
"""


def classify_grpc(address: str, photos: list[Path], models: str) -> list[dict]:
    """gRPC Classify through serve.client in a subprocess (its generated code and tritonclient's both
    define the protobuf package `inference`: never in one process)."""
    done = subprocess.run([sys.executable, "-c", GRPC_CLASSIFY, address, models, *map(str, photos)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise CheckFailed(f"gRPC Classify against {address} failed: {done.stderr[-1500:]}")
    return [without_timings(d) for d in json.loads(done.stdout)]


def wait_ready(url: str, timeout: float, process=None) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_get(url, timeout=1.0)[0] == 200:
            return time.monotonic() - started
        if process is not None and process.poll() is not None:
            return None
        time.sleep(0.05)
    return None


class HostServer:
    """`python -m serve` from this checkout's venv on the same repository: the reference."""

    def __init__(self, repository: Path, models: list[str], work: Path):
        self.port_file = work / "host-ports.json"
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "KESTREL_ORT_THREADS"}
        self.log = open(work / "host-server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve", "--repository", str(repository), "--models", ",".join(models),
             "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "-1",
             "--port-file", str(self.port_file)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self.port_file.is_file() or not self.port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"the host's server did not start; see {work / 'host-server.log'}")
            time.sleep(0.1)
        ports = json.loads(self.port_file.read_text())
        self.grpc, self.http = f"127.0.0.1:{ports['port']}", f"127.0.0.1:{ports['http_port']}"
        if wait_ready(f"http://{self.http}/v2/health/ready", 300, self.process) is None:
            raise CheckFailed(f"the host's server never became ready; see {work / 'host-server.log'}")

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def load_photos(folder: Path, size: tuple[int, int]) -> list[tuple[Path, np.ndarray]]:
    """Every decodable photo as a uint8 batch of one at the model's input size (any fixed decode will do:
    both servers get the same tensor)."""
    from PIL import Image

    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PHOTO_SUFFIXES:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
            out.append((path, pixels[None]))
    return out


def triton_outputs(grpc_url: str, http_url: str, model: str, batches: list[np.ndarray]) -> tuple[list, list]:
    """(gRPC outputs, HTTP outputs) from tritonclient, one request at a time; HTTP outputs in binary."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    g_client, h_client = grpcclient.InferenceServerClient(grpc_url), httpclient.InferenceServerClient(http_url)
    meta = g_client.get_model_metadata(model, as_json=True)
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    g_out, h_out = [], []
    try:
        for batch in batches:
            g_in = grpcclient.InferInput(in_name, list(batch.shape), "UINT8")
            g_in.set_data_from_numpy(batch)
            g_out.append(g_client.infer(model, [g_in], outputs=[grpcclient.InferRequestedOutput(out_name)])
                         .as_numpy(out_name))
            h_in = httpclient.InferInput(in_name, list(batch.shape), "UINT8")
            h_in.set_data_from_numpy(batch, binary_data=True)
            h_out.append(h_client.infer(model, [h_in], outputs=[httpclient.InferRequestedOutput(out_name,
                                                                                                 binary_data=True)])
                         .as_numpy(out_name))
    finally:
        g_client.close()
        h_client.close()
    return g_out, h_out


def bit_equal(a: list[np.ndarray], b: list[np.ndarray], atol: float = 0.0) -> bool:
    """Same dtype, shape and bytes; with atol > 0 (another CPU architecture), values within atol."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and (x.tobytes() == y.tobytes() if atol == 0 else bool(np.allclose(x, y, rtol=0, atol=atol)))
        for x, y in zip(a, b))


def same_answers(a, b, atol: float = 0.0) -> bool:
    """Classify answers (timings removed) equal; with atol > 0, probabilities within atol."""
    if atol == 0 or type(a) is not type(b):
        return a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_answers(a[k], b[k], atol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_answers(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= atol
    return a == b


def metric_sum(text: str, name: str, model: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- SIGTERM under load ----------------------------------------------------------------------------
def sigterm_under_load(container, grpc_url: str, http_url: str, ready_url: str, model: str, batch: np.ndarray,
                       expected: np.ndarray, photo: bytes, expected_classify: dict, drain: float,
                       grace: float, atol: float = 0.0) -> dict:
    import tritonclient.grpc as grpcclient

    records: list[tuple] = []  # (kind, start, end, outcome) outcome: "ok", "wrong", or the error text
    lock = threading.Lock()
    stop = threading.Event()
    done_counts = [0] * CLIENTS

    def grpc_worker(i: int):
        client = grpcclient.InferenceServerClient(grpc_url)
        inp = grpcclient.InferInput("images", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        while not stop.is_set():
            start = time.monotonic()
            try:
                out = client.infer(model, [inp], client_timeout=60).as_numpy("probabilities")
                outcome = "ok" if np.allclose(out, expected, rtol=0, atol=max(atol, 1e-5)) else "wrong"
            except Exception as exc:  # noqa: BLE001 - recorded, judged below
                outcome = f"error: {str(exc)[:120]}"
            with lock:
                records.append(("grpc", start, time.monotonic(), outcome))
                done_counts[i] += 1
            if outcome.startswith("error"):
                if time.monotonic() > kill_at[0] > 0:
                    break
                time.sleep(0.05)
        client.close()

    def http_worker(i: int):
        while not stop.is_set():
            start = time.monotonic()
            try:
                answer = without_timings(classify_http(http_url, photo, model, timeout=60))
                ok = [p["label"] for p in answer["models"][0]["predictions"]] == \
                    [p["label"] for p in expected_classify["models"][0]["predictions"]]
                outcome = "ok" if ok else "wrong"
            except Exception as exc:  # noqa: BLE001
                outcome = f"error: {str(exc)[:120]}"
            with lock:
                records.append(("http", start, time.monotonic(), outcome))
                done_counts[i] += 1
            if outcome.startswith("error"):
                if time.monotonic() > kill_at[0] > 0:
                    break
                time.sleep(0.05)

    kill_at = [0.0]
    threads = [threading.Thread(target=grpc_worker if i % 2 == 0 else http_worker, args=(i,), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while min(done_counts) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_at[0] = time.monotonic()
    container.kill(signal.SIGTERM)
    # readiness turns false at once while requests are still answered
    not_ready_after = None
    while time.monotonic() - kill_at[0] < drain:
        code, _ = http_get(ready_url, timeout=1.0)
        if code not in (200, 0):
            not_ready_after = time.monotonic() - kill_at[0]
            break
        time.sleep(0.05)
    try:
        code = container.wait(timeout=drain + grace + 30)
    except subprocess.TimeoutExpired:
        code = None
    exited_after = time.monotonic() - kill_at[0]
    stop.set()
    for t in threads:
        t.join(70)
    kill = kill_at[0]
    # the ports close `drain` s after SIGTERM (the server's clock starts a little later than ours): requests
    # started before then (10 ms margin) must all be answered, those in flight at the close included;
    # requests started after it may be refused, ideally as UNAVAILABLE / 503 / connection refused
    close = kill + drain
    before = [r for r in records if r[1] < kill]
    in_flight = [r for r in before if r[2] > kill]
    draining = [r for r in records if kill <= r[1] < close - 0.01]
    in_flight_at_close = [r for r in records if r[1] < close - 0.01 and r[2] > close]
    late = [r for r in records if r[1] >= close - 0.01]
    refused = [r for r in late if r[3] != "ok"]
    odd = [r for r in refused if not re.search(r"shutting down|503|[Cc]onnection refused|failed to connect|"
                                               r"Errno 111", r[3])]

    def rel(rows):  # (kind, seconds after SIGTERM it started, ... it ended, outcome)
        return [(k, round(a - kill, 3), round(b - kill, 3), o) for k, a, b, o in rows]

    return {
        "exit_code": code, "exited_after_s": round(exited_after, 2), "not_ready_after_s": not_ready_after,
        "requests_before_sigterm": len(before), "in_flight_at_sigterm": len(in_flight),
        "requests_during_drain": len(draining), "in_flight_at_close": len(in_flight_at_close),
        "not_answered_before_close": rel([r for r in before + draining if r[3] != "ok"]),
        "wrong_answers": rel([r for r in records if r[3] == "wrong"]),
        "refused_after_close": len(refused),
        "refusals": sorted({re.sub(r"\d+", "N", r[3])[:100] for r in refused}),
        "unusual_refusals": rel(odd),
    }


# ---- the test ----------------------------------------------------------------------------------------
def run(args) -> dict:
    results: dict = {"image": args.image}
    repository = args.repository.resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    engine = eng.choose_engine(args.engine)
    runner = eng.choose_runner(engine, args.image, args.runner)
    results.update(engine=engine, runner=runner)
    print(f"[image-test] image {args.image} ({engine}), run with {runner}; repository {repository}", flush=True)

    print("1. the image", flush=True)
    config = eng.inspect_image(engine, args.image)
    health = config.get("Healthcheck") or {}
    check(bool(health.get("Test")), f"HEALTHCHECK kept (Docker format): {health.get('Test')}")
    check(str(config.get("User")) == str(IMAGE_UID), f"USER {config.get('User')}")
    entry = list(config.get("Entrypoint") or [])
    check(entry[:3] == ["python", "-m", "serve"] and "/mnt/models" in entry, f"ENTRYPOINT {' '.join(entry)}")
    ports = {name: int(entry[entry.index(flag) + 1]) for name, flag in
             (("http", "--http-port"), ("grpc", "--port"), ("metrics", "--metrics-port"))}
    drain = float(entry[entry.index("--drain-delay") + 1]) if "--drain-delay" in entry else 0.0
    grace = float(entry[entry.index("--grace") + 1]) if "--grace" in entry else 5.0
    health_cmd = health["Test"][1:] if health["Test"][0] == "CMD" else ["/bin/sh", "-c", health["Test"][1]]
    ready_path = re.search(r"https?://[^/'\"]+(/[^'\" ]*)", " ".join(health["Test"])).group(1)

    owners = {st.st_uid for st in (p.lstat() for p in [repository, *repository.rglob("*")])}
    check(IMAGE_UID not in owners, f"the repository is owned by uid {sorted(owners)}, not the image's {IMAGE_UID}: "
          "exported by another user")
    before = snapshot(repository)
    models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt")
                    if '"ensemble"' not in p.read_text() and not p.parent.name.endswith("_keras"))
    ensembles = sorted(p.parent.name for p in repository.glob("*/config.pbtxt") if '"ensemble"' in p.read_text())
    check(bool(models), f"models to compare: {', '.join(models)}; ensembles: {', '.join(ensembles) or 'none'}")
    if "mobilenet_v2" in models:  # the first model is the one Classify, /metrics and SIGTERM use
        models.insert(0, models.pop(models.index("mobilenet_v2")))

    host = HostServer(repository, models + ensembles, work)
    container = eng.Container(runner, args.image, volumes=[(repository, "/mnt/models", True)],
                              log_path=work / "image-server.log")
    try:
        print("2. start and HEALTHCHECK", flush=True)
        container.start()
        http = f"http://127.0.0.1:{container.host_port(ports['http'])}"
        grpc_url = f"127.0.0.1:{container.host_port(ports['grpc'])}"
        metrics_url = f"http://127.0.0.1:{container.host_port(ports['metrics'])}/metrics"
        ready_url = http + ready_path
        ready_s = wait_ready(ready_url, max(120, 2 * args.ready_within),
                             container.process if runner == "buildah" else None)
        results["ready_s"] = None if ready_s is None else round(ready_s, 2)
        check(ready_s is not None and ready_s <= args.ready_within,
              f"{ready_path} ready {results['ready_s']} s after the container's start (limit {args.ready_within:g} s)")
        done = container.exec(health_cmd)
        check(done.returncode == 0, f"the HEALTHCHECK command exits {done.returncode} inside the container")
        code, body = http_get(f"{http}/v2/models/{models[0]}/ready")
        check(code == 200, f"model {models[0]} READY in the image")

        print("3. user and read-only repository", flush=True)
        pid = container.server_pid()
        status = eng.proc_status(pid)
        uids = status["Uid"].split()
        results["server_uid"] = uids
        check(set(uids) == {str(IMAGE_UID)}, f"the server (pid {pid}) runs as uid {uids} (real, effective, saved, fs)")
        probe = ("import os, sys\nfor how, path in (('a', sys.argv[1]), ('w', sys.argv[2])):\n"
                 "    try:\n        open(path, how).close(); print('WROTE', path)\n"
                 "    except OSError as exc:\n        print('DENIED', path, exc.strerror)\n")
        target = f"/mnt/models/{models[0]}/config.pbtxt"
        done = container.exec(["python", "-c", probe, target, f"/mnt/models/{models[0]}/new-file"])
        for line in done.stdout.strip().splitlines():
            print(f"      {line}", flush=True)
        check(done.returncode == 0 and done.stdout.count("DENIED") == 2 and "WROTE" not in done.stdout,
              "the image's user can neither modify nor create files in /mnt/models")

        print("4. tritonclient outputs, image vs host", flush=True)
        compared = 0
        sizes = {m: tuple(json.loads(http_get(f"{http}/v2/models/{m}")[1])["inputs"][0]["shape"][1:3]) for m in models}
        for model in models:
            photos = load_photos(args.photos, sizes[model])
            batches = [b for _, b in photos]
            img_g, img_h = triton_outputs(grpc_url, http.split("//")[1], model, batches)
            ref_g, ref_h = triton_outputs(host.grpc, host.http, model, batches)
            pairs = list(zip(img_g + img_h, ref_g + ref_h))  # different shapes fail the check, not this line
            worst = max((float(np.abs(x - y).max()) if x.shape == y.shape else float("inf") for x, y in pairs),
                        default=0.0)
            check(bit_equal(img_g, ref_g, args.atol) and bit_equal(img_h, ref_h, args.atol) and bit_equal(img_g, img_h),
                  f"{model}: gRPC and HTTP outputs {'bit-equal' if args.atol == 0 else f'within {args.atol:g}'} "
                  f"to the host's for {len(batches)} photos (max |diff| {worst:.2g})")
            compared += 4 * len(batches)
        results["bit_equal_requests"] = compared

        print("5. Classify", flush=True)
        photo_paths = [p for p, _ in load_photos(args.photos, (8, 8))]
        for model in [models[0]] + ensembles:
            same = all(same_answers(without_timings(classify_http(http, p.read_bytes(), model)),
                                    without_timings(classify_http(f"http://{host.http}", p.read_bytes(), model)),
                                    args.atol) for p in photo_paths)
            check(same, f"HTTP /v1/classify {model}: the host's answers for {len(photo_paths)} photos")
        joined = ",".join(models)
        check(same_answers(classify_grpc(grpc_url, photo_paths, joined), classify_grpc(host.grpc, photo_paths, joined),
                           args.atol),
              f"gRPC Classify {joined}: the host's answers for {len(photo_paths)} photos")

        print("6. /metrics", flush=True)
        code, body = http_get(metrics_url)
        text = body.decode()
        success = metric_sum(text, "nv_inference_request_success", models[0])
        ready_gauge = metric_sum(text, "kestrel_model_ready", models[0])
        results["metrics"] = {"nv_inference_request_success": success}
        check(code == 200 and success >= 2 * len(photo_paths) and ready_gauge == 1,
              f"/metrics on {ports['metrics']}: {models[0]} success {success:.0f} (sent >= {2 * len(photo_paths)}), "
              f"kestrel_model_ready {ready_gauge:.0f}")

        print(f"7. SIGTERM with {CLIENTS} clients sending (drain {drain:g} s, grace {grace:g} s)", flush=True)
        first, batch = load_photos(args.photos, sizes[models[0]])[0]
        expected = triton_outputs(host.grpc, host.http, models[0], [batch])[0][0]
        expected_classify = without_timings(classify_http(f"http://{host.http}", first.read_bytes(), models[0]))
        shutdown = sigterm_under_load(container, grpc_url, http, ready_url, models[0], batch, expected,
                                      first.read_bytes(), expected_classify, drain, grace, args.atol)
        results["sigterm"] = shutdown
        print(f"      {json.dumps(shutdown)}", flush=True)
        check(shutdown["in_flight_at_sigterm"] >= 1 and shutdown["in_flight_at_close"] >= 1,
              f"{shutdown['in_flight_at_sigterm']} requests in flight when SIGTERM arrived, "
              f"{shutdown['in_flight_at_close']} when the ports closed {drain:g} s later")
        check(not shutdown["not_answered_before_close"],
              f"all {shutdown['requests_before_sigterm']} requests started before SIGTERM and all "
              f"{shutdown['requests_during_drain']} started during the drain answered, those in flight at the close "
              f"included" + (f" (not: {shutdown['not_answered_before_close'][:3]})"
                             if shutdown["not_answered_before_close"] else ""))
        check(not shutdown["wrong_answers"], "no wrong answer at any time")
        check(shutdown["not_ready_after_s"] is not None,
              f"readiness false {shutdown['not_ready_after_s']:.2f} s after SIGTERM")
        print(f"      after the close: {shutdown['refused_after_close']} refused ({shutdown['refusals']})", flush=True)
        if shutdown["unusual_refusals"]:
            print(f"      note: refused otherwise than UNAVAILABLE / 503 / connection refused: "
                  f"{shutdown['unusual_refusals']}", flush=True)
        check(shutdown["exit_code"] == 0 and shutdown["exited_after_s"] <= drain + grace + 5,
              f"exit code {shutdown['exit_code']} after {shutdown['exited_after_s']} s (drain {drain:g} + grace {grace:g})")
    finally:
        container.remove()
        host.close()

    print("8. the repository", flush=True)
    check(snapshot(repository) == before, f"{len(before)} files and folders unchanged (mode, owner, content)")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=eng.DEFAULT_TAG)
    p.add_argument("--repository", type=Path, required=True, help="exported by another user than uid 1000")
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "photos")
    p.add_argument("--engine", help="docker, podman or buildah (as engine.py)")
    p.add_argument("--runner", help="docker, podman or buildah: what runs the image (default: the first that works)")
    p.add_argument("--ready-within", type=float, default=READY_WITHIN_S, help="seconds (default %(default)s)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="compare outputs within this absolute tolerance instead of bit for bit (an image for "
                        "another CPU architecture, e.g. arm64 under qemu, computes with other kernels)")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "image-test")
    p.add_argument("--json", type=Path, default=ROOT / ".cache" / "image-test.json")
    args = p.parse_args(argv)
    engine = eng.choose_engine(args.engine)
    if eng.choose_runner(engine, args.image, args.runner) == "buildah":
        eng.private_network([str(Path(__file__).resolve()), *argv])
    started = time.monotonic()
    try:
        results = run(args)
    except (CheckFailed, eng.EngineError, subprocess.CalledProcessError) as exc:
        print(f"[image-test] FAILED: {exc} (logs in {args.work})", file=sys.stderr)
        return 1
    results["seconds"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"[image-test] PASSED in {results['seconds']} s; figures in {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
