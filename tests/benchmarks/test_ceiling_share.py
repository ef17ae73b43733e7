"""`kestrel bench ceiling-share`: the server and onnxruntime alone, round by round, on a tiny real ONNX model."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import ceiling_share

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None  # never imported here


def _tiny(repo: Path) -> None:
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    try:
        from serve_helpers import write_tiny_onnx
    finally:
        sys.path.remove(str(ROOT / "tests" / "serve"))
    write_tiny_onnx(repo, "tiny", classes=4, size=(16, 16))


@pytest.mark.skipif(not HAS_TRITONCLIENT, reason="the load generator needs tritonclient (pip install '.[bench]')")
def test_each_round_pairs_the_servers_throughput_with_onnxruntime_alone_at_the_batch_it_formed(tmp_path):
    _tiny(tmp_path / "models")
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), np.uint8)).save(photos / f"{i}.png")
    work = tmp_path / "work"
    work.mkdir()
    rounds = ceiling_share.share_rounds(tmp_path / "models", "tiny", [1, 3], rounds=2, duration=0.5, warmup=0.2,
                                        images=photos, work=work, side_seconds=0.3)
    assert sorted(rounds) == [1, 3]
    for clients, rows in rounds.items():
        assert len(rows) == 2
        for row in rows:
            assert row["images_per_s"] > 0 and row["ceiling"] > 0
            assert 1.0 <= row["mean_batch"] <= clients
            # the share is the server's img/s over onnxruntime's at that batch, nothing else
            assert row["share"] == pytest.approx(row["images_per_s"] / row["ceiling"])
            # and over onnxruntime alone running two batches side by side, as the server does under load
            assert ("side_by_side" in row) == ((os.cpu_count() or 1) > 1)
            if "side_by_side" in row:
                assert row["side_by_side"] > 0
                assert row["side_by_side_share"] == pytest.approx(row["images_per_s"] / row["side_by_side"])


def test_side_by_side_runs_two_threads_in_the_narrow_session_or_says_it_cannot(tmp_path, monkeypatch):
    _tiny(tmp_path / "models")
    monkeypatch.delenv("KESTREL_ORT_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    from serve.backends.onnxruntime import OnnxRuntimeRunner

    busy = []
    real = OnnxRuntimeRunner._infer_busy
    monkeypatch.setattr(OnnxRuntimeRunner, "_infer_busy", lambda self, b: busy.append(len(b)) or real(self, b))
    assert ceiling_share.side_by_side(tmp_path / "models", "tiny", 3, images=None, seconds=0.2) > 0
    assert busy and set(busy) == {3}  # every batch in the narrow session, at the size asked
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # one core: no narrow session to compare with
    assert ceiling_share.side_by_side(tmp_path / "models", "tiny", 3, images=None, seconds=0.2) is None


def test_a_model_not_in_the_repository_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    assert ceiling_share.main(["--model", "nope", "--repository", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not in" in err and "Traceback" not in err


def test_bad_counts_are_refused(tmp_path, capsys):
    assert ceiling_share.main(["--clients", "0", "--repository", str(tmp_path)]) == 2
    assert "expected counts >= 1" in capsys.readouterr().err
