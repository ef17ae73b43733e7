"""An ensemble's served latency at concurrency 1 against its slowest member's.

    python -m benchmarks.ensemble_latency --repository models --ensemble imagenet \\
        --images ../shared/photos --repeats 200 [--ort-threads 1] [--json result.json]
    python -m benchmarks.ensemble_latency --smoke          # fake models, seconds: checks the pipeline

One `python -m serve` serves the members and the ensemble (a repository
ensemble by NAME, or NAME=a,b,c[:fusion] given on the command line); one client
sends Classify requests one at a time, for each member alone and for the
ensemble, interleaved (the order rotates every round) so background load hits
every target alike. The server runs an ensemble's members concurrently, so its
latency should stay near its slowest member's: the report gives each median,
the ratio ensemble / slowest member (goal <= 1.3x) and, for scale, the sum of
the members' medians (what running them one after another would cost).

With onnxruntime members, each session uses every core by default; members
running at the same time then compete for them. --ort-threads N pins every
session to N intra-op threads (try cores / members). Run on a quiet machine:
on a shared one the ratio says little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.3
SMOKE_DELAYS_MS = {"fake_fast": 10.0, "fake_mid": 20.0, "fake_slow": 30.0}


def _smoke_repository(folder: Path) -> tuple[Path, str, Path]:
    """Three fake members of different input sizes and compute times, an ensemble of them, and photos."""
    import numpy as np
    from PIL import Image

    from serve.backends.fake import write_fake_model
    from serve.repository import write_ensemble

    repo = folder / "models"
    sizes = [(32, 32), (48, 40), (40, 40)]
    for (name, delay), size in zip(SMOKE_DELAYS_MS.items(), sizes):
        write_fake_model(repo, name, labels=[f"c{i}" for i in range(10)], size=size, delay_ms=delay)
    write_ensemble(repo, "fake_trio", list(SMOKE_DELAYS_MS), fusion="mean")
    photos = folder / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), np.uint8)).save(photos / f"p{i}.jpg", quality=90)
    return repo, "fake_trio", photos


def _members(repository: Path, ensemble: str) -> tuple[str, list[str], list[str]]:
    """(name, members, extra server args) for a repository ensemble NAME or a NAME=a,b[:fusion] spec."""
    from serve.ensemble import Ensemble
    from serve.repository import ModelRepository

    if "=" in ensemble:
        ens = Ensemble.parse(ensemble)
        return ens.name, list(ens.members), ["--ensemble", ensemble]
    ens = Ensemble.from_entry(ModelRepository(repository).ensemble(ensemble))
    return ens.name, list(ens.members), []


def measure(repository: Path, ensemble: str, images_dir: Path, *, repeats: int, warmup: int, ort_threads: int,
            log_dir: Path, progress: bool = True) -> dict:
    from benchmarks import _method
    from benchmarks._procs import KestrelServer
    from serve import KestrelClient, images
    from serve.errors import KestrelError

    name, members, extra = _members(repository, ensemble)
    paths = [images_dir] if images_dir.is_file() else images.find_images(images_dir)
    if not paths:
        raise KestrelError(f"no images in {images_dir}; pass --images FILE_OR_DIR")
    pictures = [p.read_bytes() for p in paths]
    if ort_threads:
        extra += ["--ort-threads", str(ort_threads)]
    targets = members + [name]
    server = KestrelServer(repository, members + ([] if extra[:1] == ["--ensemble"] else [name]),
                           log_dir / "serve.log", extra_args=extra)
    times: dict[str, list[float]] = {t: [] for t in targets}
    server_ms: dict[str, list[float]] = {t: [] for t in targets}
    member_compute: dict[str, list[float]] = {m: [] for m in members}
    try:
        server.wait_ready(timeout=300)
        with KestrelClient(server.address, timeout=120) as client:
            for i in range(warmup):
                for target in targets:
                    client.classify(pictures[i % len(pictures)], [target], top_k=3)
            schedule = _method.interleaved(targets, repeats)
            bar = None
            if progress:
                from serve.console import progress  # a bar on a terminal, lines in logs
                bar = progress(total=len(schedule), desc="ensemble latency", unit="req", file=sys.stderr, leave=False)
            for r, target in schedule:
                data = pictures[r % len(pictures)]
                t0 = time.perf_counter()
                response = client.classify(data, [target], top_k=3)
                times[target].append((time.perf_counter() - t0) * 1e3)
                server_ms[target].append(response.total_ms)
                if target == name:
                    for result in response.results:
                        member_compute[result.model].append(result.compute_ms)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    finally:
        server.stop()
    medians = {t: _method.median(v) for t, v in times.items()}
    slowest = max(members, key=lambda m: medians[m])
    try:
        from serve import cpuinfo
        cpu = cpuinfo.describe()
    except Exception as exc:  # describing the CPU must never fail a benchmark
        cpu = {"summary": f"unknown ({exc})"}
    ratio = _method.ratio(medians[name], medians[slowest])
    return {
        "ensemble": name, "members": members, "repository": str(repository), "images": len(pictures),
        "repeats": repeats, "ort_threads": ort_threads or None,
        "median_ms": {t: round(v, 2) for t, v in medians.items()},
        "p90_ms": {t: round(_method.percentiles(v, [90])["p90"], 2) for t, v in times.items()},
        "server_total_median_ms": {t: round(_method.median(v), 2) for t, v in server_ms.items()},
        "member_compute_median_ms_in_ensemble": {m: round(_method.median(v), 2) for m, v in member_compute.items()},
        "slowest_member": slowest,
        "ratio_to_slowest": round(ratio, 3),
        "sum_of_members_ms": round(sum(medians[m] for m in members), 2),
        "target_ratio": TARGET_RATIO, "within_target": bool(ratio <= TARGET_RATIO),
        "cpu": cpu, "machine": _method.machine_info(),
    }


def report(result: dict) -> str:
    name = result["ensemble"]
    lines = [f"{'target':<28}{'median ms':>11}{'p90 ms':>10}"]
    for target in result["members"] + [name]:
        label = f"{target} (ensemble)" if target == name else target
        lines.append(f"{label:<28}{result['median_ms'][target]:>11.2f}{result['p90_ms'][target]:>10.2f}")
    lines.append(f"ensemble / slowest member ({result['slowest_member']}): {result['ratio_to_slowest']:.2f}x "
                 f"(goal <= {result['target_ratio']}x: {'met' if result['within_target'] else 'NOT met'}); "
                 f"members one after another would take ~{result['sum_of_members_ms']:.1f} ms")
    cpu = result.get("cpu", {})
    load = result.get("machine", {}).get("load_average")
    lines.append(f"CPU: {cpu.get('cpu') or cpu.get('summary', '?')}, {cpu.get('isa', '')}; "
                 f"load average {load[0]:.2f}" if load else f"CPU: {cpu.get('cpu') or cpu.get('summary', '?')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensemble_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--ensemble", default="imagenet",
                        help="a repository ensemble's NAME, or NAME=a,b,c[:fusion] (default imagenet)")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "photos",
                        help="an image file or a folder of images (default ../shared/photos)")
    parser.add_argument("--repeats", type=int, default=200, help="measured requests per target (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per target first")
    parser.add_argument("--ort-threads", type=int, default=0, help="onnxruntime intra-op threads per member")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--smoke", action="store_true",
                        help="fake members (10/20/30 ms, three input sizes) in a temporary repository")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from serve.errors import KestrelError

    if args.repeats < 1 or args.warmup < 0:
        print(f"error: --repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kestrel-ensemble-latency-") as tmp:
        tmp = Path(tmp)
        repository, ensemble, images_dir = args.repository, args.ensemble, args.images
        if args.smoke:
            repository, ensemble, images_dir = _smoke_repository(tmp)
        try:
            result = measure(repository, ensemble, images_dir, repeats=args.repeats, warmup=args.warmup,
                             ort_threads=args.ort_threads, log_dir=tmp, progress=not args.quiet)
        except KestrelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(report(result))
    if args.json:
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_json.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp_json, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
