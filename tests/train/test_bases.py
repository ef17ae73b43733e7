"""Headless bases, the fine-tuning cut, heads on separable features, fine-tuning on a tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from serve.errors import ConfigError  # noqa: E402
from train import bases, head as head_lib  # noqa: E402
from train.pipeline import TrainOptions, train  # noqa: E402


@pytest.fixture(scope="module")
def small_base():
    return bases.build_base("mobilenet_v2", weights=None, input_size=(96, 96), alpha=0.35, seed=0)


def test_seeded_base_has_reproducible_weights(small_base):
    again = bases.build_base("mobilenet_v2", weights=None, input_size=(96, 96), alpha=0.35, seed=0)
    other = bases.build_base("mobilenet_v2", weights=None, input_size=(96, 96), alpha=0.35, seed=1)
    assert again.weights_sha256 == small_base.weights_sha256 != other.weights_sha256
    assert small_base.key()["input_size"] == [96, 96] and small_base.preprocessing == "tf"


def test_alpha_only_for_mobilenets():
    with pytest.raises(ConfigError, match="alpha"):
        bases.build_base("resnet50", weights=None, input_size=(64, 64), alpha=0.5)


def test_cut_prefers_the_narrow_block_output(small_base):
    import keras

    cut, top, layers = bases.split_top(small_base, 10)
    assert cut == "block_15_add"  # not block_16_expand's 6x wider output
    assert layers[0] == "block_16_expand" and layers[-1] == "out_relu"
    bottom = bases.bottom_model(small_base, cut)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    direct = np.asarray(small_base.network(x, training=False))
    through = np.asarray(top(bottom(x, training=False), training=False))
    np.testing.assert_allclose(through, direct, rtol=1e-5, atol=1e-6)
    assert isinstance(top, keras.Model)
    with pytest.raises(ConfigError, match="fine-tune-layers"):
        bases.split_top(small_base, 10_000)


def test_pool_stages_options():
    assert TrainOptions(data_dir="d").pool_stages == 3  # the default: multi-scale features
    assert TrainOptions(data_dir="d", fine_tune_layers=10).pool_stages == 1
    with pytest.raises(ConfigError, match="pool-stages 0"):
        TrainOptions(data_dir="d", pool_stages=0)
    with pytest.raises(ConfigError, match="fine-tune-layers"):
        TrainOptions(data_dir="d", pool_stages=2, fine_tune_layers=10)


def test_stage_layers_are_the_last_layer_of_each_coarsest_resolution(small_base):
    """96x96 MobileNetV2: out_relu 3x3, block_13_expand_relu 6x6 (the last 6x6 tensor, before block 13's
    stride-2 depthwise; its 7x7 padding is not a resolution), block_6_expand_relu 12x12."""
    assert bases.stage_layers(small_base, 1) == ("out_relu",)
    assert bases.stage_layers(small_base, 3) == ("out_relu", "block_13_expand_relu", "block_6_expand_relu")
    assert len(bases.stage_layers(small_base, 50)) == 5  # 3, 6, 12, 24, 48: no more resolutions than that
    with pytest.raises(ConfigError, match="pool-stages"):
        bases.stage_layers(small_base, 0)


def test_pooled_features_concatenate_each_stage_average(small_base):
    """The extractor's features are the stages' global averages, deepest first; the cache key names them."""
    import keras

    staged = bases.with_stages(small_base, 3)
    assert staged.pooled_layers == ("out_relu", "block_13_expand_relu", "block_6_expand_relu")
    assert bases.with_stages(small_base, 1).pooled_layers == ()
    assert "pooled_layers" not in small_base.key()  # one stage: the key single-output features always had
    assert staged.key()["pooled_layers"] == list(staged.pooled_layers) and staged.key() != small_base.key()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    net = small_base.network
    probe = keras.Model(net.input, [net.get_layer(n).output for n in staged.pooled_layers])
    expected = np.concatenate([np.asarray(t).mean(axis=(1, 2)) for t in probe(x, training=False)], axis=1)
    pooled = np.asarray(bases.pooled_model(staged)(x, training=False))
    assert pooled.shape == (2, 1280 + 192 + 96)  # alpha 0.35: out_relu keeps 1280; 6x and 6x expansions
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_heads_learn_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (4, 32)) * 3
    y = rng.integers(0, 4, 400)
    x = centers[y] + rng.normal(0, 1, (400, 32))
    results = head_lib.train_heads(x[:300], y[:300], x[300:], y[300:], classes=4, epochs=30, batch_size=32,
                                   progress=False)
    assert {r.kind for r in results} == {"linear", "mlp"}
    assert results[0].val_accuracy >= results[1].val_accuracy
    assert results[0].val_accuracy >= 0.95
    probs = head_lib.predict(results[0].model, x[300:])
    assert probs.shape == (100, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_fine_tuning_reports_and_reverts_when_not_better(tiny_dataset, tmp_path):
    result = train(TrainOptions(data_dir=tiny_dataset, output=tmp_path / "ft", cache_dir=tmp_path / "cache",
                                base="mobilenet_v2", alpha=0.35, image_size=96, weights="none", epochs=2,
                                heads=("linear",), fine_tune_layers=10, fine_tune_epochs=1, progress=False))
    report = result.report
    assert report["base"]["pooled_layers"] == ["out_relu"]  # fine-tuning pools the top's output only
    fine = report["fine_tune"]
    assert fine["cut"] == "block_15_add" and report["base"]["fine_tune_cut"] == "block_15_add"
    assert fine["layers"] == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    assert fine["batchnorm"] == "frozen (inference mode)" and fine["trainable_parameters"] > 0
    assert report["features"]["feature_shape"][-1] == 56  # block_15_add of alpha 0.35: 3x3x56 at 96x96
    assert fine["kept"] == (fine["val_accuracy"] > report["heads"][0]["val_accuracy"])
    # fine-tuning is kept or reverted on validation: the head is not refit on those photos
    assert report["refit"] == {"done": False, "why": "--fine-tune-layers (kept or reverted on validation)"}
    assert report["features"]["misses"] == ["plain"]  # nor are validation views extracted for it
    check = report["joined_model_check"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4


def test_a_keras_model_file_is_a_base(tiny_dataset, tmp_path):
    """--base PATH.keras (a user's classifier, e.g. EfficientNet-Lite0): cut before its global pooling."""
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input(shape=(64, 64, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(images)
    x = keras.layers.Conv2D(12, 3, strides=2, activation="relu", name="stem")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    own = keras.Model(images, keras.layers.Dense(10, activation="softmax")(x))
    path = tmp_path / "my-net.keras"
    own.save(path)
    result = train(TrainOptions(data_dir=tiny_dataset, base=str(path), output=tmp_path / "out",
                                cache_dir=tmp_path / "cache", progress=False))
    report = result.report
    assert report["base"]["base"] == "my_net" and report["base"]["preprocessing"] == "none"
    assert report["base"]["input_size"] == [64, 64] and report["features"]["feature_shape"] == [12]
    assert report["base"]["pooled_layers"] == ["stem"]  # one resolution below the input's: one stage
    check = report["joined_model_check"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    with pytest.raises(ConfigError, match="takes 64x64"):
        bases.build_base(str(path), input_size=(96, 96))
    with pytest.raises(ConfigError, match="no such file"):
        bases.build_base(str(tmp_path / "absent.keras"))
