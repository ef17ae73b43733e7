"""INT8 quantization: onnxruntime static quantization to a Q/DQ ONNX model.

One calibration path for both targets:

- images come from a folder (searched recursively) and go through exactly the
  serving path (`serve.images.load`: decode, EXIF, RGB, bilinear resize); the
  model's own preprocessing is inside the graph, so calibration feeds the same
  uint8 NHWC batches the server feeds;
- `target="cpu"` (the `<name>_int8` repository entry): U8S8 (activations uint8
  asymmetric, weights int8 symmetric per channel): the fast x86 path
  (AVX-512 VNNI / AVX2) of onnxruntime's QDQ -> QLinearConv fusion;
- `target="tensorrt"` (the source of `<name>_trt_int8`): S8S8 symmetric, since
  TensorRT's explicit quantization accepts only zero-point 0; Clip/Relu stay in
  the graph and biases stay float (TensorRT fuses them into the INT8 kernels).

What stays in float (the "keep_float" rules; each is a pattern over the graph,
not a node name, so it applies to every exported model):

- `preprocessing`: the uint8 -> float ops before the first Conv (Cast, Mul,
  Add, Slice, Concat, Transpose ...). The input is already 8 bit; quantizing
  the normalised copy only adds error;
- `first_conv`: the stem convolution (3 input channels: few MACs, sensitive),
  unless its input is made exact (below);
- `classifier`: the last MatMul/Gemm and what follows (bias Add, Softmax);
- `sensitive` (MobileNet-style models): a per-layer sensitivity search (see
  below) found that the first depthwise conv of the network carries most of the
  error: it sees the widest-range activations at full resolution. The rule
  keeps the *first depthwise Conv* (group > 1) and its ReLU6 in float.
- not offered: keeping *every* depthwise conv in float. A float Conv between a
  DequantizeLinear and a QuantizeLinear is re-quantized per tensor by
  onnxruntime's WeightBiasQuantization transformer under default session
  settings (measured: top-1 agreement 21 %, 90 % with that transformer off).
  Kestrel's backend turns it off, but Triton and plain onnxruntime do not, so
  the rules keep float regions at the input (`first_conv`, `sensitive` right
  after it, `float_prefix`) or at the end (the classifier); `quantize()`
  reports any other float layer (`float_layers_between_qdq`). It did not pay
  anyway: all depthwise convs in float agreed 86-90 %.

Exact 8-bit input (`QuantizeOptions.exact_input`, on by default; export/exact_input.py): when the
model's normalisation is one affine map with the same scale on every channel (MobileNet's
x / 127.5 - 1, EfficientNet's), the uint8 image itself becomes the stem's quantized input (the float
Cast/Mul/Add and the QuantizeLinear go, the Transpose runs on uint8) and the stem's weights are 7-bit.
That lifts `first_conv` and `sensitive`: the whole network up to the classifier is integer. Both
rules had guarded two faults, not a sensitive layer: the re-quantized normalised copy of the image
keeps only even pixel values (zero point 127.5 rounds to 128, half to even), and full-range pixels
times 8-bit weights saturate the int16 pair sums of AVX2's U8S8 kernel (vpmaddubsw). Measured on
imagenet_val (mobilenet_v2, 1000 images): stem quantized the old way 76.3 %, with exact input alone
76.3 %, with exact input and 7-bit stem weights 78.6 % (FP32 79.1 %); batch-8 latency 9 % lower than
the float-stem default (no layout conversions left). Models whose normalisation does not fit
(ResNet50's caffe BGR Tensordot, per-channel mean/std) keep the rules as written.

Range equalization (`QuantizeOptions.equalize`, export/equalize.py): Conv -> ReLU -> depthwise Conv
pairs get their channel ranges equalized before calibration (cross-layer equalization); measured,
it did not change accuracy here, so it is off by default (`--equalize all|first`).

Quantizers (`QuantizeOptions.quantizer`): "onnxruntime" (the default: quantize_static with the
rules above) or "nncf" (NNCF's ONNX post-training quantization, extra "nncf"; the keep-float rules
become its ignored scope, fast bias correction on by default).

Measured on ../shared/datasets/imagenet_val (calibrated on 300 images, top-1 accuracy on the other
1000, as served; export/QUANTIZATION.md has the tables): mobilenet_v2 FP32 79.1 %, INT8 with the
default rules 78.7 % (99.5 % of FP32), NNCF 78.6 % (99.4 %), FP16 79.1 %. Calibrating on
in-distribution images is what matters; flowers-calibrated INT8 judged by agreement on flowers
(the earlier yardstick) looked far worse than it is.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from serve import console
from serve import images as simages
from serve._optional import require
from serve.errors import ConfigError, ImageDecodeError

from . import _graph, calibrate, equalize, exact_input

METHODS = ("minmax", "percentile", "entropy")
QUANTIZERS = ("onnxruntime", "nncf")  # nncf: NNCF's ONNX post-training quantization (extra "nncf")
TARGETS = ("cpu", "tensorrt")
KEEP_FLOAT_RULES = ("preprocessing", "first_conv", "classifier", "sensitive")
DEFAULT_KEEP_FLOAT = ("preprocessing", "first_conv", "classifier", "sensitive")
DEFAULT_MIN_IMAGES = 32
DEFAULT_MAX_IMAGES = 300
DEFAULT_HOLDOUT = 0.2
ACTIVATION_OPS = ("Clip", "Relu")
EQUALIZATION = ("all", "first", "none")
EQUALIZE_IMAGES = 300  # calibration images measured for the channel ranges
EXTERNAL_DATA_BYTES = 1_800_000_000  # save with external data above this (protobuf's 2 GB limit)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize. Invalid values raise ConfigError naming the value and what is allowed."""

    method: str = "percentile"
    percentile: float = 99.999
    per_channel: bool = True
    reduce_range: bool = False
    target: str = "cpu"
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None  # None: every op type onnxruntime can quantize
    float_prefix: int = 0  # the first N compute layers (Conv/MatMul/Gemm) and all between them stay float
    min_images: int = DEFAULT_MIN_IMAGES
    max_images: int = DEFAULT_MAX_IMAGES
    quantizer: str = "onnxruntime"
    symmetric_activations: bool = False  # onnxruntime, CPU target: int8 activations with zero point 0
    fast_bias_correction: bool = True  # nncf only
    exact_input: bool = True  # onnxruntime, CPU target: the uint8 image is the stem's quantized input (export.exact_input)
    equalize: str = "none"  # onnxruntime: range equalization of Conv -> ReLU -> depthwise pairs: all, first or none
    fast_calibration: bool = True  # percentile: ranges from the top values, found in the graph (export/calibrate.py)

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}; expected one of {', '.join(QUANTIZERS)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown quantization target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if self.equalize not in EQUALIZATION:
            raise ConfigError(f"unknown equalization {self.equalize!r}; expected one of {', '.join(EQUALIZATION)}")
        if not 90.0 <= float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile must be in [90, 100], got {self.percentile}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))
        unknown = [r for r in self.keep_float if r not in KEEP_FLOAT_RULES]
        if unknown:
            raise ConfigError(f"unknown keep-float rule(s) {unknown}; expected some of {', '.join(KEEP_FLOAT_RULES)}")
        if "sensitive" in self.keep_float and "first_conv" not in self.keep_float and self.float_prefix < 1:
            raise ConfigError("keep-float rule 'sensitive' needs 'first_conv' too: a float depthwise conv right after "
                              "a quantized one is re-quantized per tensor by onnxruntime's WeightBiasQuantization "
                              "transformer wherever the model runs with default settings (Triton, plain onnxruntime; "
                              "measured: 0.4 % top-1 agreement)")
        if not isinstance(self.float_prefix, int) or self.float_prefix < 0:
            raise ConfigError(f"float_prefix must be an integer >= 0, got {self.float_prefix!r}")
        if not isinstance(self.min_images, int) or self.min_images < 1:
            raise ConfigError(f"min_images must be a positive integer, got {self.min_images!r}")
        if not isinstance(self.max_images, int) or self.max_images < self.min_images:
            raise ConfigError(f"max_images ({self.max_images!r}) must be an integer >= min_images ({self.min_images})")


# ---- calibration images ---------------------------------------------------------------------
@dataclass
class HoldOut:
    """A calibration folder split into images to calibrate on and images held out for the accuracy report."""

    calibration: list[Path]
    held: list[Path]
    fraction: float
    classes: int = 0  # class folders (parent folders) among the images
    multi_classes: int = 0  # of them, with two or more images: each gives `fraction` of its images, at least one
    single_held: int = 0  # single-image folders held out whole to reach `fraction` of all images

    def count(self, source: str | Path = "") -> str:
        """'held out 374 of the 1300 images of SOURCE'."""
        total = len(self.calibration) + len(self.held)
        return f"held out {len(self.held)} of the {total} images" + (f" of {source}" if source else "")

    def why(self) -> str:
        """Why that many: the count is not always `fraction` of the images."""
        total = len(self.calibration) + len(self.held)
        if not self.held:
            return f"hold-out fraction {self.fraction:.0%}" + (
                f": {self.fraction:.0%} of {total} images rounds to none" if self.fraction > 0 else "")
        singles = self.classes - self.multi_classes
        if self.classes <= 1:
            return f"{self.fraction:.0%} of them"
        parts = []
        if self.multi_classes:
            from_multi = len(self.held) - self.single_held
            in_multi = total - singles
            folders = f"{self.multi_classes} class folder" + ("s" if self.multi_classes > 1 else "")
            which = f"its {folders}" if not singles else f"the {folders} with two or more images"
            text = f"{self.fraction:.0%} of each of {which}"
            if from_multi > round(in_multi * self.fraction):
                text += (f", at least one from each ({from_multi / in_multi:.0%} of their {in_multi} images: small "
                         "folders round up)")
            parts.append(text)
        if self.single_held:
            parts.append(f"{self.single_held} of the {singles} single-image folders whole, to reach "
                         f"{self.fraction:.0%} of all images")
        elif singles:
            parts.append(f"the {singles} single-image folders are all calibrated on")
        return "; ".join(parts)


def hold_out(paths: Sequence[Path], holdout: float = DEFAULT_HOLDOUT, *, seed: int = 0) -> HoldOut:
    """Deterministic split into calibration and held-out images, stratified by parent folder (class).

    Each class folder with two or more images is shuffled with `seed` and its last `holdout` fraction held
    out (at least one image). Classes of a single image cannot give part of themselves: when the classes
    above held out fewer than `holdout` of all images (a set of one photo per class holds out none), whole
    single-image classes, chosen with `seed`, are held out until `holdout` of all images is reached.
    """
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {holdout}")
    groups: dict[Path, list[Path]] = defaultdict(list)
    for path in sorted(Path(p) for p in paths):
        groups[path.parent].append(path)
    rng = np.random.default_rng(seed)
    parts: dict[Path, tuple[list[Path], list[Path]]] = {}  # class folder -> (calibration, held out)
    singles: list[Path] = []
    for parent in sorted(groups):
        files = groups[parent]
        order = rng.permutation(len(files))
        if len(files) == 1:
            singles.append(parent)
            continue
        n_held = int(round(len(files) * holdout))
        if holdout > 0 and n_held == 0:
            n_held = 1
        cut = len(files) - n_held
        parts[parent] = ([files[i] for i in order[:cut]], [files[i] for i in order[cut:]])
    total = sum(len(f) for f in groups.values())
    held_so_far = sum(len(h) for _, h in parts.values())
    single_held = max(0, min(len(singles), int(round(total * holdout)) - held_so_far)) if holdout > 0 else 0
    chosen = {singles[i] for i in rng.permutation(len(singles))[:single_held]} if single_held else set()
    for parent in singles:
        parts[parent] = ([], groups[parent]) if parent in chosen else (groups[parent], [])
    calibration = [p for parent in sorted(parts) for p in parts[parent][0]]
    held = [p for parent in sorted(parts) for p in parts[parent][1]]
    return HoldOut(calibration, held, float(holdout), classes=len(groups), multi_classes=len(groups) - len(singles),
                   single_held=single_held)


def interleave_classes(paths: Sequence[Path]) -> list[Path]:
    """Round-robin over parent folders, so a prefix of the list covers every class."""
    groups: dict[Path, list[Path]] = defaultdict(list)
    for path in paths:
        groups[Path(path).parent].append(Path(path))
    ordered, queues = [], [groups[k] for k in sorted(groups)]
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


@dataclass
class ImageSet:
    """Decoded images (uint8 NHWC) with the files they came from and those that failed."""

    images: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def load_images(paths: Sequence[Path], image_size: tuple[int, int], *, limit: int | None = None,
                progress: bool = False, desc: str = "images", mode: str = simages.DEFAULT_RESIZE) -> ImageSet:
    """Decode + resize (by the model's resize `mode`) through `serve.images`, the serving path;
    undecodable files are reported. With `limit`, a class-interleaved sample of at most `limit` images:
    the progress counts towards the sample ("calibration (a sample of 300 of 926 images): 300/300 img"),
    not the files (a last line of "300/926" read as a run stopped early)."""
    paths = list(paths)
    if limit is not None:
        paths = interleave_classes(paths)
    arrays, loaded, skipped = [], [], []
    wanted = len(paths) if limit is None else min(limit, len(paths))
    bar = None
    if progress:
        from serve.console import progress as tqdm  # bar on a terminal, lines in logs
        if wanted < len(paths):
            desc = f"{desc} (a sample of {wanted} of {len(paths)} images)"
        bar = tqdm(total=wanted, desc=desc, unit="img", leave=False)
    try:
        for index, path in enumerate(paths):
            if len(loaded) >= wanted:
                break
            try:
                arrays.append(simages.load(path, image_size, mode=mode))
                loaded.append(Path(path))
            except ImageDecodeError as exc:
                skipped.append((Path(path), str(exc)))
                if bar is not None:  # what can still be loaded: the last line never reads as a run stopped early
                    bar.total = min(wanted, len(loaded) + len(paths) - index - 1)
                    bar.set_postfix_str(f"({len(skipped)} undecodable, skipped)")
                    bar.refresh()
                continue
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    h, w = int(image_size[0]), int(image_size[1])
    batch = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
    return ImageSet(batch, loaded, skipped)


def load_calibration(paths: Sequence[Path], image_size: tuple[int, int], options: QuantizeOptions, *,
                     source: str | Path = "", progress: bool = False, mode: str = simages.DEFAULT_RESIZE,
                     held_out: int = 0) -> ImageSet:
    """Calibration images, at most `max_images`; refuses fewer than `min_images` with the count received
    (and `held_out`: how many of the folder's files were held out for the accuracy report)."""
    found = len(paths) + held_out
    images = load_images(paths, image_size, limit=options.max_images, progress=progress, desc="calibration",
                         mode=mode)
    if len(images) < options.min_images:
        where = f" in {source}" if source else ""
        bad = f", {len(images.skipped)} undecodable" if images.skipped else ""
        held = f", {held_out} of them held out for the accuracy report" if held_out else ""
        hint = " (or calibrate on all of them: --holdout 0 with --accuracy-images DIR)" if held_out else ""
        raise ConfigError(
            f"INT8 calibration received {len(images)} usable images{where} ({found} image files found{held}{bad}); "
            f"it needs at least {options.min_images}. Add images or lower --min-calibration-images{hint}"
        )
    return images


CALIBRATION_CHUNK = 32  # images per collection pass (bounds memory: activations are kept per pass)


class _Reader:
    """onnxruntime CalibrationDataReader over a uint8 batch, one image at a time.

    `set_range` lets quantize_static collect statistics chunk by chunk
    (extra option CalibStridedMinMax, which every calibrator honours): the
    histogram calibrators otherwise keep every intermediate activation of every
    image in memory (MobileNetV2: ~30 MB per image; 300 images were OOM-killed).
    """

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name, self.images = input_name, images
        self.start, self.end, self.index = 0, len(images), 0

    def get_next(self):
        if self.index >= self.end:
            return None
        item = {self.input_name: self.images[self.index : self.index + 1]}
        self.index += 1
        return item

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end, self.index = start_index, min(end_index, len(self.images)), start_index

    def rewind(self):
        self.index = self.start

    def __len__(self):
        return len(self.images)


def chunk_size(n: int, limit: int = CALIBRATION_CHUNK) -> int:
    """The largest divisor of n that is <= limit (onnxruntime needs n % stride == 0)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# ---- which nodes stay in float --------------------------------------------------------------
_COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")


def _with_activation(node, consumers) -> list[str]:
    """A Conv and the Clip/Relu that follows it (they quantize as one unit)."""
    names = [node.name]
    for user in consumers.get(node.output[0], []):
        if user.op_type in ACTIVATION_OPS:
            names.append(user.name)
    return names


def keep_float_nodes(model, rules: Iterable[str], float_prefix: int = 0) -> dict[str, str]:
    """{node name: rule} for the nodes that stay in float. `model` is an onnx.ModelProto (topologically sorted).

    `float_prefix` N keeps every node before the (N+1)-th compute layer in float, plus the
    activation right after the N-th (a Conv and its ReLU6 quantize as one unit).
    """
    graph = model.graph
    nodes = list(graph.node)
    consumers = _graph.consumers(graph)
    compute = [i for i, n in enumerate(nodes) if n.op_type in _COMPUTE_OPS]
    keep: dict[str, str] = {}
    rules = tuple(rules)
    for rule in rules:
        if rule not in KEEP_FLOAT_RULES:
            raise ConfigError(f"unknown keep-float rule {rule!r}; expected one of {', '.join(KEEP_FLOAT_RULES)}")
    if not compute:
        return keep
    first = compute[0]
    if "preprocessing" in rules:
        for node in nodes[:first]:
            keep.setdefault(node.name, "preprocessing")
    if "first_conv" in rules:
        for name in _with_activation(nodes[first], consumers):
            keep.setdefault(name, "first_conv")
    if "classifier" in rules:
        last_dense = max((i for i in compute if nodes[i].op_type in ("MatMul", "Gemm")), default=None)
        if last_dense is not None:
            for node in nodes[last_dense:]:
                keep.setdefault(node.name, "classifier")
    if "sensitive" in rules:
        depthwise = [nodes[i] for i in compute if _graph.is_depthwise(nodes[i])]
        if depthwise:
            for name in _with_activation(depthwise[0], consumers):
                keep.setdefault(name, "sensitive")
    if float_prefix > 0:
        cut = compute[float_prefix] if float_prefix < len(compute) else len(nodes)
        for node in nodes[:cut]:
            keep.setdefault(node.name, "prefix")
        for name in _with_activation(nodes[compute[min(float_prefix, len(compute)) - 1]], consumers):
            keep.setdefault(name, "prefix")
    return keep


# ---- quantization ---------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: Path
    images_used: int
    images_skipped: int
    method: str
    target: str
    kept_float: dict[str, str]
    quantized_nodes: int
    options: dict
    float_between_qdq: list[str] = field(default_factory=list)  # see float_layers_between_qdq()
    exact_input: dict = field(default_factory=dict)  # export.exact_input's plan, or {"applied": False, "why_not": ...}
    equalized: list = field(default_factory=list)  # export.equalize's pairs (conv, depthwise, channels rescaled)

    def summary(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["kept_float_by_rule"] = {}
        for node, rule in self.kept_float.items():
            data["kept_float_by_rule"].setdefault(rule, []).append(node)
        del data["kept_float"]
        return data


def preprocess(model_path: str | Path, out_path: str | Path) -> Path:
    """onnxruntime's quantization pre-processing: optimisation + ONNX shape inference.

    Symbolic shape inference is skipped (it needs sympy; our models' only
    dynamic dimension is the batch, which ONNX shape inference handles).
    """
    require("onnx", "INT8 quantization")
    shape_inference = require("onnxruntime.quantization.shape_inference", "INT8 quantization")
    shape_inference.quant_pre_process(str(model_path), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)


def float_layers_between_qdq(model) -> list[str]:
    """Float Conv/Gemm/MatMul nodes whose input comes from a DequantizeLinear and whose
    output (through at most one Clip/Relu) goes to a QuantizeLinear.

    onnxruntime's level-1 WeightBiasQuantization transformer re-quantizes such a
    layer's float weights per tensor, so with default session settings it no longer
    computes what the model says. Kestrel's onnxruntime backend disables that
    transformer; Triton and plain onnxruntime do not.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _graph.consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type not in _COMPUTE_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type in ACTIVATION_OPS:
            users = consumers.get(users[0].output[0], [])
        if users and all(u.op_type == "QuantizeLinear" for u in users):
            found.append(node.name)
    return found


def quantize(model_path: str | Path, out_path: str | Path, calibration: ImageSet | np.ndarray,
             options: QuantizeOptions = QuantizeOptions(), *, input_name: str = "images",
             calibration_cache: str | Path | None = None, progress: bool = False) -> QuantizeResult:
    """Statically quantize `model_path` (FP32 ONNX) into a Q/DQ model at `out_path` (`progress`: the calibration's)."""
    onnx = require("onnx", "INT8 quantization")
    q = require("onnxruntime.quantization", "INT8 quantization")
    images = calibration.images if isinstance(calibration, ImageSet) else np.asarray(calibration)
    skipped = len(calibration.skipped) if isinstance(calibration, ImageSet) else 0
    if len(images) < options.min_images:
        raise ConfigError(
            f"INT8 calibration received {len(images)} images; it needs at least {options.min_images}"
        )
    images = images[: options.max_images]
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="kestrel-quant-") as tmp:
        prepared = preprocess(model_path, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared), load_external_data=False)
        kept = keep_float_nodes(model, options.keep_float, options.float_prefix)
        for name in options.exclude_nodes:
            kept.setdefault(name, "user")
        if options.quantizer == "nncf":
            _quantize_nncf(prepared, out_path, images, options, input_name=input_name, kept=sorted(kept))
            return _result(onnx, out_path, images, skipped, options, kept)
        exact = {"applied": False, "why_not": "off (exact_input=False)"}
        use_exact = options.exact_input and options.target == "cpu" and not options.symmetric_activations
        if options.exact_input and not use_exact:
            exact["why_not"] = "needs the CPU target's asymmetric uint8 activations"
        # the prepared model with its weights, read once and written once, when a transform may change it
        full = onnx.load(str(prepared)) if use_exact or options.equalize != "none" else None
        equalized: list[dict] = []
        if options.equalize != "none":
            first = options.equalize == "first"
            pairs = equalize.find_pairs(full, first)
            if any(p.depthwise not in kept and p.conv not in kept for p in pairs):
                done = equalize.equalize(full, images[:EQUALIZE_IMAGES], input_name=input_name, pairs=pairs)
                equalized = [pair.as_dict() for pair in done]
        plan = None
        if use_exact:
            plan, exact["why_not"] = exact_input.plan(full)
            if plan is not None and kept.get(plan.conv) == "first_conv" and plan.conv not in options.exclude_nodes:
                # first_conv and sensitive guard a stem fed a re-quantized copy of the image (7 bits after
                # rounding) with 8-bit weights (AVX2's U8S8 pair sums saturate on full-range pixels). Fed
                # the exact image with 7-bit weights, the stem and the first depthwise conv quantize well.
                lifted = sorted(n for n, rule in kept.items()
                                if rule in ("first_conv", "sensitive") and n not in options.exclude_nodes)
                for name in lifted:
                    del kept[name]
                exact["lifted"] = lifted
            if plan is not None and plan.conv in kept:
                exact["why_not"] = f"the stem {plan.conv} stays float (keep-float rule {kept[plan.conv]})"
                plan = None
            if plan is not None:
                exact_input.apply(full, plan)
                for name in plan.chain:
                    kept.setdefault(name, "preprocessing")
        if equalized or plan is not None:
            prepared = Path(tmp) / "prepared_transformed.onnx"
            onnx.save(full, str(prepared))
        methods = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                   "entropy": q.CalibrationMethod.Entropy}
        symmetric_activations = options.target == "tensorrt" or options.symmetric_activations
        extra = {
            "ActivationSymmetric": symmetric_activations,
            "WeightSymmetric": True,
            "QDQKeepRemovableActivations": symmetric_activations,
        }
        if options.target == "tensorrt":
            extra["QuantizeBias"] = False  # TensorRT fuses a float bias itself; it has no INT32 dequantize
        if options.method == "percentile":
            extra["CalibPercentile"] = float(options.percentile)
        if plan is not None:
            extra["TensorQuantOverrides"] = plan.overrides()
        if len(images) > CALIBRATION_CHUNK:
            extra["CalibStridedMinMax"] = chunk_size(len(images))
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        if (calibration_cache is None and options.method == "percentile" and options.fast_calibration
                and size <= EXTERNAL_DATA_BYTES):
            try:  # the quantile from each tensor's top values, found in the graph (export/calibrate.py): minutes -> seconds
                ranges = calibrate.percentile_ranges(
                    prepared, images, input_name=input_name, percentile=float(options.percentile),
                    op_types=options.op_types, first_pass=extra.get("CalibStridedMinMax", len(images)),
                    progress=progress)
                calibration_cache = calibrate.write_cache(ranges, Path(tmp) / "calibration.json")
            except ValueError:  # too many values to keep (a low percentile), or a graph it cannot tap: onnxruntime's
                calibration_cache = None
        # onnxruntime's calibrator print()s its steps ("Collecting tensor data and making histogram ...",
        # once per chunk): kept off the user's terminal unless --verbose, like TensorFlow's start-up lines
        chatter = contextlib.nullcontext() if console.is_verbose() else contextlib.redirect_stdout(io.StringIO())
        with chatter:
            q.quantize_static(
                str(prepared), str(out_path), _Reader(input_name, images),
                quant_format=q.QuantFormat.QDQ,
                activation_type=q.QuantType.QInt8 if symmetric_activations else q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                calibrate_method=methods[options.method],
                nodes_to_exclude=sorted(kept),
                op_types_to_quantize=list(options.op_types) if options.op_types else None,
                use_external_data_format=size > EXTERNAL_DATA_BYTES,
                extra_options=extra,
                calibration_cache_path=calibration_cache,
            )
        if plan is not None:
            quantized = onnx.load(str(out_path))
            if exact_input.strip(quantized, plan):
                onnx.save(quantized, str(out_path))
                exact = {"applied": True, **plan.as_dict(), "lifted": exact.get("lifted", [])}
            else:
                exact["why_not"] = f"the quantizer did not keep scale {plan.scale:g} / zero point {plan.zero_point} on {plan.tensor}"
    return _result(onnx, out_path, images, skipped, options, kept, exact, equalized)


def _result(onnx, out_path: Path, images: np.ndarray, skipped: int, options: QuantizeOptions,
            kept: dict[str, str], exact: dict | None = None, equalized: list | None = None) -> "QuantizeResult":
    quantized = onnx.load(str(out_path), load_external_data=False)
    n_q = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    return QuantizeResult(
        path=out_path, images_used=int(len(images)), images_skipped=skipped, method=options.method,
        target=options.target, kept_float=kept, quantized_nodes=n_q,
        options={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        float_between_qdq=float_layers_between_qdq(quantized),
        exact_input=exact or {"applied": False, "why_not": f"quantizer {options.quantizer}"},
        equalized=equalized or [],
    )


def _quantize_nncf(model_path: Path, out_path: Path, images: np.ndarray, options: QuantizeOptions, *,
                   input_name: str, kept: Sequence[str]) -> None:
    """NNCF's post-training quantization of an ONNX model: Q/DQ ONNX that onnxruntime and TensorRT
    run (symmetric int8 weights per channel, activations per tensor; fast bias correction).
    The keep-float rules become its ignored scope; `method`/`percentile` do not apply (NNCF
    picks its own range estimators)."""
    onnx = require("onnx", "INT8 quantization")
    try:
        import nncf
    except ImportError as exc:
        from serve.errors import MissingDependencyError
        raise MissingDependencyError("nncf", "nncf", "--quantizer nncf") from exc
    model = onnx.load(str(model_path))
    dataset = nncf.Dataset(range(len(images)), lambda i: {input_name: images[i : i + 1]})
    kwargs = {}
    if kept:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(kept), validate=False)
    if options.target == "tensorrt":
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE  # symmetric activations: TensorRT's rule
    quantized = nncf.quantize(model, dataset, subset_size=len(images),
                              fast_bias_correction=options.fast_bias_correction, **kwargs)
    onnx.save(quantized, str(out_path))
