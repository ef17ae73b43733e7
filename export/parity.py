"""Parity: run two runners on the same uint8 images and report how far apart they are.

Any two `serve.backends` runners can be compared (Keras vs ONNX for the FP32
export; ONNX FP32 vs INT8 for quantisation). The report:

    max_abs_diff     largest |reference - candidate| over every probability
    relative_l2      ||reference - candidate||_2 / ||reference||_2 over the whole batch
    top1_agreement   fraction of images whose top-1 class is the same
    top5_agreement   fraction of images whose top-5 classes are the same set
    per_image        the same numbers per image (and each top-1 label), worst first

`check()` fails (ParityError) when relative_l2 exceeds the threshold
(1e-4 for FP32 exports), with the report's summary in the message.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serve import images as image_io
from serve.errors import ConfigError, KestrelError

FP32_THRESHOLD = 1e-4
DEFAULT_SYNTHETIC = 8
REPORT_FILE = "parity.json"


class ParityError(KestrelError):
    """The candidate's outputs differ from the reference by more than the threshold."""

    def __init__(self, report: "ParityReport"):
        self.report = report
        super().__init__(report.summary())


@dataclass
class ParityReport:
    reference: str
    candidate: str
    source: str
    images: int
    classes: int
    threshold: float
    max_abs_diff: float
    relative_l2: float
    top1_agreement: float
    top5_agreement: float
    passed: bool
    per_image: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def worst(self) -> dict | None:
        return self.per_image[0] if self.per_image else None

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = self.worst
        worst_text = f"; worst image {worst['image']} (relative L2 {worst['relative_l2']:.3g})" if worst else ""
        return (
            f"parity {verdict}: {self.candidate} vs {self.reference} on {self.images} images ({self.source}): "
            f"relative L2 {self.relative_l2:.3g} (limit {self.threshold:g}), max abs diff {self.max_abs_diff:.3g}, "
            f"top-1 agreement {self.top1_agreement:.1%}, top-5 agreement {self.top5_agreement:.1%}{worst_text}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def parity_images(size: tuple[int, int], folder: str | Path | None = None, *, count: int = DEFAULT_SYNTHETIC,
                  seed: int = 0, mode: str = image_io.DEFAULT_RESIZE) -> tuple[np.ndarray, list[str], list[dict], str]:
    """(batch, image names, skipped files, source description) for a parity run.

    With a folder, every decodable image in it (through serve.images, resized by
    the model's `mode` as served); without one, `count` deterministic synthetic images.
    """
    if folder is None:
        batch = image_io.synthetic_images(count, size, seed=seed)
        return batch, [f"synthetic-{i}" for i in range(count)], [], f"synthetic images, seed {seed}"
    folder = Path(folder)
    try:
        batch, loaded, skipped = image_io.load_folder(folder, size, mode=mode)
    except KestrelError as exc:
        raise ConfigError(f"parity images: {exc}") from None
    if len(loaded) == 0:
        raise ConfigError(f"parity image folder {folder} holds no decodable images")
    skipped_info = [{"image": str(p), "reason": reason} for p, reason in skipped]
    return batch, [p.name for p in loaded], skipped_info, str(folder)


def run(runner, batch: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """The runner's probabilities for a whole batch, in chunks of `batch_size`."""
    outs = [runner.infer(np.ascontiguousarray(batch[i : i + batch_size])) for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs, axis=0)


def _top(probs: np.ndarray, k: int) -> np.ndarray:
    k = min(k, probs.shape[1])
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def compare_outputs(ref: np.ndarray, cand: np.ndarray, *, names: list[str], labels: list[str] | None = None,
                    reference: str = "reference", candidate: str = "candidate", source: str = "",
                    threshold: float = FP32_THRESHOLD, skipped: list[dict] | None = None) -> ParityReport:
    """Compare two (N, classes) probability arrays."""
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ConfigError(f"parity: {reference} returned shape {ref.shape} but {candidate} returned {cand.shape}")
    diff = cand - ref
    norm = float(np.linalg.norm(ref))
    rel = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))
    top1_ref, top1_cand = _top(ref, 1)[:, 0], _top(cand, 1)[:, 0]
    top5_ref, top5_cand = _top(ref, 5), _top(cand, 5)
    top5_same = [set(a) == set(b) for a, b in zip(top5_ref, top5_cand)]
    per_image = []
    for i, name in enumerate(names):
        row_norm = float(np.linalg.norm(ref[i]))
        row_rel = float(np.linalg.norm(diff[i]) / row_norm) if row_norm > 0 else float(np.linalg.norm(diff[i]))
        entry = {
            "image": name,
            "max_abs_diff": float(np.abs(diff[i]).max()),
            "relative_l2": row_rel,
            "top1_reference": int(top1_ref[i]),
            "top1_candidate": int(top1_cand[i]),
            "top1_probability": float(ref[i, top1_ref[i]]),
            "top1_agrees": bool(top1_ref[i] == top1_cand[i]),
            "top5_agrees": bool(top5_same[i]),
        }
        if labels:
            entry["top1_label"] = labels[int(top1_ref[i])]
        per_image.append(entry)
    per_image.sort(key=lambda e: -e["relative_l2"])
    finite = math.isfinite(rel) and np.isfinite(cand).all()
    return ParityReport(
        reference=reference, candidate=candidate, source=source, images=len(names), classes=int(ref.shape[1]),
        threshold=float(threshold), max_abs_diff=float(np.abs(diff).max()), relative_l2=rel,
        top1_agreement=float(np.mean(top1_ref == top1_cand)), top5_agreement=float(np.mean(top5_same)),
        passed=bool(finite and rel <= threshold), per_image=per_image, skipped=list(skipped or []),
    )


def compare(reference, candidate, *, folder: str | Path | None = None, count: int = DEFAULT_SYNTHETIC,
            threshold: float = FP32_THRESHOLD, batch_size: int = 8, progress=None,
            mode: str = image_io.DEFAULT_RESIZE) -> ParityReport:
    """Run two loaded-or-loadable runners on the same images and compare them.

    Folder images are resized by `mode` (the model's resize parameter).
    `progress`, when given, is called with a short message before each runner runs.
    """
    batch, names, skipped, source = parity_images(reference.image_size, folder, count=count, mode=mode)
    if progress:
        progress(f"running {reference.name} on {len(batch)} images")
    ref = run(reference, batch, batch_size=batch_size)
    if progress:
        progress(f"running {candidate.name} on {len(batch)} images")
    cand = run(candidate, batch, batch_size=batch_size)
    return compare_outputs(ref, cand, names=names, labels=reference.labels, reference=reference.name,
                           candidate=candidate.name, source=source, threshold=threshold, skipped=skipped)


def check(report: ParityReport) -> ParityReport:
    """Raise ParityError when the report did not pass."""
    if not report.passed:
        raise ParityError(report)
    return report
