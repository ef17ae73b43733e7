"""The Triton comparison's report: Markdown tables, Kestrel/Triton ratios, the ceiling, the ensemble, plots.

    vs_triton_report.write(folder, meta, rows, ceiling, ensemble, parity, request_path)  # report.md and the plots
    python -m benchmarks.vs_triton_report FOLDER                          # rebuild them from FOLDER/results.json

Every number is the median over rounds (range over rounds in parentheses); a ratio is the ratio of
the medians, with the range of the per-round (paired: the two servers ran back to back) ratios.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from . import _method
from .request_path import NAME as REQUEST_PATH_MODEL
from .request_path import summarise as summarise_request_path

SERVERS = ("kestrel", "triton")
METRICS = ("images_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "loadgen_cores", "foreign_cores", "busy_cores")
NAMES = {"kestrel": "Kestrel", "triton": "Triton", "grpc": "gRPC", "http": "HTTP", "fp32": "FP32", "int8": "INT8"}
TRITON_BACKEND_NOTE = ("Triton's native onnxruntime backend is not in that wheel, so this is Triton with its Python "
                       "backend")


def groups(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(precision, protocol, batch) in the order they were run."""
    seen = []
    for r in rows:
        key = (r["precision"], r["protocol"], int(r["batch"]))
        if key not in seen:
            seen.append(key)
    return seen


def server_cores(row: dict) -> float | None:
    """The cores' worth of CPU the run's server used (its processes, Triton's stub included) over the measured
    window (`server_cores`, recorded since 2026-12-07); for older runs `own_cores`, which also counted the load
    generator, the other (idle) server and the run's start-up and warm-up (see cpu_note)."""
    value = row.get("server_cores")
    return value if value is not None else row.get("own_cores")


def cpu_note(rows: list[dict]) -> str:
    """A warning when some run's CPU per image comes from the older, wider measurement."""
    if any(r.get("server_cores") is None and r.get("own_cores") is not None for r in rows if _method.completed(r)):
        return (" These runs predate the per-window measurement: their CPU was taken from the load generator's "
                "start to its end and includes the load generator's own CPU and the idle other server's (the same for "
                "both servers' runs), so compare the two servers' figures with each other, not with a model's cost.")
    return ""


def aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """{(precision, protocol, batch, clients, server): {metric: Spread, 'errors', 'requests', 'runs', 'failed'}}."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        found[(r["precision"], r["protocol"], int(r["batch"]), int(r["clients"]), r["server"])].append(r)
    out = {}
    for key, items in found.items():
        ok = [r for r in items if _method.completed(r)]
        out[key] = {m: _method.over_repeats(r.get(m) for r in ok) for m in METRICS}
        # the server's CPU (its process and children: Triton's stub too) per image served, ms: where a server's
        # request path costs more, it shows here even when the two serve the same img/s
        out[key]["cpu_ms_per_image"] = _method.over_repeats(
            1000 * _method.ratio(server_cores(r), r.get("images_per_s")) for r in ok)
        out[key].update(errors=sum(int(r.get("errors") or 0) for r in items),
                        requests=sum(int(r.get("requests") or 0) for r in items), runs=len(ok),
                        failed=[r["error"] for r in items if r.get("error")], model=items[0].get("model"))
    return out


def paired(rows: list[dict], cell: tuple, metric: str = "images_per_s") -> list[float]:
    """Per-round Kestrel/Triton ratios of `metric` in `cell` = (precision, protocol, batch, clients)."""
    rounds: dict[int, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if (r["precision"], r["protocol"], int(r["batch"]), int(r["clients"])) == cell and _method.completed(r):
            rounds[int(r["repeat"])][r["server"]] = r.get(metric)
    out = []
    for values in rounds.values():
        value = _method.ratio(values.get("kestrel"), values.get("triton"))
        if not math.isnan(value):
            out.append(value)
    return out


def ratio(agg: dict, cell: tuple, metric: str = "images_per_s") -> float:
    k, t = agg.get(cell + ("kestrel",)), agg.get(cell + ("triton",))
    if not k or not t:
        return float("nan")
    return _method.ratio(k[metric].median, t[metric].median)


def ratio_text(agg: dict, rows: list[dict], cell: tuple, metric: str = "images_per_s") -> str:
    value = ratio(agg, cell, metric)
    if math.isnan(value):
        return "n/a"
    spread = paired(rows, cell, metric)
    if len(spread) > 1:
        return f"{value:.2f} ({min(spread):.2f}-{max(spread):.2f})"
    return f"{value:.2f}"


def per_image_seconds(costs: dict, mean_batch: float) -> float:
    """Seconds per image at `mean_batch` from {batch: {"median_ms"}}, linear between the whole batch sizes
    measured around it (clamped to the measured range)."""
    sizes = sorted(int(b) for b in costs)
    if not sizes or mean_batch is None or math.isnan(mean_batch):
        return float("nan")
    table = {int(b): v for b, v in costs.items()}
    b = min(max(float(mean_batch), sizes[0]), sizes[-1])
    below = max(x for x in sizes if x <= b)
    above = min(x for x in sizes if x >= b)

    def cost(x):
        return table[x]["median_ms"] / 1000.0 / x

    if above == below:
        return cost(below)
    return cost(below) + (b - below) / (above - below) * (cost(above) - cost(below))


def ceiling_at(ceiling: dict, model: str, mean_batch: float) -> float:
    """In-process images/s of `model` at the (mean) batch size a server formed."""
    seconds = per_image_seconds((ceiling.get("costs") or {}).get(model, {}), mean_batch)
    return 1.0 / seconds if seconds and not math.isnan(seconds) else float("nan")


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f} %"


def _num(value, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def group_title(group: tuple) -> str:
    precision, protocol, batch = group
    return f"{NAMES[precision]}, {NAMES[protocol]}, batch {batch}"


# ---- the text -----------------------------------------------------------------------------------
def headline(meta: dict, rows: list[dict], agg: dict, ceiling: dict, ensemble: dict) -> list[str]:
    lines = []
    for group in groups(rows):
        levels = sorted({c for (p, pr, b, c, _s) in agg if (p, pr, b) == group})
        parts = [f"{_num(ratio(agg, group + (c,)), 2)} at {c}" for c in levels]
        p95 = [f"{_num(ratio(agg, group + (c,), 'p95_ms'), 2)} at {c}" for c in levels]
        lines.append(f"- **{group_title(group)}**: Kestrel/Triton throughput {', '.join(parts)} client(s); "
                     f"p95 latency Kestrel/Triton {', '.join(p95)} (below 1 = Kestrel faster).")
    for group in groups(rows):
        levels = sorted({c for (p, pr, b, c, _s) in agg if (p, pr, b) == group})
        if not levels or not ceiling.get("costs"):
            continue
        level = min(levels, key=lambda c: (abs(c - 16), -c))
        k = agg.get(group + (level, "kestrel"))
        t = agg.get(group + (level, "triton"))
        if not k:
            continue
        model = k["model"]
        kc = ceiling_at(ceiling, model, k["mean_batch"].median)
        text = (f"- {group_title(group)}, {level} clients: Kestrel {_num(k['images_per_s'].median)} img/s = "
                f"{_pct(_method.ratio(k['images_per_s'].median, kc))} of onnxruntime alone in one process at its "
                f"mean batch {_num(k['mean_batch'].median, 2)} ({_num(kc)} img/s)")
        if t:
            tc = ceiling_at(ceiling, model, t["mean_batch"].median)
            text += (f"; Triton {_num(t['images_per_s'].median)} img/s = "
                     f"{_pct(_method.ratio(t['images_per_s'].median, tc))} at its mean batch "
                     f"{_num(t['mean_batch'].median, 2)}")
        lines.append(text + ".")
        break  # the first group (FP32 gRPC batch 1 by default) is the comparison point
    limit = (ensemble or {}).get("limit")
    if limit:
        lines.append(f"- Ensemble {ensemble['name']} ({', '.join(ensemble['members'])}) at {ensemble['clients']} "
                     f"clients through Kestrel: {_num(limit['throughput'])} img/s = {_pct(limit['fraction'])} of the "
                     f"{_num(limit['limit'])} img/s its members' summed in-process cost allows"
                     + (f" ({_pct(limit['side_by_side_fraction'])} of {_num(limit['side_by_side_limit'])} img/s with "
                        "their batches side by side, as the server runs them)." if "side_by_side_limit" in limit
                        else "."))
    return lines


def results_tables(rows: list[dict], agg: dict, ceiling: dict) -> list[str]:
    lines = []
    for group in groups(rows):
        lines += [f"### {group_title(group)}", "",
                  "| clients | Kestrel img/s | Triton img/s | Kestrel/Triton | batch formed K / T | "
                  "% of in-process ceiling K / T | server CPU ms/image K / T | errors K / T |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        levels = sorted({c for (p, pr, b, c, _s) in agg if (p, pr, b) == group})
        for c in levels:
            k, t = agg.get(group + (c, "kestrel")), agg.get(group + (c, "triton"))

            def cell(a, metric, digits=1):
                return a[metric].format(digits) if a else "n/a"

            def share(a):
                if not a:
                    return "n/a"
                return _pct(_method.ratio(a["images_per_s"].median, ceiling_at(ceiling, a["model"],
                                                                              a["mean_batch"].median)))

            def cpu(a):
                return _num(a["cpu_ms_per_image"].median, 2) if a else "n/a"

            def errors(a):
                if not a:
                    return "n/a"
                return str(a["errors"]) + (f" (+{len(a['failed'])} failed runs)" if a["failed"] else "")

            lines.append(f"| {c} | {cell(k, 'images_per_s')} | {cell(t, 'images_per_s')} | "
                         f"{ratio_text(agg, rows, group + (c,))} | {cell(k, 'mean_batch', 2)} / "
                         f"{cell(t, 'mean_batch', 2)} | {share(k)} / {share(t)} | {cpu(k)} / {cpu(t)} | "
                         f"{errors(k)} / {errors(t)} |")
        lines.append("")
    return lines


def latency_tables(rows: list[dict], agg: dict) -> list[str]:
    lines = ["p50 / p95 / p99 of each request's round trip as the client saw it, ms (medians over rounds); "
             "p95 ratio below 1: Kestrel's tail is shorter.", ""]
    for group in groups(rows):
        lines += [f"### {group_title(group)}", "",
                  "| clients | Kestrel p50 / p95 / p99 | Triton p50 / p95 / p99 | p95 Kestrel/Triton |",
                  "|---:|---:|---:|---:|"]
        levels = sorted({c for (p, pr, b, c, _s) in agg if (p, pr, b) == group})
        for c in levels:
            k, t = agg.get(group + (c, "kestrel")), agg.get(group + (c, "triton"))

            def trio(a):
                if not a:
                    return "n/a"
                return " / ".join(_num(a[m].median) for m in ("p50_ms", "p95_ms", "p99_ms"))

            lines.append(f"| {c} | {trio(k)} | {trio(t)} | {ratio_text(agg, rows, group + (c,), 'p95_ms')} |")
        lines.append("")
    return lines


def ceiling_table(ceiling: dict) -> list[str]:
    costs = ceiling.get("costs") or {}
    if not costs:
        return ["Not measured.", ""]
    lines = ["| model | batch | ms per batch (range) | img/s |", "|---|---:|---:|---:|"]
    for model, table in costs.items():
        for batch in sorted(table, key=int):
            v = table[batch]
            spread = _method.Spread(v["median_ms"], v["low_ms"], v["high_ms"], 2)
            lines.append(f"| {model} | {batch} | {spread.format(2)} | {_num(v['images_per_s'])} |")
    load = ceiling.get("load") or {}
    lines += ["", f"Measured with both servers stopped; other processes used {_num(load.get('foreign_cores'), 2)} "
                  "cores meanwhile.", ""]
    return lines


def ensemble_lines(ensemble: dict) -> list[str]:
    if not ensemble:
        return ["Not run (no ensemble in the repository, or `--ensemble ''`).", ""]
    limit = ensemble.get("limit") or {}
    runs = ensemble.get("runs") or []
    lines = [f"Ensemble `{ensemble['name']}` = {', '.join(ensemble['members'])}, served by Kestrel, "
             f"{ensemble['clients']} threaded tritonclient gRPC clients, batch-1 ModelInfer requests, "
             f"{len(runs)} round(s). Each member's in-process cost per image is taken at the mean batch the server "
             "formed for it (ModelStatistics over the window; linear between the whole batch sizes measured "
             "around it); their sum is the work one image needs, so 1 / sum is the most images per second the "
             "cores can give the ensemble if nothing else cost anything. The cost is taken in the session a lone "
             "batch runs in (every core); under load the server runs each member's batches side by side on one "
             "core each (adaptive threads), which that cost does not credit, so the last column gives the cost "
             "measured that way (onnxruntime alone, two batches of that size side by side, both cores busy) and "
             "the limit it allows.", "",
             "| member | batch formed | in-process ms per image | side by side, ms per image |",
             "|---|---:|---:|---:|"]
    for m, v in (limit.get("members") or {}).items():
        lines.append(f"| {m} | {_num(v['mean_batch'], 2)} | {_num(v['ms_per_image'], 2)} | "
                     f"{_num(v.get('side_by_side_ms_per_image', float('nan')), 2)} |")
    lines += ["", f"Limit: {_num(limit.get('limit'))} img/s. Measured: {_num(limit.get('throughput'))} img/s "
                  f"(p95 {_num(limit.get('p95_ms'))} ms, errors {limit.get('errors', 'n/a')}) = "
                  f"**{_pct(limit.get('fraction', float('nan')))} of the limit**."]
    if "side_by_side_limit" in limit:
        lines.append(f"With the members' batches side by side: limit {_num(limit['side_by_side_limit'])} img/s, "
                     f"measured = **{_pct(limit['side_by_side_fraction'])} of it**.")
    return lines + [""]


def _errors(line: dict) -> str:
    return str(line["errors"]) + (f" (+{line['failed']} failed runs)" if line.get("failed") else "")


def request_path_lines(request_path: dict) -> list[str]:
    """The request path alone: each server's CPU per request with a model that does no work."""
    rows = (request_path or {}).get("rows") or []
    if not rows:
        return []
    lines = ["## The request path alone", "",
             f"Both servers serving `{REQUEST_PATH_MODEL}`, a model that does no work (an ONNX graph that only "
             f"broadcasts a constant row to the batch's size, one file for both) with `{request_path.get('source')}`'s "
             "input, output, batching limits and parameters; batch-1 requests, servers alternated, medians over "
             "rounds (range in parentheses). *CPU µs/request*: the CPU time of the server's processes (Triton's "
             "python-backend stub included) over the measured window per request answered: receiving, decoding, "
             "batching and answering a request, which the model's work shares the cores with; part of it is paid "
             "per batch, so it also depends on the batch each server formed. *Kestrel − Triton*: the median of the "
             "rounds' differences.", "",
             "| protocol | clients | Kestrel req/s | Triton req/s | batch formed K / T | CPU µs/request Kestrel | "
             "CPU µs/request Triton | Kestrel − Triton µs | errors K / T |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in summarise_request_path(rows):
        k, t = line["kestrel"], line["triton"]
        lines.append(f"| {NAMES.get(line['protocol'], line['protocol'])} | {line['clients']} | "
                     f"{k['requests_per_s'].format(0)} | {t['requests_per_s'].format(0)} | "
                     f"{k['mean_batch'].format(2)} / {t['mean_batch'].format(2)} | "
                     f"{k['cpu_us_per_request'].format(0)} | {t['cpu_us_per_request'].format(0)} | "
                     f"{line['extra_us'].format(0)} | {_errors(k)} / {_errors(t)} |")
    lines += ["", "The difference in µs times a cell's requests per second, divided by a million, is the cores' worth "
              "of CPU that Kestrel's request path takes from the model beyond Triton's: where the model keeps every "
              "core busy (the saturated cells above), that is what Kestrel's arrangement of the model has to win "
              "back.", ""]
    return lines


def parity_lines(parity: dict) -> list[str]:
    if not parity:
        return []
    lines = ["## Same answers", "", "Each image sent alone to both servers before the load (gRPC):", ""]
    for model, p in parity.items():
        if p.get("error"):
            lines.append(f"- {model}: not compared ({p['error'].splitlines()[0]})")
        else:
            lines.append(f"- {model}: top-1 agreement {100 * p['top1_agreement']:.0f} % on {p['images']} images, "
                         f"largest probability difference {p['max_abs_diff']:.2e}")
    return lines + [""]


def machine_line(meta: dict) -> str:
    m = meta.get("machine") or {}
    load = m.get("load_average")
    return (f"{m.get('cpu', '?')} ({m.get('isa', '?')}), {m.get('cores_usable', '?')} cores usable, "
            f"{m.get('memory_gib', '?')} GiB; load average at the start {load[0]:.2f}" if load else
            f"{m.get('cpu', '?')} ({m.get('isa', '?')})")


def load_lines(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if _method.completed(r)]
    if not ok:
        return []
    busy = _method.median(r.get("busy_cores") for r in ok)
    foreign = [r.get("foreign_cores") for r in ok if r.get("foreign_cores") is not None]
    loadgen = _method.median(r.get("loadgen_cores") for r in ok)
    worst = max(foreign) if foreign else float("nan")
    lines = ["## Load on the machine", "",
             f"Median over runs: {_num(busy, 2)} cores busy, of which the load generator {_num(loadgen, 2)} "
             f"(it shares the cores with the servers, alike for both); other processes "
             f"{_num(_method.median(foreign), 2)} cores, worst run {_num(worst, 2)}.", ""]
    if not math.isnan(worst) and worst > 0.25:
        lines += ["Other processes used the CPU during some runs: alternating the servers spreads that over both, "
                  "but absolute numbers are lower than on an idle machine (runs.csv: foreign_cores).", ""]
    return lines


def _triton_rearranged(settings: dict) -> bool:
    """Triton given its own instances / threads (--triton-instances / --triton-threads), not Kestrel's."""
    return bool(settings.get("triton_instances") or settings.get("triton_threads"))


def kestrel_arrangement(side_by_side: dict | None) -> str:
    """How the run's Kestrel ran its batches, as recorded ({model: bool}); nothing when the run did not record it."""
    if not side_by_side:
        return ""
    if any(side_by_side.values()):
        return (": adaptive threads, a lone batch in one session with the thread count below and, under load, two "
                "batches side by side in a second session on half the cores (docs/server.md; "
                "`--no-ort-adaptive-threads` gives Triton's arrangement: one session per instance)")
    return ": one onnxruntime session per model"


def kestrel_setup_line(meta: dict) -> str:
    """The set-up's Kestrel item: versions, --ort-threads, and how it ran its batches (when the run recorded it)."""
    s = meta.get("settings") or {}
    v = meta.get("versions") or {}
    return (f"- Kestrel: `python -m serve` with its defaults (onnxruntime {v.get('onnxruntime', '?')}, numpy "
            f"{v.get('numpy', '?')}, Kestrel {v.get('kestrel', '?')}, Python {meta.get('python', '?')}"
            + (f", `--ort-threads {s.get('ort_threads')}`" if s.get("ort_threads") else "") + ")"
            + kestrel_arrangement((meta.get("kestrel_server") or {}).get("side_by_side")) + ".")


def setup_lines(meta: dict) -> list[str]:
    s = meta.get("settings") or {}
    tri = meta.get("triton") or {}
    tv = tri.get("versions") or {}
    server = tri.get("server") or {}
    models = tri.get("models") or {}
    v = meta.get("versions") or {}
    if s.get("ensemble_only"):  # Triton never ran: say so instead of a line of question marks
        return ["## Set-up", "",
                "- Triton: not run (`--ensemble-only`: Kestrel alone serves the ensemble).",
                kestrel_setup_line(meta),
                f"- Load: benchmarks/triton_load.py, one process per run, one thread and one tritonclient "
                f"{v.get('tritonclient', '?')} client per concurrent client, closed loop, gRPC, batch-1 requests, "
                f"the same decoded images ({s.get('images') or 'synthetic'}) resized to the model's input; "
                f"{s.get('repeats')} round(s), each {s.get('warmup_s')} s warm-up + {s.get('duration_s')} s measured. "
                "*batch formed*: inference_count / execution_count of each member's V2 ModelStatistics over the "
                "measured window.",
                f"- Versions: Kestrel {v.get('kestrel', '?')}, onnxruntime {v.get('onnxruntime', '?')}, Python "
                f"{meta.get('python', '?')}, grpcio {v.get('grpcio', '?')}, protobuf {v.get('protobuf', '?')}.", ""]
    lines = ["## Set-up", "",
             f"- Triton: `tritonserver` {server.get('version', '?')} from PyPI's nvidia-pytriton "
             f"{tv.get('nvidia-pytriton', '?')} (.venv-triton). {TRITON_BACKEND_NOTE}: "
             "benchmarks/triton_model.py runs Kestrel's model.onnx in one onnxruntime session per model instance "
             f"(onnxruntime {tv.get('onnxruntime', '?')}, numpy {tv.get('numpy', '?')}, Python "
             f"{tri.get('python_backend_python', '?')} in the stub), set up like Kestrel's onnxruntime backend: every "
             "graph optimisation, WeightBiasQuantization disabled, no spinning, the same thread counts; Triton's "
             "dynamic batcher hands it each batch of requests, run as one `session.run`.",
             kestrel_setup_line(meta)]
    for name, m in models.items():
        threads = m.get("threads") or {}
        lines.append(f"- {name}: max_batch_size {m.get('max_batch_size')}, dynamic batching max_queue_delay "
                     f"{m.get('max_queue_delay_us')} us, {m.get('instances')} instance(s), onnxruntime intra-op threads "
                     f"{threads.get('intra_op_thread_count') or 'default (one per physical core)'}, inter-op "
                     f"{threads.get('inter_op_thread_count') or 'default'}; "
                     + ("Triton's instances and threads set by --triton-instances / --triton-threads, the rest of "
                        "the config.pbtxt the same for both servers but the platform."
                        if _triton_rearranged(s) else
                        "the same config.pbtxt for both servers but the platform."))
    lines += [f"- Load: benchmarks/triton_load.py, one process per run, one thread and one tritonclient "
              f"{v.get('tritonclient', '?')} client per concurrent client, closed loop, gRPC or HTTP (binary tensors); the "
              f"same decoded images ({s.get('images') or 'synthetic'}) resized to the model's input, client i "
              "starting at image i, for both servers. A request counts when it completes inside the window and its "
              "answer is an FP32 (batch, classes) finite tensor; anything else is an error.",
              f"- Schedule: for each precision, protocol, batch and client count, {s.get('repeats')} round(s) of "
              f"Kestrel and Triton back to back (order rotated each round); each run {s.get('warmup_s')} s warm-up + "
              f"{s.get('duration_s')} s measured. *batch formed*: inference_count / execution_count of the server's "
              "V2 ModelStatistics over the measured window.",
              f"- Versions: Kestrel {v.get('kestrel', '?')}, onnxruntime {v.get('onnxruntime', '?')} (Kestrel) and "
              f"{tv.get('onnxruntime', '?')} (Triton's stub), Triton {server.get('version', '?')}, Python "
              f"{meta.get('python', '?')}, grpcio {v.get('grpcio', '?')}, protobuf {v.get('protobuf', '?')}.", ""]
    return lines


def markdown(meta: dict, rows: list[dict], ceiling: dict, ensemble: dict, parity: dict,
             request_path: dict | None = None) -> str:
    s = meta.get("settings") or {}
    agg = aggregate(rows)
    lines = [f"# Kestrel vs Triton: {s.get('model', '?')}", "",
             f"{meta.get('started_utc', '?')} UTC, {_num(meta.get('duration_s'), 0)} s, git {meta.get('git') or '?'}."
             + (" Quick run (`--quick`): one short round per level, a check of the harness, not a measurement."
                if s.get("quick") else ""), "",
             f"**Machine:** {machine_line(meta)}.", "",
             ("**Triton:** not run (`--ensemble-only`): this report is the ensemble through Kestrel against its "
              "members' cost." if s.get("ensemble_only") else
              f"**Triton:** the `tritonserver` 2.51 binary of PyPI's nvidia-pytriton 0.7.0 wheel. "
              f"**{TRITON_BACKEND_NOTE}** running the same ONNX in the same onnxruntime with the same session "
              + ("options and batching limits as Kestrel, with the instances and threads set by --triton-instances / "
                 "--triton-threads." if _triton_rearranged(s) else
                 "options, batching limits and thread count as Kestrel's session for a lone batch.")), ""]
    if rows or ensemble:
        lines += ["## Headline", ""] + headline(meta, rows, agg, ceiling, ensemble) + [""]
    if rows:
        lines += ["## Results", "",
                  f"Medians over {s.get('repeats')} round(s) (range in parentheses); Kestrel/Triton is the ratio of "
                  "the medians with the range of the per-round ratios. *% of in-process ceiling*: the server's img/s "
                  "against onnxruntime alone in one process at the mean batch size that server formed. *Server CPU "
                  "ms/image*: the CPU time the server's processes used (Triton's python-backend stub included) in the "
                  "measured window per image served: the model's work plus the request path's." + cpu_note(rows), ""]
        lines += results_tables(rows, agg, ceiling)
        lines += ["![throughput](throughput.png)", ""]
        lines += ["## Latency under load", ""] + latency_tables(rows, agg)
        lines += ["![p95 latency](latency_p95.png)", ""]
    elif not s.get("ensemble_only"):
        lines += ["No load run completed.", ""]
    lines += request_path_lines(request_path or {})
    lines += ["## In-process ceiling", "",
              "onnxruntime alone in one process, the session made exactly as Kestrel makes it, one batch after "
              "another (warm-up excluded; median of rounds of calls): what a server could reach at that batch size "
              "if requests cost nothing.", ""] + ceiling_table(ceiling)
    lines += ["## Ensemble against its physical limit", ""] + ensemble_lines(ensemble)
    lines += parity_lines(parity)
    lines += load_lines(rows)
    lines += setup_lines(meta)
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    if meta.get("skipped"):
        lines += [f"## Skipped runs ({len(meta['skipped'])})", ""]
        lines += [f"- {k['server']} {k['precision']} {k['protocol']} batch {k['batch']} x {k['clients']}, round "
                  f"{k['repeat'] + 1}: {k['reason']}" for k in meta["skipped"][:50]] + [""]
    every_run = rows + list((request_path or {}).get("rows") or [])
    failed = [r for r in every_run if r.get("error")]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r['server']} {r['precision']} {r['protocol']} batch {r['batch']} x "
                                          f"{r['clients']}: {r['error'].splitlines()[0]}" for r in failed] + [""]
    messages: dict = defaultdict(int)
    for r in every_run:
        for m, n in (r.get("error_messages") or {}).items():
            messages[(r["server"], m)] += int(n)
    if messages:
        lines += ["## Request errors", ""] + [f"- {s_}: {m} ({n}x)" for (s_, m), n in sorted(messages.items())] + [""]
    lines += ["Raw data: runs.csv (one line per run), results.json, raw/ (each run's record with every latency), "
              "logs/ (servers, load generator), triton_repository/ (what Triton served)"
              + (", request_path_repository/ and triton_request_path_repository/ (the model that does no work)"
                 if (request_path or {}).get("rows") else "") + ".", ""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------
def plots(out: Path, meta: dict, rows: list[dict], ceiling: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    found = groups(rows)
    protocols = [p for p in ("grpc", "http") if any(g[1] == p for g in found)]
    panels = sorted({(g[0], g[2]) for g in found}, key=lambda x: (list(NAMES).index(x[0]), x[1]))
    written = []
    for metric, name, label in (("images_per_s", "throughput.png", "images / s"),
                                ("p95_ms", "latency_p95.png", "p95 latency, ms")):
        fig, axes = plt.subplots(len(panels), len(protocols), figsize=(5.5 * len(protocols), 3.6 * len(panels)),
                                 squeeze=False)
        for i, (precision, batch) in enumerate(panels):
            for j, protocol in enumerate(protocols):
                ax = axes[i][j]
                group = (precision, protocol, batch)
                levels = sorted({c for (p, pr, b, c, _s) in agg if (p, pr, b) == group})
                for server, style in (("kestrel", "o-"), ("triton", "s--")):
                    points = [(c, agg[group + (c, server)][metric]) for c in levels if group + (c, server) in agg]
                    points = [(c, sp) for c, sp in points if sp.n]
                    if not points:
                        continue
                    xs = [c for c, _ in points]
                    ys = [sp.median for _, sp in points]
                    err = [[sp.median - sp.low for _, sp in points], [sp.high - sp.median for _, sp in points]]
                    ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=NAMES[server])
                if metric == "images_per_s" and ceiling.get("costs"):
                    points = [(c, ceiling_at(ceiling, agg[group + (c, "kestrel")]["model"],
                                             agg[group + (c, "kestrel")]["mean_batch"].median))
                              for c in levels if group + (c, "kestrel") in agg]
                    points = [(c, v) for c, v in points if not math.isnan(v)]
                    if points:
                        ax.plot([c for c, _ in points], [v for _, v in points], ":", color="gray",
                                label="in-process at Kestrel's batch")
                if levels:
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(levels, [str(c) for c in levels])
                ax.set_xlabel("concurrent clients")
                ax.set_ylabel(label)
                ax.set_title(group_title(group), fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        m = meta.get("machine") or {}
        fig.suptitle(f"{(meta.get('settings') or {}).get('model', '?')}: Kestrel vs Triton (python backend) on "
                     f"{m.get('cpu', '?')} ({m.get('isa', '?')})", fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write(out: Path, meta: dict, rows: list[dict], ceiling: dict, ensemble: dict, parity: dict,
          request_path: dict | None = None) -> Path:
    """report.md and the plots into `out`; returns report.md's path."""
    out = Path(out)
    if rows:
        plots(out, meta, rows, ceiling)
    path = out / "report.md"
    path.write_text(markdown(meta, rows, ceiling, ensemble, parity, request_path))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.vs_triton_report RESULTS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {folder / 'results.json'}: {exc}", file=sys.stderr)
        return 1
    print(write(folder, data["meta"], data["runs"], data.get("ceiling") or {}, data.get("ensemble") or {},
                data.get("parity") or {}, data.get("request_path") or {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
