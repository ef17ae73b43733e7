"""The issue's acceptance check: real MobileNetV2 ImageNet weights, real photos.

`python -m export mobilenet_v2 --weights imagenet` (KERAS_HOME = a copy of
../shared/keras_home) gives a model whose top-1 matches Keras on every photo
in ../shared/photos with relative L2 <= 1e-5. "Keras" here is the untouched
reference: keras.applications.MobileNetV2 + mobilenet_v2.preprocess_input on
float pixels, not our wrapper, so the in-graph preprocessing is checked too.
"""

from __future__ import annotations

import json
import os

import pytest

from keras_helpers import cli

pytestmark = pytest.mark.shared_data

def test_mobilenet_v2_imagenet_matches_keras_on_photos(keras_home, photos_dir, tmp_path):
    env = dict(os.environ, KERAS_HOME=str(keras_home))
    root = tmp_path / "models"
    result = cli(["mobilenet_v2", "--weights", "imagenet", "--repository", str(root), "--parity-images",
                  str(photos_dir), "--quiet"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "mobilenet_v2/1/parity.json").read_text())
    print(json.dumps({k: report[k] for k in ("images", "relative_l2", "max_abs_diff", "top1_agreement",
                                               "top5_agreement")}))
    assert report["passed"] and report["images"] == 13 and report["skipped"] == []
    assert report["relative_l2"] <= 1e-5
    assert report["top1_agreement"] == 1.0 and report["top5_agreement"] == 1.0
    labels = (root / "mobilenet_v2/labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[88] == "macaw"

    # The untouched Keras reference, in this process (weights from the file: no KERAS_HOME needed here).
    import keras
    import numpy as np
    import onnxruntime

    from serve import images

    batch, paths, skipped = images.load_folder(photos_dir, (224, 224))
    reference = keras.applications.MobileNetV2(
        weights=str(keras_home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"))
    ref = np.asarray(reference.predict(keras.applications.mobilenet_v2.preprocess_input(batch.astype("float32")),
                                       verbose=0))
    ours = onnxruntime.InferenceSession(str(root / "mobilenet_v2/1/model.onnx")).run(None, {"images": batch})[0]
    out = {"rows": [{"photo": p.name, "keras": int(r.argmax()), "onnx": int(o.argmax()),
                     "label": labels[int(r.argmax())], "relative_l2": float(np.linalg.norm(o - r) / np.linalg.norm(r)),
                     "max_abs": float(np.abs(o - r).max())} for p, r, o in zip(paths, ref, ours)],
           "relative_l2": float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))}
    print(json.dumps(out))
    rows = {row["photo"]: row for row in out["rows"]}
    assert len(rows) == 13
    for row in rows.values():
        assert row["keras"] == row["onnx"], row
        assert row["relative_l2"] <= 1e-5, row
    assert out["relative_l2"] <= 1e-5
    # The weights classify real photos (README of ../shared): the pipeline feeds RGB in the right order.
    assert rows["parrot.jpg"]["label"] == "macaw"
    assert rows["cat.bmp"]["label"] == "Egyptian_cat"
    assert rows["hot_dog.jpg"]["label"] == "hotdog"
