"""Features of the frozen base, computed once with onnxruntime and cached on disk.

A frozen base maps an image to the same features on every epoch, so they are
computed once: the headless base (uint8 "images" in, export's preprocessing
inside) is converted to ONNX by `export.keras_to_onnx` and run by
`serve.backends.onnxruntime.OnnxRuntimeRunner` (about 4x faster than Keras'
`predict` on CPU), then stored as

    <cache>/features/<key>.npz      features, decoded indices, undecodable files
    <cache>/extractors/<key>.onnx   the converted base (reused by the next cold run)

The key hashes the base (application, alpha, input size, preprocessing), the
sha256 of its weight values, the cut layer (pooled output or a feature map for
fine-tuning), the view (augmentation) and the image list with each file's
size and mtime: edit, add or remove a file, or change the base, and the key
changes. A re-run with other head settings loads the features in a second.

Augmentation with a frozen base means features of augmented images: each
*view* (a horizontal flip, a corner crop, ...) is a deterministic transform of
the decoded image, cached like the plain one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve import images as image_io
from serve._files import atomic_open
from serve.repository import TensorSpec

CACHE_FORMAT = 1
CROP_FRACTION = 0.8  # corner / centre crops keep 80% of each side, then resize back

# view name -> description; the transforms are in `apply_view`
VIEWS = {
    "plain": "the image as served",
    "flip": "horizontal flip",
    "crop_tl": "top-left 80% crop, resized back",
    "crop_br_flip": "bottom-right 80% crop, resized back, flipped",
    "zoom": "central 80% crop, resized back",
}
AUGMENT_VIEWS = ("flip", "zoom")


def apply_view(batch: np.ndarray, view: str) -> np.ndarray:
    """Apply a named view to a uint8 (N, H, W, 3) batch (same size out)."""
    if view == "plain":
        return batch
    from PIL import Image

    height, width = batch.shape[1:3]
    flip = view.endswith("_flip") or view == "flip"
    base = view[: -len("_flip")] if view.endswith("_flip") else view
    out = batch
    if base in ("crop_tl", "crop_br", "zoom"):
        ch, cw = max(1, int(round(height * CROP_FRACTION))), max(1, int(round(width * CROP_FRACTION)))
        if base == "crop_tl":
            y0, x0 = 0, 0
        elif base == "crop_br":
            y0, x0 = height - ch, width - cw
        else:
            y0, x0 = (height - ch) // 2, (width - cw) // 2
        out = np.stack([image_io.resize(Image.fromarray(img[y0:y0 + ch, x0:x0 + cw]), (height, width))
                        for img in batch]) if len(batch) else batch
    elif base != "flip":
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheStats:
    """What the feature stage did: the test suite asserts on these, not on timings."""

    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    extracted_images: int = 0
    decoded_images: int = 0
    extractor_converted: bool = False
    extractor_reused: bool = False
    seconds: dict = field(default_factory=dict)  # wall time of convert / decode / extract (where the phase goes)

    def add_time(self, part: str, seconds: float) -> None:
        self.seconds[part] = round(self.seconds.get(part, 0.0) + seconds, 3)

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "extracted_images": self.extracted_images,
                "decoded_images": self.decoded_images, "extractor_converted": self.extractor_converted,
                "extractor_reused": self.extractor_reused, "seconds": dict(self.seconds)}


@dataclass
class Features:
    """Features of one view of a list of images."""

    values: np.ndarray  # (n_kept, ...) float32 / float16
    kept: np.ndarray  # indices (into the list given) of the images that decoded
    skipped: list[tuple[str, str]]  # (path, reason) of those that did not


class FeatureStore:
    """Extracts and caches features of one base (and cut) for lists of image files."""

    def __init__(self, base, *, cache_dir: str | Path = ".cache", cut: str | None = None, batch_size: int = 32,
                 progress: bool = True, threads: int | None = None):
        self.base = base
        self.cut = cut
        self.cache_dir = Path(cache_dir)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.threads = threads
        self.stats = CacheStats()
        self._runner = None
        self._decoded: dict[str, np.ndarray] = {}  # path -> pixels, reused across views in one run
        self._failed: dict[str, str] = {}

    # ---- keys ----------------------------------------------------------------------------
    def _extractor_key(self) -> dict:
        return {"format": CACHE_FORMAT, **self.base.key(), "cut": self.cut}

    def key(self, fingerprint: str, view: str) -> str:
        return _digest({**self._extractor_key(), "view": view, "images": fingerprint})

    def path(self, fingerprint: str, view: str) -> Path:
        return self.cache_dir / "features" / f"{self.key(fingerprint, view)[:32]}.npz"

    # ---- the ONNX extractor ----------------------------------------------------------------
    def runner(self):
        """The onnxruntime runner of the headless base (converted once, then reused from the cache)."""
        if self._runner is not None:
            return self._runner
        from serve.backends.onnxruntime import OnnxRuntimeRunner

        started = time.perf_counter()
        path = self.cache_dir / "extractors" / f"{_digest(self._extractor_key())[:32]}.onnx"
        model = None
        if path.is_file():
            self.stats.extractor_reused = True
        else:
            from . import bases

            model = bases.feature_extractor(self.base, self.cut)
            convert_to_onnx(model, path)
            self.stats.extractor_converted = True
        height, width = self.base.input_size
        out_shape = self.feature_shape(model)
        runner = OnnxRuntimeRunner(
            f"{self.base.app.name}_features", path, TensorSpec("images", np.uint8, (height, width, 3)),
            TensorSpec("features", np.float32, out_shape), providers=["CPUExecutionProvider"],
            intra_op_threads=self.threads,
        )
        self._runner = runner.load()
        self.stats.add_time("convert_and_load", time.perf_counter() - started)
        return self._runner

    def feature_shape(self, model=None) -> tuple[int, ...]:
        if model is None:
            from . import bases

            model = bases.feature_extractor(self.base, self.cut)
        return tuple(int(d) for d in model.outputs[0].shape[1:])

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    # ---- features ----------------------------------------------------------------------------
    def get(self, paths: list[Path], fingerprint: str, view: str = "plain") -> Features:
        """Features of `view` of `paths` (cached under `fingerprint`, the list's identity)."""
        path = self.path(fingerprint, view)
        cached = self._load(path, paths)
        if cached is not None:
            self.stats.hits.append(view)
            return cached
        self.stats.misses.append(view)
        pixels, kept, skipped = self._pixels(paths)
        values = self._extract(apply_view(pixels, view), desc=f"features ({view})")
        features = Features(values=values, kept=kept, skipped=skipped)
        self._save(path, features, view, paths)
        return features

    def _pixels(self, paths: list[Path]):
        """Decoded images (decoding each file once per run), indices kept, [(path, reason)] skipped."""
        todo = [p for p in paths if str(p) not in self._decoded and str(p) not in self._failed]
        started = time.perf_counter()
        if todo:
            from serve.console import progress as tqdm  # bar on a terminal, lines in logs

            for p in tqdm(todo, desc="decoding images", unit="img", disable=not self.progress, leave=False):
                try:
                    self._decoded[str(p)] = image_io.load(p, self.base.input_size)
                except image_io.ImageDecodeError as exc:
                    self._failed[str(p)] = str(exc)
            self.stats.decoded_images += len(todo)
            self.stats.add_time("decode", time.perf_counter() - started)
        kept = [i for i, p in enumerate(paths) if str(p) in self._decoded]
        skipped = [(str(p), self._failed[str(p)]) for p in paths if str(p) in self._failed]
        height, width = self.base.input_size
        pixels = (np.stack([self._decoded[str(paths[i])] for i in kept]) if kept
                  else np.zeros((0, height, width, 3), np.uint8))
        return pixels, np.asarray(kept, np.int64), skipped

    def _extract(self, pixels: np.ndarray, desc: str) -> np.ndarray:
        from serve.console import progress as tqdm  # bar on a terminal, lines in logs

        if len(pixels) == 0:
            return np.zeros((0,) + self.feature_shape(), np.float32)
        runner = self.runner()
        started = time.perf_counter()
        out = []
        with tqdm(total=len(pixels), desc=desc, unit="img", disable=not self.progress, leave=False) as bar:
            for start in range(0, len(pixels), self.batch_size):
                chunk = pixels[start:start + self.batch_size]
                values = runner.infer(chunk)
                # feature maps (fine-tuning) are stored in float16: a quarter of float32 on disk
                out.append(values.astype(np.float16) if values.ndim > 2 else values)
                bar.update(len(chunk))
        self.stats.extracted_images += len(pixels)
        self.stats.add_time("extract", time.perf_counter() - started)
        return np.concatenate(out)

    # ---- the cache files ---------------------------------------------------------------------
    def _load(self, path: Path, paths: list[Path]) -> Features | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                values, kept = data["values"], data["kept"]
                skipped = [(str(paths[int(i)]), reason.replace(old, str(paths[int(i)])))
                           for i, old, reason in json.loads(str(data["skipped"]))]
        except Exception:  # a truncated or foreign file is a miss, rewritten below
            return None
        if len(kept) != len(values) or (len(kept) and int(kept.max()) >= len(paths)):
            return None
        return Features(values=values, kept=kept, skipped=skipped)

    def _save(self, path: Path, features: Features, view: str, paths: list[Path]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        index = {str(p): i for i, p in enumerate(paths)}
        with atomic_open(path, "wb") as fh:  # a shared cache: mode 0644 (umask 022), not mkstemp's 0600
            np.savez(fh, values=features.values, kept=features.kept,
                     # undecodable files by index: the cache stays valid for a copied dataset
                     skipped=np.asarray(json.dumps([(index[p], p, reason) for p, reason in features.skipped])),
                     meta=np.asarray(json.dumps({**self._extractor_key(), "view": view})))


def convert_to_onnx(model, path: Path) -> Path:
    """Convert with export's converter into a temporary file, then rename (never a half-written file)."""
    from export import keras_to_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        result = keras_to_onnx.convert(model, tmp / "model.onnx")
        if list(tmp.glob("model.onnx.data")):
            raise RuntimeError("the base is larger than 2 GB; features cannot be cached as one ONNX file")
        os.replace(result.path, path)
    finally:
        for child in tmp.iterdir() if tmp.exists() else []:
            child.unlink()
        if tmp.exists():
            tmp.rmdir()
    return path
