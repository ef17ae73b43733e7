"""`kestrel bench ceiling-share`: the server and onnxruntime alone, round by round, on a tiny real ONNX model."""

from __future__ import annotations

import importlib.util
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
                                        images=photos, work=work)
    assert sorted(rounds) == [1, 3]
    for clients, rows in rounds.items():
        assert len(rows) == 2
        for row in rows:
            assert row["images_per_s"] > 0 and row["ceiling"] > 0
            assert 1.0 <= row["mean_batch"] <= clients
            # the share is the server's img/s over onnxruntime's at that batch, nothing else
            assert row["share"] == pytest.approx(row["images_per_s"] / row["ceiling"])


def test_a_model_not_in_the_repository_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    assert ceiling_share.main(["--model", "nope", "--repository", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not in" in err and "Traceback" not in err


def test_bad_counts_are_refused(tmp_path, capsys):
    assert ceiling_share.main(["--clients", "0", "--repository", str(tmp_path)]) == 2
    assert "expected counts >= 1" in capsys.readouterr().err
