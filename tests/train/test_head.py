"""The linear head's full-batch fit: L2 chosen on validation, the saved Keras head computes the same answer."""

from __future__ import annotations

import numpy as np
import pytest

from train import head as head_lib


def _blobs(seed=0, n=300, dim=24, classes=3, spread=2.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim)) * spread
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(0, 1.5, (n, dim)) + 5.0).astype(np.float32)  # offset: standardising matters
    return x, y


def test_linear_fit_picks_the_best_validation_l2_of_its_path():
    pytest.importorskip("scipy")
    x, y = _blobs()
    fit = head_lib.fit_linear(x[:200], y[:200], x[200:], y[200:], classes=3)
    assert [p["l2"] for p in fit.path] == sorted(head_lib.L2_GRID, reverse=True)  # strongest first
    best = max(fit.path, key=lambda p: (p["val_accuracy"], -p["val_loss"]))
    assert fit.l2 == best["l2"] and round(fit.val_accuracy, 4) == best["val_accuracy"]
    assert fit.val_accuracy >= 0.9
    assert len(fit.history["val_accuracy"]) == fit.iterations > 0
    # the strongest L2 gives the smallest kernel
    strong = head_lib.fit_linear(x[:200], y[:200], x[200:], y[200:], classes=3, l2_grid=(1.0,))
    weak = head_lib.fit_linear(x[:200], y[:200], x[200:], y[200:], classes=3, l2_grid=(1e-4,))
    assert np.abs(strong.kernel).sum() < 0.5 * np.abs(weak.kernel).sum()


def test_linear_head_model_computes_the_fit():
    pytest.importorskip("scipy")
    pytest.importorskip("tensorflow")
    x, y = _blobs(seed=1)
    fit = head_lib.fit_linear(x[:200], y[:200], x[200:], y[200:], classes=3)
    logits = ((x - fit.mean) / fit.scale) @ fit.kernel + fit.bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    got = head_lib.predict(head_lib.linear_head_model(fit), x)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_class_weights_move_the_boundary_towards_the_rare_class():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(270, np.int64), np.ones(30, np.int64)]
    x = (y[:, None] * 1.0 + rng.normal(0, 1.0, (300, 1))).astype(np.float32)  # overlapping classes
    weights = head_lib.class_weights(y, 2)
    plain = head_lib.fit_linear(x, y, x, y, classes=2, l2_grid=(1e-3,))
    balanced = head_lib.fit_linear(x, y, x, y, classes=2, l2_grid=(1e-3,),
                                   sample_weight=np.asarray([weights[int(c)] for c in y]))

    def predicted_rare(fit):
        logits = ((x - fit.mean) / fit.scale) @ fit.kernel + fit.bias
        return int((logits.argmax(axis=1) == 1).sum())

    assert predicted_rare(balanced) > predicted_rare(plain)


def test_rebased_head_gives_the_same_logits_under_other_statistics():
    pytest.importorskip("scipy")
    x, y = _blobs(seed=3)
    fit = head_lib.fit_linear(x[:200], y[:200], x[200:], y[200:], classes=3)
    mean, scale = x.mean(axis=0) + 0.7, x.std(axis=0) * 1.9  # any other statistics
    kernel, bias = head_lib.rebased(fit, mean, scale)
    np.testing.assert_allclose(((x - mean) / scale) @ kernel + bias, ((x - fit.mean) / fit.scale) @ fit.kernel + fit.bias,
                               rtol=1e-4, atol=1e-3)


def test_refit_keeps_the_chosen_strength_and_learns_from_every_photo():
    """Validation chooses L2, the refit uses training + validation: the optimum of that data at that strength."""
    pytest.importorskip("scipy")
    x, y = _blobs(seed=4, n=400)
    chosen = head_lib.fit_linear(x[:200], y[:200], x[200:300], y[200:300], classes=3)
    refit = head_lib.refit_linear(chosen, x[:300], y[:300], classes=3)
    assert refit.l2 == chosen.l2 and refit.val_accuracy == chosen.val_accuracy and refit.path == chosen.path
    np.testing.assert_allclose(refit.mean, x[:300].mean(axis=0), rtol=1e-5)  # its own standardisation
    assert refit.iterations == len(refit.history["loss"]) > 0
    # the same weights as a cold fit of all 300 photos at that strength (a convex loss: one optimum) ...
    cold = head_lib.fit_linear(x[:300], y[:300], x[300:], y[300:], classes=3, l2_grid=(chosen.l2,))
    logits = lambda f: ((x[300:] - f.mean) / f.scale) @ f.kernel + f.bias  # noqa: E731
    np.testing.assert_allclose(logits(refit), logits(cold), atol=2e-2)
    # ... and not the chosen head's, which never saw photos 200-299
    assert np.abs(logits(refit) - logits(chosen)).max() > 10 * np.abs(logits(refit) - logits(cold)).max()
    # the warm start begins at the chosen head: refitting its own training photos needs (almost) no step
    again = head_lib.refit_linear(chosen, x[:200], y[:200], classes=3)
    assert again.iterations <= 3
    np.testing.assert_allclose(logits(again), logits(chosen), atol=2e-2)
