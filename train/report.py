"""Metrics and figures: accuracy, per-class precision/recall, confusion matrix (text and PNG), curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve._optional import require


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def per_class(matrix: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each class (0.0 where undefined, e.g. never predicted)."""
    out = {}
    for i, name in enumerate(names):
        tp = float(matrix[i, i])
        predicted = float(matrix[:, i].sum())
        actual = float(matrix[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                     "support": int(actual)}
    return out


def matrix_text(matrix: np.ndarray, names: list[str]) -> str:
    """A fixed-width table: rows are the true classes, columns the predictions."""
    width = max(8, max(len(n) for n in names) + 1, len(str(int(matrix.max()))) + 1)
    head = "true \\ predicted".ljust(width + 2) + "".join(n[:width].rjust(width) for n in names)
    lines = [head]
    for i, name in enumerate(names):
        lines.append(name[:width].ljust(width + 2) + "".join(str(int(v)).rjust(width) for v in matrix[i]))
    return "\n".join(lines) + "\n"


def _pyplot():
    matplotlib = require("matplotlib", "the training report's figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.7 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), labels=names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        peak = matrix.max() or 1
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(int(value)), ha="center", va="center",
                    color="white" if value > 0.6 * peak else "black", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_curves(phases: list[tuple[str, dict]], path: Path) -> Path:
    """Loss and accuracy per epoch (train and validation) for each training phase, one after another."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        offset = 0
        for label, hist in phases:
            epochs = np.arange(1, len(hist.get("loss", [])) + 1) + offset
            for key, ax, style in (("loss", loss_ax, "-"), ("val_loss", loss_ax, "--"),
                                   ("accuracy", acc_ax, "-"), ("val_accuracy", acc_ax, "--")):
                if key in hist:
                    ax.plot(epochs, hist[key], style, label=f"{label} {key.replace('_', ' ')}")
            offset += len(epochs)
        for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
