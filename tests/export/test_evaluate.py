"""export.evaluate on tiny labelled sets built here: fake models (no ML package) with known answers,
a tiny ONNX model through the onnxruntime backend, the labelled-data readers, the statistics, the
outputs and the CLI; and (slow, shared data) the real mobilenet_v2 on imagenet_val."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import evaluate as ev
from serve import images as simages
from serve.backends.fake import fake_probabilities, write_fake_model
from serve.ensemble import FUSIONS, Ensemble, rank
from serve.errors import ConfigError

LABELS = ["cat", "dog", "fox", "owl"]
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]


def _pictures(count: int, seed: int = 0) -> list[np.ndarray]:
    """Pictures of varied size and aspect, so stretch and crop differ."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 64))
        base = rng.integers(0, 255, 3)
        yy, xx = np.mgrid[0:h, 0:w]
        img = (base[None, None, :] + rng.uniform(-3, 3, 3)[None, None, :] * xx[..., None]
               + rng.uniform(-3, 3, 3)[None, None, :] * yy[..., None])
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _dataset(root: Path, names=LABELS, per_class: int = 6, broken: bool = True) -> Path:
    pictures = _pictures(per_class * len(names))
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pictures[k * per_class + i]).save(root / name / f"{i}.png")
    if broken:
        (root / names[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _set_resize(folder: Path, mode: str) -> None:
    from serve.repository import RESIZE_PARAMETER, read_config, write_config
    config = read_config(folder / "config.pbtxt")
    config.parameters[RESIZE_PARAMETER].string_value = mode
    write_config(config, folder)


def _expected(data: Path, names, size, mode, seed, labels=LABELS):
    """(top-1 right per image, probabilities) computed independently: serve.images + fake_probabilities."""
    right, probs = [], []
    for k, name in enumerate(names):
        for path in sorted((data / name).glob("*.png"), key=lambda p: p.name):
            pixels = simages.load(path, size, mode=mode)[None]
            p = fake_probabilities(pixels, len(labels), seed)[0]
            probs.append(p)
            right.append(int(np.argmax(p)) == k)
    return np.array(right), np.array(probs)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    write_fake_model(root, "alpha", classes=4, size=(16, 16), labels=LABELS, seed=1)
    write_fake_model(root, "beta", classes=4, size=(20, 20), labels=LABELS, seed=2)
    write_fake_model(root, "gamma", classes=4, size=(16, 16), labels=LABELS, seed=3)
    _set_resize(root / "beta", "crop")
    return root


def test_every_model_fusion_and_oracle_against_independent_answers(tmp_path, repo):
    data = _dataset(tmp_path / "data")
    result = ev.evaluate(data, repo, ["alpha", "beta", "gamma"], ["trio=alpha,beta,gamma"], latency_runs=2,
                         progress=False, log=lambda m: None)
    assert result.images == 24 and result.classes == 4
    assert [s["image"] for s in result.skipped] == [str(data / "cat" / "broken.jpg")]
    expected = {}
    for name, size, mode, seed in (("alpha", (16, 16), "stretch", 1), ("beta", (20, 20), "crop", 2),
                                   ("gamma", (16, 16), "stretch", 3)):
        right, probs = _expected(data, LABELS, size, mode, seed)
        expected[name] = (right, probs)
        row = result.row(name)
        assert row.kind == "model" and row.images == 24 and row.resize == mode
        assert row.top1 == pytest.approx(right.mean())
        assert set(row.latency_ms) == {"1", "8"} and all(v > 0 for v in row.latency_ms.values())
    # beta's model says "crop": its pixels differ from a stretch, so its answers are its own
    crop_probs = expected["beta"][1]
    stretch_probs = np.array([fake_probabilities(simages.load(p, (20, 20))[None], 4, 2)[0]
                              for name in LABELS for p in sorted((data / name).glob("*.png"))])
    assert not np.allclose(crop_probs, stretch_probs)

    truth = np.repeat(np.arange(4), 6)
    fusion_rows = [r for r in result.rows if r.ensemble == "trio" and r.kind == "fusion" and "+T" not in r.name]
    assert [r.name for r in fusion_rows] == list(FUSIONS)
    # and every fusion again with temperatures cross-fitted (2 folds: never fitted on the image scored)
    from serve.ensemble import cross_fitted

    cv_rows = [r for r in result.rows if r.ensemble == "trio" and r.name.endswith("+T (cv)")]
    assert [r.name for r in cv_rows] == [f"{f} +T (cv)" for f in FUSIONS]
    for fusion, row in zip(FUSIONS, cv_rows):
        _, order, _ = cross_fitted([expected[n][1] for n in ("alpha", "beta", "gamma")], truth, fusion, folds=2)
        assert row.top1 == pytest.approx(np.mean(order[:, 0] == truth))
    best = max(("alpha", "beta", "gamma"), key=lambda n: expected[n][0].mean())
    for row in fusion_rows:
        _, order = rank([expected[n][1] for n in ("alpha", "beta", "gamma")], row.name)
        assert row.top1 == pytest.approx(np.mean(order[:, 0] == truth))
        assert row.reference == best
    oracle = result.row("oracle")
    assert oracle.top1 == pytest.approx(np.any([expected[n][0] for n in expected], axis=0).mean())
    assert oracle.top1 >= max(r.top1 for r in result.rows if r.kind != "oracle")
    assert set(result.row("mean").latency_ms) == {"1", "8"}
    assert any("ensemble trio" in n and "slowest member" in n for n in result.notes)
    versus = next(n for n in result.notes if "mean (its fusion) vs each member" in n)
    mean_right = rank([expected[n][1] for n in ("alpha", "beta", "gamma")], "mean")[1][:, 0] == truth
    assert f"alpha {(mean_right.mean() - expected['alpha'][0].mean()) * 100:+.2f} points" in versus

    files = ev.write_outputs(result, tmp_path / "out")
    doc = json.loads(files["json"].read_text())
    assert doc["images"] == 24 and len(doc["rows"]) == 3 + 2 * len(FUSIONS) + 1
    assert doc["cpu"]  # the CPU the latency came from
    assert len(doc["files"]) == 24 and doc["rows"][0]["predictions"][:3] == list(np.argmax(expected["alpha"][1][:3], 1))
    assert doc["truth"]["alpha"] == truth.tolist()
    table = files["markdown"].read_text()
    assert "| alpha | model | 24 |" in table and "trio:oracle" in table
    assert files["png"].stat().st_size > 1000


def test_variant_is_compared_with_its_source_paired(tmp_path, repo):
    """A variant (config parameter source=alpha) gets the paired difference, a bootstrap interval
    and McNemar's p against alpha; a different model with the same answers differs by zero."""
    from serve.repository import read_config, write_config
    folder = write_fake_model(repo, "alpha_int8", classes=4, size=(16, 16), labels=LABELS, seed=3)
    config = read_config(folder / "config.pbtxt")
    config.parameters["source"].string_value = "alpha"
    config.parameters["precision"].string_value = "int8"
    write_config(config, folder)
    data = _dataset(tmp_path / "data", broken=False)
    result = ev.evaluate(data, repo, ["alpha", "alpha_int8"], latency_runs=0, progress=False, log=lambda m: None)
    row = result.row("alpha_int8")
    a, _ = _expected(data, LABELS, (16, 16), "stretch", 1)
    b, _ = _expected(data, LABELS, (16, 16), "stretch", 3)
    assert row.reference == "alpha" and row.precision == "int8"
    assert row.delta_top1 == pytest.approx(b.mean() - a.mean())
    assert row.delta_interval[0] <= row.delta_top1 <= row.delta_interval[1]
    assert row.discordant == (int(np.sum(b & ~a)), int(np.sum(a & ~b)))
    assert row.mcnemar_p == pytest.approx(ev.mcnemar_exact(b, a)["p_value"])
    assert result.row("alpha").reference is None


def test_wnid_folders_map_through_the_class_index_and_csv_works(tmp_path, repo, monkeypatch):
    data = _dataset(tmp_path / "wnid", names=WNIDS, broken=False)
    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({str(i): [w, LABELS[i]] for i, w in enumerate(WNIDS)}))
    by_wnid = ev.evaluate(data, repo, ["alpha"], class_index=index, latency_runs=0, progress=False, log=lambda m: None)
    right, _ = _expected(data, WNIDS, (16, 16), "stretch", 1)
    assert by_wnid.row("alpha").top1 == pytest.approx(right.mean()) and by_wnid.row("alpha").unmapped == 0
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))  # no class index anywhere
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="WordNet id.*--class-index"):
        ev.evaluate(data, repo, ["alpha"], latency_runs=0, progress=False, log=lambda m: None)

    csv_file = tmp_path / "labels.csv"
    rows = ["file,label"] + [f"wnid/{w}/{i}.png,{LABELS[k]}" for k, w in enumerate(WNIDS) for i in range(6)]
    csv_file.write_text("\n".join(rows) + "\n")
    by_csv = ev.evaluate(csv_file, repo, ["alpha"], latency_runs=0, progress=False, log=lambda m: None)
    assert by_csv.images == 24 and by_csv.row("alpha").top1 == pytest.approx(right.mean())


def test_resize_override_and_limit(tmp_path, repo):
    data = _dataset(tmp_path / "data", broken=False)
    forced = ev.evaluate(data, repo, ["beta"], resize="stretch", limit=8, latency_runs=0, progress=False,
                         log=lambda m: None)
    assert forced.images == 8 and forced.classes == 4  # the limit spreads over the classes
    assert forced.row("beta").resize == "stretch" and forced.resize_override == "stretch"
    with pytest.raises(ConfigError, match="--resize 'squash'"):
        ev.evaluate(data, repo, ["beta"], resize="squash", progress=False, log=lambda m: None)


def test_a_model_that_fails_is_reported_and_the_others_go_on(tmp_path, repo):
    write_fake_model(repo, "broken", classes=4, size=(16, 16), labels=LABELS, fail_infer="GPU on fire")
    write_fake_model(repo, "other", classes=3, size=(16, 16), labels=["x", "y", "z"])
    data = _dataset(tmp_path / "data", broken=False)
    result = ev.evaluate(data, repo, ["alpha", "broken", "other"], latency_runs=1, progress=False,
                         log=lambda m: None)
    assert "GPU on fire" in result.row("broken").error
    assert "none of the data's labels" in result.row("other").error
    assert result.row("alpha").images == 24
    assert "error: inference failed" in result.markdown()


def test_readers_reject_bad_input_clearly(tmp_path, repo):
    with pytest.raises(ConfigError, match="does not exist"):
        ev.read_samples(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        ev.read_samples(tmp_path / "flat")
    bad = tmp_path / "bad.csv"
    bad.write_text("onlyonecolumn\n")
    with pytest.raises(ConfigError, match=r"bad.csv:1: expected 'file,label'"):
        ev.read_samples(bad)
    with pytest.raises(ConfigError, match="not in repository"):
        ev.evaluate(_dataset(tmp_path / "d", broken=False), repo, ["nope"], progress=False, log=lambda m: None)
    map_ = ev.LabelMap(LABELS, 4, {"n1": (2, "Fox")})
    assert [map_.index(x) for x in ("dog", "DOG", "n1", "3", "9", "zebra")] == [1, 1, 2, 3, -1, -1]


def test_statistics():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    test = ev.mcnemar_exact(a, b)
    assert (test["only_a"], test["only_b"]) == (6, 0)
    assert test["p_value"] == pytest.approx(2 / 2 ** 6)  # exact two-sided binomial, 6 discordant pairs
    assert ev.mcnemar_exact(a, a)["p_value"] == 1.0
    diff, low, high = ev.bootstrap_diff(a, b)
    assert diff == pytest.approx(0.6) and low < 0.6 < high and low > 0
    low, high = ev.wilson(84, 100)
    assert low < 0.84 < high and high - low == pytest.approx(0.14, abs=0.01)
    assert math.isclose(ev.mcnemar_exact(np.ones(1300, bool), np.ones(1300, bool))["p_value"], 1.0)


def test_cli_on_a_tiny_onnx_model(tmp_path):
    """The onnxruntime backend path end to end, through the command line."""
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_helpers import CLASSES, SIZE, tiny_classifier
    onnx = pytest.importorskip("onnx")
    from serve.repository import TensorSpec, make_config, write_config
    root = tmp_path / "models"
    (root / "tiny" / "1").mkdir(parents=True)
    onnx.save(tiny_classifier(), str(root / "tiny" / "1" / "model.onnx"))
    write_config(make_config("tiny", "onnxruntime_onnx", TensorSpec("images", np.uint8, (*SIZE, 3)),
                             TensorSpec("probabilities", np.float32, (CLASSES,)), max_batch_size=8,
                             resize="crop"), root / "tiny")
    names = [f"class_{i}" for i in range(CLASSES)]
    (root / "tiny" / "labels.txt").write_text("".join(n + "\n" for n in names))
    data = _dataset(tmp_path / "data", names=names[:3], per_class=3)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "export.evaluate", str(data), "--repository", str(root),
                           "--latency-runs", "2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "| tiny | model | 9 |" in proc.stdout
    assert "broken.jpg" in proc.stderr
    doc = json.loads((out / "evaluation.json").read_text())
    row = doc["rows"][0]
    assert row["platform"] == "onnxruntime_onnx" and row["resize"] == "crop"
    from serve.backends.onnxruntime import OnnxRuntimeRunner
    runner = OnnxRuntimeRunner("tiny", root / "tiny" / "1" / "model.onnx", TensorSpec("images", np.uint8, (*SIZE, 3)),
                               TensorSpec("probabilities", np.float32, (CLASSES,)))
    truth = np.repeat(np.arange(3), 3)
    batch = np.stack([simages.load(p, SIZE, mode="crop") for n in names[:3] for p in sorted((data / n).glob("*.png"))])
    with runner:
        expected = np.mean(runner.infer(batch).argmax(1) == truth)
    assert row["top1"] == pytest.approx(expected)
    bad = subprocess.run([sys.executable, "-m", "export.evaluate", str(tmp_path / "none"), "--repository", str(root)],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.slow
@pytest.mark.shared_data
def test_mobilenet_v2_on_imagenet_val(shared_dir, keras_home, tmp_path):
    """The real model, as served, on the 1300 labelled ImageNet validation images."""
    pytest.importorskip("tensorflow")
    from export.pipeline import export_model
    repo = tmp_path / "models"
    export_model("mobilenet_v2", repository=repo, progress=False)
    data = shared_dir / "datasets" / "imagenet_val"
    result = ev.evaluate(data, repo, ["mobilenet_v2"], latency_runs=0, progress=False, log=lambda m: None)
    row = result.row("mobilenet_v2")
    assert result.images == 1300 and result.classes == 725 and row.unmapped == 0
    # measured: 79.0 % (crop, the default mode) / 78.0 % (stretch) on these 1300 images; chance is 0.1 %
    assert row.resize == "crop" and 0.76 < row.top1 < 0.82 and row.top5 > 0.92  # top-5 measured 94.3 %
