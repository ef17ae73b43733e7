"""Percentile calibration found inside onnxruntime: each tensor's top |values| instead of a histogram in numpy.

onnxruntime's percentile calibrator (`quantize_static(calibrate_method=Percentile)`) makes every
intermediate tensor a graph output, copies each to Python and bins its absolute values into a numpy
histogram, one pass of 30 images after another. On a flower model trained with `--flip-tta` (two
MobileNetV2 bases, about 20 M activations per photo) that was 6 G values through numpy for 300 photos:
294 of the 360 s quantize() took (cProfile, a loaded 2-core EPYC), 242 s of it in np.histogram's
sorting path (bins given as an array), and 60 s running a model whose every tensor is an output.

The statistic is one number per tensor: the `percentile` quantile q of |x| over all calibration values
(the smallest v with at least percentile % of them <= v), and the range (max(-q, min x), min(q, max x)).
For 99.999 % q is the K-th largest |x|, K = N - ceil(0.99999 N) + 1: a few per 100,000 values. So each
calibration tensor x gets `Abs -> Reshape(-1) -> Greater(floor) -> Compress`, `ReduceMin`/`ReduceMax` and
the smallest |x| in the graph. The first image runs with no floor (every |value| comes out: the tensor's
size, a first K-th largest); from then on the floor fed for each tensor is the K-th largest kept so far,
which can only rise (the K-th largest of part of the values never exceeds that of all), so only the few
values above it leave the graph; Python keeps each tensor's K largest. onnxruntime's answer is not q
itself but the left edge of the histogram bin holding q (2048 bins over the first collection pass's |x|,
extended by equal bins as larger values come): that edge is computed from the same grid
(`histogram_edge`), so the ranges match onnxruntime's (tests/export/test_calibrate.py) and so does the
accuracy: on imagenet_val, mobilenet_v2 INT8 top-1 78.8 % either way (FP32 79.1 %; the exact quantile, a
slightly wider range, gave 78.4 %). The ranges reach `quantize_static` through its calibration cache
(`calibration_cache_path`, onnxruntime 1.32 as pinned), so the quantizer itself is untouched.

    ranges = percentile_ranges(prepared_model, images, input_name="images", percentile=99.999)
    write_cache(ranges, cache_path)   # then quantize_static(..., calibration_cache_path=cache_path)

`select_tensors` picks the tensors onnxruntime's calibrator would (float inputs and outputs of nodes of
the quantizable op types, initializers excepted, after shape inference), so the cache covers every tensor
the quantizer asks about. When K gets large (a low percentile on big tensors: `fits()`) or onnxruntime
cannot run the tapped graph, ValueError: quantize() then uses onnxruntime's own calibrator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from serve._optional import require

BATCH = 8  # images per run: activations of 8 MobileNetV2 photos stay well under 1 GB
NUM_BINS = 2048  # onnxruntime's percentile histogram (its default "num_bins")
MAX_KEPT = 200_000  # largest K per tensor (floats kept in Python); above it: onnxruntime's histogram calibrator
PREFIX = "kestrel_calib"


def default_op_types() -> list[str]:
    """The op types quantize_static calibrates and quantizes when it is given none (its own rule)."""
    registry = require("onnxruntime.quantization.registry", "INT8 quantization")
    return sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))


def select_tensors(model, op_types: Iterable[str] | None = None) -> list[str]:
    """Float tensors read or written by nodes of `op_types` (all nodes when empty), initializers excepted,
    that have a known type: the set onnxruntime's calibrator collects (`model` after shape inference)."""
    onnx = require("onnx", "INT8 quantization")
    graph = model.graph
    typed = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    constants = {i.name for i in graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    wanted = set(op_types or ())
    found: dict[str, None] = {}
    for node in graph.node:
        if wanted and node.op_type not in wanted:
            continue
        for name in list(node.input) + list(node.output):
            value = typed.get(name)
            if (value is not None and value.type.HasField("tensor_type")
                    and value.type.tensor_type.elem_type in floats and name not in constants):
                found[name] = None
    return list(found)


def quantile_rank(total: int, percentile: float) -> int:
    """K: the `percentile` quantile of `total` values is their K-th largest (the smallest v with at least
    percentile % of the values <= v)."""
    return max(1, total - math.ceil(total * percentile / 100.0 - 1e-9) + 1)


def fits(sizes: dict[str, int], images: int, percentile: float) -> bool:
    """Whether every tensor's K largest values are few enough to keep (`sizes`: elements per image)."""
    return all(quantile_rank(size * images, percentile) <= MAX_KEPT for size in sizes.values())


def _augment(model, tensors: Sequence[str]):
    """`model` with, per tensor i: its |values| above the floor fed as input kestrel_calib_i_t, its min and max, and
    its smallest |value|."""
    onnx = require("onnx", "INT8 quantization")
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    typed = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    del graph.output[:]
    flat = numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}_flat")
    graph.initializer.append(flat)
    for i, name in enumerate(tensors):
        p = f"{PREFIX}_{i}"
        source = name
        if typed[name].type.tensor_type.elem_type == TensorProto.FLOAT16:
            graph.node.append(helper.make_node("Cast", [name], [f"{p}_f32"], to=TensorProto.FLOAT, name=f"{p}_cast"))
            source = f"{p}_f32"
        graph.input.append(helper.make_tensor_value_info(f"{p}_t", TensorProto.FLOAT, []))
        graph.node.extend([
            helper.make_node("Abs", [source], [f"{p}_abs"], name=f"{p}_absn"),
            helper.make_node("Reshape", [f"{p}_abs", flat.name], [f"{p}_row"], name=f"{p}_rown"),
            helper.make_node("Greater", [f"{p}_row", f"{p}_t"], [f"{p}_above"], name=f"{p}_aboven"),
            helper.make_node("Compress", [f"{p}_row", f"{p}_above"], [f"{p}_tail"], name=f"{p}_tailn", axis=0),
            helper.make_node("ReduceMin", [source], [f"{p}_min"], name=f"{p}_minn", keepdims=0),
            helper.make_node("ReduceMax", [source], [f"{p}_max"], name=f"{p}_maxn", keepdims=0),
            helper.make_node("ReduceMin", [f"{p}_abs"], [f"{p}_absmin"], name=f"{p}_absminn", keepdims=0),
        ])
        graph.output.extend([
            helper.make_tensor_value_info(f"{p}_tail", TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info(f"{p}_min", TensorProto.FLOAT, []),
            helper.make_tensor_value_info(f"{p}_max", TensorProto.FLOAT, []),
            helper.make_tensor_value_info(f"{p}_absmin", TensorProto.FLOAT, []),
        ])
    onnx.checker.check_model(model)
    return model


def histogram_edge(value: float, grid_low: float, grid_high: float, top: float, bins: int = NUM_BINS) -> float:
    """The left edge of the bin holding `value` in onnxruntime's percentile histogram of |x|: `bins` bins spanning
    the first collection pass's |x| (`grid_low` to `grid_high`, as np.histogram makes them), extended by bins of the
    same width up to the overall largest |x| (`top`), as its HistogramCollector does."""
    edges = np.histogram_bin_edges(np.array([grid_low, grid_high], np.float32), bins=bins).astype(np.float32)
    if top > edges[-1]:
        width = edges[1] - edges[0]
        edges = np.hstack((edges, np.arange(edges[-1] + width, np.float32(top) + width, width, dtype=np.float32)))
    index = int(np.searchsorted(edges, np.float32(value), side="right")) - 1
    return float(edges[min(max(index, 0), len(edges) - 2)])


def percentile_ranges(model_path: str | Path, images: np.ndarray, *, input_name: str = "images",
                      percentile: float = 99.999, op_types: Iterable[str] | None = None, batch: int = BATCH,
                      first_pass: int | None = None, progress: bool = False) -> dict[str, tuple[float, float]]:
    """{tensor: (low, high)}: onnxruntime's symmetric percentile range of every calibration tensor of the model
    at `model_path` (after quant_pre_process: shapes inferred) over the uint8 `images` (N, H, W, 3).

    The quantile is rounded down to the left edge of its bin in the histogram onnxruntime would have built
    (`histogram_edge`), whose grid spans the |x| of its first collection pass: `first_pass` images (quantize()
    collects in chunks of `chunk_size(n)`; default: all). On imagenet_val (mobilenet_v2, 300 images) the exact
    quantile gave INT8 top-1 78.4 %, the bin's edge 78.8 %, onnxruntime's own calibrator 78.8 %: the edge is a
    slightly tighter range. Raises ValueError when a tensor's K largest values would not fit (see `fits`) or the
    tapped graph cannot run."""
    onnx = require("onnx", "INT8 quantization")
    ort = require("onnxruntime", "INT8 quantization")
    # shapes of every tensor, those a transform added after quant_pre_process too (onnxruntime's calibrator does this)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    tensors = select_tensors(model, default_op_types() if op_types is None else op_types)
    if not tensors or len(images) == 0:
        raise ValueError("nothing to calibrate: no float tensors, or no images")
    options = ort.SessionOptions()
    # Every calibrated tensor feeds a tap, so no fusion can remove it; with all optimisations the convolutions run
    # in onnxruntime's blocked layout (reordered back at each tap): 0.82 s per 8 photos of the flower model against
    # 1.34 s unoptimised, the way onnxruntime's own calibrator runs (values agree to float rounding).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        augmented = _augment(model, tensors)
        session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (onnx and onnxruntime raise their own types): the caller falls back
        raise ValueError(f"cannot tap the graph for calibration: {type(exc).__name__}: {exc}") from exc
    del augmented, model
    slot = {o.name: i for i, o in enumerate(session.get_outputs())}
    n = len(tensors)
    first_pass = min(first_pass or len(images), len(images))

    def run(chunk: np.ndarray, floors: Sequence[float]) -> list:
        feed = {input_name: np.ascontiguousarray(chunk),
                **{f"{PREFIX}_{i}_t": np.array(t, np.float32) for i, t in enumerate(floors)}}
        try:
            out = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 (onnxruntime's own types): the caller falls back, as above
            raise ValueError(f"cannot run the tapped graph for calibration: {type(exc).__name__}: {exc}") from exc
        return [[out[slot[f"{PREFIX}_{i}_{what}"]] for i in range(n)] for what in ("tail", "min", "max", "absmin")]

    # The first image with no floor: every |value| comes out, so each tensor's size and a first K-th largest. The
    # K-th largest of part of the values never exceeds that of all, so it is a floor for the rest: only the few
    # values above it leave the graph.
    bar = None
    if progress:
        from serve.console import progress as tqdm  # a bar on a terminal, a line per 10 % in logs

        bar = tqdm(total=len(images), desc="calibrating", unit="img", leave=False)
    try:
        tails, lows, highs, absmins = run(images[:1], [-1.0] * n)
        sizes = [int(t.size) for t in tails]
        if not fits(dict(zip(tensors, sizes)), len(images), percentile):
            raise ValueError(f"percentile {percentile} keeps more than {MAX_KEPT} values of a tensor")
        ranks = [quantile_rank(size * len(images), percentile) for size in sizes]
        kept: list[np.ndarray] = [np.empty(0, np.float32)] * n
        low, high = [np.inf] * n, [-np.inf] * n
        grid_low, grid_high = [np.inf] * n, [-np.inf] * n  # |x| over the first pass: the histogram's grid
        start, done = 0, 1
        while True:
            if bar is not None:
                bar.update(done - start)
            for i, rank in enumerate(ranks):
                top = np.concatenate((kept[i], tails[i]))
                kept[i] = top if len(top) <= rank else np.partition(top, len(top) - rank)[len(top) - rank :]
                low[i], high[i] = min(low[i], float(lows[i])), max(high[i], float(highs[i]))
                if start < first_pass:
                    grid_low[i] = min(grid_low[i], float(absmins[i]))
                    grid_high[i] = max(grid_high[i], float(-lows[i]), float(highs[i]))
            if done >= len(images):
                break
            start = done
            done = min(start + batch, first_pass if start < first_pass else len(images), len(images))
            floors = [float(k.min()) if len(k) >= rank else -1.0 for k, rank in zip(kept, ranks)]
            tails, lows, highs, absmins = run(images[start:done], floors)
    finally:
        if bar is not None:
            bar.close()
    ranges = {}
    for i, name in enumerate(tensors):
        q = float(kept[i].min()) if len(kept[i]) else 0.0  # the rank-th largest |x|: the quantile
        q = histogram_edge(q, grid_low[i], grid_high[i], max(-low[i], high[i]))
        ranges[name] = (max(-q, low[i]), min(q, high[i]))
    return ranges


def write_cache(ranges: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """The ranges as quantize_static's calibration cache (percentile method)."""
    calibrate = require("onnxruntime.quantization.calibrate", "INT8 quantization")
    data = {name: calibrate.TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for name, (lo, hi) in ranges.items()}
    calibrate.save_tensors_data(calibrate.TensorsData(calibrate.CalibrationMethod.Percentile, data), path)
    return Path(path)
