"""Fusion is pure numpy: mean, max-confidence, majority vote; ensemble specs and label checks."""

import numpy as np
import pytest

from serve.ensemble import Ensemble, fuse, rank, top_k
from serve.errors import ConfigError, InvalidInputError

# 3 members, 2 images, 4 classes
P = [
    np.array([[0.70, 0.10, 0.10, 0.10], [0.25, 0.25, 0.40, 0.10]], np.float32),
    np.array([[0.05, 0.55, 0.30, 0.10], [0.10, 0.60, 0.20, 0.10]], np.float32),
    np.array([[0.10, 0.50, 0.30, 0.10], [0.05, 0.05, 0.05, 0.85]], np.float32),
]


def test_mean_is_the_average():
    fused = fuse(P, "mean")
    np.testing.assert_allclose(fused, np.mean(P, axis=0), rtol=1e-6)
    # image 0: mean favours class 1 (0.383) over class 0 (0.283)
    assert top_k(fused, k=1)[0][0][0] == 1


def test_max_confidence_takes_the_most_confident_member():
    fused = fuse(P, "max-confidence")
    np.testing.assert_array_equal(fused[0], P[0][0])  # 0.70 is the highest top-1 for image 0
    np.testing.assert_array_equal(fused[1], P[2][1])  # 0.85 for image 1
    assert [row[0][0] for row in top_k(fused, k=1)] == [0, 3]


def test_majority_vote_counts_top1_and_breaks_ties_by_mean():
    scores, order = rank(P, "majority")
    # image 0: votes class0=1, class1=2 -> class 1 wins with 2/3
    assert order[0, 0] == 1 and scores[0, 1] == pytest.approx(2 / 3)
    # image 1: votes 2, 1, 3 -> a three-way tie at 1/3; mean probabilities 0.30, 0.217, 0.35 -> 3, 1, 2
    assert list(order[1, :3]) == [3, 1, 2]
    assert scores[1, 3] == pytest.approx(1 / 3)
    picks = top_k(scores, order, k=2)
    assert picks[1] == [(3, pytest.approx(1 / 3)), (1, pytest.approx(1 / 3))]


def test_single_member_is_itself():
    for mode in ("mean", "max-confidence"):
        np.testing.assert_allclose(fuse(P[:1], mode), P[0])


def test_top_k_is_bounded_by_classes():
    picks = top_k(P[0], k=10)
    assert len(picks) == 2 and len(picks[0]) == 4
    assert [i for i, _ in picks[0]] == [0, 1, 2, 3]  # stable order for equal scores


def test_bad_fusion_inputs():
    with pytest.raises(InvalidInputError, match="unknown fusion 'vote'"):
        fuse(P, "vote")
    with pytest.raises(InvalidInputError, match="shapes"):
        fuse([P[0], P[1][:, :3]])
    with pytest.raises(InvalidInputError, match="no member"):
        fuse([])


def test_parse_spec():
    ens = Ensemble.parse("imagenet=vgg16,resnet50,xception:majority")
    assert ens == Ensemble("imagenet", ("vgg16", "resnet50", "xception"), "majority")
    assert Ensemble.parse("e=a,b").fusion == "mean"
    for bad in ("noequals", "=a,b", "e=", "e=a,a", "e=a,b:loudest", "e=../x"):
        with pytest.raises(ConfigError):
            Ensemble.parse(bad)


def test_label_sets_must_match():
    ens = Ensemble("e", ("a", "b"))
    ens.check_labels({"a": ["x", "y"], "b": ["x", "y"]}, {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="'b' has 3 classes but 'a' has 2"):
        ens.check_labels({"a": ["x", "y"], "b": ["x", "y", "z"]}, {"a": 2, "b": 3})
    with pytest.raises(ConfigError, match="first difference at class 1: 'y' vs 'q'"):
        ens.check_labels({"a": ["x", "y"], "b": ["x", "q"]}, {"a": 2, "b": 2})


# ---- geometric mean and temperatures ---------------------------------------------------------
from serve.ensemble import FUSIONS, apply_temperature, fit_temperature, fit_temperatures, nll  # noqa: E402


def test_geometric_is_the_normalised_product():
    fused = fuse(P, "geometric")
    product = np.prod(np.stack(P).astype(np.float64), axis=0) ** (1 / 3)
    np.testing.assert_allclose(fused, product / product.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(fused.sum(axis=1), 1.0, rtol=1e-6)
    # two members that each rule out the other's favourite: the mean follows the more
    # confident one (class 0), the geometric mean takes the class both find plausible (1)
    q = [np.array([[0.86, 0.13, 0.01]], np.float32), np.array([[0.01, 0.13, 0.85]], np.float32)]
    assert top_k(fuse(q, "mean"), k=1)[0][0][0] == 0
    assert top_k(fuse(q, "geometric"), k=1)[0][0][0] == 1


def test_every_fusion_is_listed_and_a_single_member_keeps_its_top1():
    assert set(FUSIONS) == {"mean", "geometric", "max-confidence", "majority"}
    for mode in FUSIONS:
        _, order = rank(P[:1], mode)
        np.testing.assert_array_equal(order[:, 0], P[0].argmax(axis=1))


def test_temperature_scaling_softens_and_keeps_the_top1():
    hot = apply_temperature(P[2], 3.0)
    np.testing.assert_allclose(hot.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(hot.argmax(axis=1), P[2].argmax(axis=1))
    assert hot.max() < P[2].max()  # T > 1 softens
    np.testing.assert_allclose(apply_temperature(P[2], 1.0), P[2], rtol=1e-5)


def test_temperatures_change_which_member_dominates():
    # image 1: member 2 (0.85 on class 3) decides max-confidence; heated up (T=10) it no longer does
    assert top_k(fuse(P, "max-confidence"), k=1)[1][0][0] == 3
    cooled = fuse(P, "max-confidence", temperatures=[1.0, 1.0, 10.0])
    assert top_k(cooled, k=1)[1][0][0] == 1
    # the mean with temperatures is the mean of the scaled members
    t = [0.5, 1.0, 2.0]
    expected = np.mean([apply_temperature(p, x) for p, x in zip(P, t)], axis=0)
    np.testing.assert_allclose(fuse(P, "mean", temperatures=t), expected, rtol=1e-5)
    np.testing.assert_allclose(rank(P, "mean", temperatures=t)[0], expected, rtol=1e-5)
    np.testing.assert_allclose(fuse(P, "mean", temperatures=[1, 1, 1]), fuse(P, "mean"))


def test_bad_temperatures_are_rejected():
    for bad, match in (([1.0, 2.0], "2 temperatures for 3 members"), ([1.0, 0.0, 1.0], "> 0"),
                       ([1.0, float("nan"), 1.0], "> 0"), (["x", 1, 1], "positive number")):
        with pytest.raises(InvalidInputError, match=match):
            fuse(P, "mean", temperatures=bad)


def _overconfident(temperature: float, n: int = 4000, classes: int = 10, seed: int = 0):
    """Labels drawn from softmax(z); the model reports softmax(z * temperature) (overconfident for T > 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    true = np.exp(logits - logits.max(axis=1, keepdims=True))
    true /= true.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in true])
    reported = np.exp(logits * temperature - (logits * temperature).max(axis=1, keepdims=True))
    return (reported / reported.sum(axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("known", [0.4, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(known):
    probs, labels = _overconfident(known)
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(known, rel=0.08)
    assert nll(probs, labels, fitted) <= nll(probs, labels, 1.0) + 1e-9
    assert nll(probs, labels, fitted) < nll(probs, labels, fitted * 1.3)


def test_fit_temperatures_is_one_per_member_and_checks_its_input():
    (a, labels), (b, _) = _overconfident(2.0, n=2000), _overconfident(0.5, n=2000)
    ta, tb = fit_temperatures([a, b], labels)
    assert ta > 1.5 and tb < 1.0 + 0.3  # b's labels were drawn for a's logits, still same seed
    with pytest.raises(InvalidInputError, match="expected \\(N, classes\\) and \\(N,\\)"):
        fit_temperature(a, labels[:5])
    with pytest.raises(InvalidInputError, match="class indices"):
        fit_temperature(a, labels + 100)


def test_ensemble_carries_temperatures():
    ens = Ensemble("e", ("a", "b"), "geometric", temperatures={"b": 2.0})
    assert ens.temperatures == (1.0, 2.0) and ens.temperature_of("b") == 2.0
    assert Ensemble("e", ("a", "b"), temperatures=[1.5, 0.5]).temperatures == (1.5, 0.5)
    assert "T=1,2" in ens.describe()
    for bad, match in (({"c": 1.0}, "not members"), ([1.0], "1 temperatures for 2 members"), ([1, -1], "> 0")):
        with pytest.raises(ConfigError, match=match):
            Ensemble("e", ("a", "b"), temperatures=bad)


def test_cross_fitting_never_scores_an_image_with_temperatures_fitted_on_it():
    from serve.ensemble import cross_fitted

    (a, labels), (b, _) = _overconfident(3.0, n=1000, seed=1), _overconfident(1.0, n=1000, seed=1)
    scores, order, fitted = cross_fitted([a, b], labels, "mean", folds=2, seed=0)
    assert len(fitted) == 2 and all(t[0] > 2.0 and 0.7 < t[1] < 1.4 for t in fitted)
    part = np.random.default_rng(0).permutation(1000) % 2
    for k in range(2):  # part k is fused with the temperatures fitted on the other part
        expected, _ = rank([a[part == k], b[part == k]], "mean", fit_temperatures(
            [a[part != k], b[part != k]], labels[part != k]))
        np.testing.assert_allclose(scores[part == k], expected, rtol=1e-6)
    np.testing.assert_array_equal(order[:, 0], scores.argmax(axis=1))
    with pytest.raises(InvalidInputError, match="folds=1"):
        cross_fitted([a, b], labels, folds=1)
