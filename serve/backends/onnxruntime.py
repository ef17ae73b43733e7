"""onnxruntime backend: the default CPU path, and CUDA / TensorRT EP where installed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._files import check_readable
from .._optional import require
from ..errors import ModelLoadError
from ..repository import ModelEntry, TensorSpec
from .base import Runner

# Preferred order; only those the installed onnxruntime offers are used.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# onnxruntime graph transformers that change a model's numbers. WeightBiasQuantization
# (a level-1 transformer) takes a float Conv/Gemm that sits between a DequantizeLinear
# and a QuantizeLinear -- a layer deliberately kept in float inside an INT8 model -- and
# quantizes its weights itself (per tensor), so the layer no longer computes what the
# model says: an INT8 mobilenet_v2 with its depthwise convs kept float agreed with the
# FP32 model on 21 % of images with it, 90 % without (export/QUANTIZATION.md;
# onnxruntime issues #24711 and #25259). Names a given onnxruntime does not know are ignored.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def available_providers() -> list[str]:
    ort = require("onnxruntime", "the onnxruntime backend")
    return list(ort.get_available_providers())


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Requested providers (or the defaults) that this onnxruntime build has, in order."""
    have = set(available_providers())
    wanted = list(requested) if requested else list(DEFAULT_PROVIDERS)
    chosen = [p for p in wanted if p in have]
    if not chosen:
        raise ModelLoadError(f"none of the requested onnxruntime providers {wanted} is available; this build has {sorted(have)}")
    return chosen


THREAD_PARAMETERS = {"intra_op_thread_count": "intra_op_threads", "inter_op_thread_count": "inter_op_threads"}


def intra_op_threads_for(requested: int | None, env=None) -> int:
    """The intra-op thread count a session gets: `requested` (a model's config or --ort-threads), else
    KESTREL_ORT_THREADS, else 0 (onnxruntime's default: one per physical core)."""
    env = os.environ if env is None else env
    return int(requested or int(env.get("KESTREL_ORT_THREADS", "0") or 0))


def config_thread_options(entry: ModelEntry) -> dict[str, int]:
    """Thread counts set in the model's config.pbtxt `parameters`; 0 means onnxruntime's default."""
    options = {}
    for key, option in THREAD_PARAMETERS.items():
        value = entry.parameters.get(key)
        if value is None or value == "":
            continue
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            raise ModelLoadError(f"model '{entry.name}': parameter {key} is {value!r} in config.pbtxt; "
                                 "expected a whole number >= 0 (0 = onnxruntime's default)")
        options[option] = count
    return options


class OnnxRuntimeRunner(Runner):
    """Runs model.onnx with an InferenceSession (thread-safe: sessions allow concurrent run())."""

    thread_safe = True

    def __init__(self, name: str, path: str | Path, input_spec: TensorSpec, output_spec: TensorSpec, *,
                 labels=None, max_batch_size: int = 0, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 allow_spinning: bool = False, adaptive_threads: bool = False):
        super().__init__(name, input_spec, output_spec, labels=labels, max_batch_size=max_batch_size)
        self.path = Path(path)
        self.requested_providers = providers
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        # Busy-waiting worker threads cut a little latency on an idle, dedicated
        # machine but burn the cores the batcher, decoding and other models need:
        # measured with 16 clients on 2 cores, 32.5 req/s spinning vs 60.9 without.
        self.allow_spinning = allow_spinning
        self.session = None
        self._narrow = None  # the busy-time session (adaptive threads), or None
        self.providers: list[str] = []
        # Adaptive threads (`adaptive_threads`; on in the server unless --no-ort-adaptive-threads or the
        # config parameter adaptive_threads "false"; CPU only, more than one core, no thread count set): a
        # lone batch runs on every core (lowest latency), and while other batches run or wait, each runs in
        # a second session on half the cores, two side by side, the batcher splitting the work between them
        # evenly: no thread of a batch waits for another preempted by request handling. Measured on
        # mobilenet_v2, 2 cores AVX-512 VNNI, gRPC batch-1 clients, interleaved 3 x 6 s: 4 / 8 / 16 / 32
        # clients +6 / +8 / +9 / +11 % img/s, p95 within 3 % (docs/benchmarks.md). Without the even split
        # (before): p95 up to 44 % longer at 32 clients.
        cores = os.cpu_count() or 1
        self.adaptive = (bool(adaptive_threads) and cores > 1
                         and not intra_op_threads_for(intra_op_threads)
                         and providers in (None, ["CPUExecutionProvider"]))
        self.narrow_threads = max(1, cores // 2)
        self.preferred_workers = 2 if self.adaptive else 1

    @classmethod
    def from_entry(cls, entry: ModelEntry, version: int | None = None, **options) -> "OnnxRuntimeRunner":
        """Server-wide `options`, overridden by the model's own config.pbtxt parameters
        (Triton's onnxruntime backend names: intra_op_thread_count, inter_op_thread_count)."""
        options.update(config_thread_options(entry))
        adaptive = entry.parameters.get("adaptive_threads", "").strip().lower()
        if adaptive:
            if adaptive not in ("true", "false", "1", "0"):
                raise ModelLoadError(f"model '{entry.name}': parameter adaptive_threads is {adaptive!r} in "
                                     "config.pbtxt; expected true or false")
            options["adaptive_threads"] = adaptive in ("true", "1")
        return cls(entry.name, entry.artifact(version), entry.input_spec, entry.output_spec,
                   labels=entry.labels(), max_batch_size=entry.max_batch_size, **options)

    def _load(self) -> None:
        ort = require("onnxruntime", "the onnxruntime backend")
        if not self.path.is_file():
            raise ModelLoadError(f"model '{self.name}': {self.path} does not exist")
        unreadable = check_readable(self.path)  # onnxruntime's own message would not say why
        if unreadable:
            raise ModelLoadError(f"model '{self.name}': {unreadable}")
        self.session = self._session(ort, self.intra_op_threads)
        if self.adaptive and set(self.providers) == {"CPUExecutionProvider"}:
            self._narrow = self._session(ort, self.narrow_threads)
        else:
            self.adaptive, self.preferred_workers = False, 1
        self._input_name = self.session.get_inputs()[0].name
        self._output_name = self.session.get_outputs()[0].name

    def _session(self, ort, intra_op_threads: int | None):
        """An InferenceSession with Kestrel's options (`intra_op_threads`: None or 0 = the server's or
        onnxruntime's default)."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = intra_op_threads_for(intra_op_threads)
        if threads:
            opts.intra_op_num_threads = threads
        if self.inter_op_threads:
            opts.inter_op_num_threads = self.inter_op_threads
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        providers = choose_providers(self.requested_providers)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers,
                                           disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as exc:  # onnxruntime raises its own (Fail, InvalidGraph, ...) types
            raise ModelLoadError(f"model '{self.name}': onnxruntime cannot load {self.path}: {exc}") from None
        self.providers = session.get_providers()
        return session

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: batch})[0]

    def _infer_busy(self, batch: np.ndarray) -> np.ndarray:
        session = self._narrow or self.session
        return session.run([self._output_name], {self._input_name: batch})[0]

    def _close(self) -> None:
        self.session = self._narrow = None
