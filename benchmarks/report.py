"""The server benchmark's report: Markdown tables, the headline ratios and PNG plots.

    report.write(folder, meta, rows)      # report.md, throughput.png, latency_<api>.png
    python -m benchmarks.report FOLDER    # rebuild them from FOLDER/results.json

Every number in a table is the median over repeats, with the range over
repeats in parentheses; ratios are ratios of those medians, with the range
of the per-repeat (paired, interleaved) ratios beside them.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from . import _method

FLASK = "flask"
NICE_PLATFORM = {
    "keras": "Keras (tf.function)",
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "TensorRT",
    "fake": "fake (no ML)",
    "flask+keras predict": "Flask + model.predict",
}


# ---- aggregation ----------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """{(api, target, level): {'items_per_s': Spread, 'p50_ms': Spread, ..., 'failures': n, 'requests': n}}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["api"], row["target"], int(row["level"]))].append(row)
    out = {}
    for key, items in groups.items():
        ok = [r for r in items if not r.get("error")]
        out[key] = {
            metric: _method.over_repeats(r.get(metric) for r in ok)
            for metric in ("items_per_s", "requests_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "mean_batch")
        }
        out[key]["failures"] = sum(int(r.get("failures") or 0) for r in items)
        out[key]["requests"] = sum(int(r.get("requests") or 0) for r in items)
        out[key]["runs"] = len(ok)
        out[key]["errors"] = [r["error"] for r in items if r.get("error")]
        out[key]["platform"] = items[0].get("platform", "")
    return out


def paired_ratios(rows: list[dict], api: str, level: int, target: str, reference: str,
                  metric: str = "items_per_s") -> list[float]:
    """Per-repeat ratios target/reference of the runs of the same repeat (interleaved, so paired)."""
    by_repeat: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["api"] == api and int(row["level"]) == level and not row.get("error"):
            by_repeat[int(row["repeat"])][row["target"]] = row.get(metric)
    out = []
    for values in by_repeat.values():
        if target in values and reference in values:
            r = _method.ratio(values[target], values[reference])
            if not math.isnan(r):
                out.append(r)
    return out


def ratio_text(agg: dict, rows: list[dict], api: str, level: int, target: str, reference: str) -> str:
    a, b = agg.get((api, target, level)), agg.get((api, reference, level))
    if not a or not b:
        return "n/a"
    value = _method.ratio(a["items_per_s"].median, b["items_per_s"].median)
    if math.isnan(value):
        return "n/a"
    paired = paired_ratios(rows, api, level, target, reference)
    if len(paired) > 1:
        return f"{value:.2f}x ({min(paired):.2f}-{max(paired):.2f})"
    return f"{value:.2f}x"


def label(target: str, platform: str) -> str:
    if target == FLASK:
        return "Flask + model.predict (reference)"
    return f"{target} [{NICE_PLATFORM.get(platform, platform)}]"


def headline_level(levels: list[int]) -> int:
    """The issue's comparison point: concurrency 8, else the level closest to it."""
    return min(levels, key=lambda lv: (abs(lv - 8), lv))


# ---- the headline ---------------------------------------------------------------------------
def checks(meta: dict, rows: list[dict], agg: dict) -> list[dict]:
    """The issue's done-when criteria, measured: [{'api', 'criterion', 'measured', 'passed'}]."""
    s = meta["settings"]
    model, baseline = s["model"], s["baseline"]
    levels = sorted({int(r["level"]) for r in rows})
    if not levels:
        return []
    level = headline_level(levels)
    out = []
    fp32, int8 = model, f"{model}_int8"
    for api in s["apis"]:
        for target, need in ((fp32, 2.0), (int8, 4.0)):
            a, b = agg.get((api, target, level)), agg.get((api, baseline, level))
            if not a or not b or target == baseline:
                continue
            value = _method.ratio(a["items_per_s"].median, b["items_per_s"].median)
            out.append(dict(api=api, level=level,
                            criterion=f"{target} throughput >= {need:g}x {baseline}",
                            measured=f"{value:.2f}x", passed=bool(value >= need)))
    for target in meta["variants"]:  # the HTTP port must not cost throughput against gRPC
        g, h = agg.get(("classify", target, level)), agg.get(("http_classify", target, level))
        if g and h:
            value = _method.ratio(h["items_per_s"].median, g["items_per_s"].median)
            out.append(dict(api="http_classify", level=level,
                            criterion=f"{target}: HTTP Classify throughput >= 0.9x gRPC Classify",
                            measured=f"{value:.2f}x", passed=bool(value >= 0.9)))
    a, f = agg.get(("classify", fp32, level)), agg.get(("classify", FLASK, level))
    if a and f:
        value = _method.ratio(a["items_per_s"].median, f["items_per_s"].median)
        lower_p95 = a["p95_ms"].median < f["p95_ms"].median
        out.append(dict(api="classify", level=level,
                        criterion=f"Kestrel {fp32} throughput >= 10x Flask + predict, at a lower p95",
                        measured=f"{value:.1f}x; p95 {a['p95_ms'].median:.1f} vs {f['p95_ms'].median:.1f} ms",
                        passed=bool(value >= 10.0 and lower_p95)))
    return out


def headline_sentence(meta: dict, agg: dict, levels: list[int]) -> str | None:
    s = meta["settings"]
    level = headline_level(levels)
    f = agg.get(("classify", FLASK, level))
    kestrel = [(t, agg[("classify", t, level)]) for t in meta["variants"] if ("classify", t, level) in agg]
    if not f or not kestrel:
        return None
    best_t, best = max(kestrel, key=lambda kv: kv[1]["items_per_s"].median)
    fp32 = agg.get(("classify", s["model"], level))
    parts = [f"At {level} concurrent clients sending image files, a Flask + Keras `model.predict` app did "
             f"**{f['items_per_s'].median:.1f} images/s at p95 {f['p95_ms'].median:.0f} ms**; "]
    if fp32:
        parts.append(f"Kestrel on onnxruntime FP32 ({s['model']}) does **{fp32['items_per_s'].median:.1f} images/s "
                     f"at p95 {fp32['p95_ms'].median:.1f} ms** "
                     f"({_method.ratio(fp32['items_per_s'].median, f['items_per_s'].median):.1f}x)")
        if best_t != s["model"]:
            parts.append(f", and {best_t} {best['items_per_s'].median:.1f} images/s at p95 "
                         f"{best['p95_ms'].median:.1f} ms "
                         f"({_method.ratio(best['items_per_s'].median, f['items_per_s'].median):.1f}x)")
    else:
        parts.append(f"Kestrel ({best_t}) does {best['items_per_s'].median:.1f} images/s at p95 "
                     f"{best['p95_ms'].median:.1f} ms "
                     f"({_method.ratio(best['items_per_s'].median, f['items_per_s'].median):.1f}x)")
    return "".join(parts) + "."


# ---- Markdown -------------------------------------------------------------------------------
def _machine_line(meta: dict) -> str:
    m = meta["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    return (f"{m.get('cpu')} ({m.get('isa', 'instruction set not recorded')}), "
            f"{m.get('cores')} cores ({m.get('cores_usable')} usable), "
            f"{m.get('memory_gib')} GiB RAM, {gpus}; {m.get('os')}; Python {m.get('python')}")


def machine_title(meta: dict) -> str:
    """"2 cores (AMD EPYC, AVX2 (no AVX-512, no VNNI))": the plot titles' machine, instruction set included."""
    m = meta["machine"]
    return f"{m.get('cores')} cores ({m.get('cpu')}, {m.get('isa', 'instruction set not recorded')})"


def tables(meta: dict, rows: list[dict], agg: dict) -> list[str]:
    s = meta["settings"]
    baseline = s["baseline"]
    levels = sorted({int(r["level"]) for r in rows})
    lines = []
    for api in s["apis"]:
        targets = [t for t in meta["variants"]] + ([FLASK] if api == "classify" and meta.get("flask") else [])
        what = {"classify": "Classify (gRPC): the image file's bytes in, top-k out (decode + resize in the server)",
                "http_classify": "Classify over HTTP: POST /v1/classify with the image file ("
                                 + ("the raw body" if s.get("http_body") == "raw" else "a multipart form upload")
                                 + "), top-k JSON out"}.get(
            api, f"V2 ModelInfer: a uint8 batch of {s['batch']} in raw_input_contents, probabilities out")
        lines += [f"### API: {api}", "", what, ""]
        header = ("| concurrency | target | images/s | p50 ms | p95 ms | p99 ms | batch | failed | x " + baseline
                  + (" | x Flask" if api == "classify" and meta.get("flask") else "") + " |")
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for level in levels:
            for t in targets:
                a = agg.get((api, t, level))
                if not a:
                    continue
                cells = [str(level), label(t, a["platform"]), a["items_per_s"].format(1), a["p50_ms"].format(1),
                         a["p95_ms"].format(1), a["p99_ms"].format(1),
                         "1" if t == FLASK else (f"{a['mean_batch'].median:.1f}" if a["mean_batch"].n else "n/a"),
                         f"{a['failures']}/{a['requests'] + a['failures']}",
                         "1 (reference)" if t == baseline else ratio_text(agg, rows, api, level, t, baseline)]
                if api == "classify" and meta.get("flask"):
                    cells.append("1 (reference)" if t == FLASK else ratio_text(agg, rows, api, level, t, FLASK))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def load_lines(rows: list[dict]) -> list[str]:
    foreign = [float(r["foreign_cores"]) for r in rows if r.get("foreign_cores") not in (None, "")
               and not math.isnan(float(r["foreign_cores"]))]
    own = [float(r["own_cores"]) for r in rows if r.get("own_cores") not in (None, "")
           and not math.isnan(float(r["own_cores"]))]
    if not foreign:
        return []
    med, worst = _method.median(foreign), max(foreign)
    lines = ["## Load on the machine", "",
             f"CPU used by the benchmark (server, Flask app, locust) per run: median {_method.median(own):.2f} cores. "
             f"CPU used by *other* processes meanwhile: median {med:.2f} cores, worst run {worst:.2f} cores.", ""]
    if worst > 0.25:
        lines += ["Other processes were using the CPU during some runs: the interleaved order spreads that over all "
                  "variants, but absolute numbers are lower than on a quiet machine (see runs.csv, foreign_cores).",
                  ""]
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    s = meta["settings"]
    agg = aggregate(rows)
    levels = sorted({int(r["level"]) for r in rows})
    lines = [f"# Kestrel server benchmark: {s['model']}", "",
             f"{meta['started_utc']} UTC, {meta['duration_s']:.0f} s, git {meta.get('git') or '?'}.", "",
             f"**Machine:** {_machine_line(meta)}.", ""]
    if not rows:
        lines += ["No run completed.", ""]
    sentence = headline_sentence(meta, agg, levels) if rows else None
    if sentence:
        lines += ["## Headline", "", sentence, ""]
    found = checks(meta, rows, agg) if rows else []
    if found:
        lines += ["| criterion (issue 5) | API | concurrency | measured | |", "|---|---|---|---|---|"]
        for c in found:
            lines.append(f"| {c['criterion']} | {c['api']} | {c['level']} | {c['measured']} | "
                         f"{'PASS' if c['passed'] else 'FAIL'} |")
        lines.append("")
    if rows:
        lines += ["## Results", "",
                  f"Medians over {s['repeats']} interleaved repeats (range in parentheses); each run "
                  f"{s['warmup_s']:g} s warm-up (not measured) + {s['duration_s']:g} s measured, closed loop "
                  "(each client sends its next request when the previous one returns). Ratios are of the medians, "
                  "with the range of the per-repeat paired ratios. *batch*: mean batch size the server executed "
                  "(dynamic batching; V2 ModelStatistics over the run, warm-up included).", ""]
        lines += tables(meta, rows, agg)
        lines += ["![throughput](throughput.png)", ""]
        lines += [f"![latency {api}](latency_{api}.png)" for api in s["apis"]] + [""]
        lines += load_lines(rows)
    lines += ["## Set-up", "",
              f"- Server: `python -m serve` started once with {', '.join(meta['variants'])} "
              f"({', '.join(f'{v}: {p}' for v, p in meta['platforms'].items())}); extra arguments: "
              f"{' '.join(s['server_args']) or 'none'}; environment: "
              f"{' '.join(f'{k}={v}' for k, v in (s.get('server_env') or {}).items()) or 'default'}.",
              *[f"- Accuracy of {v} (export.optimize's report): top-1 agreement with {a.get('reference')} "
                f"{100 * (a.get('top1_agreement') or 0):.1f}%, top-5 {100 * (a.get('top5_agreement') or 0):.1f}% on "
                f"{a.get('images')} images ({a.get('image_source')}); "
                + ("passed its threshold" if a.get("passed") else
                   f"BELOW its {100 * (a.get('min_agreement') or 0):.0f}% threshold (written with --force: "
                   "speed measured, not a shippable variant)") + "."
                for v, a in (meta.get("accuracy") or {}).items()],
              f"- Reference: benchmarks/flask_app.py ({' '.join(meta.get('flask_args') or []) or 'not run'}), "
              "werkzeug threaded server, one `model.predict` per uploaded image.",
              f"- Load: locust {meta['versions'].get('locust', '?')} headless, one process, users = concurrency, "
              "all spawned at once; gRPC users on gevent (benchmarks/locustfile.py), HTTP users FastHttpUser "
              "(benchmarks/locust_flask.py). The load generator shares the machine's cores with the server.",
              f"- Images: {s.get('images') or 'synthetic JPEGs'}, "
              + ("uploaded as JPEG bytes (files in other formats re-encoded once, quality 92)"
                 if s.get("encode", "jpeg") == "jpeg" else "uploaded as the files are") + "; the same files for "
              "Classify and Flask; ModelInfer gets them decoded and resized to the model's input.",
              f"- Concurrency levels {s['levels']}, {s['repeats']} repeats, order rotated each repeat.",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())) + ".", ""]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    if meta.get("skipped"):
        lines += [f"## Skipped runs ({len(meta['skipped'])})", ""]
        lines += [f"- {k['api']}:{k['target']} c={k['level']} repeat {k['repeat']}: {k['reason']}"
                  for k in meta["skipped"][:50]] + [""]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Failed runs", ""] + [f"- {r['api']}:{r['target']} c={r['level']} repeat {r['repeat']}: "
                                          f"{r['error']}" for r in errors] + [""]
    messages = defaultdict(int)
    for r in rows:
        for m, n in (r.get("failure_messages") or {}).items():
            messages[(r["target"], m)] += int(n)
    if messages:
        lines += ["## Request failures", ""] + [f"- {t}: {m} ({n}x)" for (t, m), n in sorted(messages.items())] + [""]
    lines += ["Raw data: runs.csv (one line per run), results.json (with the raw response times), "
              "raw/ (locust CSVs and samples), logs/ (server, Flask, locust).", ""]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------
def plots(out: Path, meta: dict, rows: list[dict]) -> list[Path]:
    """throughput.png and latency_<api>.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    s = meta["settings"]
    levels = sorted({int(r["level"]) for r in rows})
    written = []
    apis = s["apis"]
    fig, axes = plt.subplots(1, len(apis), figsize=(6.5 * len(apis), 4.5), squeeze=False)
    for ax, api in zip(axes[0], apis):
        targets = list(meta["variants"]) + ([FLASK] if api == "classify" and meta.get("flask") else [])
        for t in targets:
            points = [(lv, agg[(api, t, lv)]["items_per_s"]) for lv in levels if (api, t, lv) in agg]
            points = [(lv, sp) for lv, sp in points if sp.n]
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1].median for p in points]
            err = [[p[1].median - p[1].low for p in points], [p[1].high - p[1].median for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label(t, agg[(api, t, xs[0])]["platform"]),
                        linestyle="--" if t == FLASK else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(lv) for lv in levels])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s (median, range over repeats)")
        ax.set_title(f"{api}: throughput vs concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{s['model']} on {machine_title(meta)}", fontsize=9)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for api in apis:
        targets = list(meta["variants"]) + ([FLASK] if api == "classify" and meta.get("flask") else [])
        fig, axes = plt.subplots(1, len(levels), figsize=(5.0 * len(levels), 4.5), squeeze=False)
        for ax, lv in zip(axes[0], levels):
            present = [t for t in targets if (api, t, lv) in agg and agg[(api, t, lv)]["p50_ms"].n]
            width = 0.8 / 3
            for i, (metric, name) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
                xs = [j + (i - 1) * width for j in range(len(present))]
                ys = [agg[(api, t, lv)][metric].median for t in present]
                ax.bar(xs, ys, width=width, label=name)
            ax.set_xticks(range(len(present)), [t if t != FLASK else "Flask" for t in present], rotation=20,
                          ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("latency ms (median over repeats)")
            ax.set_title(f"{api}, {lv} concurrent clients")
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{s['model']} on {machine_title(meta)}", fontsize=9)
        fig.tight_layout()
        path = out / f"latency_{api}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(out: Path, meta: dict, rows: list[dict]) -> Path:
    """report.md and the plots into `out`; returns report.md's path."""
    out = Path(out)
    if rows:
        plots(out, meta, rows)
    path = out / "report.md"
    path.write_text(markdown(meta, rows))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {folder / 'results.json'}: {exc}", file=sys.stderr)
        return 1
    print(write(folder, data["meta"], data["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
