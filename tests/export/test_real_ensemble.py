"""The real three-model ImageNet ensemble from ../shared: MobileNetV2 + MobileNet (v1) as Keras
applications and EfficientNet-Lite0 as a user's .keras file with its labels.txt, exported, defined in
the repository, served by one hub, fused; and evaluated on labelled ImageNet images (slow)."""

from __future__ import annotations

import os

import pytest

from keras_helpers import cli

pytestmark = [pytest.mark.slow, pytest.mark.shared_data,
              pytest.mark.timeout(2400)]  # three exports (each a minute or two on 2 cores) + 200 images x 3 models

# photos every member gets right whether the model stretches or centre-crops (checked both ways)
PHOTOS = {"dragonfly.bmp": "dragonfly", "bird.bmp": "chickadee", "cat.bmp": "Egyptian_cat", "parrot.jpg": "macaw"}


@pytest.fixture(scope="module")
def trio(keras_home, shared_dir, tmp_path_factory):
    env = dict(os.environ, KERAS_HOME=str(keras_home))
    root = tmp_path_factory.mktemp("trio") / "models"
    sources = ["mobilenet_v2", "mobilenet", str(shared_dir / "models/efficientnet_lite0/efficientnet_lite0.keras")]
    for source in sources:
        result = cli([source, "--repository", str(root), "--quiet"], env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    from export.ensemble import create

    create(root, "imagenet=mobilenet_v2,mobilenet,efficientnet_lite0")
    return root


def test_the_three_real_models_serve_as_one_ensemble(trio, photos_dir):
    from serve.hub import ModelHub

    hub = ModelHub(trio, models=["imagenet"]).load()
    try:
        assert hub.find("imagenet").ready
        assert sorted(hub.models) == ["efficientnet_lite0", "mobilenet", "mobilenet_v2"]
        for photo, expected in PHOTOS.items():
            result = hub.classify((photos_dir / photo).read_bytes(), ["imagenet"], top=3)
            assert [m.model for m in result.models] == ["mobilenet_v2", "mobilenet", "efficientnet_lite0"]
            assert all(len(m.predictions) == 3 for m in result.models)
            (fused,) = result.ensembles
            assert fused.predictions[0][0] == expected, (photo, fused.predictions)
            # every member agrees on these clear photos
            assert all(m.predictions[0][0] == expected for m in result.models), photo
    finally:
        hub.close()


def test_evaluation_reports_members_fusions_temperatures_and_oracle(trio, shared_dir, keras_home, tmp_path):
    from export.evaluate import evaluate
    from serve.ensemble import FUSIONS

    result = evaluate(shared_dir / "datasets/imagenet_val", trio, ensembles=["imagenet"], limit=200,
                      latency_runs=0, progress=False, log=lambda _: None)
    names = {(r.ensemble, r.name) for r in result.rows}
    for fusion in FUSIONS:
        assert ("imagenet", fusion) in names and ("imagenet", f"{fusion} +T (cv)") in names
    assert ("imagenet", "oracle") in names
    members = [result.row(m).top1 for m in ("mobilenet_v2", "mobilenet", "efficientnet_lite0")]
    assert min(members) > 0.6  # real ImageNet weights (about 0.8 on these images)
    oracle = next(r for r in result.rows if r.name == "oracle")
    assert oracle.top1 >= max(members)
    mean = next(r for r in result.rows if r.ensemble == "imagenet" and r.name == "mean")
    assert mean.mcnemar_p is not None and mean.reference in ("mobilenet_v2", "mobilenet", "efficientnet_lite0")
